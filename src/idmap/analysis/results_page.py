"""The results page: the report's tables, the training curves and one line per run saying where,
when and how it ran, generated from the run files kept in the repository (docs/results/runs).

    python scripts/results.py docs/results/runs --collect outputs/results   # copy completed runs in
    python scripts/results.py docs/results/runs --out docs/results.md       # write the page

Only whole runs are kept: --collect copies a run once it completed its schedule, and only its small
files (summary, metrics, Hydra's record, TensorBoard events): no checkpoint, nothing of the images.
The page's tables are `scripts/report.py RUNS --seeds-needed` verbatim; its one hand-written part,
the reading of the numbers, comes from reading.md beside the runs folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import statistics
from pathlib import Path
from typing import Optional, Sequence

from idmap import IdmapError, cli, rundir
from idmap.analysis import curves, report
from idmap.analysis.run_records import Run, load_runs
from idmap.train import runlog

TENSORBOARD = "events.out.tfevents.*"
# Keys that say how a run ran, not what it computed: left out when runs are matched into pairs.
_HOW = ("seed", "trainer.precision", "trainer.resume", "trainer.progress", "trainer.checkpoint_every")


# --------------------------------------------------------------------------------------------------
# Collecting completed runs
# --------------------------------------------------------------------------------------------------
def completed(run_dir: Path) -> bool:
    """Whether the run reached the end of its schedule (a stopped or diverged run is no result)."""
    try:
        s = rundir.read_summary(run_dir)
    except ValueError:
        return False
    return s["status"] == rundir.Status.COMPLETED and (s.get("iterations") or 0) >= (s.get("max_iters") or 0) > 0


def kept_files(run_dir: Path) -> list[Path]:
    """The files of a run the repository keeps, relative to the run."""
    hydra = sorted(p for p in (run_dir / rundir.HYDRA_DIR).glob("*.yaml"))
    names = [run_dir / rundir.SUMMARY, run_dir / rundir.METRICS, *hydra, *sorted(run_dir.glob(TENSORBOARD))]
    return [p.relative_to(run_dir) for p in names if p.is_file()]


def collect(source: Path, dest: Path) -> tuple[list[Path], list[Path]]:
    """Copies each completed run under `source` into the same place under `dest`, with its sweep's
    multirun.yaml; returns the runs copied (or completed: a copy cut short is finished) and the kept
    runs whose summary under `source` differs. A kept file is never replaced: a completed run does
    not change, but a no-op resume of its sweep rewrites multirun.yaml (newer help text), and a
    rerun in the same folder is another result, which the user takes by deleting the kept copy."""
    copied, differs = [], []
    for run in rundir.run_dirs([source]):
        if not completed(run):
            continue
        target = dest / run.relative_to(source)
        kept = target / rundir.SUMMARY
        if kept.is_file() and kept.read_bytes() != (run / rundir.SUMMARY).read_bytes():
            differs.append(target)  # another run's files must not fill in this one's
            continue
        files = [(run / f, target / f) for f in kept_files(run)]
        if (run.parent / rundir.MULTIRUN).is_file() and run.parent != source.parent:
            files.append((run.parent / rundir.MULTIRUN, target.parent / rundir.MULTIRUN))
        # The summary last: it is what marks a run as kept, so an interrupted copy is redone.
        files = sorted((pair for pair in files if not pair[1].exists()), key=lambda pair: pair[1] == kept)
        for src, dst in files:
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = src.read_bytes()
            rundir.atomic_write(dst, lambda f: f.write(data))
        if files:
            copied.append(target)
    return copied, differs


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------
def _captured(main, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if main(argv):
            raise IdmapError(f"{main.__module__} {shlex.join(argv)} failed")
    return out.getvalue().strip()


def command(run: Run) -> str:
    """The command line that runs this run again (its recorded overrides; a resume's own entry left
    out, since the run it continued had the same settings)."""
    args = [o for o in run.overrides if rundir.override_key(o) != "trainer.resume"]
    return "python train.py -m " + " ".join(map(_shell, args))


def _shell(arg: str) -> str:
    """An override as one types it: bare where the shell leaves it alone, in double quotes where it
    holds Hydra's own quotes or brackets (depth='20', optim.milestones=[2000,3000])."""
    if re.fullmatch(r"[\w.=+,/:@%-]+", arg):
        return arg
    return f'"{arg}"' if not set('"$`\\!') & set(arg) else shlex.quote(arg)


def _hours(seconds: Optional[float]) -> str:
    if not seconds:
        return ""
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}"


