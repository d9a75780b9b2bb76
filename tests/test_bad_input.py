"""Bad input, round 2 (issue 33): one rule everywhere. Bad input is exit code 2 and one line naming
the file or key and what to do, with nothing on disk changed; exit code 1 is for bugs. Each test
here is a kind of case the issue found handled otherwise: accepted without a word, reported as an
internal error, a traceback, a file lost or changed, advice that leads nowhere, a comparison the
paper never makes (tests/test_sweeps.py).

Every summary.json here is a made-up test fixture, not a result."""

import errno
import importlib.util
import json
import os
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, make_cfg
from omegaconf import OmegaConf, open_dict
from test_sweeps import fake_job, lr_sweep

from idmap import IdmapError, cli
from idmap.train.checkpoint import save_checkpoint
from idmap.config import compose_config
from idmap.train.data import load_dataset
from idmap.run.launch import claim, run
from idmap.rundir import DiskFull, unlock_run_dir, write_hydra_record
from idmap.train.runlog import RunLog
from idmap.train.runtime import resolve_device
from idmap.train.state import RunExists
from idmap.run.sweep_status import failed_jobs

SHORT = [*TINY, "trainer.max_iters=4", "trainer.eval_every=2", "trainer.checkpoint_every=2"]


def one_line(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def files(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---- accepted without a word ---------------------------------------------------------------------


def test_plan_refuses_the_settings_train_py_refuses(capsys):
    one_line(capsys, cli.plan([*TINY, "optim.lr=-1"]), "job 0", "optim.lr=-1.0 is not allowed")


def test_report_and_curves_by_a_key_no_run_has(tmp_path, capsys):
    sweep = lr_sweep(tmp_path)
    one_line(capsys, cli.report([str(sweep), "--by", "optim.lrr"]), "--by optim.lrr: no run has", "optim.lr")
    one_line(capsys, cli.curves([str(sweep), "--by", "optim.lrr", "-o", str(tmp_path / "c.png")]), "--by optim.lrr")
    assert not (tmp_path / "c.png").exists()


def test_an_image_folder_with_an_empty_class_is_refused(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            if (split, cls) != ("train", "dog"):
                Image.new("RGB", (4, 4)).save(tmp_path / split / cls / "0.png")
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "image_size": 4, "label": ""})
    with pytest.raises(IdmapError, match=f"{tmp_path / 'train' / 'dog'} holds no images"):
        load_dataset(cfg)


# ---- bad input reported as an internal error -----------------------------------------------------


def test_a_device_that_is_none_here_is_bad_input(tmp_path, capsys):
    with pytest.raises(IdmapError, match="'tpu' is not one"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(IdmapError, match="CUDA is not available"):
            resolve_device("cuda:3")
        code = cli.signals(["--blocks", "original", "--depths", "8", "--device", "cuda", "-o", str(tmp_path / "s.png")])
        one_line(capsys, code, "CUDA is not available")


def test_a_figure_format_matplotlib_cannot_write_is_refused_before_any_work(tmp_path, capsys):
    one_line(capsys, cli.curves([str(tmp_path), "-o", str(tmp_path / "c.xyz")]), "no figure format 'xyz'", "png, ps")
    one_line(capsys, cli.signals(["--blocks", "original", "-o", str(tmp_path / "s")]), "no figure format ''")


def test_a_checkpoint_without_its_config_is_bad_input(tmp_path, capsys):
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}, "iteration": 1})
    for command, args in ((cli.evaluate, []), (cli.landscape, ["-o", str(tmp_path / "l")]),
                          (cli.signals, ["-o", str(tmp_path / "s.png")])):
        where = ["--runs", str(tmp_path)] if command is cli.signals else [str(tmp_path)]
        one_line(capsys, command([*where, *args, "--device", "cpu"]), f"checkpoint {tmp_path / 'checkpoint.pt'} "
                 "does not fit (it holds no run config")


