"""A probe, not a feature: N networks of one architecture, each with its own weights, BN statistics
and data, trained as one model through torch.func (stack_module_state + functional_call + vmap).

A sweep of seeds runs N small nets whose kernels are too short to fill a GPU; stacked, each kernel
does N nets' work. The GPU check (idmap.perf.gpu_check) times this against N separate processes; only
that number decides whether fused seeds become a feature, so nothing here goes beyond the probe.

Each net's parameters and buffers are slices of stacked tensors. vmap maps over the stack, so every
net normalises with its own batch statistics and BN updates its own running averages in place
(the stacked buffers are batched like the inputs). SGD's update is elementwise, so one
torch.optim.SGD over the stacked parameters is N nets' SGD; the summed loss gives each slice its
own net's gradient.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap


class FusedNets:
    """`models`: N modules of one architecture (their current weights and buffers are copied)."""

    def __init__(self, models: list[torch.nn.Module]):
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.buffers = buffers
        self.n = len(models)
        # The architecture without storage: functional_call supplies every tensor.
        self.base = copy.deepcopy(models[0]).to("meta")
        self.base.train(models[0].training)

    def train(self, mode: bool = True) -> FusedNets:
        self.base.train(mode)
        return self

    def _one(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x B x C x H x W, net i reads x[i]; returns N x B x classes."""
        # randomness="different": each net draws its own dropout masks, as N separate nets would.
        return vmap(self._one, randomness="different")(self.params, self.buffers, x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sum of each net's mean cross-entropy: its gradient is each net's own."""
        per = F.cross_entropy(out.flatten(0, 1).float(), y.flatten(), reduction="none")
        return per.view(self.n, -1).mean(1).sum()

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Net i's weights and buffers, as its own module's state_dict holds them."""
        return {k: v[i].detach() for k, v in {**self.params, **self.buffers}.items()}
