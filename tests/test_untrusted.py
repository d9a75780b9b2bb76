"""Nothing from a file runs code or writes outside its run (issue 33): unit files set the model's
ordering and nothing else, a run's or a sweep's record replays only this project's settings, an
option is a name and never a path, a link in a run directory is not written through, and a
checkpoint's refusal never repeats torch's advice to load it unsafely.

Every attack here uses idmap.perf.gpu_check_processes.start, a project function that starts a process, as
the issue's did: Hydra's own blocklist does not stop it."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY

from idmap import IdmapError
from idmap.train.checkpoint import load_checkpoint
from idmap.cli import plan
from idmap.overrides import check_overrides
from idmap.run.launch import claim
from idmap.run.resume import resume_argv
from idmap.rundir import unlock_run_dir
from idmap.train.state import RunExists


def _callback(marker: Path) -> str:
    return (f"  callbacks:\n    pwn:\n      _target_: idmap.perf.gpu_check_processes.start\n"
            f"      cmd: [touch, {marker}]\n      log: {{_target_: pathlib.Path, _args_: [{marker}.log]}}\n")


@pytest.fixture
def marker(tmp_path) -> Path:
    yield tmp_path / "pwned"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned.log").exists()


def _unit_folder(tmp_path: Path, files: dict) -> Path:
    folder = tmp_path / "units"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


GLOBAL_UNIT = "# @package _global_\nmodel:\n  block: full_preact\nhydra:\n{callback}"
UNITS = {  # file in the search path folder -> what the refusal names
    "block/evil.yaml": (GLOBAL_UNIT, "it has package _global_"),
    "block/extra.yaml": ("# @package model\nblock: extra\ndepth: 8\n", "it has depth"),
    "block/defaults.yaml": ("# @package model\ndefaults:\n  - /hydra/callbacks: x\nblock: defaults\n",
                            "it has defaults"),
    "block/original.yaml": ("# @package model\nblock: original\n", "the paper's block original has this name"),
    "experiment/evil.yaml": (GLOBAL_UNIT, "holds unit files only"),
}


@pytest.mark.parametrize("name", list(UNITS))
def test_a_unit_file_that_sets_more_than_its_ordering_is_refused_before_hydra_reads_it(tmp_path, marker, name):
    text, why = UNITS[name]
    folder = _unit_folder(tmp_path, {name: text.format(callback=_callback(marker))})
    with pytest.raises(IdmapError, match=why) as info:
        check_overrides([f"hydra.searchpath=[file://{folder}]", f"block={Path(name).stem}"])
    assert str(folder / name) in str(info.value)
    assert plan([f"hydra.searchpath=[file://{folder}]", "block=evil", "--iters", "1"]) == 2


def test_the_readme_unit_passes_and_a_callback_unit_ends_train_py_in_one_line(tmp_path, marker):
    check_overrides([f"hydra.searchpath=[file://{ROOT / 'docs' / 'examples'}]", "block=bn_relu_conv_bn"])
    folder = _unit_folder(tmp_path, {"block/evil.yaml": GLOBAL_UNIT.format(callback=_callback(marker))})
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.searchpath=[file://{folder}]",
                           "block=evil", f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {folder / 'block' / 'evil.yaml'}: a unit file sets")
    assert not run_dir.exists()


@pytest.mark.parametrize("override", ["block=../depth/20", "block=../../../etc/x", "block=original,../x",
                                      "+experiment=/tmp/x", "depth=a/b", "hydra/launcher=../../x",
                                      "block=${oc.env:HOME}"])
def test_an_option_is_a_name_never_a_path(override):
    with pytest.raises(IdmapError, match="not a path"):
        check_overrides([override])
    assert plan([override]) == 2


def _run_record(tmp_path: Path, overrides: list[str]) -> Path:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- '{o}'\n" for o in overrides))
    (run / ".hydra" / "config.yaml").write_text("trainer: {max_iters: 4}\n")
    return run


@pytest.mark.parametrize("line", [
    "hydra.callbacks.pwn._target_=idmap.perf.gpu_check_processes.start",
    "+hydra.callbacks.pwn._target_=idmap.perf.gpu_check_processes.start",
    "++hydra.job_logging.handlers.file.filename=/tmp/elsewhere.log",
    "hydra.launcher.setup=[touch /tmp/pwned]",
    "tags={_target_: os.system}",
    "no_such.key=1",
])
def test_a_runs_record_replays_only_this_projects_settings(tmp_path, line):
    run = _run_record(tmp_path, ["model.depth=8", line])
    with pytest.raises(IdmapError, match="not one of this project's settings") as info:
        resume_argv([f"trainer.resume={run}"])
    assert str(run / ".hydra" / "overrides.yaml") in str(info.value)


def _sweep_record(tmp_path: Path, task=("seed=1,2",), hydra=(), subdir="${hydra.job.num}_x") -> Path:
    sweep = tmp_path / "sweep"
    sweep.mkdir(parents=True)
    quoted = lambda items: "[" + ", ".join(f"'{o}'" for o in items) + "]"  # noqa: E731
    (sweep / "multirun.yaml").write_text(
        f"hydra:\n  overrides:\n    task: {quoted(task)}\n    hydra: {quoted(hydra)}\n"
        f"  sweep:\n    dir: {sweep}\n    subdir: '{subdir}'\n")
    return sweep


def test_a_sweeps_record_replays_only_this_projects_settings_and_job_folders_inside_it(tmp_path):
    legit = resume_argv([f"trainer.resume={_sweep_record(tmp_path / 'a', hydra=['hydra.launcher.n_jobs=2'])}"])
    assert "hydra.launcher.n_jobs=2" in legit
    for n, record in enumerate([dict(hydra=["hydra.callbacks.pwn._target_=idmap.perf.gpu_check_processes.start"]),
                                dict(hydra=["hydra.launcher.submitit_folder=/tmp/elsewhere"]),
                                dict(task=["seed=1,2", "hydra.run.dir=/tmp/x"]),
                                dict(subdir="../../elsewhere/${hydra.job.num}")]):
        sweep = _sweep_record(tmp_path / str(n), **record)
        with pytest.raises(IdmapError, match=str(sweep / "multirun.yaml")):
            resume_argv([f"trainer.resume={sweep}"])


def test_a_link_in_a_run_directory_that_leads_out_of_it_is_never_written_through(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("theirs")
    for name in ("train.log", ".lock", "metrics.jsonl", ".hydra"):
        run = tmp_path / name.strip(".") / "run"
        run.mkdir(parents=True)
        (run / "checkpoint.pt").write_bytes(b"")
        (run / name).symlink_to(outside if name != ".hydra" else tmp_path)
        with pytest.raises(RunExists, match=f"{run / name} is a link to {outside if name != '.hydra' else tmp_path}"):
            claim(run, resume=True)
        assert outside.read_text() == "theirs" and (name == ".lock" or not (run / ".lock").exists())
    inside = tmp_path / "inside" / "run"
    inside.mkdir(parents=True)
    (inside / "latest").symlink_to(inside / "checkpoint.pt")  # a link within the run is its own
    assert claim(inside, resume=True)
    unlock_run_dir(inside)


def test_a_sweep_resume_checks_every_job_folder_before_hydra_writes_in_them(tmp_path):
    sweep = _sweep_record(tmp_path)
    job = sweep / "0_x"
    (job / ".hydra").mkdir(parents=True)
    (job / "train.log").symlink_to(tmp_path / "elsewhere.log")
    with pytest.raises(IdmapError, match="train.log is a link to"):
        resume_argv([f"trainer.resume={sweep}"])


def test_the_landscape_does_not_write_through_a_link_out_of_the_run(tmp_path, capsys):
    from idmap.cli import landscape

    run = tmp_path / "run"
    run.mkdir()
    (run / "landscape").symlink_to(tmp_path)
    assert landscape([str(run), "--device", "cpu"]) == 2
    assert "landscape is a link to" in capsys.readouterr().err


def test_an_unsafe_checkpoint_is_refused_without_torchs_advice_to_load_it_anyway(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "model": {}, "config": argparse.Namespace(a=1)}, path)
    with pytest.raises(IdmapError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "weights_only" not in message and "can still be loaded" not in message
    assert "objects other than tensors and plain data" in message
