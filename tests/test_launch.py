"""How runs start and continue: resuming by run or sweep directory, torchrun, sweep progress."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import DDP, ROOT, SHORT, run_train

from idmap.run.resume import resume_argv
from idmap.run.sweep_status import swept_values


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_resumes_from_its_directory_alone_and_may_be_extended(tmp_path):
    run_dir = tmp_path / "run"
    run_train(*SHORT, "block=original", f"hydra.run.dir={run_dir}")
    run_train(f"trainer.resume={run_dir}", "trainer.max_iters=8")
    summary = _summary(run_dir)
    assert summary["status"] == "completed" and summary["iterations"] == 8
    assert summary["model"]["block"] == "original"  # the run's own settings, not train.yaml's defaults
    assert [m["iteration"] for m in _metrics(run_dir)] == [2, 4, 6, 8]


def test_resuming_by_directory_refuses_a_changed_setting_and_leaves_the_run_as_it_was(short_run):
    run_dir = short_run.fresh()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_train(f"trainer.resume={run_dir}", "optim.lr=0.2", "block=original", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optim.lr: 0.1 -> 0.2" in proc.stderr and "model.block: full_preact -> original" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_run_cannot_be_shortened_below_where_it_is_and_stays_completed(short_run):
    run_dir = short_run.fresh()
    proc = run_train(f"trainer.resume={run_dir}", "trainer.max_iters=2", check=False)
    assert proc.returncode == 2 and "can be raised to extend a run, not lowered" in proc.stderr
    assert _summary(run_dir)["status"] == "completed"
    # The long form reaches the trainer, which refuses as well, without marking the run failed.
    proc = run_train(*SHORT, "trainer.max_iters=2", "trainer.resume=true", f"hydra.run.dir={run_dir}",
                     check=False)
    assert proc.returncode == 2 and "not lowered" in proc.stderr
    assert _summary(run_dir)["status"] == "completed"
    run_train(f"trainer.resume={run_dir}")  # and the plain resume still works


def test_a_run_counted_in_epochs_is_extended_in_epochs(tmp_path):
    run_dir = tmp_path / "run"
    in_epochs = [o for o in SHORT if not o.startswith("trainer.max_iters")]
    run_train(*in_epochs, "trainer.epochs=0.25", f"hydra.run.dir={run_dir}")  # 512 images, batch 32: 4 iterations
    proc = run_train(f"trainer.resume={run_dir}", "trainer.max_iters=8", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir} counts its length in epochs (trainer.epochs=0.25); extend it with trainer.epochs=N")
    run_train(f"trainer.resume={run_dir}", "trainer.epochs=0.5")
    assert _summary(run_dir)["iterations"] == 8


def test_one_job_of_an_experiment_sweep_resumes_as_one_run_in_its_folder(tmp_path):
    sweep = tmp_path / "sweep"
    run_train("+experiment=resnet20_ablation", "resnet20_ablation=original", "seed=1", *SHORT,
              f"hydra.sweep.dir={sweep}")
    (job,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    run_train(f"trainer.resume={job}", "trainer.max_iters=6")
    assert _summary(job)["iterations"] == 6 and _summary(job)["choices"]["resnet20_ablation"] == "original"
    assert [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")] == [job]


def test_resume_of_something_that_is_no_run_says_so(tmp_path):
    with pytest.raises(Exception, match="not a run directory"):
        resume_argv([f"trainer.resume={tmp_path}"])
    assert resume_argv(["trainer.resume=true", "seed=2"]) == ["trainer.resume=true", "seed=2"]


def test_a_sweep_resumes_its_unfinished_jobs_in_one_command(tmp_path):
    sweep = tmp_path / "sweep"
    run_train("-m", *SHORT, "seed=1,2", f"hydra.sweep.dir={sweep}", "hydra.job.chdir=false")
    # The sweep's own Hydra settings (its launcher's, say) come back with it.
    assert "hydra.job.chdir=false" in resume_argv([f"trainer.resume={sweep}"])
    done, unfinished = sweep / "0_full_preact_110", sweep / "1_full_preact_110"
    # Job 1 as a kill after its first checkpoint leaves it: checkpoint at 2, no final summary.
    shutil.rmtree(unfinished)
    run_train(*SHORT, "seed=2", "trainer.max_iters=2", f"hydra.run.dir={unfinished}")
    (unfinished / "summary.json").unlink()
    finished_before = (done / "summary.json").read_bytes()
    proc = run_train(f"trainer.resume={sweep}")
    assert _summary(unfinished)["status"] == "completed" and _summary(unfinished)["iterations"] == 4
    assert [m["iteration"] for m in _metrics(unfinished)] == [2, 4]
    assert (done / "summary.json").read_bytes() == finished_before  # a completed job is not run again
    assert "job 2/2" in proc.stdout + proc.stderr
    # The resumed sweep's own record resumes again (its job folder pattern stays unresolved).
    assert "hydra.sweep.subdir=${hydra.job.num}_${hydra:runtime.choices.block}_${hydra:runtime.choices.depth}" \
        in resume_argv([f"trainer.resume={sweep}"])


def test_a_resumed_sweep_passes_over_a_job_finished_at_its_length_in_iterations_or_epochs(tmp_path):
    from conftest import make_cfg
    from idmap.run.resume import already_done

    def finished(*overrides, iterations):
        cfg = make_cfg(*overrides)
        (tmp_path / "summary.json").write_text(json.dumps({
            "status": "completed", "iterations": iterations, "config": {"trainer": dict(cfg.trainer)}}))
        return cfg

    cfg = finished("trainer.max_iters=64000", iterations=64000)
    assert already_done(cfg, tmp_path) and not already_done(make_cfg("trainer.max_iters=70000"), tmp_path)
    cfg = finished("protocol=torch", iterations=156400)  # 200 epochs: its iterations depend on the data
    assert already_done(cfg, tmp_path) and not already_done(make_cfg("protocol=torch", "trainer.epochs=250"),
                                                            tmp_path)


def test_resuming_a_sweep_with_a_changed_setting_is_refused_before_anything_is_written(short_sweep):
    sweep = short_sweep.fresh()
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    proc = run_train(f"trainer.resume={sweep}", "optim.lr=0.2", check=False)
    assert proc.returncode == 2 and "optim.lr=0.2 would change what the runs" in proc.stderr
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before


def test_each_finished_job_of_a_sweep_prints_a_progress_line(short_sweep):
    proc = short_sweep.proc  # `train.py -m SHORT seed=1,2`
    out = proc.stdout + proc.stderr
    assert "job 1/2 seed=1: completed" in out and "job 2/2 seed=2: completed" in out
    assert "ETA done" in out


def sweep_size(task, params):
    return math.prod(swept_values(task, params).values())


def test_sweep_size_counts_the_command_line_and_the_experiments_values():
    assert sweep_size(["seed=1,2,3", "block=original"], {}) == 3
    assert sweep_size(["+experiment=table2"], {"seed": "1,2,3,4,5", "depth": "'110','164'",
                                               "block": "a,b,c,d,e"}) == 50
    assert sweep_size(["+experiment=table2", "seed=1"], {"seed": "1,2,3,4,5", "block": "a,b"}) == 2


def test_torchrun_with_two_gloo_processes_trains_one_run_as_world_size_2_does(tmp_path, ddp_run):
    settings, spawned = DDP, ddp_run  # `train.py DDP trainer.world_size=2`
    # torchrun's own processes, each composing its own time-stamped run directory: rank 0's is used.
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(ROOT / "train.py"), *settings,
                           f"hydra.run.dir={work}/outputs/run" + "_${now:%H-%M-%S.%f}"],
                          cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (work / "outputs").iterdir()]
    assert len(runs) == 1, runs  # one run directory, the other rank's stray one removed
    torchrun = runs[0]
    assert len((torchrun / "metrics.jsonl").read_text().splitlines()) == 2  # written once, by rank 0
    assert len(list(torchrun.glob("events.out.tfevents.*"))) == 1
    a, b = _summary(spawned), _summary(torchrun)
    assert b["status"] == "completed" and b["iterations"] == 6
    assert b["final_test_error"] == a["final_test_error"]
    assert [m["train_loss"] for m in _metrics(torchrun)] == [m["train_loss"] for m in _metrics(spawned)]
