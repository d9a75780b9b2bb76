"""The run configuration as structured configs, so a misspelled key or a wrong type fails at start-up.

Defaults are the paper's CIFAR protocol (docs/paper.md, "Training protocol"); the YAML groups in conf/
select among the paper's choices and only override what differs.
"""

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from idmap import IdmapError
from idmap.models import SHORTCUT_DEFAULTS
from idmap.paths import CONF  # the project's config groups (train.yaml's)


@dataclass
class ModelConfig:
    depth: int = 110
    unit: str = "auto"  # basic | bottleneck | single | auto (paper's choice for the depth)
    block: str = "full_preact"  # figure 4 (a)-(e), or the name of a block file's own ordering
    # A unit the paper did not try: {layer, last, after_add} as lists of bn/relu/conv, checked by
    # idmap.orderings (Any here, so that a malformed one gets that one-line message, not Hydra's).
    ordering: Optional[Any] = None
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


_NUMERIC_CHOICE = re.compile(r"(\+{0,2}depth=)([-\w.,]+)")


def quote_numeric_choices(args: list[str]) -> list[str]:
    """`depth=1001` names the config file depth/1001.yaml, but Hydra's override grammar reads 1001 as
    an int and rejects it as a group choice; quoting keeps it a name (also in sweeps: depth=110,164)."""
    out = []
    for arg in args:
        m = _NUMERIC_CHOICE.fullmatch(arg)
        out.append(m.group(1) + ",".join(f"'{v}'" for v in m.group(2).split(",")) if m else arg)
    return out


