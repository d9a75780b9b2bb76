"""A line of a results table, shared by the paper's tables (idmap.analysis.report) and the sweep table
(idmap.analysis.sweep_table): the runs of one setting, their statistics against the reference and the
baseline, the cells every table prints, and the pairs of lines whose order the paper gives."""

import math
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from idmap.analysis import stats
from idmap.analysis.paper import FAIL, Row, is_fail
from idmap.analysis.run_records import Run

# Smallest median-vs-paper gap that is flagged, in percentage points (see the module docstring).
MIN_GAP = 0.5

@dataclass
class Line:
    """One printed line of a table: what it stands for (`row`: a paper table's Row, or a sweep's
    Setting) and the runs of one setting (data, protocol, length; None: no runs). `table` is the
    table it is printed in (name, title, reference_column)."""

    table: Any
    row: Union[Row, "Setting"]
    data: Optional[str] = None
    protocol: Optional[str] = None
    max_iters: Optional[int] = None
    runs: List[Run] = field(default_factory=list)
    # The baseline row's line of the same setting (itself for the baseline's own line), or None.
    baseline: Optional["Line"] = field(default=None, compare=False, repr=False)

    @property
    def setting(self) -> Tuple:
        return self.data, self.protocol, self.max_iters

    @property
    def network(self) -> str:
        return self.row.network

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
    def median_interval(self) -> Optional[Tuple[float, float, float]]:
        """(low, high, coverage) for the median, from the seeds (stats.median_interval)."""
        return stats.median_interval(self.outcomes)

    @cached_property  # a bootstrap and a permutation test: computed once
    def comparison(self) -> Optional[stats.Comparison]:
        """This line's seeds against the baseline's; None for the baseline itself or no runs."""
        if self.baseline is None or self.baseline is self or not self.baseline.outcomes:
            return None
        return stats.compare(self.outcomes, self.baseline.outcomes) if self.outcomes else None

    @property
    def verdict(self) -> str:
        if self.baseline is self:
            return "baseline"
        return self.comparison.verdict if self.comparison else ""

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.completed_errors) if self.completed_errors else None

    @property
    def std(self) -> Optional[float]:
        errors = self.completed_errors
        return statistics.stdev(errors) if len(errors) > 1 else None

    @property
    def fails(self) -> int:
        return sum(map(self.is_fail, self.outcomes))

    def is_fail(self, error: Optional[float]) -> bool:
        """The paper's "fail" on the paper's data; elsewhere (a JPEG copy, a short run) only divergence."""
        return self.row.is_fail(error) if self.paper_data else error == math.inf

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




@dataclass(frozen=True)
class Setting:
    """What a sweep table's line stands for: its values of the keys the sweep's runs differ by,
    on its data. No paper number; all lines of a sweep are one network (one baseline)."""

    values: Tuple[Tuple[str, Optional[str]], ...]
    dataset: str
    reference: None = None
    note: str = ""
    network: str = ""

    @property
    def key(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values) or "all runs"

    @property
    def label(self) -> str:
        return self.key

    def is_fail(self, error: Optional[float]) -> bool:
        return is_fail(self.dataset, error)


@dataclass
class Pair:
    """Two lines of one setting whose rows the paper orders: `lower` has the paper's lower error."""

    lower: Line
    higher: Line

    @cached_property
    def comparison(self) -> stats.Comparison:
        return stats.compare(self.lower.outcomes, self.higher.outcomes)

    @property
    def outcome(self) -> str:
        """Whether the runs agree with the paper, disagree (each significant) or leave it open."""
        return {-1: "agrees", 1: "disagrees", 0: "undecided"}[self.comparison.sign]

    def describe(self) -> str:
        lower, higher = self.lower, self.higher
        ref = lower.table.reference_column  # "paper", or "seed exp." for the ResNet-20 table
        return (f"{lower.row.key} < {higher.row.key} ({ref} {error_text(_paper_error(lower.row))} < "
                f"{error_text(_paper_error(higher.row))}; medians {error_text(lower.median)} vs "
                f"{error_text(higher.median)}, p = {self.comparison.p:.3f})")


def _paper_error(row: Union[Row, "Setting"]) -> Optional[float]:
    """The paper's number as an error to order by, fail the highest; None: nothing to order."""
    return math.inf if row.reference == FAIL else (
        row.reference if isinstance(row.reference, float) else None)


def paper_pairs(lines: Sequence[Line]) -> Dict[Tuple, List[Pair]]:
    """Per setting, every pair of lines with runs of one network whose rows the paper orders."""
    pairs: Dict[Tuple, List[Pair]] = {}
    ordered = [l for l in lines if l.outcomes and _paper_error(l.row) is not None]
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            ea, eb = _paper_error(a.row), _paper_error(b.row)
            if a.setting == b.setting and a.network == b.network and ea != eb:
                pair = Pair(a, b) if ea < eb else Pair(b, a)
                pairs.setdefault(a.setting, []).append(pair)
    return pairs


def pp(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2f}"


def error_text(x: Optional[float]) -> str:
    return "fail" if x == math.inf else pp(x)


def _signed(x: float) -> str:
    return f"{x:+.2f}"  # +inf / -inf: one median diverged


def iters_text(n: Optional[int]) -> str:
    if n is None:
        return "?"
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


# The columns every table shares: what a line's runs trained on, and its statistics.
SETTING_COLUMNS = ["data", "protocol", "iters"]
STAT_NOTE = ("median: final test error over finished seeds, a diverged seed counting as fail; mean ± std "
             "over completed seeds; seeds: finished/all runs; fail: seeds diverged, or above 20% on the official CIFAR-10")
STAT_COLUMNS = ["median", "mean ± std", "seeds", "fail", "median 95% interval",
                "Δ median vs {baseline} [95%]", "p", "verdict"]

def setting_cells(line: Line) -> List[str]:
    """What the line's runs trained on: data (* when not the row's own), protocol, iterations."""
    if not line.runs:
        return ["—"] * 3
    return [line.data + ("" if line.paper_data else " *"), line.protocol, iters_text(line.max_iters)]


def stat_cells(line: Line) -> List[str]:
    """The cells of STAT_COLUMNS: the line's seeds, and their comparison with its baseline."""
    if line.median == math.inf:
        median = "fail (diverged)"
    else:
        median = pp(line.median) + (" fail" if line.is_fail(line.median) else "")
    mean = "—" if line.mean is None else f"{pp(line.mean)} ± {pp(line.std)}"
    finished = len(line.outcomes)
    interval = line.median_interval
    c = line.comparison
    diff = "—"
    if c is not None:
        diff = _signed(c.diff) + ("" if c.interval is None else
                                  " [" + ", ".join(map(_signed, c.interval)) + "]")
    return [median, mean, f"{finished}/{len(line.runs)}",
            f"{line.fails}/{finished}" if finished else "—",
            "—" if interval is None else
            f"[{error_text(interval[0])}, {error_text(interval[1])}] {interval[2]:.1%}",
            diff, "—" if c is None else f"{c.p:.3f}", line.verdict]


