"""idmap.analysis.results_page (scripts/results.py): only completed runs are kept, and only their small files; the
page holds the report's tables, the curves, each run's provenance and the bf16 check's verdict."""

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, TINY, run_train
from idmap import cli
from idmap.analysis import results_page as results
from idmap.analysis.run_records import Run

SHORT = [*TINY, "trainer.max_iters=20", "trainer.eval_every=10", "trainer.checkpoint_every=20"]


def test_completed_runs_are_kept_with_their_small_files_and_the_page_says_how_each_ran(tmp_path, monkeypatch,
                                                                                       capsys):
    out = tmp_path / "outputs"
    run_train("-m", *SHORT, "seed=1,2", "trainer.precision=bf16,fp32", f"hydra.sweep.dir={out / 'pair'}")
    stopped = out / "pair" / "9_stopped"  # a run that did not finish its schedule is no result
    shutil.copytree(out / "pair" / "0_full_preact_110", stopped)
    summary = json.loads((stopped / "summary.json").read_text())
    (stopped / "summary.json").write_text(json.dumps({**summary, "status": "interrupted", "iterations": 10}))

    kept = tmp_path / "docs" / "results" / "runs"
    copied, differs = results.collect(out, kept)
    assert not differs and sorted(p.name for p in copied) == [f"{i}_full_preact_110" for i in range(4)]
    run = kept / "pair" / "0_full_preact_110"
    names = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert "checkpoint.pt" not in names and ".lock" not in names and "train.log" not in names
    assert {"metrics.jsonl", "summary.json", ".hydra/overrides.yaml"} <= set(names)
    assert any(n.startswith("events.out.tfevents.") for n in names)
    assert (kept / "pair" / "multirun.yaml").is_file() and not (kept / "pair" / "9_stopped").exists()
    assert (run / "summary.json").read_bytes() == (out / "pair" / "0_full_preact_110" / "summary.json").read_bytes()
    # Collecting again, from another folder: nothing is copied twice, and nothing kept is replaced: not
    # a sweep's multirun.yaml rewritten by a no-op resume, nor a run that has since another result.
    (out / "pair" / "multirun.yaml").write_text("rewritten by a later resume\n")
    rerun = out / "pair" / "1_full_preact_110" / "summary.json"
    rerun.write_text(json.dumps({**json.loads(rerun.read_text()), "final_test_error": 0.5}))
    lost = kept / "pair" / "2_full_preact_110" / "metrics.jsonl"  # as a copy cut short leaves a kept run
    lost.unlink()
    before = {p: p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.results([str(kept), "--collect", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert {p: p.read_bytes() for p in kept.rglob("*") if p.is_file() and p != lost} == before
    assert lost.read_bytes() == (out / "pair" / "2_full_preact_110" / "metrics.jsonl").read_bytes()
    assert len(said) == 2 and said[0] == f"kept {lost.parent}"
    assert said[1].startswith(f"left {kept / 'pair' / '1_full_preact_110'} as kept")
    assert "delete the kept folder" in said[1] and not any(elsewhere.iterdir())  # no page, no figures there

    (kept.parent / "reading.md").write_text("What the numbers say.")
    page_path = tmp_path / "docs" / "results.md"
    assert cli.results([str(kept), "--out", str(page_path)]) == 0
    page = page_path.read_text()
    assert "What the numbers say." in page
    assert "| trainer.precision=fp32 | synthetic |" in page and "baseline |" in page  # the report's sweep table
    assert "![curves_precision.png](figures/curves_precision.png)" in page
    assert (tmp_path / "docs" / "figures" / "curves_precision.png").stat().st_size > 0
    rows = [line for line in page.splitlines() if line.startswith("| `pair/")]
    assert len(rows) == 4
    for row in rows:
        assert "1 thread" in row or "threads" in row  # the CPU as summary.json names it
        assert "python train.py -m " in row and "trainer.resume" not in row and "seed=" in row
    assert "fp32 seeds" in page and "bf16 seeds" in page
    assert "predates `window_from`" not in page  # every window's rate covers the iterations it names


def _run(precision: str, seed: int, error: float) -> Run:
    return Run(Path(f"r{seed}{precision}"), "completed", error, {}, "synthetic", 20, seed,
               overrides=["block=full_preact", f"seed={seed}", f"trainer.precision={precision}"],
               config=OmegaConf.create({"trainer": {"precision": precision}}))


def test_bf16_is_kept_only_when_each_of_its_errors_lies_inside_the_fp32_seeds_range():
    fp32 = [_run("fp32", s, e) for s, e in ((1, 8.0), (2, 8.6), (3, 8.3))]
    inside = results.precision_pairs([*fp32, *(_run("bf16", s, e) for s, e in ((1, 8.1), (2, 8.5), (3, 8.0)))])
    assert len(inside) == 1 and "faithful enough" in inside[0] and "`block=full_preact`" in inside[0]
    outside = results.precision_pairs([*fp32, *(_run("bf16", s, e) for s, e in ((1, 8.1), (2, 8.7), (3, 8.0)))])
    assert len(outside) == 1 and "should use fp32" in outside[0] and "above the fp32 seeds' range (8.70)" in outside[0]
    assert results.precision_pairs(fp32) == []  # no pair, no verdict
    uneven = results.precision_pairs([*fp32[:2], *(_run("bf16", s, e) for s, e in ((1, 8.1), (2, 8.5), (3, 8.7)))])
    assert "should use fp32" in uneven[0] and "2 fp32 seeds against 3 bf16" in uneven[0]
    assert "against" not in outside[0]  # even seeds: the verdict stands
    one = results.precision_pairs([fp32[0], _run("bf16", 1, 7.5)])  # one fp32 seed: a point, no range
    assert len(one) == 1 and "undecided" in one[0] and "should use" not in one[0] and "faithful" not in one[0]


def test_a_run_trained_in_several_stretches_says_where_each_ran(tmp_path):
    def kept(name, segments):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "segments": segments}))
        return Run(run_dir, "completed", 8.0, {}, "synthetic", 20, 1)

    def segment(first, last, start, end, threads, commit):
        return {"iterations": [first, last], "elapsed": [start, end], "device_name": f"CPU ({threads})",
                "torch_version": "2.14.1", "git_commit": commit, "started": "2026-12-06T09:30:00+00:00"}

    runs = [kept("alone", [segment(0, 64000, 0, 9000, "2 threads", "a" * 40)]),   # one process: no line
            kept("before", []),                                                   # kept before segments
            kept("resumed", [segment(0, 21440, 0, 7200, "1 thread", "b" * 40),
                             segment(21440, 64000, 7200, 12600, "2 threads", "c" * 40)]),
            kept("older", [segment(49706, 64000, 20000, 26000, "1 thread", "d" * 40)])]
    lines = results.segment_lines(runs, tmp_path)
    said = [line for line in lines if line.startswith("- ")]
    assert said == [
        "- `resumed`: 0-21,440 on CPU (1 thread), torch 2.14.1, commit bbbbbbbbbb, from 2026-12-06T09:30:00, 2h00; "
        "21,440-64,000 on CPU (2 threads), torch 2.14.1, commit cccccccccc, from 2026-12-06T09:30:00, 1h30.",
        "- `older`: iterations 0-49,706 not recorded (an older idmap); 49,706-64,000 on CPU (1 thread), "
        "torch 2.14.1, commit dddddddddd, from 2026-12-06T09:30:00, 1h40."]
    assert results.segment_lines(runs[:2], tmp_path) == []


