"""The run configuration as structured configs, so a misspelled key or a wrong type fails at start-up.

Defaults are the paper's CIFAR protocol (docs/paper.md, "Training protocol"); the YAML groups in conf/
select among the paper's choices and only override what differs.
"""

import copy
import dataclasses
import functools
import hashlib
import math
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from idmap import IdmapError, one_line_message
from idmap.train.data import DATASETS, NORMALIZATIONS
from idmap.models.norm import GHOST_BN
from idmap.models.resnet import DOWNSAMPLES, SHORTCUT_DEFAULTS, SHORTCUTS, UNITS
from idmap.paths import CONF  # the project's config groups (train.yaml's)
from idmap.train.runtime import COMPILE_MODES, DEVICE, PRECISIONS, SGD_IMPLS


# --------------------------------------------------------------------------------------------------
# Every key once: its type and default (the dataclass field), what values it allows, what it is for
# (its roles), and its help line. check_config, the resume rules, the sweep report's pooling,
# idmap-plan's timing key, TensorBoard's hparams and `train.py --help` all read these declarations.
# --------------------------------------------------------------------------------------------------
class Role(Enum):
    """What a key is for, beyond the value it sets."""

    RESUMABLE = "how a run runs, not what it computes: a resumed run may change it"
    SWITCH = "picks other kernels: a resume that changes it continues equal up to rounding, not bit for bit"
    POOLED = "never tells settings apart in a sweep's report (the seed is pooled; where a run ran)"
    PER_RUN = "not repeated by a sweep report's --next commands (they give new seeds and start afresh)"
    STEP_COST = "what one training step's time depends on (idmap-plan times one model per distinct value)"
    HPARAM = "a column of TensorBoard's HParams view"
    VIEW = "not which images a data set holds (evaluate's 'the run's own data' ignores it)"


R, S, P, N, C, H, V = (Role.RESUMABLE, Role.SWITCH, Role.POOLED, Role.PER_RUN, Role.STEP_COST, Role.HPARAM,
                       Role.VIEW)


class Rule(NamedTuple):
    """A key's valid values: `test(value)`, and `allowed()` saying what they are in a message."""

    test: Callable[[Any], bool]
    allowed: Callable[[], str]


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _rule(test, allowed: str) -> Rule:
    return Rule(test, lambda: allowed)


def _integer(low: int, note: str = "") -> Rule:
    return _rule(lambda v: _is_int(v, low), f"an integer >= {low}{note}")


def _choice(names: Sequence[str]) -> Rule:
    """One of the names the implementing module gives (its one home)."""
    return _rule(lambda v: v in names, "one of " + ", ".join(names))


def _ints(v) -> bool:  # None (the paper's layout) or a non-empty list of positive integers
    return v is None or (len(v) > 0 and all(_is_int(x, 1) for x in v))


def _increasing(v, item) -> bool:
    return all(item(m) for m in v) and list(v) == sorted(set(v))


TEXT = _rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
BOOL = _rule(lambda v: isinstance(v, bool), "true or false")
POSITIVE = _rule(lambda v: _real(v) and v > 0, "a finite number > 0")
AT_LEAST_0 = _rule(lambda v: _real(v) and v >= 0, "a finite number >= 0")
FRACTION = _rule(lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)")
ANY = _rule(lambda v: True, "anything")


def setting(default, rule: Rule, *roles: Role, help: str = "", hparam: Optional[str] = None):  # noqa: A002
    """A key of the schema: a dataclass field carrying its rule, roles and help (`hparam`: the
    name TensorBoard shows, where not the key itself)."""
    meta = {"rule": rule, "roles": frozenset(roles), "help": help, "hparam": hparam}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


_S = SHORTCUT_DEFAULTS  # each shortcut option's default lives with its shortcut in models.py


