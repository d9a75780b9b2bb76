"""scripts/plot_curves.py (idmap.analysis.curves) on small run directories made here.

Every summary.json and metrics.jsonl in this file is a made-up test fixture, not a result.
"""

import importlib.util

import pytest

from idmap import cli
from idmap.analysis import curves
from test_report import ROOT, TABLE2_ORIGINAL_110, built_model, fake_run, table1


def _plot_curves_script():
    """scripts/plot_curves.py loaded by path, as `python scripts/plot_curves.py` runs it."""
    path = ROOT / "scripts" / "plot_curves.py"
    spec = importlib.util.spec_from_file_location("plot_curves", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_curves_script_writes_a_png(tmp_path, capsys):
    import matplotlib.pyplot as plt

    def curve(final):
        return [{"iteration": i, "epoch": i / 391, "train_error": final + 40 / (1 + i / 100) - 2,
                 "test_error": final + 40 / (1 + i / 100)} for i in range(0, 2001, 500)]

    for seed in (1, 2):
        fake_run(tmp_path, TABLE2_ORIGINAL_110, 7.0, seed=seed, metrics=curve(7.0))
    fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "block": "full_preact"}, 6.0, metrics=curve(6.0))
    out = tmp_path / "curves.png"
    assert _plot_curves_script().main([str(tmp_path), "-o", str(out)]) == 0
    assert "3 runs" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_legend_names_what_differs_between_runs():
    labels = curves.legend_labels([
        {"block": "original", "depth": "110"}, {"block": "full_preact", "depth": "110"},
        {"block": "original", "depth": "110"}])
    assert labels == ["block=original", "block=full_preact", "block=original"]




def test_plot_curves_by_table_row_draws_median_and_band(tmp_path, capsys):
    def curve(final, iterations=range(0, 2001, 500)):
        return [{"iteration": i, "train_error": final + 30 / (1 + i / 100) - 2,
                 "test_error": final + 30 / (1 + i / 100)} for i in iterations]

    for seed, final in enumerate((7.0, 7.4, 6.8), 1):
        fake_run(tmp_path, TABLE2_ORIGINAL_110, final, seed=seed, metrics=curve(final))
    fake_run(tmp_path, {**TABLE2_ORIGINAL_110, "block": "full_preact"}, 6.0,
             metrics=curve(6.0, range(0, 2001, 1000)))
    fake_run(tmp_path, table1("conv1x1", "conv1x1"), 12.0, metrics=curve(12.0))  # not table 2
    plot_curves = curves
    out = tmp_path / "rows.png"
    assert plot_curves.main([str(tmp_path), "--table", "table2", "-o", str(out)]) == 0
    assert "2 rows, 4 runs" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows, labels = plot_curves.collect_rows([tmp_path], "table2")
    assert labels == ["original/110, median of 3 seeds", "full_preact/110, 1 seed"]
    iterations, values = plot_curves.seed_band(rows[0], "test_error")
    assert values.shape == (3, len(iterations))
    assert values[:, -1] == pytest.approx([f + 30 / 21 for f in (7.0, 7.4, 6.8)])
    assert cli.curves([str(tmp_path / "fake_missing_dir"), "--table", "table2"]) == 2  # the command


def test_curves_are_labelled_by_the_model_built(tmp_path, capsys):
    metrics = [{"iteration": 0, "train_error": 90.0, "test_error": 90.0},
               {"iteration": 10, "train_error": 50.0, "test_error": 55.0}]
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 7.0, metrics=metrics, built=built_model("original"))
    fake_run(tmp_path, TABLE2_ORIGINAL_110, 7.0, metrics=metrics,  # model.block=full_preact
             built=built_model("full_preact"))
    torn = fake_run(tmp_path, TABLE2_ORIGINAL_110, 7.0, metrics=metrics, seed=2,
                    built=built_model("original"))
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 2')  # a run still writing
    found, labels = curves.collect([tmp_path])
    assert sorted(labels) == ["block=full_preact", "block=original", "block=original"]
    assert [len(c) for c in found] == [2, 2, 2]
    err = capsys.readouterr().err
    assert "block choice original but the model built was full_preact" in err
    assert "metrics.jsonl: skipped an unreadable line" in err
