"""A report for any sweep: runs that are no row of a paper table, one line per setting.

A run's setting is read from what it recorded (its .hydra/ overrides and config, through
idmap.rundir), never from folder names: by default the keys whose values differ between the runs,
the seed left out so that a setting's seeds are pooled; `--by KEY,...` names the keys instead.
A key a run did not override has the value of its config group choice (as built, run_records.py) or of
its composed config. The lines are lines.Line objects standing for a lines.Setting, so every
column and method is the paper tables' own (median, mean ± std, seeds, fail, the median interval,
Δ median vs a baseline, p, verdict; stats.py).

The baseline (`--baseline KEY=VALUE[,KEY=VALUE]`) is, for each line, the line with the same values
but those of the baseline: `--baseline optim.lr=0.1` compares each block's other learning rates
with that block's lr 0.1. Default: the first line. `--next` prints the `train.py -m` command that
adds the seeds `--seeds-needed` estimates to the lines of undecided comparisons.
"""

from __future__ import annotations

import functools
import itertools
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from idmap import IdmapError
from idmap.analysis import stats
from idmap.config import Role, has_role
from idmap.analysis.lines import SETTING_COLUMNS, STAT_COLUMNS, STAT_NOTE, Line, Setting, paper_pairs, setting_cells, stat_cells
from idmap.analysis.paper import Table, baseline_rows
from idmap.rundir import override_key
from idmap.analysis.run_records import Run

TABLE = "sweep"


def _unquoted(value: str) -> str:
    return value[1:-1] if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"" else value


@functools.lru_cache(maxsize=None)  # a report asks for each run's values once per key
def _canonical(text: str) -> str:
    """An override's value as the config would print it: [8,16,32] as [8, 16, 32], true as True."""
    import yaml

    try:
        value = yaml.safe_load(_unquoted(text))
    except yaml.YAMLError:
        return _unquoted(text)
    return _unquoted(text) if isinstance(value, str) or value is None else str(value)


def recorded(run: Run) -> Dict[str, str]:
    """The run's overrides as key -> value, the last given winning (a resumed run repeats some)."""
    return {override_key(o): _canonical(o.partition("=")[2]) for o in run.overrides if "=" in o}


def value(run: Run, key: str) -> Optional[str]:
    """The run's value of `key`: its override, else its group choice, else its config's."""
    given = recorded(run)
    if key in given:
        return run.choices.get(key, given[key])  # a group as built (runs.built_choices)
    if key in run.choices:
        return run.choices[key]
    if run.config is None:
        return None
    from omegaconf import OmegaConf

    found = OmegaConf.select(run.config, key, default=None, throw_on_resolution_failure=False)
    if found is None:
        return None
    return str(OmegaConf.to_container(found) if OmegaConf.is_config(found) else found)


def default_keys(runs: Sequence[Run]) -> List[str]:
    """The overridden keys whose values differ between the runs, in the order first given."""
    keys = list(dict.fromkeys(k for r in runs for k in recorded(r)))
    keys = [k for k in keys if not has_role(k, Role.POOLED)]  # the seed; how or where a run ran
    return [k for k in keys if len({value(r, k) for r in runs}) > 1]


def parse_setting(text: str) -> Dict[str, str]:
    """`optim.lr=0.1` or `block=full_preact,optim.lr=0.1` -> {key: value}; a comma inside a value
    (a list) stays with its value."""
    parts: List[str] = []
    for piece in text.split(","):
        if "=" in piece or not parts:
            parts.append(piece)
        else:
            parts[-1] += "," + piece
    setting = {}
    for part in parts:
        key, eq, val = part.partition("=")
        if not eq or not key.strip():
            raise IdmapError(f"--baseline {text}: give a setting as KEY=VALUE, e.g. optim.lr=0.1")
        setting[override_key(key.strip())] = _canonical(val.strip())
    return setting


def _natural(v: Optional[str]) -> Tuple:
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


@dataclass
class Sweep:
    """The sweep table: its grouping keys and its lines (each line's row a Setting of those keys)."""

    keys: List[str]
    lines: List[Line] = field(default_factory=list)
    baseline: str = ""
    name: str = TABLE
    title: str = "Sweep: final test error (%) per setting"
    reference_column: str = "—"  # no paper number

    @staticmethod
    def values_of(line: Line) -> Dict[str, Optional[str]]:
        return dict(line.row.values)


