"""conf/experiment/<table>.yaml sweeps exactly the paper's rows x 5 seeds, and each runs end to end."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

from conftest import CONF, ROOT
from idmap.config import check_config
from idmap.analysis.paper import TABLES
from idmap.analysis.report import main as report_main
from idmap.run.sweep_status import failed_jobs

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SEEDS = [1, 2, 3, 4, 5]


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={name}", *overrides], return_hydra_config=True)


def sweep_jobs(cfg, command_line=()) -> list:
    """The jobs Hydra's basic sweeper launches (BasicSweeper.sweep): hydra.sweeper.params, then the
    command line, where a key given again replaces the params' sweep."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides(params + list(command_line))
    (batch,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return batch


def seed_of(job: list) -> int:
    return next(int(o.split("=")[1]) for o in job if o.startswith("seed="))


def test_every_table_has_an_experiment():
    assert EXPERIMENTS == sorted(TABLES)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweeps_every_row_with_five_seeds(name):
    cfg = compose_experiment(name)
    assert cfg.hydra.mode == RunMode.MULTIRUN  # `python train.py +experiment=...` sweeps without -m
    assert cfg.trainer.progress is False
    jobs = sweep_jobs(cfg)
    rows = len(TABLES[name].rows)
    assert len(jobs) == rows * len(SEEDS)
    assert Counter(seed_of(j) for j in jobs) == {s: rows for s in SEEDS}
    # Seeds are the outer loop: the first `rows` jobs are a whole table at seed 1.
    assert {seed_of(j) for j in jobs[:rows]} == {1}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_seed_on_the_command_line_narrows_the_sweep_to_one_seed(name):
    jobs = sweep_jobs(compose_experiment(name), ["seed=1"])
    assert len(jobs) == len(TABLES[name].rows)
    assert {seed_of(j) for j in jobs} == {1}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_job_composes_to_a_different_row_of_the_paper(name):
    """Every job's Hydra choices are those of exactly one row of src/idmap/analysis/paper.py, and every row
    gets a job: the experiment files and the paper's reference numbers describe the same table."""
    table = TABLES[name]
    found = []
    for job in sweep_jobs(compose_experiment(name), ["seed=1"]):
        cfg = compose_experiment(name, *job)
        check_config(cfg)  # and every row's settings are within the schema's ranges
        choices = dict(cfg.hydra.runtime.choices)
        matches = [row.key for row in table.rows if row.choices.items() <= choices.items()]
        assert len(matches) == 1, (job, matches)
        found += matches
    assert sorted(found) == sorted(row.key for row in table.rows)


# Table 1 as the paper states it: (shortcut, the shortcut's parameters).
TABLE1 = {
    "identity": ("identity", {}),
    "scaling_0_1": ("constant_scaling", {"shortcut_scale": 0.0, "residual_scale": 1.0}),
    "scaling_05_1": ("constant_scaling", {"shortcut_scale": 0.5, "residual_scale": 1.0}),
    "scaling_05_05": ("constant_scaling", {"shortcut_scale": 0.5, "residual_scale": 0.5}),
    "exclusive_gating_bias0": ("exclusive_gating", {"gate_bias": 0.0}),
    "exclusive_gating_bias-5": ("exclusive_gating", {"gate_bias": -5.0}),
    "exclusive_gating_bias-6": ("exclusive_gating", {"gate_bias": -6.0}),
    "exclusive_gating_bias-7": ("exclusive_gating", {"gate_bias": -7.0}),
    "shortcut_only_gating_bias0": ("shortcut_only_gating", {"gate_bias": 0.0}),
    "shortcut_only_gating_bias-6": ("shortcut_only_gating", {"gate_bias": -6.0}),
    "conv1x1": ("conv1x1", {}),
    "dropout_05": ("dropout", {"dropout_p": 0.5}),
}



def built_unit(cfg) -> str:
    """The unit type the run builds ('auto' resolved as build_resnet does)."""
    from idmap.models.resnet import auto_unit

    return auto_unit(cfg.model.depth) if cfg.model.unit == "auto" else cfg.model.unit


@pytest.mark.parametrize("row", sorted(TABLE1))
def test_table1_rows_are_resnet110_original_units_with_the_papers_shortcut(row):
    cfg = compose_experiment("table1", f"table1={row}")
    shortcut, params = TABLE1[row]
    assert (cfg.model.depth, built_unit(cfg), cfg.model.block) == (110, "basic", "original")
    assert cfg.shortcut.name == shortcut
    assert {k: cfg.shortcut[k] for k in params} == params


@pytest.mark.parametrize("row, depth, unit, dataset, classes", [
    ("cifar10_110_1layer", 110, "single", "cifar10", 10),
    ("cifar10_110", 110, "basic", "cifar10", 10),
    ("cifar10_164", 164, "bottleneck", "cifar10", 10),
    ("cifar10_1001", 1001, "bottleneck", "cifar10", 10),
    ("cifar100_164", 164, "bottleneck", "cifar100", 100),
    ("cifar100_1001", 1001, "bottleneck", "cifar100", 100),
])
def test_table3_rows_set_network_and_data(row, depth, unit, dataset, classes):
    cfg = compose_experiment("table3", f"table3={row}")
    assert (cfg.model.depth, built_unit(cfg), cfg.shortcut.name) == (depth, unit, "identity")
    assert (cfg.dataset.name, cfg.dataset.num_classes) == (dataset, classes)


def test_command_line_groups_win_over_a_rows_choice():
    # What lets a tiny run put every row, CIFAR-100 ones included, on synthetic data.
    cfg = compose_experiment("table3", "table3=cifar100_164", "dataset=synthetic")
    assert cfg.dataset.name == "synthetic" and cfg.model.depth == 164


# End to end: every row of every experiment through train.py and the report, as a user runs them,
# at the paper's depths (ResNet-1001 included) but widths 2/4/8, one iteration, 64 synthetic training
# and 8 test images (a job's time is mostly its start, checkpoint and Hydra's compose, not steps).
TINY = ["seed=1", "dataset=synthetic", "dataset.num_train=64", "dataset.num_test=8",
        "trainer.max_iters=1", "trainer.eval_every=1", "trainer.batch_size=8", "trainer.device=cpu",
        "model.widths=[2,4,8]"]
needs_train_py = pytest.mark.skipif(not (ROOT / "train.py").exists(), reason="train.py not written yet")


def start_sweep(name: str, sweep_dir: Path) -> subprocess.Popen:
    # No -m: the experiment's hydra.mode makes it a sweep. One thread each: the four sweeps run side
    # by side, and on 2 cores more threads made ResNet-1001 jobs ten times slower.
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), f"+experiment={name}", *TINY,
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def tiny_sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    procs = {name: start_sweep(name, root / name) for name in EXPERIMENTS}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        # Rows that fail in the paper may diverge in runs this short: the sweep still runs every
        # job, then exits 1 naming each; any other failure is a defect.
        failed = failed_jobs(root / name)
        assert proc.returncode == (1 if failed else 0), out[-3000:]
        assert all(reason.startswith("diverged") for _, reason in failed), failed
        assert out.count("failed: ") == len(failed), out[-3000:]
    return root


@needs_train_py
@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_end_to_end_and_fills_the_report(name, tiny_sweeps, capsys):
    """Every row of the paper's table is printed with the paper's number and its one seed."""
    sweep_dir = tiny_sweeps / name
    assert len(list(sweep_dir.glob("*/summary.json"))) == len(TABLES[name].rows)
    assert report_main([str(sweep_dir), "--table", name]) == 0
    out = capsys.readouterr().out
    for row in TABLES[name].rows:
        (line,) = [l for l in out.splitlines() if l.startswith(f"| {row.key} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == "synthetic *"  # never presented as CIFAR
        if row.reference is not None:
            assert cells[5] == (f"{row.reference:.2f}" if isinstance(row.reference, float) else "fail")
        assert cells[8] == "1/1", line  # the job finished (completed or diverged), no crash

