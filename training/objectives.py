"""What training optimises, and how: the pieces of the default train spec (``training.models.registry``).

* ``PointLoss``: per-point cross-entropy with class-balanced weights and per-frame sample weights.
* ``adamw``: AdamW over every parameter with the job's ``lr`` and ``weight_decay``.
* ``warmup_cosine``: linear warm-up over the first 10% of steps (at most 100), cosine decay to 5%.

A model that wants another loss, optimizer or schedule registers its own ``TrainSpec``; these stay the
default, so models that register none train exactly as before.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.taxonomy import IGNORE
from training.data import class_weights


class PointLoss(nn.Module):
    """Per-point cross-entropy with class-balanced weights and per-frame sample weights.

    ``sum(w_frame * w_class[y] * ce) / sum(w_frame * w_class[y])`` over the non-ignored points of the
    batch: a weighted mean, so the loss scale does not depend on how many points a batch has.
    """

    def __init__(self, weights: np.ndarray):
        super().__init__()
        self.register_buffer("class_weights", torch.as_tensor(weights, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, sample_weight: torch.Tensor) -> torch.Tensor:
        """``logits [B, N, C]``, ``labels [B, N]``, ``sample_weight [B]`` -> the scalar batch loss."""
        classes = logits.shape[-1]
        per_point = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1), weight=self.class_weights,
                                    ignore_index=IGNORE, reduction="none").reshape(labels.shape)
        point_weight = self.class_weights[labels] * (labels != IGNORE)
        frame_weight = sample_weight.unsqueeze(1)
        return (per_point * frame_weight).sum() / (point_weight * frame_weight).sum().clamp_min(1e-12)


def point_loss(train_counts: np.ndarray) -> PointLoss:
    """The default loss: ``PointLoss`` weighted by the train split's class point counts (ENet weights)."""
    return PointLoss(class_weights(train_counts))


def adamw(model: nn.Module, train: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The default optimizer: AdamW with the job's ``lr`` and ``weight_decay``."""
    return torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])


def warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over the first 10% of steps (at most 100), then cosine
    decay to 5% of the peak."""
    warmup = max(1, min(100, total_steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The default schedule: ``warmup_cosine`` as a per-step ``LambdaLR``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps))
