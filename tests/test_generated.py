"""Bad settings nobody listed (issue 23): random overrides over every key of the config schema (wrong
types, out-of-range numbers, nan and inf, empty strings, unknown choices), each refused with one line
that names what is wrong, a non-zero exit and no traceback."""

import dataclasses
import subprocess
import sys
import typing

import pytest
from conftest import ROOT, TINY
from hypothesis import HealthCheck, given, settings, strategies as st

from idmap import IdmapError
from idmap.config import Config, _rules, compose_checked


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
    assert set(_rules()) == set(KEYS)


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
