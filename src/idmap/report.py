"""Reproduced test errors next to the paper's, one markdown table per table of the paper.

Reads every summary.json under the given directories and puts each run into the row of
src/idmap/paper.py whose Hydra choices it has. A row is split further by what its runs trained on
(data set label, protocol, iterations), so a run on a stand-in data set or a shortened schedule is
never shown as the paper's setting.

Per row, over its seeds (the paper reports final errors; table 3 the median of 5):
- median: over finished seeds (completed or diverged); a diverged seed counts as an infinite error,
  so a row whose seeds mostly fail has the median "fail", as the paper would write it.
- mean ± std (sample std): over completed seeds only; a diverged one has no error to average.
- fail: seeds above 20% test error or diverged (table 1's "fail"); on CIFAR-100, where the paper
  defines no fail and its own errors are 22-28%, diverged seeds only.
- vs paper, the flag: "differs" when the paper says fail and the median does not, or the paper gives
  a number and the median fails or is off by more than max(2 std, 0.5 pp). 2 std is what seed noise
  explains; the 0.5 pp floor is there because a few seeds estimate std poorly (one seed has none)
  and the paper's own spread is 0.14-0.22 pp (its table 4). Rows on other data are not compared.
Failed (crashed), interrupted and running runs are counted in "seeds" but in no statistic.
"""

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from idmap.paper import FAIL, TABLES, Row, Table

# Smallest median-vs-paper gap that is flagged, in percentage points (see the module docstring).
MIN_GAP = 0.5
FINISHED = ("completed", "diverged")
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

    @property
    def outcome(self) -> Optional[float]:
        """The run's final test error, inf when it diverged, None when it has no result."""
        if self.status == "diverged":
            return math.inf
        if self.status == "completed" and _is_number(self.final_test_error):
            return float(self.final_test_error)
        return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_dirs(dirs: Iterable[Path]) -> Iterator[Path]:
    """Every run directory under `dirs`: one with a summary.json, or one the trainer or Hydra
    started (metrics.jsonl or .hydra/) that may lack it."""
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"not a directory: {d}")
        candidates = {d} | {p.parent for name in ("summary.json", "metrics.jsonl", ".hydra")
                            for p in d.rglob(name)}
        yield from sorted(c for c in candidates if any(
            (c / name).exists() for name in ("summary.json", "metrics.jsonl", ".hydra")))


def load_run(path: Path) -> Run:
    """Raises ValueError with a one-line reason when the summary is missing or unreadable."""
    try:
        s = json.loads((path / "summary.json").read_text())
    except FileNotFoundError:
        raise ValueError("no summary.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable summary.json ({e})") from None
    if not isinstance(s, dict) or not isinstance(s.get("status"), str):
        raise ValueError("summary.json has no status")
    dataset = s.get("dataset") if isinstance(s.get("dataset"), dict) else {}
    name = str(dataset.get("name") or "?")
    return Run(
        path=path,
        status=s["status"],
        final_test_error=s.get("final_test_error"),
        choices={str(k): str(v) for k, v in (s.get("choices") or {}).items()
                 if not str(k).startswith("hydra/")},
        data=str(dataset.get("label") or _DATA_LABELS.get(name, name)),
        max_iters=s.get("max_iters"),
        seed=s.get("seed"),
    )


def load_runs(dirs: Iterable[Path]) -> Tuple[List[Run], List[str]]:
    """All runs under `dirs`, and one message per run directory that could not be read."""
    runs, problems = [], []
    for path in run_dirs(dirs):
        try:
            runs.append(load_run(path))
        except ValueError as e:
            problems.append(f"{path}: {e}, skipped")
    return runs, problems


def row_of(table: Table, run: Run) -> Optional[Row]:
    return next((r for r in table.rows if r.choices.items() <= run.choices.items()), None)


@dataclass
class Line:
    """One printed line: a row of the paper and the runs of one setting (None: no runs)."""

    table: Table
    row: Row
    data: Optional[str] = None
    protocol: Optional[str] = None
    max_iters: Optional[int] = None
    runs: List[Run] = field(default_factory=list)

    @property
    def paper_data(self) -> bool:
        return self.data == self.row.dataset

    @property
    def completed_errors(self) -> List[float]:
        return [r.outcome for r in self.runs if r.outcome is not None and r.outcome != math.inf]

    @property
    def outcomes(self) -> List[float]:
        return [r.outcome for r in self.runs if r.outcome is not None]

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.outcomes) if self.outcomes else None

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.completed_errors) if self.completed_errors else None

    @property
    def std(self) -> Optional[float]:
        errors = self.completed_errors
        return statistics.stdev(errors) if len(errors) > 1 else None

    @property
    def fails(self) -> int:
        return sum(self.row.is_fail(e) for e in self.outcomes)

    @property
    def flag(self) -> str:
        """"differs", "ok", or "" when there is nothing to compare (module docstring)."""
        ref, median = self.row.reference, self.median
        if ref is None or median is None or not self.paper_data:
            return ""
        if ref == FAIL:
            return "ok" if self.row.is_fail(median) else "differs"
        if self.row.is_fail(median) or abs(median - ref) > max(2 * (self.std or 0.0), MIN_GAP):
            return "differs"
        return "ok"


