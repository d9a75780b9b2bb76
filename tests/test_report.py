"""scripts/report.py (idmap.analysis.report) on small run directories made here.

Every summary.json and metrics.jsonl in this file is a made-up test fixture, not a result.
"""

import csv
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from idmap.analysis.lines import Line
from idmap.analysis.paper import FAIL, TABLES, baseline_rows
from idmap.analysis.report import baseline_name, group
from idmap.cli import report as main  # report.main with the exit codes of the command
from idmap.analysis.run_records import depth_option, load_runs

ROOT = Path(__file__).resolve().parents[1]
TABLE2_ORIGINAL_110 = {"experiment": "table2", "block": "original", "depth": "110",
                       "shortcut": "identity", "dataset": "cifar10", "protocol": "paper"}
_counter = iter(range(10**6))


def fake_run(root: Path, choices: dict, error=None, status="completed", label="CIFAR-10",
             seed=1, max_iters=64000, metrics=None, built=None) -> Path:
    """Writes a made-up run directory in the trainer's format (fixture data, not a result);
    `built`: the summary's record of the model built (built_model), absent as in older ones."""
    d = root / f"fake_{next(_counter)}"
    (d / ".hydra").mkdir(parents=True)
    summary = {"status": status, "final_test_error": error, "best_test_error": error,
               "iterations": max_iters, "max_iters": max_iters, "seed": seed,
               "dataset": {"name": "cifar10", "label": label}, "choices": choices, "tags": {},
               **(built or {})}
    (d / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return d


def built_model(block: str, depth: int = 110, unit: str = "basic", shortcut: str = "identity",
                configured_unit: str = "auto") -> dict:
    """summary.json's record of what the trainer built (trainer.new_summary), fixture data."""
    return {"model": {"depth": depth, "unit": unit, "block": block, "downsample": "conv1x1"},
            "shortcut": {"name": shortcut},
            "config": {"model": {"depth": depth, "unit": configured_unit, "block": block}}}


def table1(row: str, shortcut: str) -> dict:
    return {"experiment": "table1", "table1": row, "shortcut": shortcut, "block": "original",
            "depth": "110", "dataset": "cifar10", "protocol": "paper"}


def lines_of(tmp_path, table="table2"):
    runs, problems = load_runs([tmp_path])
    assert problems == []
    return {(line.row.key, line.data): line for line in group(TABLES[table], runs)}


def report(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def md_row(out: str, key: str) -> list:
    """The cells of the markdown line whose first cell is `key`."""
    (line,) = [l for l in out.splitlines() if l.startswith(f"| {key} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_seeds_of_a_row_give_median_mean_and_sample_std(tmp_path):
    errors = [6.9, 6.5, 6.6, 7.0, 6.7]
    for seed, e in enumerate(errors, 1):
        fake_run(tmp_path, TABLE2_ORIGINAL_110, e, seed=seed)
    line = lines_of(tmp_path)[("original/110", "CIFAR-10")]
    assert len(line.runs) == 5
    assert line.median == 6.7
    assert line.mean == pytest.approx(statistics.mean(errors))
    assert line.std == pytest.approx(statistics.stdev(errors))
    assert line.flag == "ok"  # paper 6.61, |6.7 - 6.61| < 0.5


def test_every_row_of_every_table_is_printed_without_runs(tmp_path, capsys):
    for name, table in TABLES.items():
        code, out, _ = report(capsys, tmp_path, "--table", name)
        assert code == 0
        for row in table.rows:
            cells = md_row(out, row.key)
            assert cells[2] == "—" and cells[8] == "0/0"  # no data, 0 seeds
            if isinstance(row.reference, float):
                assert cells[5] == f"{row.reference:.2f}"
            elif row.reference == FAIL:
                assert cells[5] == "fail"


def test_paper_numbers_in_the_report(tmp_path, capsys):
    _, out, _ = report(capsys, tmp_path, "--table", "table3")
    assert md_row(out, "cifar10_1001/full_preact")[5] == "4.92"
    assert md_row(out, "cifar100_1001/original")[5] == "27.82"
    _, out, _ = report(capsys, tmp_path, "--table", "table1")
    assert md_row(out, "exclusive_gating_bias-6")[5] == "8.70"
    assert md_row(out, "dropout_05")[5] == "fail"


def test_every_reference_number_is_in_docs_paper_md_under_its_table():
    """paper.py's numbers and the page that gives each with its source must not drift apart."""
    text = (ROOT / "docs" / "paper.md").read_text()
    sections = dict(re.findall(r"^## (.*?)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    where = {"table1": "Shortcuts (figure 2, table 1)", "table2": "Orderings of BN and ReLU (figure 4, table 2)",
             "table3": "The numbers reports compare against", "resnet20_ablation": "A seed experiment to compare with"}
    for name, table in TABLES.items():
        numbers = {float(n) for n in re.findall(r"\b\d+\.\d+\b", sections[where[name]])}
        assert {r.reference for r in table.rows if isinstance(r.reference, float)} <= numbers, name


def test_fail_is_above_20_percent_or_diverged(tmp_path):
    row = table1("scaling_0_1", "constant_scaling")
    fake_run(tmp_path, row, None, status="diverged", seed=1)
    fake_run(tmp_path, row, 45.0, seed=2)
    fake_run(tmp_path, row, 20.0, seed=3)  # exactly 20% is not above it
    line = lines_of(tmp_path, "table1")[("scaling_0_1", "CIFAR-10")]
    assert line.fails == 2
    assert line.median == 45.0
    assert line.mean == pytest.approx(32.5)  # the diverged seed has no error to average
    assert line.flag == "ok"  # the paper says fail, the median fails


def test_on_other_data_only_a_diverged_run_fails(tmp_path):
    """Table 1's "fail" is an error above 20% on the official CIFAR-10; on the JPEG copy, or in a
    short run, 25% is a number, not a failure."""
    row = table1("scaling_0_1", "constant_scaling")
    fake_run(tmp_path, row, None, status="diverged", seed=1, label="CIFAR-10 (JPEG copy)")
    fake_run(tmp_path, row, 25.0, seed=2, label="CIFAR-10 (JPEG copy)")
    fake_run(tmp_path, row, 26.0, seed=3, label="CIFAR-10 (JPEG copy)")
    line = lines_of(tmp_path, "table1")[("scaling_0_1", "CIFAR-10 (JPEG copy)")]
    assert line.fails == 1 and line.median == 26.0 and not line.is_fail(line.median)


def test_mostly_diverged_row_has_a_fail_median(tmp_path, capsys):
    row = table1("dropout_05", "dropout")
    for seed in (1, 2, 3):
        fake_run(tmp_path, row, None, status="diverged", seed=seed)
    fake_run(tmp_path, row, 9.0, seed=4)
    line = lines_of(tmp_path, "table1")[("dropout_05", "CIFAR-10")]
    assert line.median == math.inf
    _, out, _ = report(capsys, tmp_path, "--table", "table1")
    cells = md_row(out, "dropout_05")
    assert cells[6] == "fail (diverged)" and cells[9] == "3/4" and cells[10] == "ok"


def test_a_row_the_paper_calls_fail_is_flagged_when_it_trains(tmp_path):
    for seed in (1, 2, 3):
        fake_run(tmp_path, table1("scaling_05_1", "constant_scaling"), 8.0, seed=seed)
    assert lines_of(tmp_path, "table1")[("scaling_05_1", "CIFAR-10")].flag == "differs"


def test_a_numbered_row_is_flagged_when_it_fails(tmp_path):
    fake_run(tmp_path, table1("identity", "identity"), 30.0)
    assert lines_of(tmp_path, "table1")[("identity", "CIFAR-10")].flag == "differs"


@pytest.mark.parametrize("errors, flag", [
    ([7.0], "ok"),                  # 0.39 pp off, one seed: within the 0.5 pp floor
    ([7.2], "differs"),             # 0.59 pp off, one seed
    ([7.2, 7.3, 7.4], "differs"),   # 0.69 pp off, std 0.1: more than both 2 std and 0.5
    ([6.0, 7.3, 8.6], "ok"),        # 0.69 pp off, std 1.3: seed noise explains it
])
def test_flag_rule_is_max_of_two_std_and_half_a_point(tmp_path, errors, flag):
    for seed, e in enumerate(errors, 1):
        fake_run(tmp_path, TABLE2_ORIGINAL_110, e, seed=seed)
    assert lines_of(tmp_path)[("original/110", "CIFAR-10")].flag == flag


def test_failed_and_running_runs_count_but_are_no_statistic(tmp_path, capsys):
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6, seed=1)
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.8, seed=2)
    fake_run(tmp_path, TABLE2_ORIGINAL_110, None, status="failed", seed=3)
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 50.0, status="running", seed=4)
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 90.0, status="interrupted", seed=5)
    _, out, _ = report(capsys, tmp_path, "--table", "table2")
    cells = md_row(out, "original/110")
    assert cells[6] == "6.70" and cells[7] == "6.70 ± 0.14"
    assert cells[8] == "2/5" and cells[9] == "0/2"


def test_other_data_is_labelled_and_not_compared(tmp_path, capsys):
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6)
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 12.0, label="CIFAR-10 (JPEG copy)")
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 80.0, label="synthetic")
    lines = lines_of(tmp_path)
    assert lines[("original/110", "CIFAR-10")].flag == "ok"
    assert lines[("original/110", "CIFAR-10 (JPEG copy)")].flag == ""
    assert lines[("original/110", "synthetic")].flag == ""
    _, out, _ = report(capsys, tmp_path, "--table", "table2")
    data = [l.split("|")[3].strip() for l in out.splitlines() if l.startswith("| original/110 |")]
    assert data == ["CIFAR-10", "CIFAR-10 (JPEG copy) *", "synthetic *"]  # the paper's data first
    assert "* not the paper's data set" in out


