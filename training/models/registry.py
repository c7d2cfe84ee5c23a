"""The model registry: every model is a named ``ModelSpec`` (a config dataclass plus a builder).

Modelled on torchtitan's model specs: a model module describes itself once, at import time::

    @dataclass
    class MyNetConfig:
        channels: int = 32

    register_model("my_net", MyNetConfig, lambda config: MyNet(config), description="...")

and everything else (trainer, evaluator, serving package, tests) only ever says
``build_model("my_net", {"channels": 64})``. ``training/models/__init__.py`` imports every module in the
package, so adding a model means adding exactly one file.

Overrides are coerced into the config dataclass's field types (so strings from ``--set`` flags or
environment variables and lists from a JSON checkpoint both work); an unknown model name or config key
is a ``ValueError`` that names what is allowed.

How a model is *trained* is its ``TrainSpec`` (torchtitan's TrainSpec): builders for the loss, the
optimizer and the learning-rate schedule. A model that needs its own registers one next to its
``register_model`` call::

    register_train_spec("my_net", TrainSpec(build_loss=my_loss, build_optimizer=objectives.adamw,
                                            build_lr_scheduler=objectives.warmup_cosine_schedule))

and the trainer asks ``get_train_spec(name)``; a model that registers none gets ``DEFAULT_TRAIN_SPEC``
(``PointLoss``, AdamW, warm-up + cosine; ``training.objectives``).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from pipeline.config import coerce
from training import objectives

__all__ = [
    "ModelSpec",
    "TrainSpec",
    "DEFAULT_TRAIN_SPEC",
    "register_model",
    "register_train_spec",
    "get_train_spec",
    "get_model_spec",
    "list_models",
    "make_config",
    "build_model",
    "config_to_dict",
    "count_parameters",
    "model_info",
    "model_modules",
]


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model: its name, config dataclass, builder and a one-liner."""

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    description: str = ""

    def default_config(self) -> Any:
        """A config instance with every field at its default."""
        return self.config_cls()


_MODELS: dict[str, ModelSpec] = {}


def register_model(
    name: str, config_cls: type, builder: Callable[[Any], nn.Module], description: str = ""
) -> ModelSpec:
    """Register ``builder(config) -> nn.Module`` under ``name``; returns the spec.

    ``config_cls`` must be a dataclass whose fields all have defaults (``build_model(name)`` with no
    overrides must work). Registering a second, different model under a taken name is an error;
    re-registering the same builder (a module imported twice, e.g. under importlib.reload) replaces it.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise ValueError(f"model {name!r}: config_cls must be a dataclass, got {config_cls!r}")
    try:
        config_cls()
    except TypeError as exc:
        raise ValueError(
            f"model {name!r}: every field of {config_cls.__name__} needs a default ({exc})"
        ) from None
    existing = _MODELS.get(name)
    if existing is not None and _qualified(existing.build) != _qualified(builder):
        raise ValueError(
            f"model {name!r} is already registered by {_qualified(existing.build)}; pick another name"
        )
    spec = ModelSpec(name=name, config_cls=config_cls, build=builder, description=description)
    _MODELS[name] = spec
    return spec


def _qualified(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; ``ValueError`` listing the registered names otherwise."""
    try:
        return _MODELS[name]
    except (KeyError, TypeError):
        known = ", ".join(list_models()) or "(none registered)"
        raise ValueError(f"unknown model {name!r}; registered models: {known}") from None


def model_modules(name: str) -> tuple[str, ...]:
    """The modules that define model ``name`` (its config and builder), for content keys: models are
    imported by discovery, which the static import analysis behind them cannot follow."""
    spec = get_model_spec(name)
    return tuple(sorted({spec.config_cls.__module__, spec.build.__module__}))


def make_config(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The config of model ``name``: its defaults with ``overrides`` coerced into the field types."""
    spec = get_model_spec(name)
    config = spec.default_config()
    if not overrides:
        return config
    hints = typing.get_type_hints(spec.config_cls)
    allowed = [f.name for f in dataclasses.fields(config)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in allowed:
            raise ValueError(
                f"unknown config key {key!r} for model {name!r}; allowed keys: {', '.join(allowed)}"
            )
        changes[key] = coerce(f"{name}.{key}", value, hints[key])
    config = dataclasses.replace(config, **changes)
    # Let the config check cross-field invariants (e.g. range bounds in order) if it wants to.
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def build_model(name: str, overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """Build model ``name`` from its default config updated by ``overrides``.

    The returned module carries ``model_name`` and ``config`` attributes so checkpoints and serving
    packages can record how to rebuild it: ``build_model(m.model_name, config_to_dict(m.config))``.
    Parameter initialisation uses torch's global RNG, so ``torch.manual_seed`` makes builds repeatable.
    """
    spec = get_model_spec(name)
    config = make_config(name, overrides)
    model = spec.build(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"builder of model {name!r} returned {type(model).__name__}, not an nn.Module")
    model.model_name = name
    model.config = config
    return model


@dataclass(frozen=True)
class TrainSpec:
    """How a model is trained: builders the trainer calls once, identically on every rank.

    * ``build_loss(train_counts)``: the train split's points per class (``[NUM_CLASSES]``) -> a module
      called as ``loss(logits [B, N, C], labels [B, N], sample_weight [B])`` -> a scalar.
    * ``build_optimizer(model, train)``: the model and the job's train settings (``lr``,
      ``weight_decay``, ...) -> the optimizer.
    * ``build_lr_scheduler(optimizer, total_steps)``: stepped once per optimizer step.
    """

    build_loss: Callable[[np.ndarray], nn.Module]
    build_optimizer: Callable[[nn.Module, Mapping[str, Any]], torch.optim.Optimizer]
    build_lr_scheduler: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


DEFAULT_TRAIN_SPEC = TrainSpec(build_loss=objectives.point_loss, build_optimizer=objectives.adamw,
                               build_lr_scheduler=objectives.warmup_cosine_schedule)
_TRAIN_SPECS: dict[str, TrainSpec] = {}


def register_train_spec(name: str, spec: TrainSpec) -> TrainSpec:
    """Train model ``name`` (registered already) with ``spec`` instead of ``DEFAULT_TRAIN_SPEC``."""
    get_model_spec(name)
    if not isinstance(spec, TrainSpec):
        raise ValueError(f"model {name!r}: the train spec must be a TrainSpec, got {type(spec).__name__}")
    _TRAIN_SPECS[name] = spec
    return spec


def get_train_spec(name: str) -> TrainSpec:
    """The train spec of model ``name``: its own if it registered one, else ``DEFAULT_TRAIN_SPEC``."""
    get_model_spec(name)
    return _TRAIN_SPECS.get(name, DEFAULT_TRAIN_SPEC)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a model config (tuples become lists); ``make_config`` accepts it back."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_info(model: nn.Module) -> dict[str, Any]:
    """A small summary for logs and run records: name, parameter counts, size and config."""
    params = count_parameters(model)
    buffers = sum(b.numel() for b in model.buffers())
    config = getattr(model, "config", None)
    return {
        "model": getattr(model, "model_name", type(model).__name__),
        "parameters": params,
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "buffers": buffers,
        "size_mb": round(
            sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20, 3
        ),
        "per_stage_parameters": {
            child_name: count_parameters(child) for child_name, child in model.named_children()
        },
        "config": config_to_dict(config) if dataclasses.is_dataclass(config) else None,
    }
