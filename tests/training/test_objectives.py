"""training.objectives, the default train spec's pieces: PointLoss against a hand computation (sample
weights other than 1 included), the warm-up + cosine schedule at known steps, AdamW's settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.taxonomy import IGNORE, NUM_CLASSES
from training import objectives
from training.data import class_weights
from training.models import DEFAULT_TRAIN_SPEC, build_model, get_train_spec


def hand_loss(logits: np.ndarray, labels: np.ndarray, frame_weights: np.ndarray, weights: np.ndarray) -> float:
    """sum(w_frame * w_class[y] * -log softmax(logits)[y]) / sum(w_frame * w_class[y]), point by point."""
    numerator = denominator = 0.0
    for b in range(labels.shape[0]):
        for n in range(labels.shape[1]):
            y = int(labels[b, n])
            if y == IGNORE:
                continue
            row = logits[b, n].astype(np.float64)
            log_softmax_y = row[y] - (row.max() + math.log(np.exp(row - row.max()).sum()))
            w = frame_weights[b] * weights[y]
            numerator += -w * log_softmax_y
            denominator += w
    return numerator / denominator


@pytest.fixture
def batch():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, size=(3, 40, NUM_CLASSES)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(3, 40))
    labels[2, 30:] = IGNORE  # padding, as collate writes it
    weights = class_weights(rng.integers(10, 5000, size=NUM_CLASSES)).astype(np.float32)
    return logits, labels, weights


@pytest.mark.parametrize("frame_weights", [[1.0, 1.0, 1.0], [2.5, 0.5, 1.0], [0.0, 3.0, 0.25]])
def test_point_loss_equals_a_hand_computation(batch, frame_weights):
    logits, labels, weights = batch
    frame_weights = np.asarray(frame_weights, dtype=np.float32)
    loss = objectives.PointLoss(weights)(torch.from_numpy(logits), torch.from_numpy(labels),
                                         torch.from_numpy(frame_weights))
    assert float(loss) == pytest.approx(hand_loss(logits, labels, frame_weights, weights), rel=1e-5)


def test_a_frame_weight_of_two_counts_the_frame_twice(batch):
    logits, labels, weights = batch
    loss = objectives.PointLoss(weights)
    weighted = loss(torch.from_numpy(logits), torch.from_numpy(labels), torch.tensor([2.0, 1.0, 1.0]))
    doubled = np.concatenate([logits[:1], logits]), np.concatenate([labels[:1], labels])
    repeated = loss(torch.from_numpy(doubled[0]), torch.from_numpy(doubled[1]), torch.ones(4))
    assert float(weighted) == pytest.approx(float(repeated), rel=1e-6)
    zero = loss(torch.from_numpy(logits), torch.from_numpy(labels), torch.tensor([0.0, 1.0, 1.0]))
    without = loss(torch.from_numpy(logits[1:]), torch.from_numpy(labels[1:]), torch.ones(2))
    assert float(zero) == pytest.approx(float(without), rel=1e-6)


def test_warmup_cosine_at_known_steps():
    factor = objectives.warmup_cosine(200)  # warm-up: 10% of 200 = 20 steps
    assert factor(0) == pytest.approx(1 / 20) and factor(19) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(1.0)
    assert factor(110) == pytest.approx(0.05 + 0.95 * 0.5)  # half way through the decay
    assert factor(200) == pytest.approx(0.05) and factor(500) == pytest.approx(0.05)
    assert objectives.warmup_cosine(5000)(99) == pytest.approx(1.0)  # warm-up capped at 100 steps


def test_the_default_train_spec_builds_adamw_and_the_schedule():
    assert get_train_spec("bev_segnet") is DEFAULT_TRAIN_SPEC
    model = build_model("bev_segnet", {"cell_size_m": 0.8, "x_range_m": [-12.8, 12.8], "y_range_m": [-12.8, 12.8]})
    optimizer = DEFAULT_TRAIN_SPEC.build_optimizer(model, {"lr": 0.01, "weight_decay": 0.001})
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (0.01, 0.001)
    scheduler = DEFAULT_TRAIN_SPEC.build_lr_scheduler(optimizer, 200)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.01 / 20)
    loss = DEFAULT_TRAIN_SPEC.build_loss(np.arange(1, NUM_CLASSES + 1) * 100)
    assert isinstance(loss, objectives.PointLoss)
    assert torch.allclose(loss.class_weights, torch.from_numpy(class_weights(np.arange(1, NUM_CLASSES + 1) * 100)).float())
