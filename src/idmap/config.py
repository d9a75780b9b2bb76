"""The run configuration as structured configs, so a misspelled key or a wrong type fails at start-up.

Defaults are the paper's CIFAR protocol (paper.md, "Training protocol"); the YAML groups in conf/
select among the paper's choices and only override what differs.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from idmap.models import SHORTCUT_DEFAULTS


@dataclass
class ModelConfig:
    depth: int = 110
    unit: str = "auto"  # basic | bottleneck | single | auto (paper's choice for the depth)
    block: str = "full_preact"  # figure 4 (a)-(e)
    downsample: str = "auto"  # zero_pad | projection | auto
    widths: Optional[List[int]] = None  # per stage; None = the paper's 16/32/64
    units_per_stage: Optional[List[int]] = None  # None = derived from depth
    zero_init_residual: bool = False
    # Ghost batch norm: BN statistics over chunks of this many images, as the paper's 2 GPUs x 64.
    bn_batch: Optional[int] = None
    # Activation checkpointing per unit: trades compute for memory (ResNet-1001 on one GPU).
    checkpointing: bool = False


_S = SHORTCUT_DEFAULTS  # each shortcut option's default lives with its shortcut in models.py


@dataclass
class ShortcutConfig:
    """Figure 2 / table 1. Only the parameters of the chosen shortcut are read."""

    name: str = "identity"
    shortcut_scale: float = _S["shortcut_scale"]  # constant_scaling: lambda on h(x)
    residual_scale: float = _S["residual_scale"]  # constant_scaling: lambda on F(x)
    gate_bias: float = _S["gate_bias"]  # exclusive_gating, shortcut_only_gating: initial b_g
    gate_bn: bool = _S["gate_bn"]  # UNVERIFIED in the paper: BN after the gate's 1x1 conv
    dropout_p: float = _S["dropout_p"]  # dropout
    dropout_rescale: bool = _S["dropout_rescale"]  # UNVERIFIED: Caffe scales kept values by 1/(1-p)


@dataclass
class DatasetConfig:
    name: str = "cifar10"  # cifar10 | cifar100 | imagefolder | synthetic
    root: str = "${oc.env:IDMAP_DATA,data}"
    download: bool = True
    # What reports call the data; empty = the loader's own name. Set it for copies that are not
    # the official release, e.g. "CIFAR-10 (JPEG copy)".
    label: str = ""
    normalization: str = "channel"  # channel (per-channel mean/std) | pixel (per-pixel mean, v1)
    augment: bool = True  # zero-pad 4, random 32x32 crop, random horizontal flip
    # synthetic only
    num_train: int = 5000
    num_test: int = 1000
    num_classes: int = 10
    image_size: int = 32


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    gamma: float = 0.1
    milestones: List[int] = field(default_factory=lambda: [32000, 48000])  # iterations
    # When set, replaces `milestones` with epochs (the Torch code's recipe: 81, 122).
    milestone_epochs: Optional[List[float]] = None
    warmup_iters: int = 400
    warmup_lr: float = 0.01
    impl: str = "foreach"  # foreach | fused | loop: torch.optim.SGD's implementations, same maths


@dataclass
class TrainerConfig:
    max_iters: int = 64000
    epochs: Optional[float] = None  # when set, replaces max_iters (iterations = epochs*N/batch)
    batch_size: int = 128
    eval_every: int = 1000
    eval_batch_size: int = 1000
    checkpoint_every: int = 4000
    log_every: int = 100  # progress bar refresh and the divergence check (a host sync)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # true: continue the checkpoint in hydra.run.dir; a run or sweep directory: continue that, with
    # its own settings (train.py turns the path into the run's overrides, resume.resume_argv).
    resume: Any = False
    deterministic: bool = False
    # Speed switches (issue 4). None changes the algorithm; bf16 changes arithmetic precision only.
    precision: str = "fp32"  # fp32 | tf32 | bf16 (autocast, fp32 master weights)
    channels_last: bool = False
    compile: str = "none"  # none | default | reduce-overhead (CUDA graphs) | max-autotune
    # Data-parallel processes spawned by this run (one per GPU, or gloo on CPU); BN stays per GPU.
    world_size: int = 1
    progress: bool = True  # tqdm bar; off in multiruns
    signal_every: int = 0  # log per-unit activation/gradient norms every N iterations (0 = off)


@dataclass
class GpuPoolConfig:
    """Jobs of a sweep running in parallel on one machine take one GPU each (see idmap.gpus)."""

    enabled: bool = False
    jobs_per_gpu: int = 1
    lock_dir: str = "${oc.env:IDMAP_GPU_LOCKS,/tmp/idmap-gpu-locks}"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    gpu_pool: GpuPoolConfig = field(default_factory=GpuPoolConfig)
    seed: int = 0
    # Free-form tags recorded in summary.json (e.g. the table row an experiment runs).
    tags: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    ConfigStore.instance().store(name="idmap_schema", node=Config)


_NUMERIC_CHOICE = re.compile(r"(\+{0,2}depth=)([\w,]+)")


def quote_numeric_choices(args: list[str]) -> list[str]:
    """`depth=1001` names the config file depth/1001.yaml, but Hydra's override grammar reads 1001 as
    an int and rejects it as a group choice; quoting keeps it a name (also in sweeps: depth=110,164)."""
    out = []
    for arg in args:
        m = _NUMERIC_CHOICE.fullmatch(arg)
        out.append(m.group(1) + ",".join(f"'{v}'" for v in m.group(2).split(",")) if m else arg)
    return out


def compose_config(*overrides: str):
    """The run config that `python train.py OVERRIDES` gets, for tests, benchmarks and notebooks."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=quote_numeric_choices(list(overrides)))
