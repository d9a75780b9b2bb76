"""Batch normalisation as the paper ran it: statistics over ghost batches of `bn_batch` images.

The paper's batch of 128 was split over 2 GPUs, so each BN saw 64 images at a time.
`GhostBatchNorm2d` normalises all chunks of a batch in one pass; `ChunkedGhostBatchNorm2d` is the
reference it must equal (one BN call per chunk, then a cat), kept so that tests and the benchmark
can set the two side by side (`to_chunked`; `model.ghost_bn=chunked` builds a run's nets with it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BN whose training statistics come from chunks of `bn_batch` images. The running averages take
    one update per chunk, in chunk order; which replica's averages the paper tested with is
    UNVERIFIED. The batch is viewed as chunks x bn_batch and normalised at once: a step costs one
    BN's kernels, not one BN per chunk and a cat, in nets whose steps are bound by kernel launches."""

    def __init__(self, num_features: int, bn_batch: int):
        super().__init__(num_features)
        self.bn_batch = bn_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.bn_batch:
            return super().forward(x)
        if self.momentum is None:  # a cumulative average: its factor changes chunk by chunk
            return _chunked(self, x)
        n, c, h, w = x.shape
        chunks, rest = divmod(n, self.bn_batch)
        whole = chunks * self.bn_batch
        y = self._one_pass(x[:whole].view(chunks, self.bn_batch, c, h, w)).flatten(0, 1)
        if not rest:
            return y
        # A batch that is no multiple of bn_batch (never under the paper's protocol): its last,
        # smaller chunk comes after the others, as in the chunked version.
        return torch.cat([y, super().forward(x[whole:])])

    def _one_pass(self, g: torch.Tensor) -> torch.Tensor:
        """g: chunks x bn_batch x C x H x W. Statistics in fp32 at least, as cuDNN's BN keeps them,
        and the output in the input's dtype, as nn.BatchNorm2d gives it under autocast."""
        stats_dtype = torch.promote_types(g.dtype, torch.float32)
        var, mean = torch.var_mean(g.to(stats_dtype), dim=(1, 3, 4), correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps) * self.weight.view(1, 1, -1, 1, 1)
        y = torch.addcmul(self.bias.view(1, 1, -1, 1, 1) - mean * scale, g, scale).to(g.dtype)
        if self.track_running_stats:
            count = g.shape[1] * g.shape[3] * g.shape[4]
            self._update_running(mean.flatten(1).detach(), var.flatten(1).detach(), count)
        return y

    @torch.no_grad()
    def _update_running(self, means: torch.Tensor, variances: torch.Tensor, count: int) -> None:
        """One update per chunk, in order, with nn.BatchNorm2d's arithmetic (unbiased variance)."""
        m, unbiased = self.momentum, count / max(count - 1, 1)
        # Plain in-place ops, not torch._foreach_*: the fused probe runs this layer under torch.func's
        # vmap, which has no batching rule for the foreach ops.
        for mean, var in zip(means, variances):
            self.running_mean.mul_(1 - m).add_(mean, alpha=m)
            self.running_var.mul_(1 - m).add_(var, alpha=m * unbiased)
        self.num_batches_tracked.add_(len(means))


class ChunkedGhostBatchNorm2d(GhostBatchNorm2d):
    """The reference: one nn.BatchNorm2d call per chunk of `bn_batch` images, then a cat."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chunked(self, x)


def _chunked(bn: GhostBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    if not bn.training or x.shape[0] <= bn.bn_batch:
        return nn.BatchNorm2d.forward(bn, x)
    return torch.cat([nn.BatchNorm2d.forward(bn, c) for c in x.split(bn.bn_batch)])


GHOST_BN = ("one_pass", "chunked")  # model.ghost_bn: how ghost BN computes (the same statistics)


def to_chunked(model: nn.Module) -> nn.Module:
    """Every GhostBatchNorm2d of `model` becomes the chunked reference, in place. Only the class
    changes: the module objects, their parameters and buffers stay, so an optimizer, a DDP or
    compile wrapper built on `model` keeps working. Returns `model`."""
    for m in model.modules():
        if type(m) is GhostBatchNorm2d:
            m.__class__ = ChunkedGhostBatchNorm2d
    return model


def norm(channels: int, bn_batch: int | None) -> nn.Module:
    return GhostBatchNorm2d(channels, bn_batch) if bn_batch else nn.BatchNorm2d(channels)


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module):
    """Activation checkpointing runs each unit's forward again during backward; BN must normalise
    with the same batch statistics but not update its running averages a second time. Momentum 0
    keeps the running averages as they are while the recomputation saves the same tensors."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
