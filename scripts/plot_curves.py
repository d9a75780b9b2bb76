#!/usr/bin/env python
"""Training curves as in the paper's figures 1 and 6: training error dashed, test error solid, in %,
against iterations; one colour per setting (the seeds of a setting share it).

    python scripts/plot_curves.py outputs/multirun/2026-01-01/12-00-00 -o curves.png
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from idmap.report import load_run, run_dirs  # noqa: E402

# The paper's figures show 0-20%; wider only when no curve gets below it (e.g. failing runs).
PAPER_YMAX = 20.0


def read_metrics(path: Path) -> List[dict]:
    """The evaluations of one run; a torn last line (a run still writing) is skipped."""
    rows = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path}/metrics.jsonl: skipped an unreadable line", file=sys.stderr)
    return [r for r in rows if isinstance(r, dict) and "iteration" in r]


def legend_labels(choices: Sequence[Dict[str, str]]) -> List[str]:
    """Each run's label: the choices that differ between the plotted runs, or all of them."""
    keys = sorted({k for c in choices for k in c})
    varying = [k for k in keys if len({c.get(k) for c in choices}) > 1] or keys
    return [" ".join(f"{k}={c[k]}" for k in varying if k in c) or "run" for c in choices]


def collect(dirs: Sequence[Path]) -> Tuple[List[List[dict]], List[str]]:
    """The evaluations of every run under `dirs` that has some, and each run's legend label."""
    curves, choices = [], []
    for d in run_dirs(dirs):
        if not (d / "metrics.jsonl").exists():
            continue
        try:
            run_choices = load_run(d).choices
        except ValueError:  # a run still going has metrics but no summary yet
            run_choices = {"run": d.name}
        metrics = read_metrics(d)
        if metrics:
            curves.append(metrics)
            choices.append({k: v for k, v in run_choices.items() if k != "experiment"})
    return curves, legend_labels(choices)


def plot(curves: Sequence[List[dict]], labels: Sequence[str], out: Path,
         ymax: Optional[float] = None) -> None:
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(labels))}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for metrics, label in zip(curves, labels):
        it = [m["iteration"] for m in metrics]
        for key, style in (("train_error", "--"), ("test_error", "-")):
            ys = [m.get(key) for m in metrics]
            ax.plot(it, [math.nan if y is None else y for y in ys], style, color=colours[label],
                    linewidth=1.0, marker="o" if len(it) == 1 else None)  # a lone point is no line
    for label, colour in colours.items():  # one legend entry per setting, not per seed
        ax.plot([], [], "-", color=colour, label=label)
    ax.plot([], [], "k--", label="training error")
    ax.plot([], [], "k-", label="test error")
    best = min((m["test_error"] for c in curves for m in c if m.get("test_error") is not None),
               default=math.inf)
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, ymax or (PAPER_YMAX if best < PAPER_YMAX else None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("-o", "--out", type=Path, default=Path("curves.png"))
    parser.add_argument("--ymax", type=float, help="top of the error axis in %% (default: 20 as in "
                        "the paper's figures, unless no test error gets below it)")
    args = parser.parse_args(argv)
    try:
        curves, labels = collect(args.dirs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not curves:
        print("error: no metrics.jsonl with evaluations under the given directories", file=sys.stderr)
        return 1
    plot(curves, labels, args.out, args.ymax)
    print(f"{len(curves)} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