def test_cifar100_rows_are_compared_on_cifar100(tmp_path):
    choices = {"experiment": "table3", "table3": "cifar100_164", "block": "full_preact",
               "depth": "164", "shortcut": "identity", "dataset": "cifar100", "protocol": "paper"}
    fake_run(tmp_path, choices, 24.5, label="CIFAR-100")
    line = lines_of(tmp_path, "table3")[("cifar100_164/full_preact", "CIFAR-100")]
    assert line.paper_data and line.flag == "ok"


def test_shorter_schedules_and_other_protocols_are_separate_lines(tmp_path):
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6)
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 30.0, max_iters=2)
    fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "protocol": "torch"}, 6.0)
    runs, _ = load_runs([tmp_path])
    lines = [l for l in group(TABLES["table2"], runs) if l.row.key == "original/110"]
    assert sorted((l.protocol, l.max_iters, len(l.runs)) for l in lines) == [
        ("paper", 2, 1), ("paper", 64000, 1), ("torch", 64000, 1)]


def test_runs_of_other_settings_are_not_put_in_a_row(tmp_path, capsys):
    fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "shortcut": "conv1x1"}, 7.0)  # overridden shortcut
    fake_run(tmp_path, table1("conv1x1", "conv1x1"), 12.0)  # table 1, not table 2
    code, out, err = report(capsys, tmp_path, "--table", "table2")
    assert code == 0 and md_row(out, "original/110")[8] == "0/0"
    assert "2 runs are no row of table2" in err


