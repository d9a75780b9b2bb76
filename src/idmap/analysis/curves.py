"""Training curves as in the paper's figures 1 and 6: training error dashed, test error solid, in %,
against iterations; one colour per setting (the seeds of a setting share it).

    python scripts/plot_curves.py outputs/multirun/2026-01-01/12-00-00 -o curves.png
    python scripts/plot_curves.py outputs/multirun --table table2 -o table2.png
    python scripts/plot_curves.py outputs/multirun/<date>/<time> --by optim.lr -o lr.png

With --table, one curve per row of the paper's table (runs grouped as scripts/report.py groups
them): the median over seeds at each evaluated iteration, the median being the paper's statistic,
and a shaded band from the lowest to the highest seed, so seed noise is seen beside the gaps.
With --by, the same per setting of any sweep, grouped as the report's sweep table (idmap.analysis.sweep_table).
"""

import math
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure

from idmap import cli, rundir
from idmap.analysis.paper import TABLES
from idmap.analysis.report import group
from idmap.analysis.run_records import load_run, load_runs

# The paper's figures show 0-20%; wider only when no curve gets below it (e.g. failing runs).
PAPER_YMAX = 20.0


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def legend_labels(choices: Sequence[Dict[str, str]]) -> List[str]:
    """Each run's label: the choices that differ between the plotted runs, or all of them."""
    keys = sorted({k for c in choices for k in c})
    varying = [k for k in keys if len({c.get(k) for c in choices}) > 1] or keys
    return [" ".join(f"{k}={c[k]}" for k in varying if k in c) or "run" for c in choices]


def collect(dirs: Sequence[Path]) -> Tuple[List[List[dict]], List[str]]:
    """The evaluations of every run under `dirs` that has some, and each run's legend label."""
    curves, choices = [], []
    for d in rundir.run_dirs(dirs):
        if not rundir.has_metrics(d):
            continue
        try:
            run = load_run(d)
        except ValueError:  # a run still going has metrics but no summary yet
            run_choices = {"run": d.name}
        else:  # labelled as built, not as chosen (runs.built_choices)
            run_choices = run.choices
            for note in run.notes:
                _warn(f"{d}: {note}")
        metrics = rundir.read_metrics(d, _warn)
        if metrics:
            curves.append(metrics)
            choices.append({k: v for k, v in run_choices.items() if k != "experiment"})
    return curves, legend_labels(choices)


def seed_band(curves: Sequence[List[dict]], key: str) -> Tuple[np.ndarray, np.ndarray]:
    """Iterations any seed evaluated at, and per seed the value there (NaN where it has none)."""
    iterations = np.array(sorted({m["iteration"] for c in curves for m in c}))
    values = np.full((len(curves), len(iterations)), np.nan)
    for i, metrics in enumerate(curves):
        for m in metrics:
            if m.get(key) is not None:
                values[i, np.searchsorted(iterations, m["iteration"])] = m[key]
    return iterations, values


def collect_rows(dirs: Sequence[Path], table: str) -> Tuple[List[List[List[dict]]], List[str]]:
    """Per line of the report's table that has curves: its seeds' evaluations, and its label."""
    return _line_curves([l for l in group(TABLES[table], _load(dirs)) if l.runs])


def collect_settings(dirs: Sequence[Path], by: Optional[Sequence[str]] = None
                     ) -> Tuple[List[List[List[dict]]], List[str]]:
    """Per setting of the report's sweep table (idmap.analysis.sweep_table: `by`, or the overrides that differ
    between the runs, seeds pooled): its seeds' evaluations, and its label."""
    from idmap.analysis.sweep_table import sweep

    return _line_curves(sweep(_load(dirs), by).lines)


def _load(dirs: Sequence[Path]):
    runs, problems = load_runs(dirs)
    for p in problems:
        _warn(p)
    return runs


def _line_curves(lines) -> Tuple[List[List[List[dict]]], List[str]]:
    """Each line's curves and label: its row or setting, and what its runs trained on where the
    lines' data, protocol or length differ (a line never pools those, report.group, sweeps.sweep)."""
    rows, labels = [], []
    many = len({l.setting for l in lines}) > 1
    for line in lines:
        name = line.row.key + (f" ({line.data}, {line.protocol}, {line.max_iters})" if many else "")
        curves = [m for m in (rundir.read_metrics(r.path, _warn) for r in line.runs
                              if rundir.has_metrics(r.path)) if m]
        if curves:
            rows.append(curves)
            seeds = f"median of {len(curves)} seeds" if len(curves) > 1 else "1 seed"
            labels.append(f"{name}, {seeds}")
    return rows, labels


