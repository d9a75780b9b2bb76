"""Never lose a run: kills, crashes, corrupt files and bad input (issue 7)."""

import errno
import json
import re
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, Made, make_cfg, run_train
from idmap import IdmapError
from idmap.train.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from idmap.train.trainer import train

# Deterministic and long enough that a kill lands mid-run; a checkpoint every 10 iterations.
EXACT = [*TINY, "trainer.max_iters=120", "trainer.eval_every=20", "trainer.checkpoint_every=10",
         "trainer.log_every=5", "trainer.deterministic=true"]


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *EXACT, f"hydra.run.dir={run_dir}", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_train(*EXACT, f"hydra.run.dir={run_dir}")
    return run_dir


def _assert_same_run(resumed: Path, straight: Path) -> None:
    a, b = load_checkpoint(resumed), load_checkpoint(straight)
    assert a["iteration"] == b["iteration"] == 120
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    for pid, s in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][pid]["momentum_buffer"], s["momentum_buffer"])
    ma, mb = _metrics(resumed), _metrics(straight)
    assert [m["iteration"] for m in ma] == [20, 40, 60, 80, 100, 120]  # no duplicate, none missing
    assert [(m["train_error"], m["test_error"], m["test_loss"]) for m in ma] == [
        (m["train_error"], m["test_error"], m["test_loss"]) for m in mb]
    assert json.loads((resumed / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_run(tmp_path, straight):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for_checkpoint(proc, run_dir)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    killed_at = load_checkpoint(run_dir)["iteration"]
    assert killed_at < 120  # killed mid-run
    run_train(*EXACT, f"hydra.run.dir={run_dir}", "trainer.resume=true")
    _assert_same_run(run_dir, straight)
    # The killed process's segment ends at its last checkpoint: what it trained after is trained again.
    segments = json.loads((run_dir / "summary.json").read_text())["segments"]
    assert [s["iterations"] for s in segments] == [[0, killed_at], [killed_at, 120]]
    first_after = next(m for m in _metrics(run_dir) if m["iteration"] > killed_at)
    assert first_after["window_from"] == killed_at  # its rate is the resumed process's alone


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2])
def test_sigterm_sigint_or_sigusr2_checkpoints_at_the_next_iteration_and_resume_is_exact(tmp_path, straight, signum):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for_checkpoint(proc, run_dir)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signum, output
    assert "trainer.resume=true" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    state = load_checkpoint(run_dir)
    assert summary["status"] == "interrupted" and summary["iterations"] == state["iteration"] < 120
    run_train(*EXACT, f"hydra.run.dir={run_dir}", "trainer.resume=true")
    _assert_same_run(run_dir, straight)


