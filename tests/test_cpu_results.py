"""scripts/cpu_results.sh, the CPU runs behind docs/results.md: the train.py commands it starts, that a
second call resumes what the first began, that a sweep kept in the repo is not run again, and that a
failed sweep stops its lane. A stand-in for Python records each call instead of training."""

import os
import subprocess

from conftest import ROOT


def _lanes(tmp_path, exit_code=0):
    tmp_path.mkdir(parents=True, exist_ok=True)
    calls, fake = tmp_path / "calls", tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit {exit_code}\n')
    fake.chmod(0o755)
    out = tmp_path / "results"
    env = {**os.environ, "PY": str(fake), "IDMAP_RESULTS_OUT": str(out), "IDMAP_RESULTS_KEPT": str(tmp_path / "kept")}

    def run(*args):
        return subprocess.run(["bash", str(ROOT / "scripts" / "cpu_results.sh"), *args], env=env,
                              capture_output=True, text=True, timeout=60)
    return run, calls, out


def test_the_pair_starts_its_sweep_once_and_resumes_it_after(tmp_path):
    run, calls, out = _lanes(tmp_path)
    assert run("pair").returncode == 0
    (first,) = calls.read_text().splitlines()
    assert first.startswith("train.py -m ") and f"hydra.sweep.dir={out}/bf16_pair" in first
    for setting in ("block=full_preact", "seed=1,2,3", "trainer.precision=bf16,fp32", "trainer.max_iters=4000",
                    "optim.milestones=[2000,3000]", "dataset=cifar10_jpeg", "trainer.compile=default"):
        assert setting in first.split(), setting
    (out / "bf16_pair").mkdir(parents=True)
    (out / "bf16_pair" / "multirun.yaml").write_text("{}\n")  # the sweep began: the next call resumes it
    assert run("pair").returncode == 0
    assert calls.read_text().splitlines()[1:] == [f"train.py trainer.resume={out}/bf16_pair"]


def test_a_lane_runs_its_orderings_in_order_and_stops_at_a_failed_sweep(tmp_path):
    run, calls, out = _lanes(tmp_path)
    assert run("1").returncode == 0
    starts = calls.read_text().splitlines()
    orderings = [c.split("resnet20_ablation=")[1].split()[0] for c in starts]
    assert orderings == ["original", "relu_before_add", "bn_after_add"]
    assert all("+experiment=resnet20_ablation" in c and "trainer.precision=fp32" in c and "seed=1" in c.split()
               for c in starts)
    failing, failed_calls, _ = _lanes(tmp_path / "failing", exit_code=1)
    assert failing("1").returncode == 1 and len(failed_calls.read_text().splitlines()) == 1


def test_a_kept_sweep_is_not_run_again_so_a_fresh_clone_goes_on_with_the_next(tmp_path):
    run, calls, out = _lanes(tmp_path)
    for kept in ("original", "relu_before_add"):  # what `results.py --collect` copied from completed runs
        (tmp_path / "kept" / "resnet20_ablation" / kept).mkdir(parents=True)
    proc = run("1")
    assert proc.returncode == 0 and "resnet20_ablation/original: kept in" in proc.stdout
    (start,) = calls.read_text().splitlines()
    assert "resnet20_ablation=bn_after_add" in start.split() and f"hydra.sweep.dir={out}/resnet20_ablation/bn_after_add" in start


def test_an_unknown_lane_is_one_line_and_exit_2(tmp_path):
    run, calls, _ = _lanes(tmp_path)
    proc = run("3")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "usage" in proc.stderr
    assert not calls.exists()