def test_one_foreign_summary_among_good_runs_is_named_and_skipped(tmp_path, capsys):
    sweep = lr_sweep(tmp_path)
    foreign = fake_job(sweep, ["optim.lr=0.1"], 5.0, 9)
    (foreign / "summary.json").write_text(json.dumps({"status": "completed", "choices": ["a"], "max_iters": "lots"}))
    assert cli.report([str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {foreign}: summary.json is not a run's (choices is ['a']), skipped" in err
    assert "| optim.lr=0.1 |" in out


# ---- tracebacks: names too long, folders that cannot be written, full disks ----------------------


@pytest.fixture(scope="module")
def train_py():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the edge; runs nothing (no __main__)
    return module


@pytest.mark.parametrize("how", ["name of 300", "name of 300 with ${now}", "outputs/ a file", "sweep, outputs/ a file"])
def test_a_run_folder_that_cannot_be_made_is_one_line_before_hydra(train_py, tmp_path, monkeypatch, capsys, how):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("")  # a file where a folder is expected: read-only for root too
    long = "x" * 300
    argv = {"name of 300": [f"hydra.run.dir={tmp_path / long}"],
            "name of 300 with ${now}": [f"hydra.run.dir={tmp_path}/" + "${now:%H}" + long],
            "outputs/ a file": [], "sweep, outputs/ a file": ["-m", "seed=1,2"]}[how]
    with pytest.raises(SystemExit) as info:
        train_py.before_hydra_writes([*SHORT, *argv])
    one_line(capsys, info.value.code, "too long" if "300" in how else "outputs")
    assert files(tmp_path) == {tmp_path / "outputs": b""}


def test_a_full_disk_under_the_tensorboard_writer_is_one_line_without_the_threads_traceback(tmp_path, monkeypatch,
                                                                                            capfd):
    from tensorboard.summary.writer.record_writer import RecordWriter

    monkeypatch.setattr(RecordWriter, "write", full_disk)
    with pytest.raises(DiskFull, match=f"cannot write the TensorBoard events in {tmp_path} .No space left"):
        RunLog(tmp_path, {}, [], 4)  # as on resume
    time.sleep(0.2)  # the writer thread has ended
    assert "Traceback" not in capfd.readouterr().err


def test_a_full_disk_while_the_runs_record_is_written_leaves_the_earlier_record_whole(tmp_path, monkeypatch):
    write_hydra_record(tmp_path, "config: 1\n", "hydra: 1\n", "- a=1\n")
    before = files(tmp_path)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DiskFull, match="disk full while writing .*/.hydra/"):
        write_hydra_record(tmp_path, "config: 2\n", "hydra: 2\n", "- a=2\n")
    assert files(tmp_path) == before
    assert OmegaConf.select(compose_config(hydra=True), "hydra.output_subdir") is None  # Hydra writes none


# ---- files lost or changed -----------------------------------------------------------------------


def test_csv_never_replaces_a_runs_file_and_a_full_disk_leaves_the_old_csv(tmp_path, monkeypatch, capsys):
    sweep = lr_sweep(tmp_path)
    job = next(p for p in sweep.iterdir() if (p / "summary.json").exists())
    before = files(sweep)
    for name in ("summary.json", "metrics.jsonl", ".hydra/config.yaml", "checkpoint.pt"):
        one_line(capsys, cli.report([str(sweep), "--csv", str(job / name)]), f"{name.split('/')[-1]} is a run's own file")
    assert files(sweep) == before
    out = tmp_path / "table.csv"
    out.write_text("old")
    monkeypatch.setattr(os, "fsync", full_disk)
    one_line(capsys, cli.report([str(sweep), "--csv", str(out)]), f"disk full while writing {out}")
    assert out.read_text() == "old" and sorted(tmp_path.iterdir()) == [sweep, out]


def test_a_figure_on_a_full_disk_leaves_the_old_one(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    fake_job(sweep, ["optim.lr=0.1"], 5.0, 1, metrics=[{"iteration": 2, "train_error": 50.0, "test_error": 60.0}])
    out = tmp_path / "c.png"
    out.write_text("old")
    monkeypatch.setattr(os, "fsync", full_disk)
    one_line(capsys, cli.curves([str(sweep), "-o", str(out)]), f"disk full while writing {out}")
    assert out.read_text() == "old"


def test_a_failing_landscape_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    from idmap.analysis import landscape

    grid = landscape.grid(3, 1.0)
    result = {"alphas": grid, "betas": grid, "loss": np.arange(9.0).reshape(3, 3), "accuracy": np.ones((3, 3)),
              "meta": {"block": "b", "depth": 8, "dataset": "d", "iteration": 1, "samples": 2}}
    landscape.write_landscape(result, tmp_path)
    before = files(tmp_path)

    def broken(*args):
        raise RuntimeError("a figure that fails to draw")

    monkeypatch.setattr(landscape, "surface_figure", broken)
    with pytest.raises(RuntimeError):
        landscape.write_landscape({**result, "loss": np.arange(9.0)[::-1].reshape(3, 3)}, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DiskFull):
        landscape.write_landscape({**result, "loss": np.arange(9.0)[::-1].reshape(3, 3)}, tmp_path)
    assert files(tmp_path) == before  # no file of the four replaced, no temporary file left


def test_gpu_check_never_overwrites_an_earlier_bundle(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    one_line(capsys, cli.gpu_check(["--rehearse", "--out", str(tmp_path)]), "holds an earlier bundle (results.json)")
    assert (tmp_path / "results.json").read_text() == "{}"


# ---- advice that leads somewhere -----------------------------------------------------------------


def test_a_full_disk_says_what_works_next_with_or_without_a_checkpoint(tmp_path, monkeypatch):
    import idmap.train.checkpoint as ckpt

    real, writes = ckpt.atomic_write, []

    def second_fails(path, write, mode="wb"):  # the checkpoint at `fail_at` finds the disk full
        writes.append(path)
        return real(path, full_disk if len(writes) == fail_at else write, mode)

    monkeypatch.setattr(ckpt, "atomic_write", second_fails)
    cfg = make_cfg(*SHORT, "trainer.eval_every=1", "dataset.num_test=32")
    for fail_at, run_dir in ((1, tmp_path / "first"), (2, tmp_path / "second")):
        writes.clear()
        with pytest.raises(DiskFull) as info:
            run(cfg, run_dir, choices={})
        if fail_at == 1:  # nothing to continue from: resuming it would be refused
            assert "start it again in another run directory" in str(info.value)
            with pytest.raises(RunExists):
                claim(run_dir, resume=True)
        else:  # the resume it advises is taken
            assert f"then continue it with trainer.resume={run_dir}" in str(info.value)
            assert claim(run_dir, resume=True)
            unlock_run_dir(run_dir)


def test_a_resumed_sweep_names_a_completed_job_it_could_not_continue(tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from idmap.run.launch import main

    sweep, job = tmp_path, tmp_path / "0_job"
    run(make_cfg(*SHORT), job, choices={})
    (job / "checkpoint.pt").write_bytes(b"not a checkpoint")
    cfg = compose_config(*SHORT, "trainer.max_iters=6", "trainer.resume=true", hydra=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.runtime.output_dir, cfg.hydra.sweep.dir = "MULTIRUN", str(job), str(sweep)
    HydraConfig.instance().set_config(cfg)
    try:
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        assert main(task) is None  # the job failed; the sweep goes on
    finally:
        HydraConfig.instance().cfg = None
    assert json.loads((job / "summary.json").read_text())["status"] == "completed"  # its result stands
    ((folder, reason),) = failed_jobs(sweep)
    assert folder == job and reason.startswith("completed at iteration 4, but resuming it failed: IdmapError: "
                                               f"checkpoint {job / 'checkpoint.pt'} is unreadable")


def test_bench_names_a_rows_file_it_could_not_write_before_it_measures_anything(tmp_path, capsys):
    rows = tmp_path / "absent" / "rows.jsonl"
    one_line(capsys, cli.bench(["--device", "cpu", "--depths", "8", "--rows", str(rows)]),
             f"--rows {rows}: no folder {rows.parent}")
    assert not rows.parent.exists()