def test_auto_prints_the_tables_that_have_runs(tmp_path, capsys):
    fake_run(tmp_path, table1("conv1x1", "conv1x1"), 12.0)
    code, out, _ = report(capsys, tmp_path)
    assert code == 0
    assert "## Table 1" in out and "## Table 2" not in out
    assert md_row(out, "conv1x1")[6:8] == ["12.00", "12.00 ± —"]  # one seed has no std


def test_auto_without_runs_is_an_error(tmp_path, capsys):
    code, out, err = report(capsys, tmp_path)
    assert code == 2 and out == "" and "--table" in err  # bad input (issue 23's exit codes)


def test_corrupt_and_missing_summaries_are_reported_and_skipped(tmp_path, capsys):
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6)
    (fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6) / "summary.json").write_text('{"status": "compl')
    (fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6) / "summary.json").write_text("[1, 2]")
    (fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6) / "summary.json").unlink()
    code, out, err = report(capsys, tmp_path, "--table", "table2")
    assert code == 0
    assert md_row(out, "original/110")[8] == "1/1"
    assert err.count("unreadable summary.json") == 1
    assert err.count("summary.json has no status") == 1
    assert err.count("no summary.json") == 1


def test_csv_has_one_record_per_printed_line(tmp_path, capsys):
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.5, seed=1)
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.9, seed=2)
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 60.0, label="synthetic")
    report(capsys, tmp_path, "--table", "table2", "--csv", tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(TABLES["table2"].rows) + 1  # + the synthetic line
    first, second = records[0], records[1]
    assert (first["row"], first["data"], first["paper_data"]) == ("original/110", "CIFAR-10", "True")
    assert float(first["paper"]) == 6.61 and float(first["median"]) == pytest.approx(6.7)
    assert (first["finished"], first["runs"], first["flag"]) == ("2", "2", "ok")
    assert (second["data"], second["paper_data"], second["flag"]) == ("synthetic", "False", "")
    assert records[-1]["runs"] == "0" and records[-1]["median"] == ""


def test_a_seed_run_twice_is_warned_about(tmp_path, capsys):
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.5, seed=1)
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6, seed=1)
    _, _, err = report(capsys, tmp_path, "--table", "table2")
    assert "seed 1 appears 2 times" in err


