"""The house rules of docs/architecture.md, checked: small functions and files, one home for the
run directory's file names, Hydra only at the edge, each shortcut default in one place."""

import ast
import re
from pathlib import Path

import pytest

from idmap.config import ShortcutConfig
from idmap.models import SHORTCUT_DEFAULTS, SHORTCUTS

SRC = Path(__file__).resolve().parents[1] / "src" / "idmap"
MODULES = sorted(SRC.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_function_is_over_80_lines_and_no_file_over_460(path):
    tree = ast.parse(path.read_text())
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 80]
    assert not long
    assert len(path.read_text().splitlines()) <= 460


def test_only_rundir_names_the_files_of_a_run_directory():
    names = re.compile(r"""["'](summary\.json|metrics\.jsonl|checkpoint\.pt|\.hydra|multirun\.yaml)["']""")
    users = [p.name for p in MODULES if names.search(p.read_text())]
    assert users == ["rundir.py"]


def test_only_paths_finds_files_from_where_the_code_is():
    # An installed copy has no clone around it: conf/ and the clone come from idmap.paths alone.
    users = [p.name for p in MODULES if "__file__" in p.read_text()]
    assert users == ["paths.py"]


def test_hydra_is_imported_only_at_the_edge():
    importers = [p.name for p in MODULES if re.search(r"^\s*(from|import) hydra\b", p.read_text(), re.M)]
    # plan.py expands a sweep with Hydra's own sweeper, as train.py -m would; sweep.py is the
    # sweep's end as a Hydra callback; slurm.py is the SLURM launcher, a Hydra plugin
    # (docs/architecture.md).
    assert set(importers) <= {"launch.py", "sweep.py", "config.py", "overrides.py", "plan.py", "slurm.py"}


def test_each_shortcut_option_has_one_default_shared_by_the_builder_and_the_config():
    config = ShortcutConfig()
    assert {k for k in vars(config) if k != "name"} == set(SHORTCUT_DEFAULTS)
    assert all(getattr(config, k) == v for k, v in SHORTCUT_DEFAULTS.items())
    # Options two shortcuts share (the gates' b_g) must agree, or the merged default would lie.
    for kind in SHORTCUTS.values():
        assert all(SHORTCUT_DEFAULTS[k] == v for k, v in kind.defaults.items())
