"""Eqs. 4-5 of the paper, measured: with identity shortcuts and nothing after the addition, the
gradient at a unit's input reaches every shallower unit unchanged by the units in between."""

import importlib.util
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

from idmap.models.resnet import build_resnet
from idmap.analysis.signals import log_signals, unit_signals

ROOT = Path(__file__).resolve().parents[1]


def signals(block, depth=56, zero_init_residual=False, mode="train", **kwargs):
    torch.manual_seed(0)
    model = build_resnet(depth, block=block, zero_init_residual=zero_init_residual, **kwargs).train(mode == "train")
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    return model, x, y, unit_signals(model, x, y)


def identity_runs(s):
    """Index runs [first, last] of x_l joined only by identity-shortcut units: a unit with a shared
    pre-activation (the first, and each dimension-increasing one) starts a new run after itself."""
    starts = sorted({0, *s["stage_starts"]})
    ends = starts[1:] + [len(s["gradient_norm"]) - 1]
    return [(a + 1, b) for a, b in zip(starts, ends)]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_full_preact_with_zeroed_branches_passes_the_gradient_unchanged_within_each_stage(mode):
    # Branch output 0 and dF/dx = 0: dE/dx_l = dE/dx_L exactly (eq. 5 without its second term).
    _, _, _, s = signals("full_preact", zero_init_residual=True, mode=mode)
    g = s["gradient_norm"]
    assert s["stage_starts"] == [9, 18]
    for first, last in identity_runs(s):
        assert last - first == 8
        assert g[first:last + 1] == pytest.approx([g[last]] * (last - first + 1), rel=1e-6)


def test_the_shared_bn_relu_of_a_dimension_increasing_unit_does_change_the_gradient():
    _, _, _, s = signals("full_preact", zero_init_residual=True)
    g = s["gradient_norm"]
    for l in s["stage_starts"]:
        assert g[l] != pytest.approx(g[l + 1], rel=1e-2)


def test_bn_after_addition_with_zeroed_branches_changes_the_gradient_at_every_unit():
    # Figure 4(b): the BN after the addition sits on the shortcut path itself.
    _, _, _, s = signals("bn_after_add", zero_init_residual=True)
    g = s["gradient_norm"]
    for first, last in identity_runs(s):
        steps = [g[l] / g[l + 1] for l in range(first, last)]
        assert min(abs(r - 1) for r in steps) > 1e-3
        assert max(g[first:last + 1]) / min(g[first:last + 1]) > 1.3


def test_original_unit_at_init_does_not_pass_the_gradient_unchanged():
    # Figure 4(a) at He init. Not a contrast with full pre-activation: at He init, with BN on batch
    # statistics, eq. 5's second term is large in both and the gradient grows towards the input
    # (full_preact spreads as much); the zeroed-branch tests above are where the orderings differ.
    _, _, _, s = signals("original")
    g = s["gradient_norm"]
    assert max(g) / min(g) > 10
    first, last = identity_runs(s)[0]
    assert max(g[first:last + 1]) / min(g[first:last + 1]) > 3


def test_signals_are_the_norms_of_the_stem_output_the_head_input_and_their_gradients():
    model, x, y, s = signals("full_preact", depth=20)
    x0 = model.stem(x).detach().requires_grad_(True)
    h = x0
    for unit in model.units:
        h = unit(h)
    xL = h
    xL.retain_grad()
    logits = model.fc(torch.flatten(F.adaptive_avg_pool2d(model.head_act(xL), 1), 1))
    F.cross_entropy(logits, y, reduction="sum").backward()
    norm = lambda t: t.flatten(1).norm(dim=1).mean().item()  # noqa: E731
    assert len(s["gradient_norm"]) == len(s["activation_norm"]) == len(model.units) + 1
    assert s["activation_norm"][0] == pytest.approx(norm(x0), rel=1e-5)
    assert s["activation_norm"][-1] == pytest.approx(norm(xL), rel=1e-5)
    assert s["gradient_norm"][0] == pytest.approx(norm(x0.grad), rel=1e-4)
    assert s["gradient_norm"][-1] == pytest.approx(norm(xL.grad), rel=1e-4)
    assert s["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_measuring_leaves_grads_and_bn_statistics_alone():
    torch.manual_seed(0)
    model = build_resnet(20, block="original").train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    unit_signals(model, torch.randn(8, 3, 16, 16) * 5 + 3, y)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_activation_checkpointing_gives_the_same_signals():
    # Checkpointed units run twice (forward, then again in backward): the hooks must keep the first.
    _, _, _, plain = signals("full_preact", depth=20)
    _, _, _, ckpt = signals("full_preact", depth=20, checkpointing=True)
    for key in ("activation_norm", "gradient_norm"):
        assert ckpt[key] == pytest.approx(plain[key], rel=1e-5)


def test_log_signals_writes_summary_scalars_and_one_figure():
    class Writer:
        def __init__(self):
            self.scalars, self.figures = {}, []

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

        def add_figure(self, tag, figure, step):
            self.figures.append((tag, step))

    model, x, y, _ = signals("full_preact", depth=20, zero_init_residual=True)
    w = Writer()
    s = log_signals(w, model, x, y, step=7)
    assert w.figures == [("signal/per_unit", 7)]
    assert len(w.scalars) == 6 and all(step == 7 for _, step in w.scalars.values())
    g = s["gradient_norm"]
    assert w.scalars["signal/grad_ratio"][0] == pytest.approx(g[0] / g[-1])


def test_the_script_draws_the_nets_side_by_side(tmp_path):
    spec = importlib.util.spec_from_file_location("signals_script", ROOT / "scripts" / "signals.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "signals.png"
    assert script.main(["--blocks", "original", "full_preact", "--depths", "20", "--batch", "4", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(out).ndim == 3


def test_no_script_is_named_after_a_standard_library_module():
    # `python scripts/X.py` puts scripts/ first on the import path: a scripts/signal.py would be what
    # `import signal` (subprocess, hence torch) finds, and every script there would break.
    assert not {p.stem for p in (ROOT / "scripts").glob("*.py")} & sys.stdlib_module_names