def test_a_folder_without_completed_runs_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.results([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no completed runs" in err[0] and "--collect" in err[0]
    assert cli.results([str(tmp_path), "--colect", "x"]) == 2  # a bad flag: one line, not argparse's usage
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--colect" in err[0] and "--help" in err[0]


def test_the_command_of_a_run_is_one_a_shell_takes_as_recorded():
    run = _run("bf16", 1, 8.0)
    run.overrides = ["depth='20'", "optim.milestones=[2000,3000]", "trainer.resume=True", "seed=1"]
    assert results.command(run) == "python train.py -m \"depth='20'\" \"optim.milestones=[2000,3000]\" seed=1"


def test_the_committed_results_page_is_what_its_committed_run_files_give(monkeypatch):
    """docs/results.md holds nothing that the run files kept beside it do not back: regenerated from
    docs/results/runs it is the same page (the curves' image lines aside: they are drawn elsewhere)."""
    root = ROOT / "docs" / "results" / "runs"
    if not root.is_dir():
        pytest.skip("no results kept yet")
    committed = (ROOT / "docs" / "results.md").read_text()
    monkeypatch.chdir(ROOT)  # the page names its folders as its command does, from the clone
    fresh = results.page(Path("docs/results/runs"), None, Path("docs/results.md"))
    drop = lambda text: [ln for ln in text.splitlines() if not ln.startswith(("![", "(not drawn"))]  # noqa: E731
    assert drop(fresh) == drop(committed)