@dataclass
class ModelConfig:
    depth: int = setting(110, _integer(1), C, H, help="layers with weights (conf/depth/ names the paper's)")
    unit: str = setting("auto", _choice(("auto", *UNITS)), C, H,
                        help="auto: the paper's choice for the depth")
    # A paper ordering's name, or the name of a block file's own ordering (checked in _joint).
    block: str = setting("full_preact", TEXT, C, H, help="figure 4's ordering (a)-(e), or a block file's own")
    # A unit the paper did not try: {layer, last, after_add} as lists of bn/relu/conv, checked by
    # idmap.models.orderings (Any here, so that a malformed one gets that one-line message, not Hydra's).
    ordering: Optional[Any] = setting(None, _rule(lambda v: v is None or isinstance(v, dict),
                                                  "null or a mapping of layer, last and after_add"), C, H,
                                      help="a block file's ordering: layer, last and after_add")
    downsample: str = setting("auto", _choice(("auto", *DOWNSAMPLES)), C, H,
                              help="the shortcut where a stage changes shape; auto: projection for bottleneck units")
    widths: Optional[List[int]] = setting(None, _rule(_ints, "null or a list of integers >= 1"), C, H,
                                          help="channels per stage; null: the paper's 16/32/64")
    units_per_stage: Optional[List[int]] = setting(None, _rule(_ints, "null or a list of integers >= 1"), C, H,
                                                   help="units per stage; null: derived from the depth")
    zero_init_residual: bool = setting(False, BOOL, C, H, help="each residual branch's last BN starts at 0")
    bn_batch: Optional[int] = setting(None, _rule(lambda v: v is None or _is_int(v, 1), "null or an integer >= 1"),
                                      C, H, help="ghost BN: statistics over chunks of this many images "
                                                 "(the paper's 2 GPUs x 64)")
    checkpointing: bool = setting(False, BOOL, C, H, help="activation checkpointing per unit: compute for "
                                                          "memory (ResNet-1001 on one GPU)")
    ghost_bn: str = setting("one_pass", _choice(GHOST_BN), R, S, C, help="how ghost BN computes the same "
                            "statistics: all chunks at once, or chunked (the reference, one BN call per chunk)")


@dataclass
class ShortcutConfig:
    """Figure 2 / table 1. Only the parameters of the chosen shortcut are read."""

    name: str = setting("identity", _choice(tuple(SHORTCUTS)), C, H, help="figure 2's shortcut")
    # Table 1 scales h(x) by 0 (no shortcut at all): a scale may be 0.
    shortcut_scale: float = setting(_S["shortcut_scale"], AT_LEAST_0, C, H, help="constant_scaling: lambda on h(x)")
    residual_scale: float = setting(_S["residual_scale"], AT_LEAST_0, C, H, help="constant_scaling: lambda on F(x)")
    gate_bias: float = setting(_S["gate_bias"], _rule(_real, "a finite number"), C, H,
                               help="exclusive_gating, shortcut_only_gating: initial b_g")
    gate_bn: bool = setting(_S["gate_bn"], BOOL, C, H, help="UNVERIFIED in the paper: BN after the gate's 1x1 conv")
    dropout_p: float = setting(_S["dropout_p"], FRACTION, C, H, help="dropout: the probability of dropping h(x)")
    dropout_rescale: bool = setting(_S["dropout_rescale"], BOOL, C, H,
                                    help="UNVERIFIED: Caffe scales kept values by 1/(1-p)")


@dataclass
class DatasetConfig:
    name: str = setting("cifar10", _choice(DATASETS), C, H, hparam="dataset",
                        help="the data (conf/dataset/ holds ready-made settings)")
    root: str = setting("${oc.env:IDMAP_DATA,data}", TEXT, R, help="where the data sets are (or are downloaded to)")
    download: bool = setting(True, BOOL, R, help="download the official archives when missing")
    label: str = setting("", _rule(lambda v: isinstance(v, str), "a string"), R, V,
                         help="what reports call the data, e.g. 'CIFAR-10 (JPEG copy)'; empty: the loader's name")
    normalization: str = setting("channel", _choice(NORMALIZATIONS), V,
                                 help="channel: per-channel mean and std; pixel: per-pixel mean (the paper's v1)")
    augment: bool = setting(True, BOOL, V, help="zero-pad 4, random 32x32 crop, random horizontal flip")
    num_train: int = setting(5000, _integer(1), help="synthetic only: training images")
    num_test: int = setting(1000, _integer(1), help="synthetic only: test images")
    num_classes: int = setting(10, _integer(2), C, help="synthetic only: classes")
    image_size: int = setting(32, _integer(1), C, help="synthetic only: image side in pixels")