# ---- files ---------------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def crash(f):
        f.write("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash, mode="w")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_disk_full_while_checkpointing_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    config = {"model": {}, "shortcut": {}, "dataset": {}, "trainer": {}}
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "iteration": 1, "config": config, "num_classes": 2})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(IdmapError, match="disk full while writing .*checkpoint.pt.*previous version of it is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "iteration": 2})
    assert load_checkpoint(path)["iteration"] == 1


def test_disk_full_during_a_run_ends_it_with_one_message(tmp_path, monkeypatch):
    import idmap.train.checkpoint as ckpt

    def full_disk_write(path, write, mode="wb"):  # what a file write on a full disk raises
        raise OSError(errno.ENOSPC, "No space left on device")

    real = ckpt.atomic_write
    monkeypatch.setattr(ckpt, "atomic_write",
                        lambda path, write, mode="wb": real(path, write, mode) if mode == "w" else
                        real(path, lambda f: full_disk_write(path, write), mode))
    with pytest.raises(IdmapError, match=r"disk full while writing .*checkpoint.pt"):
        train(make_cfg(*TINY), tmp_path)


@pytest.fixture(scope="module")
def four_iterations(tmp_path_factory) -> Made:
    """A completed run of 4 iterations, one evaluation and one checkpoint, made once."""
    run_dir = tmp_path_factory.mktemp("four") / "run"
    return Made(run_dir, run_train(*TINY, "trainer.max_iters=4", "trainer.eval_every=4", f"hydra.run.dir={run_dir}"))


def test_a_truncated_checkpoint_gives_a_clear_error_naming_the_file(four_iterations):
    run_dir = four_iterations.fresh()
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    (run_dir / ".lock").unlink(missing_ok=True)  # a copied run: not even the lock file is made
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_train(*TINY, f"hydra.run.dir={run_dir}", "trainer.resume=true", "trainer.max_iters=8", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint {ckpt} is unreadable (") and line.endswith(
        "point at an intact copy of the run's own checkpoint, or start the run afresh in another run directory")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # not a log line added


def test_an_existing_run_is_never_silently_overwritten(four_iterations):
    run_dir = four_iterations.fresh()
    before = {p: (run_dir / p).read_bytes() for p in ("checkpoint.pt", "summary.json", "metrics.jsonl")}
    proc = run_train(*TINY, "block=original", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and "trainer.resume=true" in proc.stderr
    assert {p: (run_dir / p).read_bytes() for p in before} == before  # still the completed run


@pytest.mark.parametrize("override, change", [
    ("model.depth=14", "model.depth: 8 -> 14"),
    ("shortcut=constant_scaling", "shortcut.name: identity -> constant_scaling"),  # same shapes
    ("optim.lr=0.2", "optim.lr: 0.1 -> 0.2"),
])
def test_resuming_with_other_settings_says_which(tmp_path, tiny_cfg, override, change):
    train(tiny_cfg, tmp_path)
    with pytest.raises(IdmapError, match=re.escape(change)):
        train(make_cfg(*TINY, override, "trainer.resume=true"), tmp_path)


def test_resuming_may_change_how_a_run_runs(tmp_path, tiny_cfg):
    train(tiny_cfg, tmp_path)
    summary = train(make_cfg(*TINY, "trainer.max_iters=60", "trainer.eval_every=30", "trainer.resume=true"), tmp_path)
    assert summary["status"] == "completed" and summary["iterations"] == 60


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "model": {}, "payload": _Exploit()}, path)
    with pytest.raises(IdmapError, match="unreadable"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    with open(path, "wb") as f:  # a bare pickle, not even a torch file
        pickle.dump(_Exploit(), f)
    with pytest.raises(IdmapError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_config_values_are_data_never_evaluated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*TINY, "trainer.max_iters=2", "trainer.eval_every=2",
                   "dataset.label=\"__import__('os').system('touch pwned')\"")
    summary = train(cfg, tmp_path)
    assert summary["dataset"]["label"].startswith("__import__")
    assert not (tmp_path / "pwned").exists()


# ---- bad input: one clear line, non-zero exit, traceback only when asked ------------------------


def test_impossible_depth_is_one_line_and_exit_2(tmp_path):
    proc = run_train(*TINY, "model.depth=100", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "error: depth 100 is not 6n+2 for basic units (nearest: 98, 104)" in proc.stderr
    assert "Traceback" not in proc.stderr
    full = run_train(*TINY, "model.depth=100", f"hydra.run.dir={tmp_path}/full", check=False,
                     env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_unknown_block_lists_the_options(tmp_path):
    proc = run_train("block=preact", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "Could not find 'block/preact'" in proc.stderr and "full_preact" in proc.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", "optim.lr=0.0 is not allowed; it must be a finite number > 0"),
        ("optim.lr=-0.1", "optim.lr=-0.1 is not allowed; it must be a finite number > 0"),
        ("trainer.batch_size=0", "trainer.batch_size=0 is not allowed; it must be an integer >= 1"),
        ("trainer.batch_size=100000", "larger than the training set"),
        ("model.block=preact", "model.block='preact' is not allowed; it must be one of .*full_preact"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not allowed; it must be one of fp32, tf32, bf16"),
    ],
)
def test_bad_settings_raise_a_clear_message(tmp_path, override, message):
    with pytest.raises(IdmapError, match=message):
        train(make_cfg(*TINY, override), tmp_path)


def test_missing_data_root_says_where_it_looked(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(IdmapError, match=str(root)):
        train(make_cfg(*TINY, "dataset=cifar10", f"dataset.root={root}", "dataset.download=false"), tmp_path)


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", *TINY, "trainer.max_iters=4", "trainer.eval_every=4", "model.depth=8,100",
                     f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1  # the sweep's exit status counts its failed job
    summaries = {json.loads(p.read_text())["status"]: json.loads(p.read_text())
                 for p in sweep.glob("*/summary.json")}
    assert set(summaries) == {"completed", "failed"}
    assert "depth 100 is not 6n+2" in summaries["failed"]["error"]
