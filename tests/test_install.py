"""The built wheel, installed (not editable) beside the installed dependencies and run from an empty
folder, as a user of `pip install .` runs it: conf/ ships inside it and every command starts."""

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY
from test_report import TABLE2_ORIGINAL_110, fake_run

# Built without isolation (no network here, nor in every CI), so the backend must be installed:
# the dev extra brings it.
pytest.importorskip("setuptools")

# What the wheel is built from: pyproject.toml's sources, conf/ and what packaging reads.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src", "conf")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The folder the wheel is installed into (pip --target), its commands in bin/."""
    tmp = tmp_path_factory.mktemp("install")
    # A copy, so that setuptools' build/ and egg-info land there and not in the clone.
    project = tmp / "project"
    project.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, project / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
                    project], check=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("idmap-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True, timeout=300)
    return tmp / "site"


def run(site: Path, *cmd, cwd: Path) -> subprocess.CompletedProcess:
    """`cmd` in `cwd` with the installed copy the only idmap on the path before site-packages (an
    editable install of the clone, if any, comes after it)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_copy_reads_its_own_files_and_every_command_answers_help(site, tmp_path):
    shipped = sorted(p.relative_to(site / "idmap" / "conf") for p in (site / "idmap" / "conf").rglob("*.yaml"))
    assert shipped == sorted(p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml"))
    commands = configparser.ConfigParser()
    commands.read(next(site.glob("idmap-*.dist-info")) / "entry_points.txt")
    names = list(commands["console_scripts"])
    assert len(names) == 9 and all((site / "bin" / name).is_file() for name in names)  # pyproject's
    # One process for all of it: each would spend seconds importing torch.
    script = "\n".join([
        "import json, sys, idmap, idmap.cli as c, idmap.paths as p, idmap.rundir as r",
        "print(json.dumps([idmap.__file__, str(p.CONF), p.REPO is None, r.git_commit()]), flush=True)",
        "for name in sys.argv[1:]:",
        "    try:",
        "        code = getattr(c, name)(['--help'])",
        "    except SystemExit as exc:",  # argparse's --help exits 0
        "        code = exc.code",
        "    print('exit', name, code, flush=True)",
    ])
    attrs = [commands["console_scripts"][n].split(":")[1] for n in names]
    proc = run(site, sys.executable, "-c", script, *attrs, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    module, conf, no_repo, commit = json.loads(proc.stdout.splitlines()[0])
    assert Path(module).is_relative_to(site) and Path(conf) == site / "idmap" / "conf"
    assert no_repo and commit is None  # not the clone's commit, nor any repository's the folder is in
    assert proc.stdout.count("usage:") == len(names)
    assert [l.split()[1:] for l in proc.stdout.splitlines() if l.startswith("exit ")] == [[a, "0"] for a in attrs]


def test_idmap_plan_and_idmap_report_run_from_an_empty_folder(site, tmp_path):
    tiny = [o for o in TINY if not o.startswith("trainer.max_iters")]
    plan = run(site, site / "bin" / "idmap-plan", "-m", *tiny, "trainer.max_iters=100", "seed=1,2",
               "--iters", "1", "--warmup", "1", "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    result = json.loads(plan.stdout)
    assert result["total"]["jobs"] == 2 and result["devices"] == ["cpu"]
    assert all(j["iterations"] == 100 and j["seconds_per_iter"] > 0 for j in result["jobs"])

    runs = tmp_path / "runs"
    for seed, error in enumerate([6.9, 6.5, 6.6], 1):
        fake_run(runs, TABLE2_ORIGINAL_110, error, seed=seed)
    report = run(site, site / "bin" / "idmap-report", runs, "--table", "table2", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    (row,) = [l for l in report.stdout.splitlines() if l.startswith("| original/110 | ") and "CIFAR-10" in l]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "6.61" and "6.60" in cells  # the paper's number and the median of the three
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written where it ran
