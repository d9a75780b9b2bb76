"""Every residual unit of He et al. 2016, built by one function.

    x_{l+1} = f( h(x_l) + F(x_l) )

A unit is three pieces of data: the *ordering* of BN, ReLU and weight layers (figure 4) decides the
branch F and the after-addition f; the *shortcut* (figure 2) decides how h(x) and F(x) are combined;
the *unit type* (basic, bottleneck, 1-layer) decides the weight layers. Any of each composes with
any of the others.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

from idmap.models.norm import GHOST_BN, GhostBatchNorm2d, frozen_running_stats, norm as _norm, to_chunked
# Figure 4's orderings (and orderings given as data) live in orderings.py, their one home.
from idmap.models.orderings import ORDERINGS, Ordering, block_of


# Weight layers of each unit type as (kernel, width multiplier); the unit's stride goes on the first
# layer, as in the official Torch code (resnet-pre-act.lua) for bottlenecks too.
UNIT_LAYERS = {
    "basic": ((3, 1), (3, 1)),
    "bottleneck": ((1, 1), (3, 1), (1, 4)),
    "single": ((3, 1),),
}
EXPANSION = {unit: layers[-1][1] for unit, layers in UNIT_LAYERS.items()}


# --------------------------------------------------------------------------------------------------
# Figure 2: how a unit combines its input x with its branch output f. `down` matches x to f's shape
# in dimension-increasing units (zero padding or a 1x1 projection) and is the identity elsewhere.
# --------------------------------------------------------------------------------------------------
class ZeroPad(nn.Module):
    """Option A of the v1 paper: subsample by the stride, fill the extra channels with zeros."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))


def _projection(in_ch: int, out_ch: int, stride: int, bn: bool, bn_batch: int | None) -> nn.Module:
    conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
    return nn.Sequential(conv, _norm(out_ch, bn_batch)) if bn else conv


class Identity(nn.Module):
    """h(x) = x: x_{l+1} = x + F(x)."""

    defaults: dict = {}
    gated = False  # takes a gate g(x) (the gating shortcuts)
    always_project = False  # `down` is a 1x1 convolution in every unit, not only where shapes change

    def __init__(self, down: nn.Module):
        super().__init__()
        self.down = down

    def forward(self, x, f):
        return self.down(x) + f


class ConstantScaling(Identity):
    defaults = dict(shortcut_scale=0.5, residual_scale=0.5)  # lambda on h(x) and on F(x)

    def __init__(self, down, shortcut_scale: float, residual_scale: float):
        super().__init__(down)
        self.shortcut_scale, self.residual_scale = shortcut_scale, residual_scale

    def forward(self, x, f):
        return self.shortcut_scale * self.down(x) + self.residual_scale * f


class _Gate(nn.Module):
    """g(x) = sigmoid(W_g x + b_g), W_g a 1x1 convolution of the unit's input."""

    def __init__(self, in_ch, out_ch, stride, gate_bias, gate_bn, bn_batch):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=True)
        nn.init.constant_(self.conv.bias, gate_bias)
        self.bn = _norm(out_ch, bn_batch) if gate_bn else nn.Identity()

    def forward(self, x):
        return torch.sigmoid(self.bn(self.conv(x)))


# b_g's initial value; gate_bn (BN after the gate's 1x1 conv) is UNVERIFIED in the paper.
_GATE_DEFAULTS = dict(gate_bias=-6.0, gate_bn=False)


class ExclusiveGating(Identity):
    defaults = _GATE_DEFAULTS
    gated = True

    def __init__(self, down, gate: _Gate):
        super().__init__(down)
        self.gate = gate

    def forward(self, x, f):
        g = self.gate(x)
        return (1 - g) * self.down(x) + g * f


class ShortcutOnlyGating(ExclusiveGating):
    def forward(self, x, f):
        return (1 - self.gate(x)) * self.down(x) + f


class Conv1x1(Identity):
    """A 1x1 convolution on every shortcut: `down` is that convolution, in every unit."""

    always_project = True


class DropoutShortcut(Identity):
    # dropout_rescale is UNVERIFIED: Caffe's dropout scales kept values by 1/(1-p).
    defaults = dict(dropout_p=0.5, dropout_rescale=True)

    def __init__(self, down, dropout_p: float, dropout_rescale: bool):
        super().__init__(down)
        self.p, self.rescale = dropout_p, dropout_rescale

    def forward(self, x, f):
        h = self.down(x)
        if self.training and self.p > 0:
            keep = torch.rand_like(h) >= self.p
            h = h * keep / (1 - self.p) if self.rescale else h * keep
        elif not self.rescale:
            h = h * (1 - self.p)  # without train-time rescaling, test time scales by the keep rate
        return h + f


