"""A finished run is never lost (issue 23): a run directory belongs to one process while it runs, a
folder holding a run's results is continued only by a resume that can continue it, and a sweep's
exit status says whether every job gave a result."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SHORT, TINY, make_cfg, run_train

from idmap.run.launch import run
from idmap.rundir import RunInUse, lock_run_dir, unlock_run_dir, write_summary
from idmap.train.state import RunExists
from idmap.run.sweep_status import failed_jobs


def _files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that holds `run_dir`'s lock until its stdin closes."""
    code = ("import sys; from idmap.rundir import lock_run_dir; lock_run_dir(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---- one process per run directory ---------------------------------------------------------------


def test_a_second_run_into_a_running_directory_is_refused_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    long = [*TINY, "trainer.max_iters=100000", "trainer.checkpoint_every=5"]
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *long, f"hydra.run.dir={run_dir}"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        hydra_record = _files(run_dir / ".hydra")
        # A second start, a new run with other settings or the same run resumed: refused by the lock.
        for extra in (["seed=5"], ["trainer.resume=true"]):
            proc = run_train(*long, *extra, f"hydra.run.dir={run_dir}", check=False)
            assert proc.returncode == 2, proc.stderr
            assert f"error: {run_dir} is in use by another run" in proc.stderr
            assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
            assert _files(run_dir / ".hydra") == hydra_record  # the first run's record of its settings
        assert first.poll() is None  # the first run trains on
    finally:
        first.kill()
        first.wait()
    assert lock_run_dir(run_dir)  # the kernel released the killed run's lock
    unlock_run_dir(run_dir)


def test_a_sweep_job_into_a_folder_another_process_runs_in_is_refused(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunInUse, match="in use by another run"):
            run(make_cfg(*SHORT), tmp_path, choices={})
        assert list(tmp_path.iterdir()) == [tmp_path / ".lock"]  # nothing trained or written
    finally:
        holder.stdin.close()
        holder.wait()
    assert run(make_cfg(*SHORT), tmp_path, choices={})["status"] == "completed"


def test_the_lock_is_this_processs_own_and_taken_once(tmp_path):
    assert lock_run_dir(tmp_path) is True
    assert lock_run_dir(tmp_path / ".") is False  # already held here: the Hydra task finds it held
    unlock_run_dir(tmp_path)
    assert lock_run_dir(tmp_path) is True
    unlock_run_dir(tmp_path)


# ---- a folder that holds results is a run ---------------------------------------------------------


@pytest.fixture
def finished_without_checkpoint(short_run) -> Path:
    run_dir = short_run.fresh()
    (run_dir / "checkpoint.pt").unlink()
    return run_dir


@pytest.mark.parametrize("how", ["by directory", "long form", "new run"])
def test_a_finished_run_without_its_checkpoint_is_left_exactly_as_it_was(finished_without_checkpoint, how):
    run_dir = finished_without_checkpoint
    before = _files(run_dir)
    args = {"by directory": [f"trainer.resume={run_dir}"],
            "long form": [*SHORT, "trainer.resume=true", f"hydra.run.dir={run_dir}"],
            "new run": [*SHORT, "seed=3", f"hydra.run.dir={run_dir}"]}[how]
    proc = run_train(*args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds a run's results (summary.json (completed)) but no checkpoint" in proc.stderr
    assert _files(run_dir) == before


def test_metrics_alone_make_a_folder_a_run(finished_without_checkpoint):
    run_dir = finished_without_checkpoint
    (run_dir / "summary.json").unlink()
    proc = run_train(*SHORT, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and "metrics.jsonl (2 evaluations)" in proc.stderr


def test_a_new_run_into_a_folder_with_a_checkpoint_leaves_even_its_hydra_record(short_run):
    run_dir = short_run.fresh()
    before = _files(run_dir)
    proc = run_train(*SHORT, "block=original", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and "already holds a checkpoint" in proc.stderr
    assert _files(run_dir) == before


def test_a_run_that_failed_before_any_result_may_be_started_again(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(*SHORT, "model.depth=100", f"hydra.run.dir={run_dir}", check=False).returncode == 2
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    run_train(*SHORT, f"hydra.run.dir={run_dir}")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


# ---- no result, no exit status 0 -----------------------------------------------------------------


def test_a_diverged_run_exits_1_with_one_line(tmp_path):
    proc = run_train(*SHORT, "optim.lr=1e30", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {tmp_path} diverged: non-finite loss by iteration" in proc.stderr


def test_a_sweep_with_a_failed_job_runs_the_others_then_exits_1_naming_it(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", *SHORT, "model.depth=100,8", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1
    assert json.loads((sweep / "1_full_preact_110" / "summary.json").read_text())["status"] == "completed"
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert failed == [f"failed: {sweep / '0_full_preact_110'}: failed: IdmapError: depth 100 is not 6n+2 "
                      f"for basic units (nearest: 98, 104)"]
    assert "Traceback" not in proc.stderr


def test_a_sweep_whose_jobs_all_completed_exits_0(short_sweep):
    proc = short_sweep.proc  # `train.py -m SHORT seed=1,2`, which exited 0 (run_train checks)
    assert "failed: " not in proc.stderr and failed_jobs(short_sweep.fresh()) == []


def test_a_run_directory_that_is_a_file_is_refused_and_the_file_left_as_it_was(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    proc = run_train(*TINY, f"hydra.run.dir={notes}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {notes} is a file, not a run directory; choose another run directory")
    assert notes.read_text() == "mine" and list(tmp_path.iterdir()) == [notes]


def test_a_new_sweep_into_a_folder_that_holds_a_sweeps_runs_is_refused_and_writes_nothing(short_sweep):
    sweep = short_sweep.fresh()
    before = _files(sweep)
    proc = run_train("-m", *SHORT, "seed=1,2,3", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: hydra.sweep.dir={sweep} already holds a sweep's runs (0_full_preact_110: a checkpoint); "
        f"continue it with trainer.resume={sweep}, or choose another hydra.sweep.dir (it is left as it was)")
    assert _files(sweep) == before


def test_only_a_sweeps_folder_is_refused_and_a_sweep_whose_settings_resume_is_not(short_run, tmp_path):
    from idmap.run.launch import _refuse_held_sweep, _resumes
    from idmap.run.resume import quoted

    folder = tmp_path / "runs"
    shutil.copytree(short_run.fresh(), folder / "r1")  # a folder of single runs: a new job folder is new
    _refuse_held_sweep(folder)
    (folder / "multirun.yaml").write_text("{}\n")  # a sweep's: its jobs' folders would be taken again
    with pytest.raises(RunExists, match=r"already holds a sweep's runs \(r1: a checkpoint\)"):
        _refuse_held_sweep(folder)
    assert not _resumes(["-m", "seed=1,2", f"hydra.sweep.dir={quoted(folder)}"])
    assert _resumes(["-m", "seed=1,2", "trainer.resume=true"])
    assert _resumes(["-m", "seed=1,2", "+launcher=slurm"])  # conf/launcher/slurm.yaml resumes its jobs


def test_a_resumed_sweep_that_finds_a_job_done_drops_an_earlier_starts_failure_note(short_sweep):
    sweep = short_sweep.fresh()
    job = sweep / "0_full_preact_110"
    summary = json.loads((job / "summary.json").read_text())
    write_summary(job, {**summary, "failed_resume": "RunExists: an earlier start could not continue it"})
    assert [d.name for d, _ in failed_jobs(sweep)] == [job.name]
    proc = run_train(f"trainer.resume={sweep}")  # exit 0: both jobs done, none failed this time
    assert "failed: " not in proc.stderr and failed_jobs(sweep) == []
    assert json.loads((job / "summary.json").read_text()) == summary


def _job(sweep: Path, name: str, summary=None, text=None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    if summary is not None:
        write_summary(job, summary)
    if text is not None:
        (job / "summary.json").write_text(text)
    return job


def test_failed_jobs_reads_every_outcome_from_the_job_folders(tmp_path):
    _job(tmp_path, "0_done", {"status": "completed", "error": None})
    diverged = _job(tmp_path, "1_diverged", {"status": "diverged", "error": "non-finite loss by iteration 7"})
    interrupted = _job(tmp_path, "2_interrupted", {"status": "interrupted", "error": None})
    failed = _job(tmp_path, "3_failed", {"status": "failed", "error": "RuntimeError: CUDA error\nmore"})
    missing = _job(tmp_path, "4_never_finished")
    torn = _job(tmp_path, "5_torn", text='{"status": "compl')
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    found = failed_jobs(tmp_path)
    assert found[:4] == [
        (diverged, "diverged: non-finite loss by iteration 7"),
        (interrupted, "interrupted"),
        (failed, "failed: RuntimeError: CUDA error"),
        (missing, "no result recorded (no summary.json)"),
    ]
    assert found[4][0] == torn and found[4][1].startswith("no result recorded (unreadable summary.json")
    assert len(found) == 5
