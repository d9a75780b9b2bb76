"""One typed run config (issue 34): each key is declared once, with its type, default, valid values,
roles and help; the checks, the resume rules, the sweep report's pooling, idmap-plan's timing key,
TensorBoard's hparams and `train.py --help` all derive from that declaration. The fixture adds a key
the way a developer would (one field in config.py) and nothing else changes."""

import copy
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from conftest import ROOT, TINY

from idmap import IdmapError, config
from idmap.config import AT_LEAST_0, Config, Role, TrainerConfig, has_role, setting, with_role
from idmap.perf.plan import speed_key
from idmap.run.resume import _runs_differently
from idmap.train.state import settings_changed, switches_changed
from idmap.train.trainer import hparams


@dataclass
class MoreTrainer(TrainerConfig):
    grad_clip: float = setting(0.0, AT_LEAST_0, Role.RESUMABLE, Role.HPARAM, help="clip the gradient's norm (0: off)")
    label_smoothing: float = setting(0.0, AT_LEAST_0, Role.HPARAM, help="changes what a run computes")


@dataclass
class More(Config):
    trainer: MoreTrainer = field(default_factory=MoreTrainer)


@pytest.fixture
def more_keys(monkeypatch):
    """The schema with two keys added, registered where train.yaml finds it."""
    monkeypatch.setattr(config, "Config", More)
    config.register_configs()
    yield
    monkeypatch.undo()
    config.register_configs()


def test_a_new_key_is_checked_resumable_logged_and_listed_from_its_declaration_alone(more_keys):
    with pytest.raises(IdmapError, match=r"trainer.grad_clip=-1.0 is not allowed; it must be a finite number >= 0"):
        config.compose_checked(*TINY, "trainer.grad_clip=-1")
    cfg = config.compose_checked(*TINY, "trainer.grad_clip=0.5", "trainer.label_smoothing=0.1")
    assert hparams(cfg)["trainer.grad_clip"] == 0.5 and hparams(cfg)["trainer.label_smoothing"] == 0.1
    old = {"trainer": {"grad_clip": 0.0, "label_smoothing": 0.0}}
    assert settings_changed(old, {"trainer": {"grad_clip": 1.0, "label_smoothing": 0.0}}) == []
    assert settings_changed(old, {"trainer": {"grad_clip": 0.0, "label_smoothing": 0.2}}) == [
        "trainer.label_smoothing: 0.0 -> 0.2"]
    assert _runs_differently("trainer.grad_clip=1") and not _runs_differently("trainer.label_smoothing=0.2")
    assert not has_role("trainer.grad_clip", Role.POOLED) and not has_role("trainer.grad_clip", Role.SWITCH)
    other = config.compose_checked(*TINY, "trainer.grad_clip=2", "trainer.label_smoothing=0.3")
    assert speed_key(cfg) == speed_key(other)  # neither changes a step's time
    assert "trainer.grad_clip=0.0: a finite number >= 0; clip the gradient's norm (0: off)" in config.settings_help()


def test_the_roles_are_the_lists_they_replaced():
    """Behaviour unchanged: each role holds what its hand-kept list held before issue 34 (and
    model.ghost_bn, the switch added since: how ghost BN computes the same statistics)."""
    assert set(with_role(Role.RESUMABLE)) == {
        *(f"trainer.{k}" for k in ("max_iters", "epochs", "eval_every", "eval_batch_size", "checkpoint_every",
                                   "log_every", "device", "resume", "progress", "signal_every", "world_size",
                                   "precision", "channels_last", "compile", "deterministic")),
        "optim.impl", "dataset.root", "dataset.download", "dataset.label", "gpu_pool.enabled",
        "gpu_pool.jobs_per_gpu", "gpu_pool.lock_dir", "tags", "model.ghost_bn"}
    assert set(with_role(Role.SWITCH)) == {"trainer.device", "trainer.precision", "trainer.channels_last",
                                           "trainer.compile", "trainer.deterministic", "optim.impl",
                                           "model.ghost_bn"}
    assert set(with_role(Role.POOLED)) == {"seed", "trainer.resume", "trainer.device", "trainer.progress",
                                           "gpu_pool.enabled", "gpu_pool.jobs_per_gpu", "gpu_pool.lock_dir"}
    assert set(with_role(Role.PER_RUN)) == {"seed", "trainer.resume"}
    sections = {k for k in with_role(Role.STEP_COST) if k.startswith(("model.", "shortcut."))}
    assert sections == {k for k in config.keys() if k.startswith(("model.", "shortcut."))}
    assert set(with_role(Role.STEP_COST)) - sections == {
        "dataset.name", "dataset.image_size", "dataset.num_classes", "trainer.batch_size", "trainer.device",
        "trainer.precision", "trainer.channels_last", "trainer.compile", "trainer.world_size", "optim.impl"}
    for key in ("hydra.launcher.partition", "hydra/launcher", "launcher"):  # Hydra's, where jobs run
        assert has_role(key, Role.RESUMABLE) and has_role(key, Role.POOLED)
    assert has_role("hydra.run.dir", Role.PER_RUN) and not has_role("launcher", Role.PER_RUN)
    assert has_role("tags.row", Role.RESUMABLE) and has_role("gpu_pool", Role.RESUMABLE)
    assert not has_role("trainer", Role.RESUMABLE) and not has_role("block", Role.POOLED)
    assert switches_changed({"trainer": {"precision": "fp32"}, "optim": {"impl": "loop"}},
                            {"trainer": {"precision": "bf16"}, "optim": {"impl": "loop"}}) == [
        "trainer.precision: fp32 -> bf16"]
    # A checkpoint from before a switch existed ran as its default: no switch changed.
    same = {"trainer": {k: config.default(f"trainer.{k}") for k in ("precision", "device", "channels_last",
                                                                     "compile", "deterministic")},
            "optim": {"impl": "foreach"}}
    assert switches_changed(same, {**same, "model": {"ghost_bn": "one_pass"}}) == []


def test_train_py_help_lists_every_key_with_what_it_allows():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for key in config.keys().values():
        assert f"  {key.name}=" in out.stdout and key.rule.allowed() in out.stdout, key.name
    assert "block: bn_after_add, full_preact, original" in out.stdout  # the groups, as Hydra lists them
    assert "dataset.root=" in out.stdout and "${oc.env" not in out.stdout.split("dataset.root=")[1].split("\n")[0]


def test_a_config_is_checked_once_where_it_comes_in(monkeypatch):
    cfg = config.compose_checked(*TINY)  # an edge: checked here
    calls = []
    real = config.check_config
    monkeypatch.setattr(config, "check_config", lambda *args: calls.append(args) or real(*args))
    assert config.checked(cfg) is cfg and calls == []  # code below takes it as it is
    assert config.checked(config.compose_config(*TINY)) is not None and calls == []  # the same, composed again
    raw = config.compose_config(*TINY, "seed=5")  # a config no edge checked (a run started from Python)
    assert config.checked(raw) is raw and len(calls) == 1
    changed = copy.deepcopy(cfg)  # a copy of a checked config, changed after the check, is checked again
    changed.trainer.batch_size = 0
    with pytest.raises(IdmapError, match="trainer.batch_size=0"):
        config.checked(changed)