def test_line_without_runs_has_no_statistics():
    line = Line(TABLES["table1"], TABLES["table1"].row("identity"))
    assert (line.median, line.mean, line.std, line.fails, line.flag) == (None, None, None, 0, "")


# Whether two rows differ (issue 14); the statistics themselves are specified in test_stats.py.

OLD_CSV_COLUMNS = ["table", "row", "case", "data", "paper_data", "protocol", "max_iters", "paper",
                   "median", "mean", "std", "finished", "runs", "fails", "flag"]


def test_csv_appends_the_comparison_after_the_old_columns(tmp_path, capsys):
    pairs = [(6.9, 6.0), (7.0, 6.1), (7.1, 5.9), (7.05, 6.05), (6.95, 5.95)]
    for seed, (a, b) in enumerate(pairs, 1):
        fake_run(tmp_path, TABLE2_ORIGINAL_110, a, seed=seed)
        fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "block": "full_preact"}, b, seed=seed)
    report(capsys, tmp_path, "--table", "table2", "--csv", tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        header = next(csv.reader(f))
        f.seek(0)
        records = {r["row"]: r for r in csv.DictReader(f)}
    assert header == OLD_CSV_COLUMNS + ["median_lo", "median_hi", "median_coverage", "baseline",
                                        "diff", "diff_lo", "diff_hi", "p_value", "verdict"]
    base, full = records["original/110"], records["full_preact/110"]
    assert (base["baseline"], base["diff"], base["verdict"]) == ("original/110", "", "baseline")
    assert (float(base["median_lo"]), float(base["median_hi"])) == (6.9, 7.1)
    assert float(base["median_coverage"]) == pytest.approx(0.9375)
    assert float(full["diff"]) == pytest.approx(-1.0)
    assert float(full["diff_lo"]) <= -1.0 <= float(full["diff_hi"])
    assert float(full["p_value"]) == pytest.approx(2 / 252) and full["verdict"] == "better"
    assert records["original/164"]["verdict"] == records["original/164"]["p_value"] == ""


def test_baseline_option_chooses_the_row_compared_with(tmp_path, capsys):
    for seed in (1, 2, 3):
        fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6 + seed / 10, seed=seed)
        fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "block": "full_preact"}, 6.3 + seed / 10,
                 seed=seed)
    code, out, _ = report(capsys, tmp_path, "--table", "table2", "--baseline", "full_preact/110")
    assert code == 0 and "| Δ median vs full_preact/110 [95%] |" in out
    assert md_row(out, "full_preact/110")[14] == "baseline"
    assert md_row(out, "original/110")[12].startswith("+0.30")
    # 3 vs 3 seeds, fully separated: p = 2 / 20 is the best there is
    assert md_row(out, "original/110")[14] == (
        "no difference shown at 3 seeds (p cannot go below 0.1)")
    code, _, err = report(capsys, tmp_path, "--table", "table2", "--baseline", "nonsense")
    assert code == 2 and "--baseline nonsense" in err


