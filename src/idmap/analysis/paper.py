"""The test errors the paper reports, per table row: reference data for reports, never our results.

Every number is the paper's (He et al. 2016, "Identity Mappings in Deep Residual Networks", tables
1-3; docs/paper.md gives each with its table), except the ResNet-20 table: that is docs/paper.md's
"seed experiment", an earlier run to compare with, not part of the paper.

A row's `choices` are the Hydra config-group choices (summary.json "choices") that a run must have
to count as that row; conf/experiment/<table>.yaml sweeps exactly these (tests/test_experiments.py).
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

FAIL = "fail"
# Table 1's "fail": test error above 20% on CIFAR-10. The paper defines none for CIFAR-100, where its
# own errors are 22-28%; there only a diverged run fails.
FAIL_ERROR = {"CIFAR-10": 20.0}

def is_fail(dataset: str, error: Optional[float]) -> bool:
    """Whether a test error on `dataset` is the paper's "fail"; inf stands for diverged."""
    return error is not None and (error == math.inf or error > FAIL_ERROR.get(dataset, math.inf))


Reference = Union[float, str, None]  # a test error in %, FAIL, or None (no number reported)


@dataclass(frozen=True)
class Row:
    key: str  # the row's name in reports; the row-group option where the table has one
    label: str  # the paper's wording
    choices: Dict[str, str]
    reference: Reference
    dataset: str  # the data the reference number is on, as summary.json's dataset label
    note: str = ""

    def is_fail(self, error: Optional[float]) -> bool:
        return is_fail(self.dataset, error)

    @property
    def network(self) -> str:
        """The network the row's unit is built into, which rows are compared within. Read off the
        key: table 2's keys are "<block>/<depth>" and table 3's "<table3 option>/<block>" (the
        option names data and network), so the part that is not the block names the network.
        Table 1 and the ResNet-20 ablation have keys without "/" and one network each: ""."""
        parts = self.key.split("/")
        return "/".join(p for p in parts if p != self.choices.get("block")) if len(parts) > 1 else ""

    @property
    def variant(self) -> str:
        """What tells a row from the others of its network: its block in tables 2-3, else its key."""
        return self.choices["block"] if self.network else self.key


@dataclass(frozen=True)
class Table:
    name: str  # the experiment: conf/experiment/<name>.yaml
    title: str
    source: str  # where the reference numbers come from
    statistic: str  # what the reference number is (median of 5, ...)
    rows: Tuple[Row, ...]
    reference_column: str = "paper"  # the reference's column header in reports

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)


_TABLE_1_2_STATISTIC = (
    "the paper does not say which statistic tables 1-2 report; their ResNet-110 original 6.61 is "
    "the v1 paper's mean of 5 runs (6.61±0.16, best 6.43)"
)

# (row key = conf/table1 option, the paper's case, shortcut group option, error)
_TABLE1 = [
    ("identity", "original: h(x) = x", "identity", 6.61),
    ("scaling_0_1", "constant scaling, shortcut 0, F 1", "constant_scaling", FAIL),
    ("scaling_05_1", "constant scaling, shortcut 0.5, F 1", "constant_scaling", FAIL),
    ("scaling_05_05", "constant scaling, shortcut 0.5, F 0.5", "constant_scaling", 12.35),
    # The paper's "b_g = 0 ... -5: fail" is one row; we run its two ends (see table1.yaml).
    ("exclusive_gating_bias0", "exclusive gating, b_g init 0 (of 0...-5)", "exclusive_gating",
     FAIL),
    ("exclusive_gating_bias-5", "exclusive gating, b_g init -5 (of 0...-5)", "exclusive_gating",
     FAIL),
    ("exclusive_gating_bias-6", "exclusive gating, b_g init -6", "exclusive_gating", 8.70),
    ("exclusive_gating_bias-7", "exclusive gating, b_g init -7", "exclusive_gating", 9.81),
    ("shortcut_only_gating_bias0", "shortcut-only gating, b_g init 0", "shortcut_only_gating", 12.86),
    ("shortcut_only_gating_bias-6", "shortcut-only gating, b_g init -6", "shortcut_only_gating", 6.91),
    ("conv1x1", "1x1 conv shortcut", "conv1x1", 12.22),
    ("dropout_05", "dropout shortcut, ratio 0.5", "dropout", FAIL),
]

# Figure 4's units: block group option -> (the paper's name, ResNet-110, ResNet-164)
_TABLE2 = {
    "original": ("(a) original", 6.61, 5.93),
    "bn_after_add": ("(b) BN after addition", 8.17, 6.50),
    "relu_before_add": ("(c) ReLU before addition", 7.84, 6.14),
    "relu_only_preact": ("(d) ReLU-only pre-activation", 6.71, 5.91),
    "full_preact": ("(e) full pre-activation", 6.37, 5.46),
}

