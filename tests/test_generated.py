"""Bad settings nobody listed (issue 23): random overrides over every key of the config schema (wrong
types, out-of-range numbers, nan and inf, empty strings, unknown choices), each refused with one line
that names what is wrong, a non-zero exit and no traceback."""

import dataclasses
import math
import subprocess
import sys
import typing

import pytest
from conftest import ROOT, TINY
from hypothesis import HealthCheck, given, settings, strategies as st

from idmap import IdmapError, cli
from idmap.config import Config, compose_checked, keys


def schema_keys(cls=Config, prefix="") -> dict[str, typing.Any]:
    """Every key of the structured config and its type."""
    keys = {}
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(schema_keys(hint, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hint
    return keys


KEYS = schema_keys()
NOT_A_NUMBER = ["nan", "inf", "-inf", "abc", "''", "[1]"]


def bad_values(key: str, hint) -> list[str]:
    """Values that no key of this type allows (so each must be refused)."""
    args = typing.get_args(hint)
    if hint is bool:
        return ["maybe", "1.5", "''", "[true]"]
    if hint is int or hint == typing.Optional[int]:
        return ["-7", "1.5", *NOT_A_NUMBER]  # every integer setting is >= 0
    if hint is float or hint == typing.Optional[float]:
        return ["nan", "inf", "-inf", "abc", "''", "[0.5]"]  # every number must be finite
    if typing.get_origin(hint) in (list, typing.Union) and (int in args or float in args
                                                            or typing.List[int] in args
                                                            or typing.List[float] in args):
        # Out of order is wrong for milestones only: stage widths may go any way.
        return ["[0]", "[-1,2]", "[nan]", "abc", "7", *(["[5,2]"] if "milestone" in key else [])]
    if key in ("dataset.label",):
        return ["[1,2]", "{a: 1}"]  # any text is a label; a list is not
    if hint is str:
        return ["''", "no_such_choice" if key not in ("dataset.root", "gpu_pool.lock_dir") else "''", "[a]"]
    if key == "trainer.resume":
        return ["'/no/such/run'", "maybe", "[1]"]
    if key == "model.ordering":  # a block file's ordering: a mapping of op lists
        return ["7", "abc", "[1]"]
    if key == "tags":
        return ["7", "abc"]
    raise AssertionError(f"no bad values for {key}: {hint}")


BAD = [(key, value) for key, hint in KEYS.items() for value in bad_values(key, hint)]
GROUPS = [("depth", "-5"), ("depth", "100x"), ("block", "preact"), ("shortcut", "''"), ("dataset", "nope")]


def test_every_key_of_the_schema_has_a_valid_range_or_set_of_choices():
    assert set(keys()) == set(KEYS)


def _refused(overrides: list[str]) -> str:
    with pytest.raises(IdmapError) as info:
        compose_checked(*TINY, *overrides)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(BAD), min_size=1, max_size=3, unique_by=lambda kv: kv[0]))
def test_random_bad_settings_are_each_refused_with_one_line_naming_the_setting(bad):
    message = _refused([f"{k}={v}" for k, v in bad])
    assert any(k in message for k, _ in bad), message


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(GROUPS))
def test_a_bad_group_choice_is_refused_with_the_options(group):
    key, value = group
    assert f"Could not find '{key}/" in _refused([f"{key}={value}"])


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.sampled_from(BAD + GROUPS))
def test_train_py_refuses_a_random_bad_setting_before_writing_anything(tmp_path_factory, bad):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    key, value = bad
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"{key}={value}",
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not run_dir.exists()


# ---- the tools' command-line flags (issue 33) ----------------------------------------------------
# Per tool: the rest of a command line, and each flag with what it allows (cli.number's kinds: an
# integer >= low, a finite number > low or >= low; or a device name). Any other value is refused at
# parsing: one line naming the flag, exit code 2, nothing run or written.
TOOLS = {
    "landscape": (["{dir}"], {"--grid": ("int", 2), "--samples": ("int", 1), "--batch": ("int", 1),
                              "--seed": ("int", 0), "--range": (">", 0), "--vmax": (">", 0), "--device": None}),
    "signals": (["--blocks", "original", "-o", "{dir}/s.png"], {"--batch": ("int", 1), "--seed": ("int", 0),
                                                                "--depths": ("int", 1), "--device": None}),
    "evaluate": (["{dir}"], {"--batch-size": ("int", 1), "--device": None}),
    "curves": (["{dir}", "-o", "{dir}/c.png"], {"--ymax": (">", 0)}),
    "plan": (["seed=1"], {"--iters": ("int", 1), "--warmup": ("int", 0)}),
    "gpu_check": (["--rehearse", "--out", "{dir}/bundle"], {"--budget": (">=", 30)}),
    "bench": (["--device", "cpu", "--num-train", "1000000"], {"--iters": ("int", 1), "--warmup": ("int", 1),
                                                              "--batch-size": ("int", 1), "--num-train": ("int", 1)}),
}
FLAGS = [(tool, flag) for tool, (_, flags) in TOOLS.items() for flag in flags]
NUMBERS = st.one_of(st.sampled_from(["nan", "inf", "-inf", "abc", "", "1e999", "0x10", "--"]),
                    st.integers(-10**6, 40).map(str), st.floats(-1e6, 40, allow_nan=False).map(repr))
DEVICES = st.sampled_from(["tpu", "cuda:x", "cuda:", "gpu0", "CPU", " cpu", "cpu,cuda"])
_examples = iter(range(10**6))


def _allowed(kind, value: str) -> bool:
    try:
        v = int(value) if kind[0] == "int" else float(value)
    except ValueError:
        return False
    return math.isfinite(v) and (v > kind[1] if kind[0] == ">" else v >= kind[1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(FLAGS), NUMBERS, DEVICES)
def test_each_tools_flags_refuse_a_bad_value_in_one_line_before_any_work(tmp_path, capsys, case, number, device):
    tool, flag = case
    rest, flags = TOOLS[tool]
    value = device if flags[flag] is None else number
    if flags[flag] is not None and _allowed(flags[flag], value):
        return  # an allowed value: nothing to refuse
    work = tmp_path / f"work{next(_examples)}"
    work.mkdir()
    argv = [a.format(dir=work) for a in rest] + [f"{flag}={value}"]
    assert getattr(cli, tool)(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err
    assert list(work.iterdir()) == []  # nothing written, nothing run