def _rate(run_dir: Path) -> Optional[float]:
    # From the metrics, not summary.json: runs kept before the summary's rate became images over
    # training seconds hold a plain mean of their windows' rates there.
    return runlog.throughput(rundir.read_metrics(run_dir))


def run_table(runs: Sequence[Run], root: Path) -> list[str]:
    lines = ["| run | final test error (%) | iterations | device | precision | torch | commit | ended (UTC) "
             "| wall time | images/s (training) | command |", "|" + "---|" * 11]
    for run in runs:
        s = rundir.read_summary(run.path)
        config = s.get("config") or {}
        lines.append("| " + " | ".join([
            f"`{run.path.relative_to(root)}`", "" if run.final_test_error is None else f"{run.final_test_error:.2f}", str(s.get("iterations")),
            s.get("device_name") or s.get("device", ""), (config.get("trainer") or {}).get("precision", ""),
            s.get("torch_version", ""), (s.get("git_commit") or "")[:10], (s.get("ended") or "").replace("+00:00", ""),
            _hours(s.get("wall_time_s")), f"{rate:,.0f}" if (rate := _rate(run.path)) else "",
            f"`{command(run)}`"]) + " |")
    return lines


def _rate_note(runs: Sequence[Run]) -> list[str]:
    older = [r for r in runs if any("window_from" not in m for m in rundir.read_metrics(r.path))]
    return ["Runs whose metrics.jsonl predates `window_from` (each window's first iteration) count the "
            "rate of a window a resume began inside over the whole window: their images/s may be off by "
            "a few percent.", ""] if older else []


def segment_lines(runs: Sequence[Run], root: Path) -> list[str]:
    """Where each stretch of a resumed run trained (summary.json's segments: one per process); a
    run kept before idmap recorded them, or trained by one process, has no line."""
    lines = []
    for run in runs:
        segments = rundir.read_summary(run.path).get("segments") or []
        if len(segments) < 2 and not (segments and segments[0]["iterations"][0]):
            continue
        parts = [] if not segments[0]["iterations"][0] else [f"iterations 0-{segments[0]['iterations'][0]:,} "
                                                             "not recorded (an older idmap)"]
        for seg in segments:
            (first, last), (start, end) = seg["iterations"], seg["elapsed"]
            parts.append(f"{first:,}-{last:,} on {seg['device_name']}, torch {seg['torch_version']}, commit "
                         f"{(seg['git_commit'] or '')[:10]}, from {seg['started'].replace('+00:00', '')}, "
                         f"{_hours(end - start) or '0h00'}")
        lines.append(f"- `{run.path.relative_to(root)}`: " + "; ".join(parts) + ".")
    return ["Runs trained in several stretches (one process each, resumed from its checkpoint):", "", *lines,
            ""] if lines else []


def _pairs(runs: Sequence[Run]) -> dict[tuple, dict[str, list[Run]]]:
    """Runs that differ only in seed and precision, with both fp32 and bf16 among them, by the rest
    of their overrides and then by precision."""
    groups: dict[tuple, dict[str, list[Run]]] = {}
    for run in runs:
        if run.outcome is None:
            continue
        precision = (run.config.trainer.precision if run.config is not None else None) or "fp32"
        same = tuple(sorted(o for o in run.overrides if rundir.override_key(o) not in _HOW))
        groups.setdefault(same, {}).setdefault(precision, []).append(run)
    return {same: by for same, by in groups.items() if "fp32" in by and "bf16" in by}


def precision_pairs(runs: Sequence[Run]) -> list[str]:
    """For runs that differ only in seed and precision: whether each bf16 run's final error lies
    inside the range of the fp32 seeds' (the check that lets the long runs use bf16)."""
    lines = []
    for same, paired in _pairs(runs).items():
        by = {precision: [r.outcome for r in group] for precision, group in paired.items()}
        low, high = min(by["fp32"]), max(by["fp32"])
        outside = [e for e in by["bf16"] if not low <= e <= high]
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in sorted(xs))  # noqa: E731
        if len(by["fp32"]) < 2:  # one seed is a point, not a spread: any bf16 run would lie outside
            verdict = "One fp32 seed has no spread yet: undecided until a second fp32 seed completes."
        elif not outside:
            verdict = ("Every bf16 error lies inside the fp32 seeds' range: bf16 is faithful enough here "
                       "at this length, as far as this many seeds can show.")
        else:
            side = ("below" if all(e < low for e in outside) else
                    "above" if all(e > high for e in outside) else "outside")
            verdict = (f"Some bf16 error lies {side} the fp32 seeds' range ({fmt(outside)}): "
                       "the long runs should use fp32.")
        if 2 <= len(by["fp32"]) < len(by["bf16"]):  # a seed still to come may widen the range
            verdict += (f" ({len(by['fp32'])} fp32 seeds against {len(by['bf16'])} bf16: the verdict may "
                        "change once they are even.)")
        lines.append(
            f"- `{' '.join(same)}`: fp32 seeds {fmt(by['fp32'])} (median {statistics.median(by['fp32']):.2f}); "
            f"bf16 seeds {fmt(by['bf16'])} (median {statistics.median(by['bf16']):.2f}). " + verdict)
    return lines