def test_rows_are_compared_only_within_one_setting(tmp_path, capsys):
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6)
    fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "block": "full_preact"}, 60.0, label="synthetic")
    fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "block": "full_preact"}, 6.4, max_iters=2000)
    lines = lines_of(tmp_path)
    assert lines[("original/110", "CIFAR-10")].verdict == "baseline"
    assert lines[("full_preact/110", "synthetic")].comparison is None  # no original/110 on it
    _, out, _ = report(capsys, tmp_path, "--table", "table2")
    assert "no two rows that the paper orders both have runs of one setting" in out


# Issue 12: a run is reported as the model it built, not as its Hydra group choices.

def test_a_run_is_reported_as_the_block_it_built_and_the_disagreement_warned(tmp_path, capsys):
    # `train.py +experiment=table2 block=full_preact model.block=original`: the block choice stays
    # full_preact, the model built is original.
    chosen = {**TABLE2_ORIGINAL_110, "block": "full_preact"}
    run = fake_run(tmp_path, chosen, 6.7, built=built_model("original"))
    code, out, err = report(capsys, tmp_path, "--table", "table2")
    assert code == 0
    assert md_row(out, "original/110")[6] == "6.70" and md_row(out, "original/110")[8] == "1/1"
    assert md_row(out, "full_preact/110")[8] == "0/0"
    assert (f"warning: {run}: block choice full_preact but the model built was original; "
            "reported as original") in err


def test_a_run_is_reported_as_the_depth_and_shortcut_it_built(tmp_path, capsys):
    deeper = fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.0,
                      built=built_model("original", 164, "bottleneck"))  # model.depth=164
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 7.0,  # model.unit=bottleneck: no network of the paper
             built=built_model("original", 110, "bottleneck", configured_unit="bottleneck"))
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 7.5, built=built_model("original", shortcut="conv1x1"))
    runs, problems = load_runs([tmp_path])
    assert sorted(r.choices["depth"] for r in runs) == ["110", "110_bottleneck", "164"]
    assert (f"{deeper}: depth choice 110 but the model built was ResNet-164 of bottleneck units; "
            "reported as 164") in problems
    assert any("shortcut choice identity but the model built was conv1x1" in p for p in problems)
    code, out, err = report(capsys, tmp_path, "--table", "table2")
    assert code == 0
    assert md_row(out, "original/164")[6] == "6.00" and md_row(out, "original/110")[8] == "0/0"
    assert "2 runs are no row of table2" in err


def test_a_run_that_built_its_choices_is_not_warned_about(tmp_path):
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 6.6, built=built_model("original"))
    fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "depth": "164"}, 5.9,  # auto: bottleneck
             built=built_model("original", 164, "bottleneck"))
    table3 = {"experiment": "table3", "table3": "cifar10_110_1layer", "block": "full_preact",
              "depth": "110_1layer", "shortcut": "identity", "dataset": "cifar10"}
    fake_run(tmp_path, table3, 9.0, built=built_model("full_preact", 110, "single", "identity",
                                                       configured_unit="single"))
    runs, problems = load_runs([tmp_path])
    assert problems == [] and len(runs) == 3
    assert lines_of(tmp_path)[("original/164", "CIFAR-10")].median == 5.9
    one_layer = lines_of(tmp_path, "table3")[("cifar10_110_1layer/full_preact", "CIFAR-10")]
    assert one_layer.median == 9.0


def test_depth_option_names_the_conf_depth_option_that_builds_a_network():
    assert depth_option(110, "basic") == "110"  # the paper's unit, checked with models.auto_unit
    assert depth_option(164, "bottleneck", "auto") == "164"
    assert depth_option(110, "single", "single") == "110_1layer"
    assert depth_option(164, "basic", "basic") == "164_basic"  # not the paper's ResNet-164


# Rows are compared only with rows of the same network (table 2: depth; table 3: data and network).

