"""The report of any sweep (idmap.analysis.sweep_table through scripts/report.py): settings read from what each
run recorded, the paper tables' columns and methods, --by, --baseline, --next.

Every summary.json in this file is a made-up test fixture, not a result.
"""

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY
from idmap.cli import report as main  # report.main with the exit codes of the command
from idmap.analysis.run_records import load_runs
from idmap.analysis.sweep_table import default_keys, parse_setting, sweep

_counter = iter(range(10**6))


def fake_job(sweep_dir: Path, overrides: list, error: float, seed: int, block="full_preact",
             status="completed", folder=None, metrics=None, max_iters=40, data="synthetic") -> Path:
    """A made-up sweep job in the trainer's and Hydra's formats: its summary, and the overrides
    Hydra records; the folder name says nothing (settings come from the record)."""
    d = sweep_dir / (folder or f"job_{next(_counter)}")
    (d / ".hydra").mkdir(parents=True)
    record = [*overrides, f"seed={seed}"]
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in record))
    (d / ".hydra" / "config.yaml").write_text(
        f"model:\n  block: {block}\n  depth: 8\noptim:\n  lr: 0.1\nseed: {seed}\n")
    summary = {"status": status, "final_test_error": error, "max_iters": max_iters, "seed": seed,
               "dataset": {"name": data, "label": data},
               "choices": {"block": block, "shortcut": "identity", "depth": "110",
                           "dataset": "synthetic", "protocol": "paper"}}
    (d / "summary.json").write_text(json.dumps(summary))
    if metrics:
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return d


def report(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def md_rows(out: str) -> dict:
    """The sweep table's rows: setting -> cells."""
    lines = out[out.index("## Sweep"):].splitlines()
    rows = [l for l in lines if l.startswith("| ") and not l.startswith("| setting")]
    return {c[0]: c for c in ([x.strip() for x in r.strip("|").split("|")] for r in rows)}


LR_WORSE = {"0.1": [6.0, 6.2, 6.1, 6.3, 6.4], "0.05": [7.0, 7.2, 7.1, 7.3, 7.4]}


def lr_sweep(root: Path, errors=LR_WORSE, extra=("dataset=synthetic",), max_iters=40) -> Path:
    d = root / "sweep"
    for lr, errs in errors.items():
        for seed, e in enumerate(errs, 1):
            fake_job(d, [*extra, f"optim.lr={lr}"], e, seed, max_iters=max_iters)
    return d


def test_a_sweep_of_no_paper_row_gets_one_line_per_setting_with_every_column(tmp_path, capsys):
    # On main: "none of the 10 runs is a row of a paper table; choose a table with --table".
    code, out, err = report(capsys, lr_sweep(tmp_path))
    assert code == 0, err
    header = next(l for l in out.splitlines() if l.startswith("| setting"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "setting", "data", "protocol", "iters", "median", "mean ± std", "seeds", "fail",
        "median 95% interval", "Δ median vs optim.lr=0.05 [95%]", "p", "verdict"]
    rows = md_rows(out)
    assert set(rows) == {"optim.lr=0.05", "optim.lr=0.1"}  # seeds pooled, dataset constant
    base, other = rows["optim.lr=0.05"], rows["optim.lr=0.1"]
    assert base[1:4] == ["synthetic", "paper", "40"]
    assert base[4:8] == ["7.20", "7.20 ± 0.16", "5/5", "0/5"]
    assert base[8] == "[7.00, 7.40] 93.8%" and base[-1] == "baseline"
    assert other[4] == "6.20" and other[9].startswith("-1.00 [")
    assert other[10] == "0.008" and other[11] == "better"


def test_settings_come_from_the_recorded_overrides_not_folder_names(tmp_path):
    d = tmp_path / "s"
    fake_job(d, ["optim.lr=0.1"], 6.0, 1, folder="0_original_20")  # misleading folder names
    fake_job(d, ["optim.lr=0.2"], 7.0, 1, folder="1_original_20")
    fake_job(d, ["optim.lr=0.2"], 7.1, 2, folder="2_full_preact_110")
    runs, _ = load_runs([d])
    assert default_keys(runs) == ["optim.lr"]
    table = sweep(runs)
    assert [l.row.key for l in table.lines] == ["optim.lr=0.1", "optim.lr=0.2"]
    assert [len(l.runs) for l in table.lines] == [1, 2]


def test_a_key_one_run_did_not_override_has_its_config_value(tmp_path):
    d = tmp_path / "s"
    fake_job(d, [], 6.0, 1)  # the config's optim.lr 0.1
    fake_job(d, ["optim.lr=0.1"], 6.1, 2)
    fake_job(d, ["optim.lr=0.05"], 7.0, 1)
    table = sweep(load_runs([d])[0])
    assert {l.row.key: len(l.runs) for l in table.lines} == {"optim.lr=0.05": 1, "optim.lr=0.1": 2}


def test_by_chooses_the_keys_and_baseline_a_setting_per_other_key(tmp_path, capsys):
    d = tmp_path / "s"
    for block, shift in (("original", 0.0), ("full_preact", -0.5)):
        for lr, errs in LR_WORSE.items():
            for seed, e in enumerate(errs, 1):
                fake_job(d, [f"block={block}", f"optim.lr={lr}"], e + shift, seed, block=block)
    code, out, _ = report(capsys, d, "--baseline", "optim.lr=0.1")
    rows = md_rows(out)
    assert len(rows) == 4
    # Each block's lr 0.05 against that block's lr 0.1.
    assert rows["block=full_preact optim.lr=0.05"][-1] == "worse"
    assert rows["block=full_preact optim.lr=0.1"][-1] == "baseline"
    assert rows["block=original optim.lr=0.1"][-1] == "baseline"
    code, out, _ = report(capsys, d, "--by", "block", "--baseline", "block=original")
    rows = md_rows(out)  # learning rates merged: 10 seeds per block
    assert set(rows) == {"block=full_preact", "block=original"}
    assert rows["block=full_preact"][6] == "10/10" and rows["block=original"][-1] == "baseline"
    assert "Δ median vs block=original" in out


def test_a_baseline_the_sweep_does_not_have_is_one_line_exit_2(tmp_path, capsys):
    d = lr_sweep(tmp_path)
    code, _, err = report(capsys, d, "--baseline", "optim.lr=0.3")
    assert code == 2 and err.count("\n") == 1 and "no line of the sweep has that setting" in err
    code, _, err = report(capsys, d, "--baseline", "block=original")
    assert code == 2 and "name it with --by" in err


def test_paper_rows_fill_the_paper_table_and_the_csv_holds_both(tmp_path, capsys):
    lr_sweep(tmp_path)
    paper = {"experiment": "resnet20_ablation", "resnet20_ablation": "original",
             "block": "original", "shortcut": "identity", "depth": "20", "dataset": "cifar10",
             "protocol": "paper"}
    for seed in (1, 2):
        run = fake_job(tmp_path / "paper", ["+experiment=resnet20_ablation"], 8.5, seed)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "choices": paper}))
    code, out, err = report(capsys, tmp_path, "--csv", tmp_path / "r.csv")
    assert code == 0, err
    assert "## ResNet-20 ablation" in out and "## Sweep" in out
    assert set(md_rows(out)) == {"optim.lr=0.05", "optim.lr=0.1"}
    tables = [r["table"] for r in csv.DictReader(open(tmp_path / "r.csv"))]
    assert set(tables) == {"resnet20_ablation", "sweep"} and tables.count("sweep") == 2