def sweep(runs: Sequence[Run], by: Optional[Sequence[str]] = None,
          baseline: Optional[str] = None) -> Sweep:
    """One line per distinct setting of `runs` (seeds pooled) and what they trained on (data,
    protocol, iterations: as in the paper tables, runs on other data or of other lengths are never
    pooled or compared), each with its baseline's line."""
    keys = list(by) if by else default_keys(runs)
    unknown = [k for k in keys if all(value(r, k) is None for r in runs)]
    if runs and unknown:
        known = dict.fromkeys(k for r in runs for k in recorded(r))
        raise IdmapError(f"--by {unknown[0]}: no run has this setting; the runs' overrides are "
                         f"{', '.join(known) or 'none'}")
    groups: Dict[Tuple, List[Run]] = {}
    for run in runs:
        trained_on = (run.data, run.choices.get("protocol", "?"), run.max_iters)
        groups.setdefault((tuple(value(run, k) for k in keys), trained_on), []).append(run)
    ordered = sorted(groups, key=lambda g: ([_natural(v) for v in g[0]], [_natural(v) for v in g[1]]))
    result = Sweep(keys)
    for vs, trained_on in ordered:
        setting = Setting(tuple(zip(keys, vs)), dataset=trained_on[0])
        result.lines.append(Line(result, setting, *trained_on, groups[vs, trained_on]))
    _set_baselines(result, baseline)
    return result


def split_baseline(base: Optional[str], tables: Sequence[Table], rest: Sequence[Run],
                   by: Optional[Sequence[str]]) -> Tuple[Optional[str], Optional[str]]:
    """--baseline for (the paper tables, the sweep table): a row key, a block or block=NAME for the
    paper tables having that row; KEY=VALUE for the sweep table when its lines differ by KEY. One
    that neither takes goes where it fails with the reason: the sweep's, else 'no row'."""
    if not base:
        return None, None
    paper = base.partition("=")[2] if base.startswith("block=") and "," not in base else base
    paper = paper if "=" not in paper and any(baseline_rows(t, paper) for t in tables) else None
    keys = list(by) if by else default_keys(rest)
    for_sweep = bool(rest) and "=" in base and set(parse_setting(base)) <= set(keys)
    if not (paper or for_sweep):
        if rest and ("=" in base or not tables):
            return None, base
        raise IdmapError(f"--baseline {base} is no row of {', '.join(t.name for t in tables)}")
    return paper, base if for_sweep else None


def _set_baselines(table: Sweep, baseline: Optional[str]) -> None:
    """Each line's baseline: the line with the baseline's values (default: the first line's) and
    the same data, protocol and iterations, or none."""
    if not table.lines:
        return
    spec = parse_setting(baseline) if baseline else table.values_of(table.lines[0])
    unknown = [k for k in spec if k not in table.keys]
    if unknown:
        raise IdmapError(f"--baseline {baseline}: {', '.join(unknown)} is not a key the sweep's "
                         f"lines differ by ({', '.join(table.keys) or 'none'}); name it with --by")
    table.baseline = Setting(tuple(spec.items()), "").key
    by_values = {(tuple(table.values_of(l).items()), l.setting): l for l in table.lines}
    for line in table.lines:
        target = {**table.values_of(line), **spec}
        line.baseline = by_values.get((tuple(target.items()), line.setting))
    if not any(line.baseline is line for line in table.lines):
        raise IdmapError(f"--baseline {baseline}: no line of the sweep has that setting (lines: "
                         f"{'; '.join(l.row.key for l in table.lines)})")


def undecided(table: Sweep) -> List[Line]:
    """Lines whose comparison with their baseline shows no difference."""
    return [l for l in table.lines if l.comparison is not None and l.comparison.sign == 0]


COLUMNS = ["setting", *SETTING_COLUMNS, *STAT_COLUMNS]


def markdown(table: Sweep, seeds_needed: bool = False) -> str:
    header = [c.format(baseline=table.baseline) for c in COLUMNS]
    by = ", ".join(table.keys) or "none (one setting)"
    out = [f"## {table.title}", "",
           f"One line per setting of {by} (each run's recorded overrides and config), seeds "
           f"pooled; baseline {table.baseline}, compared only with lines of the same data, protocol "
           f"and iterations.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join([line.row.key, *setting_cells(line), *stat_cells(line)]) + " |"
            for line in table.lines]
    out += ["", STAT_NOTE + ".", "",
            *stats.method_notes(f"Δ median vs {table.baseline}")]
    if seeds_needed:
        out.append("")
        for line in undecided(table):
            note = stats.seeds_needed_note(line.outcomes, line.baseline.outcomes)
            out.append(f"- undecided: {line.row.key} vs {line.baseline.row.key}; {note}")
        out.append(stats.SEEDS_NEEDED_METHOD)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# --next: the seeds that would decide the undecided comparisons
# --------------------------------------------------------------------------------------------------
def undecided_pairs(lines: Sequence[Line], table: Optional[Sweep] = None) -> List[Tuple[Line, Line]]:
    """The undecided pairs: of each paper table among `lines`, the pairs the paper orders
    (report.paper_pairs); of the sweep table, each line and its baseline."""
    pairs = []
    for name in dict.fromkeys(l.table.name for l in lines if l.table.name != TABLE):
        of_table = [l for l in lines if l.table.name == name]
        pairs += [(p.lower, p.higher) for ps in paper_pairs(of_table).values() for p in ps
                  if p.outcome == "undecided"]
    return pairs + ([(l, l.baseline) for l in undecided(table)] if table else [])


