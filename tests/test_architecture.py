"""The house rules of docs/architecture.md, checked: small functions and files, one home for the
run directory's file names, Hydra only at the edge, each shortcut default in one place, packages
without import cycles, and no product module that imports the measuring code (idmap.perf)."""

import ast
import re
from pathlib import Path

import pytest

from idmap.config import ShortcutConfig
from idmap.models.resnet import SHORTCUT_DEFAULTS, SHORTCUTS

SRC = Path(__file__).resolve().parents[1] / "src" / "idmap"
MODULES = sorted(SRC.rglob("*.py"))
PACKAGES = ("models", "train", "run", "analysis", "perf")  # below them, the shared top-level modules


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {module_name(p): p for p in MODULES}


def imports_of(path: Path) -> set:
    """The idmap modules a module imports, at its top or inside a function (a lazy import is an
    import all the same)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in NAMES}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("idmap"):
            out |= {node.module} & set(NAMES)
            out |= {f"{node.module}.{a.name}" for a in node.names} & set(NAMES)  # from idmap.run import launch
    return out - {module_name(path)}


GRAPH = {name: imports_of(path) for name, path in NAMES.items()}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
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
    # plan.py expands a sweep with Hydra's own sweeper, as train.py -m would; sweep_status.py is the
    # sweep's end as a Hydra callback; slurm.py is the SLURM launcher, a Hydra plugin
    # (docs/architecture.md).
    assert set(importers) <= {"launch.py", "sweep_status.py", "config.py", "overrides.py", "plan.py", "slurm.py"}


def test_each_shortcut_option_has_one_default_shared_by_the_builder_and_the_config():
    config = ShortcutConfig()
    assert {k for k in vars(config) if k != "name"} == set(SHORTCUT_DEFAULTS)
    assert all(getattr(config, k) == v for k, v in SHORTCUT_DEFAULTS.items())
    # Options two shortcuts share (the gates' b_g) must agree, or the merged default would lie.
    for kind in SHORTCUTS.values():
        assert all(SHORTCUT_DEFAULTS[k] == v for k, v in kind.defaults.items())


def test_the_modules_are_grouped_in_packages_one_level_deep():
    assert {p.relative_to(SRC).parts[0] for p in MODULES if len(p.relative_to(SRC).parts) > 1} == set(PACKAGES)
    assert all(len(p.relative_to(SRC).parts) <= 2 for p in MODULES)
    top = sorted(p.name for p in MODULES if p.parent == SRC)
    assert top == ["__init__.py", "cli.py", "config.py", "overrides.py", "paths.py", "rundir.py"]


def test_no_import_cycle():
    def cycle_from(start, path, seen):
        for nxt in sorted(GRAPH[path[-1]]):
            if nxt == start:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                found = cycle_from(start, path + [nxt], seen)
                if found:
                    return found
        return None

    cycles = [c for c in (cycle_from(m, [m], set()) for m in sorted(GRAPH)) if c]
    assert not cycles, " -> ".join(cycles[0])


def test_no_product_module_imports_the_measuring_code():
    # cli.py names every command's module, perf's too, as text for importlib: the commands' edge.
    product = [m for m in GRAPH if not m.startswith("idmap.perf") and m != "idmap.cli"]
    reaching = {m: sorted(v for v in GRAPH[m] if v.startswith("idmap.perf")) for m in product}
    assert {m: v for m, v in reaching.items() if v} == {}


def test_the_graph_sees_imports_inside_functions_and_of_modules_from_packages():
    # The checks above are only as good as this reading of imports.
    assert "idmap.analysis.signals" in GRAPH["idmap.train.trainer"]  # a lazy import in the loop
    assert "idmap.analysis.report" in GRAPH["idmap.analysis.results_page"]  # from idmap.analysis import report
    assert "idmap.perf.bench" in GRAPH["idmap.perf.gpu_check_processes"] or any(
        v.startswith("idmap.perf") for v in GRAPH["idmap.perf.gpu_check"])


def test_build_resnet_is_where_other_tools_import_it():
    from idmap import models

    assert models.build_resnet is models.resnet.build_resnet


def test_docs_architecture_is_the_map_of_every_module():
    text = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:[a-z]+/)?[a-z_]+\.py)`", text))
    modules = {str(p.relative_to(SRC)) for p in MODULES if p.name != "__init__.py"}
    assert modules - named == set()
    assert {n for n in named if n.split("/")[0] in PACKAGES} - modules == set()  # none it names is gone


def test_one_input_pipeline_turns_images_into_what_the_model_reads():
    # The trainer, evaluation and the landscape all read images through train/inputs.py; the
    # evaluate command picks which training set's statistics to use (the run's), nothing more.
    # bench.py's classic loop is the torchvision pipeline it measures against, on purpose.
    uses = {str(p.relative_to(SRC)) for p in MODULES if p.name != "data.py"
            and re.search(r"\b(model_input|normalize|crop_flip|draw_crop_flip)\(", p.read_text())}
    assert uses == {"train/inputs.py"}
    stats = {str(p.relative_to(SRC)) for p in MODULES if p.name != "data.py" and "normalization(" in p.read_text()}
    assert stats == {"train/inputs.py", "train/evaluation.py", "perf/bench.py"}
