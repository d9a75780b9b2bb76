"""idmap-plan (idmap.perf.plan, scripts/plan.py): a sweep's jobs as Hydra's sweeper expands them, each
distinct model timed with the trainer's own step, and what the whole sweep will cost."""

import itertools
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY
from idmap.perf import plan
from idmap.train import trainer
from idmap.config import compose_config


def run_plan(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "plan.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_resnet20_ablation_lists_its_55_jobs_and_a_total(monkeypatch, capsys):
    timed = []

    def fake_timer(cfg, iters, warmup):  # the timing itself is tested below, at a tiny size
        timed.append((cfg.model.block, cfg.shortcut.name))
        return 0.01, "cpu"

    monkeypatch.setattr(plan, "time_step", fake_timer)
    assert plan.main(["+experiment=resnet20_ablation"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert len(rows) == 55 and out.startswith("55 jobs, timed on cpu (a CPU")
    assert rows[0].startswith("| 0 | seed=1 resnet20_ablation=original | 64000 | 0.0100 | 10.7 |")
    assert len(timed) == len(set(timed)) == 11  # one timing per distinct model, not per seed
    # 55 x 64k iterations x 0.01 s; the slowest job's 10.7 min x 1.25 + 10.
    assert "| total | 55 jobs | 3520000 | | 586.7 | 9.78 |" in out
    assert "hydra.launcher.timeout_min=24 " in out


def test_the_jobs_are_hydras_expansion_in_its_order():
    jobs = plan.expand(["block=original,full_preact", "seed=1,2", "depth=20,110"])
    expected = [[f"block={b}", f"seed={s}", f"depth='{d}'"] for b, s, d in
                itertools.product(["original", "full_preact"], [1, 2], ["20", "110"])]
    assert [overrides for overrides, _, _ in jobs] == expected
    assert [cfg.model.depth for _, cfg, _ in jobs[:2]] == [20, 110]
    assert {gpus for _, _, gpus in jobs} == {1}


def test_a_slurm_job_of_two_nodes_of_4_tasks_holds_8_gpus():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    ((_, _, gpus),) = plan.expand(["+launcher=slurm", "hydra.launcher.nodes=2",
                                   "hydra.launcher.tasks_per_node=4"])
    assert gpus == 8


def test_time_step_counts_the_trainers_step_after_warm_up(monkeypatch):
    calls = []

    def step(self, it):  # the Loop's step, slow in warm-up as a first compiled step would be
        calls.append(it)
        time.sleep(1.0 if len(calls) <= 2 else 0.01)
        return 0.1

    monkeypatch.setattr(trainer.Loop, "step", step)
    seconds, device = plan.time_step(compose_config(*TINY), iters=3, warmup=2)
    assert calls == [0, 1, 2, 3, 4] and device == "cpu"
    assert 0.01 <= seconds < 0.3


def test_time_step_runs_the_real_step_at_a_tiny_size():
    seconds, device = plan.time_step(compose_config(*TINY), iters=2, warmup=1)
    assert seconds > 0 and device == "cpu"


def test_plan_json_times_a_tiny_sweep_on_this_cpu():
    tiny = [o for o in TINY if not o.startswith("trainer.max_iters")]
    proc = run_plan("-m", *tiny, "trainer.max_iters=1000", "block=original,full_preact",
                    "--iters", "2", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["devices"] == ["cpu"] and result["total"]["jobs"] == 2
    assert [j["overrides"][-1] for j in result["jobs"]] == ["block=original", "block=full_preact"]
    assert all(j["iterations"] == 1000 and j["seconds_per_iter"] > 0 for j in result["jobs"])
    assert result["total"]["minutes"] == pytest.approx(sum(j["minutes"] for j in result["jobs"]))
    assert result["timeout_min"] >= 10


def test_an_unknown_option_is_one_line_exit_2():
    proc = run_plan("block=nope")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope" in proc.stderr