def page(root: Path, figures: Optional[Path], out: Optional[Path]) -> str:
    """The page's text; the curves are drawn into `figures` (None: none drawn)."""
    runs, _ = load_runs([root])  # the report below warns of what it finds odd
    runs = sorted((r for r in runs if completed(r.path)), key=lambda r: str(r.path))
    if not runs:
        raise IdmapError(f"{root}: no completed runs (scripts/results.py {root} --collect outputs/results)")
    base = out.parent if out else Path.cwd()
    curve_links = [] if figures else ["(not drawn: a printed page draws its curves only where --figures says)"]
    # The precision check's curves hold its own runs only (a long run of one precision would squash
    # them), with room for their higher errors.
    paired = [str(r.path) for by in _pairs(runs).values() for group in by.values() for r in group]
    drawings = [("curves_resnet20_ablation.png", [str(root), "--table", "resnet20_ablation"])]
    if paired:
        drawings.append(("curves_precision.png", [*paired, "--by", "trainer.precision", "--ymax", "40"]))
    for name, argv in drawings if figures else ():
        figures.mkdir(parents=True, exist_ok=True)
        path = figures / name
        with contextlib.redirect_stderr(io.StringIO()):
            drawn = curves.main([*argv, "-o", str(path)]) == 0
        if drawn:
            curve_links.append(f"![{name}]({_relative(path, base)})")
    reading = root.parent / "reading.md"
    parts = [
        "# Results",
        "",
        f"Generated by `python scripts/results.py {root} --out {out or '-'}` from the run files kept under "
        f"`{root}` (summary.json, metrics.jsonl, .hydra/, TensorBoard events); do not edit by hand. "
        "Only completed runs are kept and shown.",
        "",
        "## The reading",
        "",
        reading.read_text().strip() if reading.is_file() else "(no reading.md beside the runs folder yet)",
        "",
        "## Tables",
        "",
        f"`python scripts/report.py {root} --seeds-needed --baseline trainer.precision=fp32`, verbatim:",
        "",
        _captured(report.main, [str(root), "--seeds-needed", "--baseline", "trainer.precision=fp32"]),
        "",
        "## bf16 against fp32",
        "",
        *(precision_pairs(runs) or ["(no completed fp32/bf16 pair)"]),
        "",
        "## Curves",
        "",
        "Training error dashed, test error solid, median over seeds with the range of seeds shaded "
        f"(`scripts/plot_curves.py {root} --table resnet20_ablation`; the bf16 check's runs alone "
        "with `--by trainer.precision --ymax 40`).",
        "",
        *curve_links,
        "",
        "## The runs",
        "",
        *run_table(runs, root),
        "",
        *_rate_note(runs),
        *segment_lines(runs, root),
    ]
    return "\n".join(parts)


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the folder of kept runs, e.g. docs/results/runs")
    parser.add_argument("--collect", type=Path, metavar="DIR",
                        help="first copy the completed runs under DIR (e.g. outputs/results) into RUNS")
    parser.add_argument("--out", type=Path, help="write the page here (default: print it)")
    parser.add_argument("--figures", type=Path,
                        help="where the curves go (default: figures/ beside --out; a printed page draws none)")
    args = parser.parse_args(argv)
    if args.collect:
        if not args.collect.is_dir():
            raise IdmapError(f"--collect {args.collect}: not a directory")
        copied, differs = collect(args.collect, args.runs)
        for run in copied:
            print(f"kept {run}")
        for run in differs:
            print(f"left {run} as kept: its run under {args.collect} has another summary.json "
                  f"(delete the kept folder to take that one)")
        if not args.out:  # collecting alone writes nothing else (no page on stdout, no figures here)
            return 0
    if not args.runs.is_dir():
        raise IdmapError(f"{args.runs}: not a directory")
    figures = args.figures or (args.out.parent / "figures" if args.out else None)
    text = page(args.runs, figures, args.out)
    if args.out:
        rundir.atomic_write(args.out, lambda f: f.write(text), mode="w")
    else:
        print(text)
    return 0