@dataclass
class OptimConfig:
    lr: float = setting(0.1, POSITIVE, H, help="the learning rate after warm-up")
    momentum: float = setting(0.9, FRACTION, H)
    nesterov: bool = setting(False, BOOL, H)
    weight_decay: float = setting(1e-4, AT_LEAST_0, H)
    gamma: float = setting(0.1, _rule(lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"), H,
                           help="the LR's factor at each milestone")
    milestones: List[int] = setting([32000, 48000], _rule(lambda v: _increasing(v, lambda m: _is_int(m, 1)),
                                                          "increasing integers >= 1 (iterations)"), H,
                                    help="LR drops, in iterations")
    milestone_epochs: Optional[List[float]] = setting(
        None, _rule(lambda v: v is None or _increasing(v, lambda m: _real(m) and m > 0),
                    "null or increasing numbers > 0 (epochs)"), H,
        help="when set, replaces milestones with epochs (the Torch code's recipe: 81, 122)")
    warmup_iters: int = setting(400, _integer(0), H, help="iterations at warmup_lr before lr")
    warmup_lr: float = setting(0.01, POSITIVE, H)
    impl: str = setting("foreach", _choice(tuple(SGD_IMPLS)), R, S, C, H,
                        help="torch.optim.SGD's implementation (the same maths)")


@dataclass
class TrainerConfig:
    max_iters: int = setting(64000, _integer(1), R, help="the run's length in iterations")
    epochs: Optional[float] = setting(None, _rule(lambda v: v is None or (_real(v) and v > 0),
                                                  "null or a finite number > 0"), R,
                                      help="when set, replaces max_iters (iterations = epochs*N/batch)")
    batch_size: int = setting(128, _integer(1), C, H, hparam="batch_size", help="the global batch")
    eval_every: int = setting(1000, _integer(1), R, help="iterations between test-set evaluations")
    eval_batch_size: int = setting(1000, _integer(1), R)
    checkpoint_every: int = setting(4000, _integer(1), R, help="iterations between checkpoints")
    log_every: int = setting(100, _integer(1), R, help="progress bar refresh and the divergence check (a host sync)")
    device: str = setting("auto", _rule(lambda v: isinstance(v, str) and DEVICE.fullmatch(v) is not None,
                                        "auto, cpu, cuda or cuda:N"), R, S, P, C, help="where the run trains")
    # train.py turns a path into the run's own overrides (resume.resume_argv) before the config is
    # composed, so the config sees true or false only.
    resume: Any = setting(False, _rule(lambda v: isinstance(v, bool), "true, false or a run or sweep directory"),
                          R, P, N, help="true: continue the checkpoint in hydra.run.dir; a run or sweep "
                                        "directory: continue that, with its own settings")
    deterministic: bool = setting(False, BOOL, R, S, help="deterministic kernels (slower)")
    # Speed switches (issue 4). None changes the algorithm; bf16 changes arithmetic precision only.
    precision: str = setting("fp32", _choice(PRECISIONS), R, S, C,
                             help="bf16: autocast with fp32 master weights")
    channels_last: bool = setting(False, BOOL, R, S, C, help="NHWC memory format")
    compile: str = setting("none", _choice(tuple(COMPILE_MODES)), R, S, C,
                           help="torch.compile's mode; reduce-overhead: CUDA graphs")
    world_size: int = setting(1, _integer(1), R, C, help="data-parallel processes spawned by this run (one "
                                                         "per GPU, or gloo on CPU); BN stays per process")
    progress: bool = setting(True, BOOL, R, P, help="tqdm bar; off in multiruns")
    signal_every: int = setting(0, _integer(0, " (0: off)"), R,
                                help="log per-unit activation/gradient norms every N iterations")


@dataclass
class GpuPoolConfig:
    """Jobs of a sweep running in parallel on one machine take one GPU each (see idmap.run.gpu_pool)."""

    enabled: bool = setting(False, BOOL, R, P, help="one GPU per job of a sweep on one machine")
    jobs_per_gpu: int = setting(1, _integer(1), R, P)
    lock_dir: str = setting("${oc.env:IDMAP_GPU_LOCKS,/tmp/idmap-gpu-locks}", TEXT, R, P)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    gpu_pool: GpuPoolConfig = field(default_factory=GpuPoolConfig)
    seed: int = setting(0, _rule(lambda v: _is_int(v, 0) and v < 2**63, "an integer in [0, 2^63)"), P, N, H,
                        help="the data order's and initialisation's seed")
    tags: Dict[str, Any] = setting({}, _rule(lambda v: v is not None, "a mapping"), R,
                                   help="free-form, recorded in summary.json (e.g. the table row an experiment runs)")


class Key(NamedTuple):
    """One declared key: its dotted name, rule, roles, help and TensorBoard name."""

    name: str
    rule: Rule
    roles: frozenset
    help: str
    hparam: str


def keys(schema: Optional[type] = None) -> Dict[str, Key]:
    """Every key the schema (by default Config) declares, dotted, in declaration order."""
    return _declared(schema or Config)


@functools.lru_cache(maxsize=None)  # read-only: a schema does not change while the process runs
def _declared(schema: type, prefix: str = "") -> Dict[str, Key]:
    out = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_declared(hints[f.name], f"{prefix}{f.name}."))
        else:
            m, name = f.metadata, prefix + f.name
            out[name] = Key(name, m["rule"], m["roles"], m["help"], m["hparam"] or name)
    return out