def _finish(fig, ax, best: float, out: Path, ymax: Optional[float]) -> None:
    ax.plot([], [], "k--", label="training error")
    ax.plot([], [], "k-", label="test error")
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, ymax or (PAPER_YMAX if best < PAPER_YMAX else None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    rundir.write_figure(fig, out)


def plot_rows(rows: Sequence[List[List[dict]]], labels: Sequence[str], out: Path,
              ymax: Optional[float] = None) -> None:
    """Each row's median curve over seeds, training error dashed, test error solid with a band
    from the lowest to the highest seed."""
    fig = Figure(figsize=(7, 4.5))  # not pyplot: no backend, no global state
    ax = fig.subplots()
    best = math.inf
    for i, (curves, label) in enumerate(zip(rows, labels)):
        colour = f"C{i % 10}"
        for key, style in (("train_error", "--"), ("test_error", "-")):
            it, values = seed_band(curves, key)
            with warnings.catch_warnings():  # an iteration where no seed logged this key
                warnings.simplefilter("ignore", RuntimeWarning)
                median = np.nanmedian(values, axis=0)
                lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
            ax.plot(it, median, style, color=colour, linewidth=1.0,
                    marker="o" if len(it) == 1 else None,
                    label=label if key == "test_error" else None)
            if key == "test_error":
                ax.fill_between(it, lo, hi, color=colour, alpha=0.2, linewidth=0)
                best = min(best, np.nanmin(values, initial=math.inf))
    ax.fill_between([], [], [], color="k", alpha=0.2, linewidth=0,
                    label="test error, lowest to highest seed")
    _finish(fig, ax, best, out, ymax)


def plot(curves: Sequence[List[dict]], labels: Sequence[str], out: Path,
         ymax: Optional[float] = None) -> None:
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(labels))}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for metrics, label in zip(curves, labels):
        it = [m["iteration"] for m in metrics]
        for key, style in (("train_error", "--"), ("test_error", "-")):
            ys = [m.get(key) for m in metrics]
            ax.plot(it, [math.nan if y is None else y for y in ys], style, color=colours[label],
                    linewidth=1.0, marker="o" if len(it) == 1 else None)  # a lone point is no line
    for label, colour in colours.items():  # one legend entry per setting, not per seed
        ax.plot([], [], "-", color=colour, label=label)
    best = min((m["test_error"] for c in curves for m in c if m.get("test_error") is not None),
               default=math.inf)
    _finish(fig, ax, best, out, ymax)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run or sweep directories (searched recursively)")
    parser.add_argument("-o", "--out", type=cli.figure, default="curves.png",
                        help="figure file (.png, .pdf, .svg, ...; default curves.png)")
    parser.add_argument("--ymax", type=cli.number(), help="top of the error axis in %% (default: 20 as in "
                        "the paper's figures, unless no test error gets below it)")
    parser.add_argument("--table", choices=list(TABLES),
                        help="one median curve with a min-max band over seeds per row of this "
                        "paper table (runs grouped as scripts/report.py groups them)")
    parser.add_argument("--by", nargs="?", const="", metavar="KEY,...",
                        help="one median curve with a min-max band over seeds per setting, grouped "
                        "as the report's sweep table (default keys: the overrides that differ)")
    args = parser.parse_args(argv)
    rows = bool(args.table) or args.by is not None
    if args.table:  # a folder that is none: an IdmapError, exit 2 (cli.run_command)
        curves, labels = collect_rows(args.dirs, args.table)
    elif args.by is not None:
        curves, labels = collect_settings(args.dirs, [k for k in args.by.split(",") if k])
    else:
        curves, labels = collect(args.dirs)
    if not curves:
        print(f"error: no {rundir.METRICS} with evaluations under the given directories"
              + (f" in a row of {args.table}" if args.table else ""), file=sys.stderr)
        return 2
    if rows:
        plot_rows(curves, labels, args.out, args.ymax)
        print(f"{len(curves)} rows, {sum(map(len, curves))} runs -> {args.out}")
    else:
        plot(curves, labels, args.out, args.ymax)
        print(f"{len(curves)} runs -> {args.out}")
    return 0

