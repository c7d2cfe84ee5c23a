"""Models, registered by name (see ``registry``).

Every module in this package (other than ``registry`` and private ``_*`` modules) is imported here, and
each model module registers itself on import, so adding a model means adding exactly one file::

    from training.models import build_model, list_models
    model = build_model("bev_segnet", {"cell_size_m": 0.8})
"""

from __future__ import annotations

import importlib
import pkgutil

from training.models.registry import (
    DEFAULT_TRAIN_SPEC,
    ModelSpec,
    TrainSpec,
    build_model,
    config_to_dict,
    count_parameters,
    get_model_spec,
    get_train_spec,
    list_models,
    make_config,
    model_info,
    register_model,
    register_train_spec,
)

__all__ = [
    "DEFAULT_TRAIN_SPEC",
    "ModelSpec",
    "TrainSpec",
    "build_model",
    "config_to_dict",
    "count_parameters",
    "get_model_spec",
    "get_train_spec",
    "list_models",
    "make_config",
    "model_info",
    "register_model",
    "register_train_spec",
]


def _discover_models() -> None:
    """Import every model module in this package so that each registers itself."""
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.name == "registry" or module.name.startswith("_"):
            continue
        importlib.import_module(f"{__name__}.{module.name}")


_discover_models()
