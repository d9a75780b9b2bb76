"""Runs as reports see them: each run directory's summary read through idmap.rundir, placed by the
model it built (issue 12: `model.block=original` on the command line builds an original unit but
leaves Hydra's block choice full_preact, so choices alone would misfile it)."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from idmap import rundir

# summary.json's dataset name -> label, for summaries written without a label.
_DATA_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


@dataclass
class Run:
    path: Path
    status: str
    final_test_error: Optional[float]
    choices: Dict[str, str]
    data: str  # what the run trained on, e.g. "CIFAR-10", "CIFAR-10 (JPEG copy)", "synthetic"
    max_iters: Optional[int]
    seed: Optional[int]
    notes: List[str] = field(default_factory=list)  # choices that disagree with the built model
    # What the run recorded in .hydra/: its command-line overrides and composed config (sweep_table.py).
    overrides: List[str] = field(default_factory=list)
    config: Any = None

    @property
    def outcome(self) -> Optional[float]:
        """The run's final test error, inf when it diverged, None when it has no result."""
        if self.status == rundir.Status.DIVERGED:
            return math.inf
        if self.status == rundir.Status.COMPLETED and _is_number(self.final_test_error):
            return float(self.final_test_error)
        return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def depth_option(depth: int, unit: str, configured_unit: Optional[str] = None) -> str:
    """The conf/depth option that builds `depth` layers of `unit` units: "110" where the unit is
    the paper's for that depth (idmap.models.resnet.auto_unit), "110_1layer" for 1-layer units. Any other
    network gets a name no option has, e.g. "110_bottleneck", so that it is in no paper row."""
    if unit == "single":
        return f"{depth}_1layer"
    if configured_unit == "auto":  # the paper's unit by definition
        return str(depth)
    from idmap.models.resnet import auto_unit  # here: it imports torch (seconds), rarely needed

    return str(depth) if unit == auto_unit(depth) else f"{depth}_{unit}"


def built_choices(summary: dict) -> Tuple[Dict[str, str], List[str]]:
    """The run's choices, with block, shortcut and depth as the model was built (issue 12:
    `model.block=original` on the command line builds an original unit but leaves the block choice
    full_preact), and one message per choice that disagrees with the built model. A summary without
    "model" (older ones; runs that failed before building) keeps its choices."""
    choices = {str(k): str(v) for k, v in (summary.get("choices") or {}).items()
               if not str(k).startswith("hydra/")}
    model, shortcut = summary.get("model"), summary.get("shortcut")
    if not isinstance(model, dict):
        return choices, []
    built: Dict[str, Tuple[str, str]] = {}  # group -> (option, what was built in words)
    if model.get("block"):
        built["block"] = (str(model["block"]),) * 2
    if isinstance(shortcut, dict) and shortcut.get("name"):
        built["shortcut"] = (str(shortcut["name"]),) * 2
    if isinstance(model.get("depth"), int) and model.get("unit"):
        config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
        configured = (config.get("model") or {}).get("unit")
        depth, unit = model["depth"], str(model["unit"])
        built["depth"] = (depth_option(depth, unit, configured), f"ResNet-{depth} of {unit} units")
    notes = []
    for name, (option, words) in built.items():
        if choices.get(name, option) != option:
            notes.append(f"{name} choice {choices[name]} but the model built was {words}; "
                         f"reported as {option}")
        choices[name] = option
    return choices, notes


# The summary fields a report reads, and their types: a summary.json that has one of another type
# is no run's (a foreign or hand-edited file), and is skipped with a warning, not the whole report.
_FIELDS = {"choices": dict, "dataset": dict, "model": dict, "shortcut": dict, "config": dict, "seed": int,
           "max_iters": int, "final_test_error": (int, float)}


def load_run(path: Path) -> Run:
    """Raises ValueError with a one-line reason when the summary is missing, unreadable or foreign."""
    s = rundir.read_summary(path)
    for key, kind in _FIELDS.items():
        value = s.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ValueError(f"summary.json is not a run's ({key} is {value!r:.40})")
    dataset = s.get("dataset") if isinstance(s.get("dataset"), dict) else {}
    name = str(dataset.get("name") or "?")
    choices, notes = built_choices(s)
    return Run(
        path=path,
        status=s["status"],
        final_test_error=s.get("final_test_error"),
        choices=choices,
        data=str(dataset.get("label") or _DATA_LABELS.get(name, name)),
        max_iters=s.get("max_iters"),
        seed=s.get("seed"),
        notes=notes,
        overrides=rundir.recorded_overrides(path),
        config=rundir.recorded_config(path),
    )


def load_runs(dirs: Iterable[Path]) -> Tuple[List[Run], List[str]]:
    """All runs under `dirs`, and a warning per run directory that could not be read and per
    choice that disagrees with the model a run built."""
    runs, problems = [], []
    for path in rundir.run_dirs(dirs):
        try:
            runs.append(load_run(path))
        except ValueError as e:
            problems.append(f"{path}: {e}, skipped")
            continue
        problems += [f"{path}: {note}" for note in runs[-1].notes]
    return runs, problems
