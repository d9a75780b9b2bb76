"""Reproduced test errors next to the paper's, one markdown table per table of the paper.

Reads every run's summary (through idmap.rundir) under the given directories and puts the run into
the row of src/idmap/analysis/paper.py whose Hydra choices it has, with block, shortcut and depth as the
model was built: a choice that an override contradicts (model.block=...) is warned about and the
run reported as built (issue 12). A row is split further by what its runs trained on
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

Whether two rows differ (the methods are in src/idmap/analysis/stats.py), only for rows of one network
(table 2: one depth; table 3: one data set and network) on the same data, protocol and iterations:
- median interval: the exact order-statistic interval for the median, with its real coverage.
- vs baseline (--baseline; default: the network's original unit in tables 2-3, the table's first
  row in the others): the difference of medians with a bootstrap interval, the p-value of an exact
  permutation test on ranks, and a verdict: better, worse, or no difference shown at n seeds.
- the paper's ordering: for each pair of rows that the paper orders (two different numbers, or a
  number and "fail"), whether the runs agree (significant, same direction), disagree (significant,
  opposite) or leave it undecided; --seeds-needed estimates how many seeds would decide it.
Runs of no paper row go to one sweep table (idmap.analysis.sweep_table), with these columns and methods.
"""

import csv
import io
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from idmap import cli
from idmap.analysis import stats
from idmap.analysis.lines import (MIN_GAP, SETTING_COLUMNS, STAT_COLUMNS, STAT_NOTE, Line, iters_text, paper_pairs, pp,
                         setting_cells, stat_cells)
from idmap.analysis.paper import TABLES, Row, Table, baseline_rows
from idmap.analysis.run_records import Run, load_runs


def row_of(table: Table, run: Run) -> Optional[Row]:
    return next((r for r in table.rows if r.choices.items() <= run.choices.items()), None)


def baseline_name(table: Table, baseline: Optional[str] = None) -> str:
    """The baseline for a header: a row key, or a pattern such as "original/<depth>"."""
    bases = baseline_rows(table, baseline)
    keys = {row.key for row in bases.values()}
    if len(keys) <= 1:
        return keys.pop() if keys else "—"
    row = next(iter(bases.values()))
    # The placeholder names the choice the network part is: <depth> (table 2), <table3> (table 3).
    name = next((k for k, v in row.choices.items() if v == row.network and k != "block"),
                "network")
    return "/".join(p if p == row.variant else f"<{name}>" for p in row.key.split("/"))


def group(table: Table, runs: Sequence[Run], baseline: Optional[str] = None) -> List[Line]:
    """Every row of `table` at least once, in the paper's order; the paper's data first. Each line
    with runs gets the line of its network's baseline row (baseline_rows) of its setting."""
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
    base_rows = baseline_rows(table, baseline)
    by_row = {(line.row.key, line.setting): line for line in lines if line.runs}
    for line in lines:
        base = base_rows.get(line.network)
        if line.runs and base is not None:
            line.baseline = by_row.get((base.key, line.setting))
    return lines


def ordering_check(lines: Sequence[Line], seeds_needed: bool = False) -> List[str]:
    """One line per setting: how often the runs confirm the paper's ordering of two rows."""
    out = []
    for (data, protocol, iters), pairs in paper_pairs(lines).items():
        by = {o: [p for p in pairs if p.outcome == o] for o in ("agrees", "disagrees", "undecided")}
        ref = pairs[0].lower.table.reference_column
        title = "Paper's ordering" if ref == "paper" else f"Ordering of the {ref}"
        out.append(f"{title} ({data}, {protocol}, {iters_text(iters)} iters): agrees on "
                   f"{len(by['agrees'])} of {len(pairs)} pairs, disagrees on "
                   f"{len(by['disagrees'])}, undecided on {len(by['undecided'])}.")
        out += [f"- disagrees: {p.describe()}" for p in by["disagrees"]]
        if seeds_needed:
            for p in by["undecided"]:
                note = stats.seeds_needed_note(p.lower.outcomes, p.higher.outcomes)
                out.append(f"- undecided: {p.describe()}; {note}")
    if not out:
        return ["Paper's ordering: no two rows that the paper orders both have runs of one "
                "setting and network."]
    return out + ([stats.SEEDS_NEEDED_METHOD] if seeds_needed else [])


def detect_tables(runs: Sequence[Run]) -> List[Table]:
    return [t for t in TABLES.values() if any(row_of(t, r) for r in runs)]


# The comparison columns come last so that the first eleven keep their places for readers.
COLUMNS = ["row", "case", *SETTING_COLUMNS, "{ref}", *STAT_COLUMNS[:4], "vs {ref}",
           *STAT_COLUMNS[4:]]


def cells(line: Line) -> List[str]:
    row = line.row
    if isinstance(row.reference, float):
        reference = pp(row.reference)
    else:  # FAIL, or no number: what the source says instead
        reference = row.reference or (f"— ({row.note})" if row.note else "—")
    stat = stat_cells(line)
    return [row.key, row.label, *setting_cells(line), reference, *stat[:4], line.flag, *stat[4:]]