# conf/table3 option -> (data, network, depth group option, original, full pre-activation)
_TABLE3 = {
    "cifar10_110_1layer": ("CIFAR-10", "ResNet-110, 1-layer skip", "110_1layer", 9.90, 8.91),
    "cifar10_110": ("CIFAR-10", "ResNet-110", "110", 6.61, 6.37),
    "cifar10_164": ("CIFAR-10", "ResNet-164", "164", 5.93, 5.46),
    "cifar10_1001": ("CIFAR-10", "ResNet-1001", "1001", 7.61, 4.92),
    "cifar100_164": ("CIFAR-100", "ResNet-164", "164", 25.16, 24.33),
    "cifar100_1001": ("CIFAR-100", "ResNet-1001", "1001", 27.82, 22.71),
}

# conf/resnet20_ablation option -> (block, shortcut, error or None, what the seed experiment said)
_RESNET20 = {
    "original": ("original", "identity", 8.56, ""),
    "constant_scaling": ("original", "constant_scaling", 8.5, ""),
    "exclusive_gating": ("original", "exclusive_gating", None, "worse than original; worst shortcut"),
    "shortcut_only_gating": ("original", "shortcut_only_gating", None, "worse than original"),
    "conv1x1": ("original", "conv1x1", 8.43, "best shortcut"),
    "dropout": ("original", "dropout", None, "worse than shortcut-only gating"),
    "bn_after_add": ("bn_after_add", "identity", None, "worse than original"),
    "relu_before_add": ("relu_before_add", "identity", None, "worst ordering"),
    "relu_only_preact": ("relu_only_preact", "identity", None, "between full pre-act and original"),
    "full_preact": ("full_preact", "identity", 8.08, "best ordering"),
    "conv1x1_full_preact": ("full_preact", "conv1x1", 8.16, ""),
}

TABLES: Dict[str, Table] = {
    "table1": Table(
        name="table1",
        title="Table 1: shortcut variants, ResNet-110, original unit, CIFAR-10 test error (%)",
        source="paper (He et al. 2016, table 1)",
        statistic=_TABLE_1_2_STATISTIC,
        rows=tuple(
            Row(key, label, {"table1": key, "shortcut": shortcut, "block": "original", "depth": "110"},
                error, "CIFAR-10")
            for key, label, shortcut, error in _TABLE1
        ),
    ),
    "table2": Table(
        name="table2",
        title="Table 2: activation orderings, identity shortcuts, CIFAR-10 test error (%)",
        source="paper (He et al. 2016, table 2)",
        statistic=_TABLE_1_2_STATISTIC,
        rows=tuple(
            # Table 2 has no row group, so `experiment` keeps its rows apart from other tables'
            # runs of the same units.
            Row(f"{block}/{depth}", f"{name}, ResNet-{depth}",
                {"experiment": "table2", "block": block, "depth": depth, "shortcut": "identity"},
                errors[i], "CIFAR-10")
            for block, (name, *errors) in _TABLE2.items()
            for i, depth in enumerate(("110", "164"))
        ),
    ),
    "table3": Table(
        name="table3",
        title="Table 3: original vs full pre-activation, test error (%)",
        source="paper (He et al. 2016, table 3)",
        statistic="median of 5 runs",
        rows=tuple(
            Row(f"{key}/{block}", f"{data} {network}, {block_name}",
                {"table3": key, "block": block, "depth": depth, "shortcut": "identity"},
                errors[i], data)
            for key, (data, network, depth, *errors) in _TABLE3.items()
            for i, (block, block_name) in enumerate((("original", "original"),
                                                     ("full_preact", "pre-act")))
        ),
    ),
    "resnet20_ablation": Table(
        name="resnet20_ablation",
        title="ResNet-20 ablation: every shortcut and every unit, CIFAR-10 test error (%)",
        source="docs/paper.md's seed experiment (not from the paper)",
        statistic="one number per row, statistic not stated; rows without a number were only ranked",
        rows=tuple(
            Row(key, f"{block} unit, {shortcut} shortcut",
                {"resnet20_ablation": key, "block": block, "shortcut": shortcut, "depth": "20"},
                error, "CIFAR-10", note)
            for key, (block, shortcut, error, note) in _RESNET20.items()
        ),
        reference_column="seed exp.",
    ),
}


# Rows are compared only with rows of the same network: table 2's original ResNet-164 against its
# pre-act ResNet-110 says nothing about the unit (Row.network: read off the row's key).
def baseline_rows(table: Table, baseline: Optional[str] = None) -> Dict[str, Row]:
    """Per network of `table`, the row its rows are compared with: `baseline` when it is a row key
    (that row for all), else the network's row of that variant (e.g. block "original"), else the
    network's first row: the original unit in tables 2 and 3, the table's first row otherwise."""
    if any(r.key == baseline for r in table.rows):
        return {r.network: table.row(baseline) for r in table.rows}
    bases: Dict[str, Row] = {}
    for row in table.rows:
        if baseline is None:
            bases.setdefault(row.network, row)
        elif row.variant == baseline:
            bases[row.network] = row
    return bases