# Figure 2's shortcuts by name; each class carries its options' defaults, the rows the paper
# reports numbers for. The config schema takes its defaults from here.
SHORTCUTS = {
    "identity": Identity,
    "constant_scaling": ConstantScaling,
    "exclusive_gating": ExclusiveGating,
    "shortcut_only_gating": ShortcutOnlyGating,
    "conv1x1": Conv1x1,
    "dropout": DropoutShortcut,
}
SHORTCUT_DEFAULTS = {k: v for kind in SHORTCUTS.values() for k, v in kind.defaults.items()}


def _make_shortcut(name, in_ch, out_ch, stride, downsample, proj_bn, bn_batch, opts) -> nn.Module:
    kind = SHORTCUTS[name]
    changes_shape = stride != 1 or in_ch != out_ch
    if kind.always_project or (changes_shape and downsample == "projection"):
        down = _projection(in_ch, out_ch, stride, proj_bn, bn_batch)
    elif changes_shape:
        down = ZeroPad(in_ch, out_ch, stride)
    else:
        down = nn.Identity()
    kwargs = {k: opts[k] for k in kind.defaults}
    if kind.gated:
        return kind(down, _Gate(in_ch, out_ch, stride, kwargs["gate_bias"], kwargs["gate_bn"], bn_batch))
    return kind(down, **kwargs)


# --------------------------------------------------------------------------------------------------
# The residual unit and the network.
# --------------------------------------------------------------------------------------------------
class ResidualUnit(nn.Module):
    def __init__(self, shared: nn.Module, branch: nn.Module, shortcut: nn.Module, after_add: nn.Module):
        super().__init__()
        self.shared, self.branch, self.shortcut, self.after_add = shared, branch, shortcut, after_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(x)  # a pre-activation shared by both paths (appendix); identity elsewhere
        return self.after_add(self.shortcut(x, self.branch(x)))


def _ops(tokens: Sequence[str], convs: Sequence[nn.Conv2d], channels: int, bn_batch) -> list[nn.Module]:
    """Turns an ordering's tokens into modules; a BN normalises whatever the layer before it made."""
    modules, convs = [], iter(convs)
    for token in tokens:
        if token == "conv":
            conv = next(convs)
            modules.append(conv)
            channels = conv.out_channels
        elif token == "bn":
            modules.append(_norm(channels, bn_batch))
        else:
            modules.append(nn.ReLU(inplace=False))
    return modules