def compose_config(*overrides: str, hydra: bool = False):
    """The run config that `python train.py OVERRIDES` gets, for tests, benchmarks and notebooks;
    `hydra`: with its `hydra` node (the run's choices, hydra.run.dir, ...)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=quote_numeric_choices(list(overrides)),
                       return_hydra_config=hydra)


def hydra_path(cfg, key: str) -> Optional[Path]:
    """hydra.run.dir or hydra.sweep.dir of a config composed with its hydra node, resolved as the
    job will resolve it (${now:...}, ${hydra:runtime.choices.block}); None where only the job can."""
    from hydra.core.hydra_config import HydraConfig

    instance = HydraConfig.instance()
    before = instance.cfg
    try:
        instance.set_config(cfg)  # for the ${hydra:...} resolver
        return Path(str(OmegaConf.select(cfg, key)))
    except Exception:  # e.g. ${hydra.job.id}, set by a launcher
        return None
    finally:
        instance.cfg = before


# --------------------------------------------------------------------------------------------------
# Valid values: every key, checked before anything is built or written
# --------------------------------------------------------------------------------------------------
def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _one_of(*names: str):
    return lambda v: v in names


def _ints(v) -> bool:  # None (the paper's layout) or a non-empty list of positive integers
    return v is None or (len(v) > 0 and all(_int(1)(x) for x in v))


_TEXT = (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_POSITIVE = (lambda v: _real(v) and v > 0, "a finite number > 0")
_AT_LEAST_0 = (lambda v: _real(v) and v >= 0, "a finite number >= 0")


def _rules() -> dict:
    """key -> (test, what is allowed). Choices come from where each choice is implemented."""
    from idmap.data import DATASETS, NORMALIZATIONS
    from idmap.models import SHORTCUTS, UNITS
    from idmap.runtime import DEVICE

    choice = lambda names: (_one_of(*names), "one of " + ", ".join(names))  # noqa: E731
    return {
        "model.depth": (_int(1), "an integer >= 1"), "model.unit": choice(("auto", *UNITS)),
        # A paper ordering's name, or the name of a block file's own ordering (checked in _joint).
        "model.block": _TEXT,
        # Its pieces are checked with the block file's name in the message (orderings.check_config).
        "model.ordering": (lambda v: v is None or isinstance(v, dict),
                           "null or a mapping of layer, last and after_add"),
        "model.downsample": choice(("auto", "zero_pad", "projection")),
        "model.widths": (_ints, "null or a list of integers >= 1"),
        "model.units_per_stage": (_ints, "null or a list of integers >= 1"),
        "model.zero_init_residual": _BOOL, "model.checkpointing": _BOOL,
        "model.bn_batch": (lambda v: v is None or _int(1)(v), "null or an integer >= 1"),
        # Table 1 scales h(x) by 0 (no shortcut at all): a scale may be 0.
        "shortcut.name": choice(tuple(SHORTCUTS)), "shortcut.shortcut_scale": _AT_LEAST_0,
        "shortcut.residual_scale": _AT_LEAST_0, "shortcut.gate_bias": (_real, "a finite number"),
        "shortcut.gate_bn": _BOOL, "shortcut.dropout_rescale": _BOOL,
        "shortcut.dropout_p": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
        "dataset.name": choice(DATASETS), "dataset.root": _TEXT, "dataset.download": _BOOL,
        "dataset.label": (lambda v: isinstance(v, str), "a string"), "dataset.augment": _BOOL,
        "dataset.normalization": choice(NORMALIZATIONS),
        "dataset.num_train": (_int(1), "an integer >= 1"), "dataset.num_test": (_int(1), "an integer >= 1"),
        "dataset.num_classes": (_int(2), "an integer >= 2"), "dataset.image_size": (_int(1), "an integer >= 1"),
        "optim.lr": _POSITIVE, "optim.momentum": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
        "optim.nesterov": _BOOL, "optim.weight_decay": _AT_LEAST_0,
        "optim.gamma": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
        "optim.milestones": (lambda v: all(_int(1)(m) for m in v) and list(v) == sorted(set(v)),
                             "increasing integers >= 1 (iterations)"),
        "optim.milestone_epochs": (lambda v: v is None or (all(_real(m) and m > 0 for m in v)
                                                           and list(v) == sorted(set(v))),
                                   "null or increasing numbers > 0 (epochs)"),
        "optim.warmup_iters": (_int(0), "an integer >= 0"), "optim.warmup_lr": _POSITIVE,
        "optim.impl": choice(("foreach", "fused", "loop")),
        "trainer.max_iters": (_int(1), "an integer >= 1"),
        "trainer.epochs": (lambda v: v is None or (_real(v) and v > 0), "null or a finite number > 0"),
        "trainer.batch_size": (_int(1), "an integer >= 1"), "trainer.eval_every": (_int(1), "an integer >= 1"),
        "trainer.eval_batch_size": (_int(1), "an integer >= 1"),
        "trainer.checkpoint_every": (_int(1), "an integer >= 1"), "trainer.log_every": (_int(1), "an integer >= 1"),
        "trainer.device": (lambda v: isinstance(v, str) and DEVICE.fullmatch(v) is not None,
                           "auto, cpu, cuda or cuda:N"),
        "trainer.resume": (lambda v: isinstance(v, bool), "true, false or a run or sweep directory"),
        "trainer.deterministic": _BOOL, "trainer.precision": choice(("fp32", "tf32", "bf16")),
        "trainer.channels_last": _BOOL, "trainer.compile": choice(("none", "default", "reduce-overhead", "max-autotune")),
        "trainer.world_size": (_int(1), "an integer >= 1"), "trainer.progress": _BOOL,
        "trainer.signal_every": (_int(0), "an integer >= 0 (0: off)"),
        "gpu_pool.enabled": _BOOL, "gpu_pool.jobs_per_gpu": (_int(1), "an integer >= 1"), "gpu_pool.lock_dir": _TEXT,
        "seed": (lambda v: _int(0)(v) and v < 2**63, "an integer in [0, 2^63)"),
        "tags": (lambda v: v is not None, "a mapping"),
    }


def _joint(cfg) -> list[tuple[bool, str]]:
    """Checks of keys taken together (each key alone already passed)."""
    from idmap.orderings import ORDERINGS

    t, m = cfg.trainer, cfg.model
    return [
        (m.get("ordering") is not None or m.block in ORDERINGS,
         f"model.block={m.block!r} is not allowed; it must be one of {', '.join(ORDERINGS)} (figure 4), "
         f"or the name of a block file that gives its ordering (README, 'Beyond the paper's tables')"),
        (t.batch_size % t.world_size == 0,
         f"trainer.batch_size={t.batch_size} must divide over trainer.world_size={t.world_size} processes"),
        (not (cfg.gpu_pool.enabled and t.world_size > 1),
         "gpu_pool gives each job one GPU; it cannot run trainer.world_size > 1 processes"),
        (not (cfg.optim.nesterov and cfg.optim.momentum == 0), "optim.nesterov=true needs optim.momentum > 0"),
        (not (m.widths and m.units_per_stage) or len(m.widths) == len(m.units_per_stage),
         f"model.widths {list(m.widths or [])} and model.units_per_stage {list(m.units_per_stage or [])} "
         f"must name the same number of stages"),
    ]


def check_config(cfg, choices=None) -> None:
    """IdmapError naming the key, its value and what is allowed, for the first bad setting; a block
    file's ordering is checked with the file's name (`choices`: the run's group choices)."""
    from idmap.orderings import check_config as check_ordering

    for key, (ok, allowed) in _rules().items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        try:
            good = ok(plain)
        except TypeError:  # e.g. a number where a list belongs
            good = False
        if not good:
            raise IdmapError(f"{key}={plain!r} is not allowed; it must be {allowed}")
    for ok, message in _joint(cfg):
        if not ok:
            raise IdmapError(message)
    check_ordering(cfg.model, (choices or {}).get("block"))


def schedule(cfg, num_train: int) -> tuple[float, int, list[int]]:
    """(iterations per epoch, the run's length, the LR milestones) in iterations, from the epochs
    or iterations the config gives, once the training set's size is known."""
    t, o = cfg.trainer, cfg.optim
    per_epoch = num_train / t.batch_size
    iters = round(t.epochs * per_epoch) if t.epochs else t.max_iters
    milestones = [round(e * per_epoch) for e in o.milestone_epochs] if o.milestone_epochs else list(o.milestones)
    return per_epoch, iters, milestones


def check_schedule(cfg, num_train: int) -> int:
    """The run's length in iterations; IdmapError when the schedule gives none. Milestones past
    the end are allowed (short trial runs) but logged."""
    import logging

    _, iters, milestones = schedule(cfg, num_train)
    if iters < 1:
        t = cfg.trainer
        raise IdmapError(f"trainer.epochs={t.epochs} gives no iteration ({num_train} images, batches of "
                         f"{t.batch_size}); raise trainer.epochs")
    if any(m >= iters for m in milestones):
        logging.getLogger("idmap").info("LR milestones %s lie past the run's %d iterations", milestones, iters)
    return iters


def one_line_message(exc: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line, without their object dumps."""
    noise = ("full_key:", "reference_type=", "object_type=", "Set the environment variable HYDRA_FULL_ERROR")
    text = str(exc)
    if isinstance(exc, IdmapError):  # one line already (compose_checked's), whatever its cause said
        return text
    if exc.__cause__ is not None and str(exc.__cause__) not in text:  # "Error merging override x" says why here
        text += "\n" + str(exc.__cause__)
    lines = [ln.strip() for ln in text.split("Config search path")[0].splitlines()
             if ln.strip() and not ln.strip().startswith(noise)]
    out = []
    for k, line in enumerate(lines):
        if line.startswith("Available options"):  # then one option per line (Hydra may repeat it all)
            options = [o for o in lines[k + 1:] if " " not in o and ":" not in o]
            out.append(f"{line.rstrip(':')}: {', '.join(dict.fromkeys(options))}")
            break
        out.append(line.rstrip("."))
    return "; ".join(out) or type(exc).__name__


def compose_checked(*overrides: str, hydra: bool = False):
    """compose_config, then check_config: IdmapError with one line for any bad setting."""
    try:
        cfg = compose_config(*overrides, hydra=hydra)
    except Exception as exc:  # a setting Hydra cannot compose: unknown key or option, wrong type
        raise IdmapError(one_line_message(exc)) from exc
    check_config(cfg, cfg.hydra.runtime.choices if hydra else None)
    return cfg


# ---- What comes in from outside, before Hydra reads a file for it: command lines, records, units ----
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a config option's name: no path
_FIELDS = {"model", "shortcut", "dataset", "optim", "trainer", "gpu_pool", "seed", "tags"}  # Config's
# Launcher settings a sweep's record may replay: resources and queues. Not submitit's setup or
# srun_args (commands), submitit_folder or additional_parameters (files written elsewhere), _target_.
LAUNCHER_KEYS = {"partition", "account", "qos", "timeout_min", "nodes", "tasks_per_node", "gpus_per_node",
                 "gpus_per_task", "cpus_per_task", "cpus_per_gpu", "mem_gb", "mem_per_cpu", "mem_per_gpu",
                 "constraint", "exclude", "comment", "array_parallelism", "signal_delay_s",
                 "max_num_timeout", "name", "n_jobs"}


def check_overrides(args: Sequence[str], record: Optional[Path] = None) -> None:
    """IdmapError for overrides that would make Hydra read a file it must not: a group option that
    is a path (block=../depth/20 loads another group's file, block=../../X any YAML), or a search
    path folder that holds more than unit files (check_unit_file). `record`: the file the
    overrides were replayed from (a run's .hydra/overrides.yaml, a sweep's multirun.yaml), which
    may hold this project's settings only (_check_replayed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    folders, overrides = [], []
    for before, arg in zip(["", *args], args):  # Hydra's flags, those with a value, then overrides
        if before in ("-cd", "--config-dir") or arg.startswith("--config-dir="):
            folders.append(arg.split("=", 1)[1] if arg.startswith("--config-dir=") else arg)
        elif not arg.startswith("-") and before not in ("-cp", "--config-path", "-cn", "--config-name",
                                                        "-c", "--cfg", "-p", "--package"):
            overrides.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # Hydra's grammar: one line
        raise IdmapError(one_line_message(exc)) from None
    for o in parsed:
        if record is not None:
            _check_replayed(o, record)
        if o.key_or_group == "hydra.searchpath":
            folders += [str(entry) for entry in (o.value() or [])]
        elif "." not in o.key_or_group and o.key_or_group not in _FIELDS and not o.is_delete():
            value = o.value()
            names = value.list if isinstance(value, ChoiceSweep) else value if isinstance(value, list) else [value]
            for name in (getattr(n, "text", n) for n in names):
                if name is not None and not _NAME.fullmatch(str(name)):
                    raise IdmapError(f"{o.input_line}: {o.key_or_group} takes an option's name (python "
                                     f"train.py --help lists them), not a path; a unit of your own is a "
                                     f"block file in DIR/block/ with DIR on hydra.searchpath")
    for folder in folders:
        _check_search_folder(folder)


def _check_replayed(o, record: Path) -> None:
    """An override a run's record replays: one of this project's settings, or of the launcher's
    resources; never a class (_target_), a callback or any other Hydra setting, nor a line break."""
    key, text = o.key_or_group, o.input_line
    ours = key in _rules() or key.startswith(("model.ordering.", "tags.")) or (CONF / key).is_dir()
    hydra = key in ("hydra.searchpath", "hydra.job.chdir") or (
        key.startswith("hydra.launcher.") and key[len("hydra.launcher."):] in LAUNCHER_KEYS)
    if not (ours or (hydra and text.startswith("hydra."))) or "_target_" in text or not text.isprintable():
        raise IdmapError(f"{record}: {text!r} is not one of this project's settings, and a run's record "
                         f"replays only those; delete it from the file (or give it on your own command line)")


def _check_search_folder(entry: str) -> None:
    """A folder Hydra searches for configs holds unit files only, each checked: any other YAML in
    it could be loaded as an option of another group, or replace Hydra's own settings."""
    scheme, sep, rest = entry.partition("://")
    if sep and scheme != "file":
        raise IdmapError(f"hydra.searchpath: {entry}: give unit files in a folder, file://DIR")
    folder = Path(rest if sep else entry)
    for top, dirs, files in os.walk(folder):  # a folder that does not exist yields nothing
        for name in sorted(dirs + files):
            path = Path(top) / name
            # A linked folder is not walked here, but Hydra would follow it.
            if (path.is_symlink() and path.is_dir()) or (name.endswith(".yaml") and path.parent != folder / "block"):
                raise IdmapError(f"{path}: a folder on hydra.searchpath holds unit files only "
                                 f"(block/<name>.yaml); move this out of {folder}")
            if name.endswith(".yaml"):
                check_unit_file(path)


def check_unit_file(path: Path) -> None:
    """A unit of one's own, read as data before Hydra loads it: `# @package model` and the keys block
    and ordering only (what they hold is checked when the unit is used, orderings.check_config).
    Any other key, package or defaults list could set Hydra's callbacks or any setting, so that a
    unit from elsewhere could run code or change a run."""
    import yaml
    from hydra.plugins.config_source import ConfigSource

    text = path.read_text(errors="replace")
    try:
        package, data = ConfigSource._get_header_dict(text)["package"], yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise IdmapError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from None
    extra = sorted(map(str, set(data) - {"block", "ordering"})) if isinstance(data, dict) else ["(not a mapping)"]
    if (CONF / "block" / path.name).is_file():
        raise IdmapError(f"{path}: the paper's block {path.stem} has this name, and Hydra would load the "
                         f"paper's; rename the file (and set block: to its new name)")
    if package != "model" or extra:
        raise IdmapError(f"{path}: a unit file sets the model's block and ordering only, under '# @package "
                         f"model'; it has {f'package {package}' if package != 'model' else extra[0]}")