def test_a_block_baseline_goes_to_the_paper_tables_when_a_sweep_is_reported_beside_them(tmp_path, capsys):
    # Before: "block is not a key the sweep's lines differ by", exit 2, as soon as other runs came too.
    from test_report import _two_depths

    _two_depths(tmp_path / "t2")
    lr_sweep(tmp_path)
    code, out, err = report(capsys, tmp_path, "--baseline", "block=full_preact")
    assert code == 0, err
    assert "| Δ median vs full_preact/<depth> [95%] |" in out  # the paper table's baseline
    assert md_rows(out)["optim.lr=0.05"][-1] == "baseline"  # the sweep keeps its default
    code, out, err = report(capsys, tmp_path, "--baseline", "optim.lr=0.1")
    assert code == 0 and md_rows(out)["optim.lr=0.1"][-1] == "baseline", err
    assert "| Δ median vs original/<depth> [95%] |" in out


def test_seeds_needed_for_each_undecided_comparison(tmp_path, capsys):
    d = lr_sweep(tmp_path, {"0.1": [10.0, 11.0, 12.0], "0.05": [12.0, 13.0, 14.0]})
    code, out, _ = report(capsys, d, "--seeds-needed")
    assert "- undecided: optim.lr=0.1 vs optim.lr=0.05; difference of means -2.00, seed sd 1.00: " \
           "seeds needed per row 5" in out


