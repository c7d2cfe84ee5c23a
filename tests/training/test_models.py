"""The model registry and the registered models' contract.

Every test marked with ``MODELS`` runs for every registered model, so a new model file gets the whole
contract checked: ``forward(points [B, N, 4] float32, valid [B, N] bool) -> logits [B, N, K]``, with
TorchScript and torch.export (dynamic B and N) matching eager, padding and out-of-grid points that do not
leak into other points, permutation equivariance, trainability and deterministic initialisation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.export import Dim, export

from pipeline.taxonomy import NUM_CLASSES
from training import models
from training.models import (
    build_model,
    config_to_dict,
    count_parameters,
    get_model_spec,
    list_models,
    make_config,
    model_info,
    register_model,
    registry,
)

MODELS = pytest.mark.parametrize("name", list_models())
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run these CPU tests on one intra-op thread.

    The suite runs beside Spark jobs and other tests; on an oversubscribed machine OpenMP's spin-waiting
    makes multi-threaded small convolutions many times slower than one thread (90 s vs 12 s measured).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _scene(
    batch: int, num_points: int, seed: int, valid_share: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random LiDAR-like points (mostly within 40 m, a few beyond the default grid) and a valid mask."""
    generator = torch.Generator().manual_seed(seed)
    xy = (torch.rand(batch, num_points, 2, generator=generator) * 2 - 1) * 60.0
    z = torch.randn(batch, num_points, 1, generator=generator) - 1.0
    intensity = torch.rand(batch, num_points, 1, generator=generator)
    points = torch.cat([xy, z, intensity], dim=2)
    valid = torch.rand(batch, num_points, generator=generator) < valid_share
    return points, valid


def _eval_model(name: str, overrides: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, overrides).eval()
    # Non-trivial BatchNorm statistics so eval mode is not an identity that hides bugs.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def test_bev_segnet_is_discovered_and_registered():
    assert "bev_segnet" in list_models()
    spec = get_model_spec("bev_segnet")
    assert spec.name == "bev_segnet"
    assert dataclasses.is_dataclass(spec.default_config())


def test_unknown_model_name_is_a_value_error_listing_known_models():
    with pytest.raises(ValueError, match=r"unknown model 'no_such_net'.*bev_segnet"):
        build_model("no_such_net")
    with pytest.raises(ValueError, match="registered models"):
        get_model_spec("no_such_net")


def test_unknown_config_key_is_a_value_error_naming_key_and_allowed_keys():
    with pytest.raises(ValueError) as excinfo:
        build_model("bev_segnet", {"cell_size": 0.8})
    message = str(excinfo.value)
    assert "'cell_size'" in message
    assert "cell_size_m" in message and "backbone_channels" in message


def test_bad_override_values_are_value_errors():
    with pytest.raises(ValueError, match="cell_size_m"):
        build_model("bev_segnet", {"cell_size_m": "wide"})
    with pytest.raises(ValueError, match="pooling"):
        build_model("bev_segnet", {"pooling": "median"})
    with pytest.raises(ValueError, match="x_range_m"):
        build_model("bev_segnet", {"x_range_m": [10.0, -10.0]})


def test_overrides_change_the_config_and_the_model():
    default = build_model("bev_segnet")
    assert default.config.grid_size() == (256, 256)
    assert (default.grid.width, default.grid.height) == (256, 256)

    # Strings (CLI flags) and lists (JSON) are coerced into the field types.
    coarse = build_model(
        "bev_segnet", {"cell_size_m": "0.8", "x_range_m": "-25.6,25.6", "backbone_channels": [16, 32]}
    )
    assert coarse.config.cell_size_m == 0.8
    assert coarse.config.x_range_m == (-25.6, 25.6)
    assert coarse.config.backbone_channels == (16, 32)
    assert coarse.config.grid_size() == (64, 128)
    assert (coarse.grid.width, coarse.grid.height) == (64, 128)
    assert len(coarse.backbone.levels) == 2
    assert count_parameters(coarse) < count_parameters(default)
    points, valid = _scene(2, 64, seed=1)
    with torch.no_grad():
        assert coarse.eval()(points, valid).shape == (2, 64, NUM_CLASSES)


def test_config_round_trips_through_a_json_dict():
    model = build_model("bev_segnet", {"cell_size_m": 0.5, "pooling": "mean"})
    again = make_config("bev_segnet", config_to_dict(model.config))
    assert again == model.config