def group(table: Table, runs: Sequence[Run]) -> List[Line]:
    """Every row of `table` at least once, in the paper's order; the paper's data first."""
    by_setting: Dict[Tuple, Line] = {}
    for run in runs:
        row = row_of(table, run)
        if row is not None:
            key = (row.key, run.data, run.choices.get("protocol", "?"), run.max_iters)
            by_setting.setdefault(key, Line(table, row, *key[1:])).runs.append(run)
    lines = []
    for row in table.rows:
        mine = [g for k, g in by_setting.items() if k[0] == row.key]
        mine.sort(key=lambda g: (not g.paper_data, g.data, g.protocol, g.max_iters or 0))
        lines += mine or [Line(table, row)]
    return lines


def detect_tables(runs: Sequence[Run]) -> List[Table]:
    return [t for t in TABLES.values() if any(row_of(t, r) for r in runs)]


def _pp(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2f}"


def _iters(n: Optional[int]) -> str:
    if n is None:
        return "?"
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


COLUMNS = ["row", "case", "data", "protocol", "iters", "{ref}", "median", "mean ± std", "seeds",
           "fail", "vs {ref}"]


def cells(line: Line) -> List[str]:
    row = line.row
    if line.runs:
        data = line.data + ("" if line.paper_data else " *")
        protocol, iters = line.protocol, _iters(line.max_iters)
    else:
        data = protocol = iters = "—"
    if isinstance(row.reference, float):
        reference = _pp(row.reference)
    else:  # FAIL, or no number: what the source says instead
        reference = row.reference or (f"— ({row.note})" if row.note else "—")
    if line.median == math.inf:
        median = "fail (diverged)"
    else:
        median = _pp(line.median) + (" fail" if row.is_fail(line.median) else "")
    mean = "—" if line.mean is None else f"{_pp(line.mean)} ± {_pp(line.std)}"
    finished = len(line.outcomes)
    return [row.key, row.label, data, protocol, iters, reference, median, mean,
            f"{finished}/{len(line.runs)}", f"{line.fails}/{finished}" if finished else "—",
            line.flag]


def markdown(table: Table, lines: Sequence[Line]) -> str:
    out = [f"## {table.title}", "",
           f"Reference: {table.source}; {table.statistic}.", "",
           "| " + " | ".join(c.format(ref=table.reference_column) for c in COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cells(line)) + " |" for line in lines]
    out += ["",
            "median: final test error over finished seeds, a diverged seed counting as fail; "
            "mean ± std over completed seeds; seeds: finished/all runs; fail: seeds diverged "
            f"or above 20% (CIFAR-10 rows); vs {table.reference_column}: differs when the median is "
            f"off by more than max(2 std, {MIN_GAP} pp) or fail disagrees."]
    if any(line.runs and not line.paper_data for line in lines):
        out.append("* not the paper's data set: not compared with the paper's number.")
    return "\n".join(out) + "\n"


def write_csv(path: Path, lines: Sequence[Line]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "row", "case", "data", "paper_data", "protocol", "max_iters", "paper",
                    "median", "mean", "std", "finished", "runs", "fails", "flag"])
        for line in lines:
            stats = ("" if x is None else x for x in (line.median, line.mean, line.std))
            reference = "" if line.row.reference is None else line.row.reference
            w.writerow([line.table.name, line.row.key, line.row.label, line.data or "",
                        line.paper_data if line.runs else "", line.protocol or "",
                        line.max_iters or "", reference, *stats, len(line.outcomes),
                        len(line.runs), line.fails, line.flag])


def duplicate_seeds(lines: Sequence[Line]) -> Iterator[str]:
    for line in lines:
        seeds = [r.seed for r in line.runs]
        for seed in sorted({s for s in seeds if seeds.count(s) > 1}, key=str):
            yield (f"{line.table.name} {line.row.key} ({line.data}): seed {seed} appears "
                   f"{seeds.count(seed)} times")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run or sweep directories (searched recursively)")
    parser.add_argument("--table", choices=["auto", *TABLES], default="auto",
                        help="the paper's table to fill (auto: every table that has runs)")
    parser.add_argument("--csv", type=Path, help="also write the lines as CSV to this file")
    args = parser.parse_args(argv)

    try:
        runs, problems = load_runs(args.dirs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    tables = detect_tables(runs) if args.table == "auto" else [TABLES[args.table]]
    if not tables:
        print(f"error: none of the {len(runs)} runs is a row of a paper table; "
              "choose a table with --table", file=sys.stderr)
        return 1
    unmatched = [r for r in runs if not any(row_of(t, r) for t in tables)]
    if unmatched:
        print(f"warning: {len(unmatched)} runs are no row of {', '.join(t.name for t in tables)}, "
              f"e.g. {unmatched[0].path}", file=sys.stderr)

    all_lines = []
    for table in tables:
        lines = group(table, runs)
        all_lines += lines
        print(markdown(table, lines))
    for message in duplicate_seeds(all_lines):
        print(f"warning: {message}", file=sys.stderr)
    if args.csv:
        write_csv(args.csv, all_lines)
    return 0
