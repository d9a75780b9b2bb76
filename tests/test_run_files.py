"""Every file a run directory holds may be missing, empty, truncated or foreign (issue 23): the
message names the file and what to do, the exit code is 2, and the run is left as it was."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHORT, run_train


@pytest.fixture
def run_copy(short_run, tmp_path):
    """A copy of `train.py SHORT`'s completed run (conftest)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(short_run.fresh(), copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def _refused(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr


@pytest.mark.parametrize("name, content, what", [
    ("overrides.yaml", "[unclosed", "is unreadable"),
    ("overrides.yaml", "", "empty or foreign"),
    ("overrides.yaml", "model: {depth: 8}\n", "empty or foreign"),
    ("config.yaml", "", "empty or foreign"),
    ("config.yaml", "\x00\x01: [", "is unreadable"),
])
def test_a_broken_hydra_record_is_named_and_the_run_left_as_it_was(run_copy, name, content, what):
    (run_copy / ".hydra" / name).write_text(content)
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    _refused(run_train(f"trainer.resume={run_copy}", check=False), str(run_copy / ".hydra" / name), what,
             "restore it")
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before


def test_a_missing_overrides_record_is_named(run_copy):
    (run_copy / ".hydra" / "overrides.yaml").unlink()
    _refused(run_train(f"trainer.resume={run_copy}", check=False), "overrides.yaml is missing")


def test_a_foreign_sweep_record_is_named(tmp_path):
    (tmp_path / "multirun.yaml").write_text("- just\n- a list\n")
    _refused(run_train(f"trainer.resume={tmp_path}", check=False), str(tmp_path / "multirun.yaml"),
             "not a sweep's record")


@pytest.mark.parametrize("damage", ["no optimizer", "other weights", "config not a dict"])
def test_a_checkpoint_that_does_not_fit_the_run_is_named(run_copy, damage):
    path = run_copy / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    if damage == "no optimizer":
        del state["optimizer"]
    elif damage == "other weights":
        state["model"]["fc.weight"] = torch.zeros(3, 3)
    else:
        state["config"] = [1, 2]
    torch.save(state, path)
    summary = (run_copy / "summary.json").read_bytes()
    record = {p: p.read_bytes() for p in (run_copy / ".hydra").iterdir()}
    _refused(run_train(f"trainer.resume={run_copy}", "trainer.max_iters=6", check=False),
             f"checkpoint {path}", "does not fit")
    assert (run_copy / "summary.json").read_bytes() == summary  # still the completed run
    # Its record of its settings too (issue 33: Hydra had rewritten it with trainer.max_iters=6 by
    # then, so that every later plain resume of the run would have asked for that).
    assert {p: p.read_bytes() for p in (run_copy / ".hydra").iterdir()} == record


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *SHORT, f"hydra.run.dir={blocker}/run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    _refused(proc, f"cannot write the run directory {blocker}/run")