def test_register_model_refuses_a_taken_name_and_lists_new_models(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    @dataclasses.dataclass
    class TinyConfig:
        width: int = 4

    def build_tiny(config: TinyConfig) -> torch.nn.Module:
        return torch.nn.Linear(4, config.width)

    with pytest.raises(ValueError, match="already registered"):
        register_model("bev_segnet", TinyConfig, build_tiny)
    register_model("tiny", TinyConfig, build_tiny)
    assert "tiny" in list_models()
    assert build_model("tiny", {"width": 3}).out_features == 3

    @dataclasses.dataclass
    class NoDefaults:
        width: int

    with pytest.raises(ValueError, match="needs a default"):
        register_model("broken", NoDefaults, build_tiny)


def test_model_info_counts_parameters_per_stage():
    model = build_model("bev_segnet")
    info = model_info(model)
    assert info["model"] == "bev_segnet"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert 200_000 <= info["parameters"] <= 1_000_000  # the size the training budget was planned for
    assert sum(info["per_stage_parameters"].values()) == info["parameters"]
    assert info["config"]["cell_size_m"] == pytest.approx(0.4)
    assert model.model_info()["parameters"] == info["parameters"]


def test_package_discovery_registers_a_new_model_file(tmp_path, monkeypatch):
    """Adding a model is adding one file: discovery imports it and it registers itself."""
    import sys

    assert "training.models.bev_segnet" in sys.modules  # loaded by discovery, not by an explicit import
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    (tmp_path / "extra_net.py").write_text(
        "import dataclasses\n"
        "import torch\n"
        "from training.models.registry import register_model\n"
        "@dataclasses.dataclass\n"
        "class ExtraConfig:\n"
        "    width: int = 2\n"
        "register_model('extra_net', ExtraConfig, lambda config: torch.nn.Linear(4, config.width))\n"
    )
    (tmp_path / "_private_helpers.py").write_text("raise RuntimeError('private modules are not imported')\n")
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "training.models.extra_net", raising=False)
    try:
        models._discover_models()
        assert "extra_net" in list_models()
        assert build_model("extra_net", {"width": 5}).out_features == 5
    finally:
        sys.modules.pop("training.models.extra_net", None)


# ---------------------------------------------------------------------------------------------------
# The model contract, for every registered model
# ---------------------------------------------------------------------------------------------------


@MODELS
def test_output_shape_dtype_and_finite_logits_for_padded_points(name):
    model = _eval_model(name)
    points, valid = _scene(2, 500, seed=2)
    points[~valid] = float("nan")  # padding may hold anything; it must not reach any output
    with torch.no_grad():
        logits = model(points, valid)
    assert logits.shape == (2, 500, NUM_CLASSES)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@MODELS
def test_script_and_export_match_eager_on_two_shapes(name):
    model = _eval_model(name)
    scripted = torch.jit.script(model)
    batch, num_points = Dim("batch", min=1, max=64), Dim("points", min=1, max=1_000_000)
    example = _scene(2, 300, seed=3)
    exported = export(
        model,
        example,
        dynamic_shapes={"points": {0: batch, 1: num_points}, "valid": {0: batch, 1: num_points}},
    ).module()
    for shape, seed in (((2, 300), 4), ((3, 517), 5), ((1, 1), 6)):
        points, valid = _scene(*shape, seed=seed)
        with torch.no_grad():
            eager = model(points, valid)
            from_script = scripted(points, valid)
            from_export = exported(points, valid)
        assert eager.shape == (*shape, NUM_CLASSES)
        torch.testing.assert_close(from_script, eager, atol=ATOL, rtol=0)
        torch.testing.assert_close(from_export, eager, atol=ATOL, rtol=0)


def test_mean_pooling_scripts_and_exports_too():
    model = _eval_model("bev_segnet", {"pooling": "mean", "cell_size_m": 0.8})
    scripted = torch.jit.script(model)
    batch, num_points = Dim("batch", min=1, max=64), Dim("points", min=1, max=1_000_000)
    dynamic = {"points": {0: batch, 1: num_points}, "valid": {0: batch, 1: num_points}}
    exported = export(model, _scene(2, 200, seed=7), dynamic_shapes=dynamic).module()
    points, valid = _scene(3, 333, seed=8)
    with torch.no_grad():
        eager = model(points, valid)
        torch.testing.assert_close(scripted(points, valid), eager, atol=ATOL, rtol=0)
        torch.testing.assert_close(exported(points, valid), eager, atol=ATOL, rtol=0)