def _unit(ordering, unit, in_ch, width, stride, shortcut, downsample, first, bn_batch, opts):
    out_ch = width * EXPANSION[unit]
    convs, ch = [], in_ch
    for i, (kernel, mult) in enumerate(UNIT_LAYERS[unit]):
        s = stride if i == 0 else 1
        convs.append(nn.Conv2d(ch, width * mult, kernel, stride=s, padding=kernel // 2, bias=False))
        ch = width * mult
    n = len(convs)
    tokens = list(ordering.layer) * (n - 1) + list(ordering.last)
    # Pre-activation units that increase dimensions, and the first unit after conv1, activate once
    # before the split so the shortcut reads the activated input too (appendix; resnet-pre-act.lua).
    share = bool(ordering.preact) and (first or stride != 1 or in_ch != out_ch)
    shared = _ops(ordering.preact, [], in_ch, bn_batch) if share else []
    if share:
        tokens = tokens[len(ordering.preact):]
    return ResidualUnit(
        nn.Sequential(*shared),
        nn.Sequential(*_ops(tokens, convs, in_ch, bn_batch)),
        # In post-activation units BN follows every weight layer, the projection's too (table 1);
        # in pre-activation units the next unit's BN does that job.
        _make_shortcut(shortcut, in_ch, out_ch, stride, downsample, not ordering.preact, bn_batch, opts),
        nn.Sequential(*_ops(ordering.after_add, [], out_ch, bn_batch)),
    )


class ResNet(nn.Module):
    def __init__(self, stem: nn.Module, units: Sequence[ResidualUnit], head_act: nn.Module,
                 channels: int, num_classes: int, checkpointing: bool = False):
        super().__init__()
        self.stem = stem
        self.units = nn.ModuleList(units)
        self.head_act = head_act  # pre-activation nets: the extra BN-ReLU after the last unit
        self.fc = nn.Linear(channels, num_classes)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for unit in self.units:
            if self.checkpointing and self.training and x.requires_grad:
                x = recompute(unit, x, use_reentrant=False, **_recompute_once(unit))
            else:
                x = unit(x)
        # Global average pooling as a mean: adaptive_avg_pool2d's CUDA backward is not deterministic.
        return self.fc(self.head_act(x).mean((2, 3)))


def _recompute_once(unit: nn.Module) -> dict:
    """Eager recomputation runs BN's forward again, so it runs with the running statistics frozen.
    Compiled, the graph holds BN's buffer updates once, in the forward, and dynamo accepts no
    context_fn but selective checkpointing's: there is nothing to freeze."""
    if torch.compiler.is_compiling():
        return {}
    return dict(context_fn=lambda: (contextlib.nullcontext(), frozen_running_stats(unit)))


# --------------------------------------------------------------------------------------------------
# Depth rules.
# --------------------------------------------------------------------------------------------------
UNITS = tuple(UNIT_LAYERS)
# Where a stage changes shape: zero-padded identity, or a 1x1 projection (the paper's bottleneck choice).
DOWNSAMPLES = ("zero_pad", "projection")
DEFAULT_WIDTHS = (16, 32, 64)


def auto_unit(depth: int, stages: int = 3) -> str:
    """The paper's choice: bottleneck for ResNet-164 and ResNet-1001 (any 9n+2 depth from 164 up),
    basic (6n+2) otherwise, so ResNet-110 and ResNet-1202 are basic."""
    per_unit = len(UNIT_LAYERS["bottleneck"]) * stages
    return "bottleneck" if depth >= 164 and (depth - 2) % per_unit == 0 else "basic"


def units_per_stage_for(depth: int, unit: str, stages: int = 3) -> list[int]:
    per_unit = len(UNIT_LAYERS[unit]) * stages
    n, rem = divmod(depth - 2, per_unit)
    if rem or n < 1:
        below = max(2 + per_unit, depth - 2 - (depth - 2) % per_unit + 2)
        nearest = sorted({below, below + per_unit} - {depth})
        raise ValueError(
            f"depth {depth} is not {per_unit}n+2 for {unit} units "
            f"(nearest: {', '.join(map(str, nearest))})"
        )
    return [n] * stages


def _check_names(block, shortcut: str, options: dict, ghost_bn: str) -> None:
    """ValueError for a block, shortcut, shortcut option or ghost BN mode the builder does not have."""
    if not isinstance(block, Ordering) and block not in ORDERINGS:
        raise ValueError(f"unknown block {block!r}; choose from {', '.join(ORDERINGS)}, or give its "
                         "ordering as data (orderings.py)")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; choose from {', '.join(SHORTCUTS)}")
    unknown = set(options) - set(SHORTCUT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; shortcut options are {sorted(SHORTCUT_DEFAULTS)}")
    if ghost_bn not in GHOST_BN:
        raise ValueError(f"unknown ghost_bn {ghost_bn!r}; choose from {', '.join(GHOST_BN)}")


def build_resnet(
    depth: int,
    *,
    num_classes: int = 10,
    block: str | Ordering = "full_preact",
    shortcut: str = "identity",
    unit: str = "auto",
    downsample: str = "auto",
    widths: Sequence[int] | None = None,
    units_per_stage: Sequence[int] | None = None,
    zero_init_residual: bool = False,
    bn_batch: int | None = None,
    checkpointing: bool = False,
    ghost_bn: str = "one_pass",
    **options,
) -> ResNet:
    """A CIFAR ResNet of `depth` weight layers with the paper's residual unit variants.

    block: original | bn_after_add | relu_before_add | relu_only_preact | full_preact (figure 4),
        or an idmap.models.orderings.Ordering (e.g. orderings.parse(data, name)).
    shortcut: identity | constant_scaling | exclusive_gating | shortcut_only_gating | conv1x1 |
        dropout (figure 2); options shortcut_scale, residual_scale, gate_bias, gate_bn, dropout_p,
        dropout_rescale default to the rows the paper reports numbers for.
    unit: basic (6n+2) | bottleneck (9n+2, 4x expansion) | single (3n+2) | auto (see auto_unit).
    downsample: zero_pad (option A) | projection (1x1 conv, stride 2) | auto (zero_pad for basic
        and single units, projection for bottlenecks).
    widths / units_per_stage: other stage layouts, e.g. widths=(64, 128, 256, 512),
        units_per_stage=(2, 2, 2, 2) for a pre-activation ResNet-18.
    bn_batch: ghost batch norm over chunks of this many images.
    ghost_bn: one_pass (all chunks at once) | chunked (one BN call per chunk: the reference it
        equals, for benchmarks and checks).
    """
    _check_names(block, shortcut, options, ghost_bn)
    widths = tuple(widths or DEFAULT_WIDTHS)
    if unit == "auto":
        unit = auto_unit(depth, len(widths))
    if unit not in UNIT_LAYERS:
        raise ValueError(f"unknown unit {unit!r}; choose from auto, {', '.join(UNITS)}")
    if downsample == "auto":
        downsample = "projection" if unit == "bottleneck" else "zero_pad"
    if downsample not in DOWNSAMPLES:
        raise ValueError(f"unknown downsample {downsample!r}; choose from auto, {', '.join(DOWNSAMPLES)}")
    if units_per_stage is None:
        units_per_stage = units_per_stage_for(depth, unit, len(widths))
    elif len(units_per_stage) != len(widths) or min(units_per_stage) < 1:
        raise ValueError(f"units_per_stage {list(units_per_stage)} must give >= 1 unit for each of {len(widths)} widths")
    elif depth != len(UNIT_LAYERS[unit]) * sum(units_per_stage) + 2:
        raise ValueError(
            f"depth {depth} does not match units_per_stage {list(units_per_stage)} of {unit} units "
            f"({len(UNIT_LAYERS[unit]) * sum(units_per_stage) + 2} layers)"
        )
    if bn_batch is not None and bn_batch < 1:
        raise ValueError(f"bn_batch must be a positive number of images, got {bn_batch}")
    opts = {**SHORTCUT_DEFAULTS, **options}
    ordering = block if isinstance(block, Ordering) else ORDERINGS[block]

    stem_ch = widths[0]
    stem = [nn.Conv2d(3, stem_ch, 3, padding=1, bias=False)]
    if not ordering.preact:  # post-activation nets: conv1 is conv-BN-ReLU (v1); pre-act: see _unit
        stem += [_norm(stem_ch, bn_batch), nn.ReLU(inplace=False)]

    units, ch = [], stem_ch
    for stage, (width, count) in enumerate(zip(widths, units_per_stage)):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            units.append(_unit(ordering, unit, ch, width, stride, shortcut, downsample,
                               first=not units, bn_batch=bn_batch, opts=opts))
            ch = width * EXPANSION[unit]
    head_act = nn.Sequential(*_ops(ordering.preact, [], ch, bn_batch))
    model = ResNet(nn.Sequential(*stem), units, head_act, ch, num_classes, checkpointing)
    # The choices as resolved ('auto' made concrete), for summaries and reports.
    model.arch = dict(depth=depth, block=ordering.name or "custom", shortcut=shortcut, unit=unit,
                      downsample=downsample, widths=list(widths), units_per_stage=list(units_per_stage))
    _init(model, zero_init_residual)
    return to_chunked(model) if ghost_bn == "chunked" else model


def _init(model: ResNet, zero_init_residual: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # He init with fan_out, as the official Torch code (n = k*k*out_channels). Only weights:
            # a gate's bias keeps its b_g.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for unit in model.units:
            # Zero the branch's last weighted layer so every unit starts as its shortcut.
            last = [m for m in unit.branch if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))][-1]
            nn.init.zeros_(last.weight)


def model_kwargs(cfg: Any, num_classes: int) -> dict:
    """build_resnet's arguments from a run config (an OmegaConf node or a plain dict)."""
    m, s = cfg["model"], cfg["shortcut"]
    return dict(
        depth=m["depth"],
        num_classes=num_classes,
        block=block_of(m),  # a paper ordering's name, or the block file's own ordering
        shortcut=s["name"],
        unit=m["unit"],
        downsample=m["downsample"],
        widths=list(m["widths"]) if m.get("widths") else None,
        units_per_stage=list(m["units_per_stage"]) if m.get("units_per_stage") else None,
        zero_init_residual=m["zero_init_residual"],
        bn_batch=m.get("bn_batch"),
        checkpointing=m.get("checkpointing", False),
        ghost_bn=m.get("ghost_bn", "one_pass"),  # a run from before the switch: one pass
        **{k: s[k] for k in SHORTCUT_DEFAULTS},
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["build_resnet", "model_kwargs", "ORDERINGS", "SHORTCUTS", "SHORTCUT_DEFAULTS", "UNITS", "auto_unit",
           "count_parameters", "ResNet"]