def default(key: str, schema: Optional[type] = None):
    """A key's default in the schema (as declared; before any group of conf/ sets it)."""
    return _defaults(schema or Config)[key]


@functools.lru_cache(maxsize=None)
def _defaults(schema: type) -> Dict[str, Any]:
    node = OmegaConf.structured(schema)
    return {k: OmegaConf.select(node, k, throw_on_resolution_failure=False) for k in keys(schema)}


def with_role(role: Role, schema: Optional[type] = None) -> List[str]:
    """The keys that have `role`, in declaration order."""
    return [k.name for k in keys(schema).values() if role in k.roles]


# Keys outside the schema that have roles: Hydra's own settings, and conf/launcher/ (where jobs run).
OUTSIDE = {"hydra": frozenset({R, P, N}), "launcher": frozenset({R, P})}


def has_role(key: str, role: Role, schema: Optional[type] = None) -> bool:
    """Whether a dotted key (or a section, or something inside a key, e.g. tags.row; or an override's
    key, e.g. hydra.launcher.partition) has `role`: a section has it when all its keys do."""
    head = re.split(r"[./]", key, maxsplit=1)[0]
    if head in OUTSIDE:
        return role in OUTSIDE[head]
    declared = keys(schema)
    if key in declared:
        return role in declared[key].roles
    parts = key.split(".")
    for n in range(1, len(parts)):  # a key below a declared one (tags.row)
        above = ".".join(parts[:n])
        if above in declared:
            return role in declared[above].roles
    inside = [k for k in declared.values() if k.name.startswith(key + ".")]
    return bool(inside) and all(role in k.roles for k in inside)


def register_configs() -> None:
    """The schema train.yaml builds on, and `train.py --help` (conf/train.yaml selects it)."""
    store = ConfigStore.instance()
    store.store(name="idmap_schema", node=Config)
    store.store(group="hydra/help", name="idmap", node={
        "app_name": "train.py",
        "header": "python train.py [GROUP=OPTION ...] [KEY=VALUE ...]: one run of the paper's protocol; "
                  "-m with comma-separated values sweeps (README).",
        "footer": "Use --hydra-help for Hydra's own flags; --cfg job prints the composed config.",
        "template": "${hydra.help.header}\n\n== Groups (GROUP=OPTION) ==\n$APP_CONFIG_GROUPS\n\n"
                    "== Settings (KEY=VALUE): the schema's default (the groups above set some: --cfg job prints a "
                    "run's own); allowed values; what it does ==\n"
                    + settings_help().replace("$", "\\$") + "\n\n${hydra.help.footer}\n"})