@MODELS
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_padded_points_do_not_change_valid_points_logits(name, mode):
    model = _eval_model(name)
    model.train(mode == "train")
    first, _ = _scene(1, 400, seed=9, valid_share=1.0)
    second, _ = _scene(1, 250, seed=10, valid_share=1.0)
    # Pad the shorter frame with points *right next to* its real ones and at the origin, where zeroed
    # padding would land, next to a real point: if padding leaked into the scatter, the cells (and so
    # the logits) of the real points would change.
    second[0, 0] = torch.tensor([0.1, 0.1, -1.0, 0.5])
    padding = torch.cat([second[:, :100] + 0.05, torch.zeros(1, 50, 4)], dim=1)
    padded_second = torch.cat([second, padding], dim=1)
    points = torch.cat([first, padded_second], dim=0)
    valid = torch.ones(2, 400, dtype=torch.bool)
    valid[1, 250:] = False
    with torch.no_grad():
        # Train mode: BatchNorm uses batch statistics, so compare batches of the same frames.
        reference = model(torch.cat([first, torch.cat([second, torch.zeros(1, 150, 4)], 1)]), valid)
        alone = model(second, torch.ones(1, 250, dtype=torch.bool)) if mode == "eval" else None
        padded = model(points, valid)
    torch.testing.assert_close(padded[:, :250], reference[:, :250], atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[0], reference[0], atol=ATOL, rtol=0)
    if alone is not None:  # eval: a frame's logits do not depend on what it is batched with
        torch.testing.assert_close(padded[1, :250], alone[0], atol=ATOL, rtol=0)
    assert torch.isfinite(padded).all()


@MODELS
def test_points_outside_the_grid_get_logits_and_change_nothing_inside(name):
    model = _eval_model(name)
    scale, shift = torch.tensor([40.0, 40.0, 2.0, 1.0]), torch.tensor([20.0, 20.0, 1.5, 0.0])
    inside = torch.rand(1, 300, 4, generator=torch.Generator().manual_seed(14)) * scale - shift
    # A real point in the edge cell where clamping would put the first far point: clamped scatter
    # (instead of skipping out-of-grid points) would change its cell feature.
    inside[0, 0] = torch.tensor([51.1, 3.1, 0.0, 0.5])
    far = torch.tensor([[[500.0, 3.1, 0.0, 0.9], [-80.0, -80.0, 1.0, 0.1], [0.0, 1e9, 0.0, 0.0]]])
    points = torch.cat([inside, far], dim=1)
    with torch.no_grad():
        with_far = model(points, torch.ones(1, 303, dtype=torch.bool))
        without = model(inside, torch.ones(1, 300, dtype=torch.bool))
    torch.testing.assert_close(with_far[:, :300], without, atol=ATOL, rtol=0)
    assert torch.isfinite(with_far).all()


@MODELS
def test_permuting_points_permutes_logits(name):
    model = _eval_model(name)
    points, valid = _scene(2, 600, seed=11)
    permutation = torch.randperm(600, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        logits = model(points, valid)
        permuted = model(points[:, permutation], valid[:, permutation])
    valid_after = valid[:, permutation]
    torch.testing.assert_close(permuted[valid_after], logits[:, permutation][valid_after], atol=ATOL, rtol=0)


@MODELS
def test_same_seed_same_parameters_different_seed_different(name):
    torch.manual_seed(123)
    first = build_model(name).state_dict()
    torch.manual_seed(123)
    second = build_model(name).state_dict()
    torch.manual_seed(124)
    third = build_model(name).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], third[key]) for key in first if first[key].is_floating_point())


def _two_class_scene(num_points: int = 2000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat ground (class 1) around the car and a box-shaped vehicle (class 5) 6-10 m ahead."""
    generator = torch.Generator().manual_seed(13)
    half = num_points // 2
    ground_xy = (torch.rand(half, 2, generator=generator) * 2 - 1) * 30.0
    ground_intensity = torch.rand(half, 1, generator=generator) * 0.2
    ground = torch.cat([ground_xy, torch.full((half, 1), -1.7), ground_intensity], dim=1)
    low = torch.tensor([6.0, -1.0, -1.5, 0.5])
    high = torch.tensor([10.0, 1.0, 0.0, 1.0])
    vehicle = low + torch.rand(num_points - half, 4, generator=generator) * (high - low)
    points = torch.cat([ground, vehicle]).unsqueeze(0)
    labels = torch.cat([torch.full((half,), 1), torch.full((num_points - half,), 5)]).unsqueeze(0)
    return points, torch.ones(1, num_points, dtype=torch.bool), labels


@MODELS
def test_loss_drops_when_overfitting_a_tiny_scene(name):
    torch.manual_seed(0)
    model = build_model(name).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    points, valid, labels = _two_class_scene()
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        logits = model(points, valid)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1.0  # roughly log(8) at initialisation
    assert losses[-1] < 0.25 * losses[0], losses
    # Train mode (batch statistics): 30 steps are too few for BatchNorm's running averages to settle.
    with torch.no_grad():
        accuracy = (model(points, valid).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.95