# A difference that would take more seeds than this per row is small beside its seed spread: --next
# names it instead of printing a command of thousands of runs (the paper's tables rest on 5 seeds).
MAX_NEXT_SEEDS = 30


def seeds_to_add(pairs: Sequence[Tuple[Line, Line]]) -> Dict[int, Tuple[Line, List[int]]]:
    """Per line of an undecided pair (both sides), the new seeds it needs: as many as
    stats.seeds_needed says (pairs needing over MAX_NEXT_SEEDS left out), numbered after the
    highest seed the line has run."""
    wanted: Dict[int, Tuple[Line, int]] = {}
    for a, b in pairs:
        n = stats.seeds_needed(a.outcomes, b.outcomes)
        if n is None or n > MAX_NEXT_SEEDS:
            continue
        for side in (a, b):
            have = wanted.get(id(side), (side, 0))[1]
            wanted[id(side)] = (side, max(have, n))
    out = {}
    for key, (line, n) in wanted.items():
        seeds = [r.seed for r in line.runs if isinstance(r.seed, int)]
        missing = n - len(set(seeds))
        if missing > 0:
            start = max(seeds, default=0) + 1
            out[key] = (line, list(range(start, start + missing)))
    return out


def _sweep_dir(line: Line) -> Path:
    return line.runs[0].path.parent


def _own(run: Run) -> List[str]:
    """A run's overrides to repeat: its settings and how it ran (device, launcher), not its seed
    nor a resume."""
    return [o for o in run.overrides if not has_role(override_key(o), Role.PER_RUN)]


def _merged(lines: Sequence[Line]) -> Optional[List[str]]:
    """The lines' overrides as one Hydra sweep (each differing key as KEY=V1,V2) when the lines
    are every combination of those values; None when they are not."""
    per = [{override_key(o): o for o in _own(l.runs[0])} for l in lines]
    keys = list(per[0])
    if any(list(p) != keys for p in per) or len({tuple(p.values()) for p in per}) < len(lines):
        return None
    values = {k: list(dict.fromkeys(p[k].partition("=")[2] for p in per)) for k in keys}
    if math.prod(len(v) for v in values.values()) != len(lines):
        return None
    return [per[0][k].partition("=")[0] + "=" + ",".join(values[k]) for k in keys]


def next_commands(pairs: Sequence[Tuple[Line, Line]]) -> List[str]:
    """The `python train.py -m` commands that run those seeds: one per set of lines that need the
    same seeds and form a grid (else one per line), with the lines' recorded overrides, each into a
    new sweep folder beside the first line's own (report both folders afterwards)."""
    by_seeds: Dict[Tuple[int, ...], List[Line]] = {}
    for line, seeds in seeds_to_add(pairs).values():
        by_seeds.setdefault(tuple(seeds), []).append(line)
    commands, taken = [], set()
    for seeds, lines in by_seeds.items():
        merged = _merged(lines) if len(lines) > 1 else None
        for own, first in ([(merged, lines[0])] if merged else
                           [(_own(l.runs[0]), l) for l in lines]):
            parent = _sweep_dir(first)
            target = next(t for i in itertools.count(1)
                          for t in [parent.parent / f"{parent.name}_next{i}"]
                          if not t.exists() and t not in taken)
            taken.add(target)
            args = [*own, "seed=" + ",".join(map(str, seeds)), f"hydra.sweep.dir={target}"]
            commands.append(" ".join(["python", "train.py", "-m", *map(shlex.quote, args)]))
    return commands


def next_report(lines: Sequence[Line], table: Optional[Sweep] = None) -> List[str]:
    """--next: the commands for the undecided pairs of the paper tables' `lines` and `table`."""
    pairs = undecided_pairs(lines, table)
    commands = next_commands(pairs)
    needed = [(a, b, stats.seeds_needed(a.outcomes, b.outcomes)) for a, b in pairs]
    too_many = [f"--next leaves out {a.row.key} vs {b.row.key} ({a.data}, {a.max_iters} iterations): {n} seeds "
                f"per row would be needed (over {MAX_NEXT_SEEDS}), a difference small beside the seed spread"
                for a, b, n in needed if n and n > MAX_NEXT_SEEDS]
    if not commands:
        return [*too_many, "--next: no undecided pair whose seeds needed can be estimated"
                + (f" within {MAX_NEXT_SEEDS} per row." if too_many else ".")]
    # The folders to report with the new ones: those of the pairs the commands are for.
    dirs = sorted({str(r.path.parent) for a, b, n in needed if n and n <= MAX_NEXT_SEEDS
                   for l in (a, b) for r in l.runs})
    return [*too_many, "Next seeds (stats.seeds_needed for each undecided pair; then report "
            f"{' '.join(dirs)} with the new folders):", *commands]


__all__ = ["Sweep", "sweep", "markdown", "next_commands", "next_report", "default_keys", "value",
           "parse_setting", "seeds_to_add", "undecided_pairs"]