def test_the_sweep_table_never_compares_runs_on_other_data_or_of_other_lengths(tmp_path, capsys):
    # Issue 33: these were pooled, one line per rate, and compared with p-values.
    sweep = tmp_path / "sweep"
    for lr, errors in {"0.1": [6.0, 6.2, 6.1], "0.05": [7.0, 7.2, 7.1]}.items():
        for seed, e in enumerate(errors, 1):
            fake_job(sweep, [f"optim.lr={lr}"], e, seed)
            fake_job(sweep, [f"optim.lr={lr}"], e + 20, seed, max_iters=400)
    fake_job(sweep, ["optim.lr=0.1"], 30.0, 1, data="CIFAR-10")
    code, out, _ = report(capsys, sweep)
    assert code == 0
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in out.splitlines() if r.startswith("| optim.lr")]
    assert sorted((r[0], r[1], r[3], r[6]) for r in rows) == [
        ("optim.lr=0.05", "synthetic", "40", "3/3"), ("optim.lr=0.05", "synthetic", "400", "3/3"),
        ("optim.lr=0.1", "CIFAR-10", "40", "1/1"), ("optim.lr=0.1", "synthetic", "40", "3/3"),
        ("optim.lr=0.1", "synthetic", "400", "3/3")]
    compared = {(r[0], r[1], r[3]): r[-1] for r in rows}
    assert compared[("optim.lr=0.1", "CIFAR-10", "40")] == ""  # its baseline has no runs on that data
    assert compared[("optim.lr=0.05", "synthetic", "400")] == "baseline"
    assert compared[("optim.lr=0.1", "synthetic", "400")].startswith("no difference shown at 3 seeds")


def test_parse_setting_keeps_list_values_whole():
    assert parse_setting("model.widths=[8,16,32],optim.lr=0.1") == {
        "model.widths": "[8, 16, 32]", "optim.lr": "0.1"}  # as the config prints it


def test_next_numbers_the_seeds_after_each_lines_own_and_merges_a_grid(tmp_path, capsys):
    d = lr_sweep(tmp_path, {"0.1": [10.0, 11.0, 12.0], "0.05": [12.0, 13.0, 14.0]})
    code, out, _ = report(capsys, d, "--next")
    (command,) = [l for l in out.splitlines() if l.startswith("python train.py -m")]
    args = shlex.split(command)
    assert "optim.lr=0.05,0.1" in args or "optim.lr=0.1,0.05" in args
    assert "seed=4,5" in args and "dataset=synthetic" in args
    assert f"hydra.sweep.dir={tmp_path / 'sweep_next1'}" in args


def test_next_names_a_pair_that_would_need_more_than_max_next_seeds_instead_of_a_command(tmp_path, capsys):
    from idmap.analysis.sweep_table import MAX_NEXT_SEEDS

    d = lr_sweep(tmp_path, {"0.1": [10.0, 12.0, 14.0], "0.05": [10.1, 12.1, 14.1]})  # 0.1 apart at sd 2
    code, out, _ = report(capsys, d, "--next")
    assert code == 0 and "python train.py" not in out
    left_out = [l for l in out.splitlines() if l.startswith("--next")]
    n = int(left_out[0].split(": ")[1].split()[0])
    assert n > MAX_NEXT_SEEDS and left_out == [
        f"--next leaves out optim.lr=0.1 vs optim.lr=0.05 (synthetic, 40 iterations): {n} seeds per row would "
        f"be needed (over {MAX_NEXT_SEEDS}), a difference small beside the seed spread",
        f"--next: no undecided pair whose seeds needed can be estimated within {MAX_NEXT_SEEDS} per row."]


def test_next_asks_to_report_only_the_folders_of_the_pairs_it_gives_commands_for(tmp_path, capsys):
    near = lr_sweep(tmp_path / "near", {"0.1": [10.0, 12.0, 14.0], "0.05": [10.1, 12.1, 14.1]})  # left out
    far = lr_sweep(tmp_path / "far", {"0.1": [10.0, 11.0, 12.0], "0.05": [12.0, 13.0, 14.0]}, max_iters=400)
    code, out, _ = report(capsys, near, far, "--next")
    lines = out.splitlines()
    assert code == 0 and any(l.startswith("--next leaves out optim.lr=0.1 vs optim.lr=0.05 (synthetic, 40 iterations)")
                             for l in lines)  # the data and length tell it from the pair at 400
    (then,) = [l for l in lines if l.startswith("Next seeds")]
    assert str(far) in then and str(near) not in then
    (command,) = [l for l in lines if l.startswith("python train.py -m")]
    assert f"hydra.sweep.dir={far.parent / 'sweep_next1'}" in shlex.split(command)


@pytest.mark.slow
def test_next_prints_a_runnable_command_whose_runs_a_second_report_pools(tmp_path, capsys):
    tiny = [o for o in TINY if not o.startswith("trainer.max_iters")] + ["trainer.max_iters=20"]
    d = lr_sweep(tmp_path, {"0.1": [10.0, 11.0, 12.0], "0.05": [12.0, 13.0, 14.0]}, extra=tiny, max_iters=20)
    _, out, _ = report(capsys, d, "--next")
    (command,) = [l for l in out.splitlines() if l.startswith("python train.py -m")]
    args = shlex.split(command)[2:]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs, _ = load_runs([tmp_path / "sweep_next1"])
    assert sorted((r.seed, r.status) for r in runs) == [(4, "completed")] * 2 + [(5, "completed")] * 2
    code, out, _ = report(capsys, d, tmp_path / "sweep_next1")
    assert {row[6] for row in md_rows(out).values()} == {"5/5"}


