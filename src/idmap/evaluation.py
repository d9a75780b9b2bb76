"""The one evaluation: mean cross-entropy, error and a confusion matrix of a model on a data set, in
chunks, on the data's device. The trainer, the loss landscape and `scripts/evaluate.py` all call
`evaluate`, so a checkpoint's test error is the same number wherever it is computed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Evaluation:
    """Sums on the device; reading a property is a host sync."""

    totals: torch.Tensor  # float64 [summed cross-entropy, mistakes]
    confusion: torch.Tensor | None  # int64 [true class, predicted class], when asked for
    count: int

    @property
    def loss(self) -> float:
        return self.totals[0].item() / self.count

    @property
    def error(self) -> float:
        """Test error in %."""
        return 100.0 * self.totals[1].item() / self.count

    def means(self) -> torch.Tensor:
        """[mean loss, error rate in 0..1], still on the device (no sync)."""
        return self.totals / self.count


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
             autocast: contextlib.AbstractContextManager | None = None,
             num_classes: int | None = None) -> Evaluation:
    """Evaluates `model` in eval mode (BN on running statistics) on x, y in chunks of `batch_size`;
    `prepare` turns a chunk of x into the model's input (e.g. uint8 -> normalised float), so the
    whole set need not be converted at once. The model's train/eval mode is restored afterwards.
    `num_classes`: also count a confusion matrix."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=y.device, dtype=torch.float64)
    confusion = (torch.zeros(num_classes * num_classes, device=y.device, dtype=torch.int64)
                 if num_classes else None)
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            with autocast or contextlib.nullcontext():
                out = model(prepare(xb) if prepare else xb).float()
            pred = out.argmax(1)
            totals += torch.stack([F.cross_entropy(out, yb, reduction="sum").double(),
                                   (pred != yb).sum().double()])
            if confusion is not None:
                confusion += torch.bincount(yb * num_classes + pred, minlength=num_classes**2)
    finally:
        model.train(was_training)
    if confusion is not None:
        confusion = confusion.view(num_classes, num_classes)
    return Evaluation(totals, confusion, len(y))