def settings_help(schema: Optional[type] = None) -> str:
    """One line per key for `train.py --help`: its default, what it allows and its help."""
    defaults = OmegaConf.structured(schema or Config)
    lines = []
    for key in keys(schema).values():
        default = OmegaConf.select(defaults, key.name, throw_on_resolution_failure=False)
        default = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
        help_text = f"; {key.help}" if key.help else ""
        lines.append(f"  {key.name}={default}: {key.rule.allowed()}{help_text}")
    return "\n".join(lines)


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


def _short(v) -> str:  # 200.0 as the user wrote it, 200
    return f"{v:g}" if isinstance(v, float) else str(v)


def _joint(cfg) -> list[tuple[bool, str]]:
    """Checks of keys taken together (each key alone already passed)."""
    from idmap.models.orderings import ORDERINGS

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
        # A length or LR drops in iterations that epochs replace would be ignored without a word.
        (t.epochs is None or t.max_iters == default("trainer.max_iters"),
         f"trainer.max_iters={t.max_iters} is ignored while trainer.epochs={_short(t.epochs)} sets the length "
         f"(as in protocol=torch): give the length as trainer.epochs, or set trainer.epochs=null"),
        (cfg.optim.milestone_epochs is None or list(cfg.optim.milestones) == default("optim.milestones"),
         f"optim.milestones={list(cfg.optim.milestones)} are ignored while optim.milestone_epochs="
         f"[{','.join(map(_short, cfg.optim.milestone_epochs or []))}] set the LR drops: give them in "
         f"epochs, or set optim.milestone_epochs=null"),
        (not (m.widths and m.units_per_stage) or len(m.widths) == len(m.units_per_stage),
         f"model.widths {list(m.widths or [])} and model.units_per_stage {list(m.units_per_stage or [])} "
         f"must name the same number of stages"),
    ]


# Validation happens once, where a config comes in (train.py's task, compose_checked, idmap-plan, a run
# started from Python): check_config remembers what each config it passed held, and `checked` checks
# again only what it has not passed (a copy changed after the check: the launcher's world size, say).
_PASSED: set = set()


def _content(cfg, choices) -> str:  # the block file's name is in the messages
    return hashlib.sha256((OmegaConf.to_yaml(cfg) + repr((choices or {}).get("block"))).encode()).hexdigest()


def checked(cfg, choices=None):
    """`cfg`, checked (check_config) unless a config that held the same was."""
    if not (OmegaConf.is_config(cfg) and _content(cfg, choices) in _PASSED):
        check_config(cfg, choices)
    return cfg


def check_config(cfg, choices=None) -> None:
    """IdmapError naming the key, its value and what is allowed, for the first bad setting; a block
    file's ordering is checked with the file's name (`choices`: the run's group choices). A config
    that passes is remembered (`checked`)."""
    from idmap.models.orderings import check_config as check_ordering

    for key in keys().values():
        value = OmegaConf.select(cfg, key.name, throw_on_missing=False)
        plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        try:
            good = key.rule.test(plain)
        except TypeError:  # e.g. a number where a list belongs
            good = False
        if not good:
            raise IdmapError(f"{key.name}={plain!r} is not allowed; it must be {key.rule.allowed()}")
    for ok, message in _joint(cfg):
        if not ok:
            raise IdmapError(message)
    check_ordering(cfg.model, (choices or {}).get("block"))
    if OmegaConf.is_config(cfg):
        _PASSED.add(_content(cfg, choices))


def compose_checked(*overrides: str, hydra: bool = False):
    """compose_config, then check_config: IdmapError with one line for any bad setting."""
    try:
        cfg = compose_config(*overrides, hydra=hydra)
    except Exception as exc:  # a setting Hydra cannot compose: unknown key or option, wrong type
        raise IdmapError(one_line_message(exc)) from exc
    check_config(cfg, cfg.hydra.runtime.choices if hydra else None)
    return cfg