def test_networks_and_default_baselines_of_every_table():
    t2, t3 = TABLES["table2"], TABLES["table3"]
    assert t2.row("full_preact/164").network == "164" and t2.row("full_preact/164").variant == (
        "full_preact")
    assert t3.row("cifar100_1001/original").network == "cifar100_1001"
    assert {n: r.key for n, r in baseline_rows(t2).items()} == {
        "110": "original/110", "164": "original/164"}
    assert {r.key for r in baseline_rows(t3).values()} == {f"{o}/original" for o in (
        "cifar10_110_1layer", "cifar10_110", "cifar10_164", "cifar10_1001", "cifar100_164",
        "cifar100_1001")}
    for name in ("table1", "resnet20_ablation"):  # one network each: the table's first row
        assert {n: r.key for n, r in baseline_rows(TABLES[name]).items()} == {
            "": TABLES[name].rows[0].key}
    assert baseline_name(t2) == "original/<depth>" and baseline_name(t3) == "<table3>/original"
    assert baseline_name(t2, "full_preact") == "full_preact/<depth>"
    assert baseline_name(t2, "full_preact/110") == "full_preact/110"
    assert baseline_rows(TABLES["resnet20_ablation"], "original")[""].key == "original"
    assert baseline_rows(t2, "nonsense") == {}


def _two_depths(tmp_path):
    """original and full pre-act at both depths of table 2, five made-up seeds each."""
    for block, depth, centre in (("original", "110", 7.0), ("full_preact", "110", 6.0),
                                 ("original", "164", 6.5), ("full_preact", "164", 5.5)):
        for seed in range(1, 6):
            fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "block": block, "depth": depth},
                     centre + seed / 50, seed=seed)


def test_table2_rows_are_compared_with_the_original_unit_of_their_depth(tmp_path, capsys):
    _two_depths(tmp_path)
    lines = lines_of(tmp_path)
    assert lines[("full_preact/164", "CIFAR-10")].baseline.row.key == "original/164"
    assert lines[("full_preact/110", "CIFAR-10")].baseline.row.key == "original/110"
    assert lines[("original/164", "CIFAR-10")].verdict == "baseline"
    code, out, _ = report(capsys, tmp_path, "--table", "table2")
    assert code == 0 and "| Δ median vs original/<depth> [95%] | p | verdict |" in out
    assert md_row(out, "full_preact/164")[12].startswith("-1.00")  # 5.56 - 6.56, not vs 110
    assert md_row(out, "original/164")[14] == "baseline"
    # 2 pairs, one per depth; across depths (e.g. original/164 < full_preact/110) none is compared
    assert "agrees on 2 of 2 pairs, disagrees on 0, undecided on 0." in out
    assert "original/164 < original/110" not in out


def test_baseline_block_picks_that_blocks_row_of_each_network(tmp_path, capsys):
    _two_depths(tmp_path)
    code, out, _ = report(capsys, tmp_path, "--table", "table2", "--baseline", "full_preact")
    assert code == 0 and "| Δ median vs full_preact/<depth> [95%] |" in out
    assert md_row(out, "full_preact/110")[14] == md_row(out, "full_preact/164")[14] == "baseline"
    assert md_row(out, "original/164")[12].startswith("+1.00")
    code, out, _ = report(capsys, tmp_path, "--table", "table2", "--baseline", "original/110")
    assert code == 0 and md_row(out, "original/164")[12].startswith("-0.50")  # one row for all
    assert "agrees on 2 of 2 pairs" in out  # the ordering check stays within a network


def test_table3_rows_are_compared_within_their_data_and_network(tmp_path):
    for option, depth, dataset, label in (("cifar10_164", "164", "cifar10", "CIFAR-10"),
                                          ("cifar100_164", "164", "cifar100", "CIFAR-100")):
        for block, error in (("original", 30.0), ("full_preact", 25.0)):
            fake_run(tmp_path, {"experiment": "table3", "table3": option, "block": block,
                                "depth": depth, "shortcut": "identity", "dataset": dataset,
                                "protocol": "paper"}, error, label=label)
    runs, _ = load_runs([tmp_path])
    lines = {l.row.key: l for l in group(TABLES["table3"], runs) if l.runs}
    assert lines["cifar10_164/full_preact"].baseline.row.key == "cifar10_164/original"
    assert lines["cifar100_164/full_preact"].baseline.row.key == "cifar100_164/original"