def test_curves_group_a_sweep_as_the_report_does(tmp_path, capsys):
    from idmap.analysis import curves

    d = tmp_path / "s"
    for lr, finals in {"0.1": (7.0, 7.4, 6.8), "0.05": (9.0, 9.5)}.items():
        for seed, final in enumerate(finals, 1):
            fake_job(d, [f"optim.lr={lr}"], final, seed, metrics=[
                {"iteration": i, "train_error": final + 30 / (1 + i) - 2,
                 "test_error": final + 30 / (1 + i)} for i in (0, 10, 20)])
    rows, labels = curves.collect_settings([d])
    assert labels == ["optim.lr=0.05, median of 2 seeds", "optim.lr=0.1, median of 3 seeds"]
    assert [len(r) for r in rows] == [2, 3]
    out = tmp_path / "lr.png"
    assert curves.main([str(d), "--by", "-o", str(out)]) == 0
    assert "2 rows, 5 runs" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curves.main([str(d), "--by", "seed", "-o", str(out)]) == 0
    assert "3 rows, 5 runs" in capsys.readouterr().out


def test_table_sweep_reports_paper_rows_by_their_settings_too(tmp_path, capsys):
    # An lr sweep over one paper row would otherwise be pooled into that row.
    for lr, errs in LR_WORSE.items():
        for seed, e in enumerate(errs, 1):
            run = fake_job(tmp_path, ["+experiment=resnet20_ablation", f"optim.lr={lr}"], e, seed)
            summary = json.loads((run / "summary.json").read_text())
            summary["choices"].update(experiment="resnet20_ablation", resnet20_ablation="original",
                                      block="original", depth="20")
            (run / "summary.json").write_text(json.dumps(summary))
    code, out, _ = report(capsys, tmp_path, "--table", "sweep")
    assert code == 0 and "## ResNet-20" not in out
    assert set(md_rows(out)) == {"optim.lr=0.05", "optim.lr=0.1"}


def test_next_adds_seeds_to_the_undecided_pairs_of_a_paper_table(tmp_path, capsys):
    d = tmp_path / "ablation"
    for row, errs in {"original": [8.0, 9.0, 10.0], "full_preact": [7.0, 8.0, 9.0]}.items():
        for seed, e in enumerate(errs, 1):
            run = fake_job(d, ["+experiment=resnet20_ablation", f"resnet20_ablation={row}"], e,
                           seed, block=row)
            summary = json.loads((run / "summary.json").read_text())
            summary["choices"].update(resnet20_ablation=row, depth="20")
            (run / "summary.json").write_text(json.dumps(summary))
    code, out, _ = report(capsys, d, "--next")
    assert code == 0 and "## ResNet-20" in out and "## Sweep" not in out
    (command,) = [l for l in out.splitlines() if l.startswith("python train.py -m")]
    args = shlex.split(command)
    # The seed experiment orders full_preact < original; 1 point apart at sd 1: 17 seeds per row
    # (2 (1.96 + 0.84)^2 / 1^2 / (3/pi) = 16.4), so seeds 4 to 17 beside the 3 run.
    assert args[3] == "+experiment=resnet20_ablation"
    assert set(args[4].partition("=")[2].split(",")) == {"original", "full_preact"}
    assert "seed=" + ",".join(map(str, range(4, 18))) in args
    assert f"hydra.sweep.dir={tmp_path / 'ablation_next1'}" in args


def test_a_value_written_otherwise_is_the_same_setting(tmp_path):
    d = tmp_path / "s"
    fake_job(d, ["optim.lr=0.1", "model.widths=[8,16,32]"], 6.0, 1)
    fake_job(d, ["optim.lr=0.1", "model.widths=[8, 16, 32]"], 6.1, 2)
    fake_job(d, ["optim.lr=0.05", "model.widths=[8,16,32]"], 7.0, 1)
    table = sweep(load_runs([d])[0])
    assert table.keys == ["optim.lr"] and [len(l.runs) for l in table.lines] == [1, 2]


def test_baseline_block_setting_picks_that_blocks_rows_in_the_paper_tables(tmp_path, capsys):
    from test_report import _two_depths

    _two_depths(tmp_path)
    _, by_name, _ = report(capsys, tmp_path, "--table", "table2", "--baseline", "full_preact")
    code, by_setting, _ = report(capsys, tmp_path, "--table", "table2", "--baseline",
                                 "block=full_preact")
    assert code == 0 and by_setting == by_name
    assert "| Δ median vs full_preact/<depth> [95%] |" in by_setting
