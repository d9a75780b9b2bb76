"""scripts/report.py and scripts/plot_curves.py on small run directories made here.

Every summary.json and metrics.jsonl in this file is a made-up test fixture, not a result.
"""

import csv
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

from idmap.paper import FAIL, TABLES
from idmap.report import Line, group, load_runs, main

ROOT = Path(__file__).resolve().parents[1]
TABLE2_ORIGINAL_110 = {"experiment": "table2", "block": "original", "depth": "110",
                       "shortcut": "identity", "dataset": "cifar10", "protocol": "paper"}
_counter = iter(range(10**6))


def fake_run(root: Path, choices: dict, error=None, status="completed", label="CIFAR-10",
             seed=1, max_iters=64000, metrics=None) -> Path:
    """Writes a made-up run directory in the trainer's format (fixture data, not a result)."""
    d = root / f"fake_{next(_counter)}"
    (d / ".hydra").mkdir(parents=True)
    summary = {"status": status, "final_test_error": error, "best_test_error": error,
               "iterations": max_iters, "max_iters": max_iters, "seed": seed,
               "dataset": {"name": "cifar10", "label": label}, "choices": choices, "tags": {}}
    (d / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return d


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
    assert code == 1 and out == "" and "--table" in err


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


def _plot_curves():
    spec = importlib.util.spec_from_file_location("plot_curves", ROOT / "scripts" / "plot_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_curves_writes_a_png(tmp_path, capsys):
    import matplotlib.pyplot as plt

    def curve(final):
        return [{"iteration": i, "epoch": i / 391, "train_error": final + 40 / (1 + i / 100) - 2,
                 "test_error": final + 40 / (1 + i / 100)} for i in range(0, 2001, 500)]

    for seed in (1, 2):
        fake_run(tmp_path, TABLE2_ORIGINAL_110, 7.0, seed=seed, metrics=curve(7.0))
    fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "block": "full_preact"}, 6.0, metrics=curve(6.0))
    out = tmp_path / "curves.png"
    assert _plot_curves().main([str(tmp_path), "-o", str(out)]) == 0
    assert "3 runs" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_legend_names_what_differs_between_runs():
    labels = _plot_curves().legend_labels([
        {"block": "original", "depth": "110"}, {"block": "full_preact", "depth": "110"},
        {"block": "original", "depth": "110"}])
    assert labels == ["block=original", "block=full_preact", "block=original"]