def markdown(table: Table, lines: Sequence[Line], seeds_needed: bool = False,
             baseline: Optional[str] = None) -> str:
    baseline = baseline_name(table, baseline)
    header = (c.format(ref=table.reference_column, baseline=baseline) for c in COLUMNS)
    out = [f"## {table.title}", "",
           f"Reference: {table.source}; {table.statistic}.", "",
           "| " + " | ".join(header) + " |",
           "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cells(line)) + " |" for line in lines]
    out += ["", f"{STAT_NOTE}; vs {table.reference_column}: differs when the median is off by more than "
                f"max(2 std, {MIN_GAP} pp) or fail disagrees."]
    if any(line.runs and not line.paper_data for line in lines):
        out.append("* not the paper's data set: not compared with the paper's number.")
    out += ["", *stats.method_notes(f"Δ median vs {baseline}"),
            ("- rows are compared, here and in the paper's ordering, only on the same data, "
             "protocol and iterations and with rows of the same network (unless --baseline names "
             "one row)."),
            ""]
    out += ordering_check(lines, seeds_needed)
    return "\n".join(out) + "\n"


def write_csv(path: Path, lines: Sequence[Line]) -> None:
    """The lines as CSV, written as every output is (rundir.write_output: atomic, never a run's file)."""
    from idmap.rundir import write_output

    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["table", "row", "case", "data", "paper_data", "protocol", "max_iters", "paper",
                "median", "mean", "std", "finished", "runs", "fails", "flag",
                "median_lo", "median_hi", "median_coverage", "baseline", "diff", "diff_lo",
                "diff_hi", "p_value", "verdict"])
    for line in lines:
        summary = ("" if x is None else x for x in (line.median, line.mean, line.std))
        reference = "" if line.row.reference is None else line.row.reference
        interval = line.median_interval or ("", "", "")
        c = line.comparison
        compared = ("", "", "", "") if c is None else (c.diff, *(c.interval or ("", "")), c.p)
        w.writerow([line.table.name, line.row.key, line.row.label, line.data or "",
                    line.paper_data if line.runs else "", line.protocol or "",
                    line.max_iters or "", reference, *summary, len(line.outcomes),
                    len(line.runs), line.fails, line.flag, *interval,
                    line.baseline.row.key if line.baseline else "", *compared, line.verdict])
    write_output(path, lambda out: out.write(f.getvalue()), mode="w")


def duplicate_seeds(lines: Sequence[Line]) -> Iterator[str]:
    for line in lines:
        seeds = [r.seed for r in line.runs]
        for seed in sorted({s for s in seeds if seeds.count(s) > 1}, key=str):
            yield (f"{line.table.name} {line.row.key} ({line.data}): seed {seed} appears "
                   f"{seeds.count(seed)} times")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="run or sweep directories (searched recursively)")
    parser.add_argument("--table", choices=["auto", *TABLES, "sweep"], default="auto",
                        help="the paper's table to fill (auto: every table that has runs, and the "
                        "runs of no paper row in a sweep table; sweep: every run in a sweep table)")
    parser.add_argument("--csv", type=Path, help="also write the lines as CSV to this file")
    parser.add_argument("--baseline", metavar="KEY", help="a row key, or a block (full_preact or "
                        "block=full_preact): that block's row of each network (tables 2-3); "
                        "default: original (tables 2-3), the first row (others). Sweep table: a "
                        "setting, e.g. optim.lr=0.1")
    parser.add_argument("--by", metavar="KEY,...", type=lambda s: [k for k in s.split(",") if k],
                        help="the sweep table's grouping keys (default: the overrides whose values "
                        "differ between its runs, seeds pooled)")
    parser.add_argument("--seeds-needed", action="store_true",
                        help="for each pair the paper orders (sweep: each comparison with the "
                        "baseline) that the runs leave undecided, estimate the seeds per row that "
                        "would decide it")
    parser.add_argument("--next", action="store_true",
                        help="print the train.py -m commands that add those seeds to a sweep")
    return _report(parser.parse_args(argv))  # bad input: an IdmapError, exit 2 (cli.run_command)


def _report(args) -> int:
    from idmap.analysis import sweep_table as sweeps  # it builds on this module

    runs, problems = load_runs(args.dirs)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    tables = [TABLES[args.table]] if args.table in TABLES else detect_tables(runs) * (args.table == "auto")
    rest = [r for r in runs if not any(row_of(t, r) for t in tables)]
    if rest and args.table in TABLES:  # the table asked for, and no other
        print(f"warning: {len(rest)} runs are no row of {args.table}, e.g. {rest[0].path}",
              file=sys.stderr)
        rest = []
    if not runs and not tables:
        print(f"error: no runs under {' '.join(map(str, args.dirs))} (--table T prints the rows "
              "of paper table T)", file=sys.stderr)
        return 2
    paper_base, sweep_base = sweeps.split_baseline(args.baseline, tables, rest, args.by)
    table = sweeps.sweep(rest, args.by, sweep_base)
    all_lines = []
    for t in tables:
        baseline = paper_base if baseline_rows(t, paper_base) else None
        lines = group(t, runs, baseline)
        all_lines += lines
        print(markdown(t, lines, args.seeds_needed, baseline))
    if table.lines:
        print(sweeps.markdown(table, args.seeds_needed))
    if args.next:
        print("\n".join(sweeps.next_report(all_lines, table)))
    all_lines += table.lines
    for message in duplicate_seeds(all_lines):
        print(f"warning: {message}", file=sys.stderr)
    if args.csv:
        write_csv(args.csv, all_lines)
    return 0
