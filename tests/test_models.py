import itertools
import time

import pytest
import torch
import torch.nn as nn

from idmap.models.resnet import (
    ORDERINGS,
    SHORTCUTS,
    UNITS,
    ConstantScaling,
    DropoutShortcut,
    ExclusiveGating,
    GhostBatchNorm2d,
    ShortcutOnlyGating,
    ZeroPad,
    _Gate,
    build_resnet,
    count_parameters,
)

# Small depths per unit type: one unit per stage.
TINY = {"basic": 8, "bottleneck": 11, "single": 5}


@pytest.mark.parametrize(
    "depth, kwargs, expected",
    [
        (20, dict(block="original"), 269_722),
        (56, dict(block="original"), 853_018),
        (110, dict(block="original"), 1_727_962),
        (164, dict(block="full_preact"), 1_703_258),
        (1001, dict(block="full_preact"), 10_327_706),
    ],
)
def test_parameter_counts_equal_the_papers_computed_ones(depth, kwargs, expected):
    assert count_parameters(build_resnet(depth, **kwargs)) == expected


def test_resnet1001_without_bn_has_the_papers_10_2M_weights():
    model = build_resnet(1001)
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert count_parameters(model) - bn == 10_178_490


def test_resnet1001_builds_in_a_few_seconds():
    start = time.perf_counter()
    build_resnet(1001)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "depth, unit", [(20, "basic"), (110, "basic"), (1202, "basic"), (164, "bottleneck"), (1001, "bottleneck")]
)
def test_auto_unit_is_the_papers_choice(depth, unit):
    model = build_resnet(depth)
    layers = {"basic": 2, "bottleneck": 3}[unit]
    assert len(model.units) * layers + 2 == depth
    assert sum(isinstance(m, nn.Conv2d) for m in model.units[1].branch) == layers


def test_one_layer_resnet110_has_36_units_per_stage():
    model = build_resnet(110, unit="single")
    assert len(model.units) == 108


@pytest.mark.parametrize(
    "depth, unit, message",
    [
        (100, "basic", "depth 100 is not 6n+2 for basic units (nearest: 98, 104)"),
        (112, "bottleneck", "depth 112 is not 9n+2 for bottleneck units (nearest: 110, 119)"),
        (3, "basic", "depth 3 is not 6n+2 for basic units (nearest: 8, 14)"),
    ],
)
def test_impossible_depth_says_why_and_names_nearby_depths(depth, unit, message):
    with pytest.raises(ValueError) as err:
        build_resnet(depth, unit=unit)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(block="preact"), "full_preact"),
        (dict(shortcut="gating"), "exclusive_gating"),
        (dict(unit="wide"), "bottleneck"),
        (dict(downsample="pool"), "zero_pad"),
        (dict(gate_biass=-6), "gate_bias"),
    ],
)
def test_unknown_choices_list_the_valid_ones(kwargs, word):
    with pytest.raises(ValueError, match=word):
        build_resnet(20, **kwargs)


def test_other_stage_layouts_build_a_preact_resnet18():
    model = build_resnet(18, unit="basic", widths=(64, 128, 256, 512), units_per_stage=(2, 2, 2, 2))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.fc.in_features == 512
    with pytest.raises(ValueError, match="does not match"):
        build_resnet(20, widths=(64, 128, 256, 512), units_per_stage=(2, 2, 2, 2))


# ---- each block's defining property -------------------------------------------------------------


@pytest.mark.parametrize("block", ["full_preact", "relu_only_preact"])
def test_preact_with_zeroed_branches_carries_x_through_every_unit_unchanged(block):
    model = build_resnet(20, block=block, zero_init_residual=True).eval()
    x = torch.randn(4, 16, 32, 32)
    checked = 0
    for unit in model.units:
        y = unit(x)
        if len(unit.shared) == 0:  # units whose shortcut reads x itself (not a shared activation)
            assert torch.equal(y, x)
            checked += 1
        x = y
    assert checked == len(model.units) - 3


def test_preact_whole_network_is_identity_between_downsamplings():
    model = build_resnet(20, block="full_preact", zero_init_residual=True).eval()
    x = torch.randn(2, 16, 32, 32)
    stage1 = nn.Sequential(*list(model.units)[1:3])  # units after the first share no activation
    assert torch.equal(stage1(x), x)


def test_relu_before_add_branch_output_is_never_negative():
    model = build_resnet(20, block="relu_before_add").train()
    unit = model.units[4]
    x = torch.randn(8, unit.branch[0].in_channels, 16, 16)
    assert (unit.branch(x) >= 0).all()


def test_original_unit_output_is_never_negative():
    model = build_resnet(20, block="original").train()
    x = torch.randn(8, 3, 32, 32)
    h = model.stem(x)
    for unit in model.units:
        h = unit(h)
        assert (h >= 0).all()


def test_bn_after_add_normalizes_the_sum_before_its_relu():
    model = build_resnet(20, block="bn_after_add").train()
    unit = model.units[1]
    bn, relu = unit.after_add
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    x = torch.randn(16, 16, 32, 32)
    seen = {}
    bn.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    unit(x)
    out = seen["out"]
    mean = out.mean(dim=(0, 2, 3))
    var = out.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(var, torch.ones_like(var), atol=1e-3)


def test_post_activation_units_have_no_shared_activation_and_preact_head_has_bn_relu():
    original = build_resnet(20, block="original")
    preact = build_resnet(20, block="full_preact")
    assert all(len(u.shared) == 0 for u in original.units)
    assert len(original.head_act) == 0
    assert [type(m) for m in preact.head_act] == [nn.BatchNorm2d, nn.ReLU]


def test_preact_first_and_dimension_increasing_units_activate_before_the_split():
    model = build_resnet(164, block="full_preact")
    shares = [i for i, u in enumerate(model.units) if len(u.shared)]
    assert shares == [0, 18, 36]
    # The projection reads the activated input: it is the shortcut of a unit whose branch starts
    # with a conv (the shared BN-ReLU moved before the split).
    unit = model.units[18]
    assert isinstance(unit.branch[0], nn.Conv2d)
    assert isinstance(unit.shortcut.down, nn.Conv2d) and unit.shortcut.down.stride == (2, 2)


def test_stem_is_a_bare_conv_in_preact_nets_and_conv_bn_relu_otherwise():
    assert len(build_resnet(20, block="full_preact").stem) == 1
    assert len(build_resnet(20, block="original").stem) == 3


# ---- each shortcut's formula --------------------------------------------------------------------


def test_zero_pad_subsamples_and_fills_extra_channels_with_zeros():
    x = torch.randn(2, 4, 8, 8)
    y = ZeroPad(4, 8, 2)(x)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2])
    assert (y[:, 4:] == 0).all()


def test_constant_scaling_scales_both_paths():
    x, f = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert torch.allclose(ConstantScaling(nn.Identity(), 0.5, 0.25)(x, f), 0.5 * x + 0.25 * f)


@pytest.mark.parametrize("bias, expect", [(-40.0, "shortcut"), (40.0, "branch")])
def test_exclusive_gating_picks_one_path_at_extreme_gate_biases(bias, expect):
    gate = _Gate(4, 4, 1, bias, False, None)
    nn.init.zeros_(gate.conv.weight)
    x, f = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    y = ExclusiveGating(nn.Identity(), gate)(x, f)
    assert torch.allclose(y, x if expect == "shortcut" else f)


def test_exclusive_gating_is_a_convex_mix():
    gate = _Gate(4, 4, 1, 0.0, False, None)
    nn.init.zeros_(gate.conv.weight)
    x, f = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert torch.allclose(ExclusiveGating(nn.Identity(), gate)(x, f), 0.5 * x + 0.5 * f)


def test_shortcut_only_gating_leaves_the_branch_unscaled():
    gate = _Gate(4, 4, 1, 0.0, False, None)
    nn.init.zeros_(gate.conv.weight)
    x, f = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert torch.allclose(ShortcutOnlyGating(nn.Identity(), gate)(x, f), 0.5 * x + f)


def test_gate_bias_initialises_to_the_configured_value():
    model = build_resnet(20, block="original", shortcut="exclusive_gating", gate_bias=-7)
    gates = [m for m in model.modules() if isinstance(m, _Gate)]
    assert len(gates) == 9 and all((g.conv.bias == -7).all() for g in gates)


def test_dropout_shortcut_drops_about_p_and_rescales_in_training_only():
    torch.manual_seed(0)
    s = DropoutShortcut(nn.Identity(), 0.5, True)
    x, f = torch.ones(1, 1, 100, 100), torch.zeros(1, 1, 100, 100)
    y = s.train()(x, f)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert abs((y == 0).float().mean().item() - 0.5) < 0.03
    assert torch.equal(s.eval()(x, f), x)
    assert torch.equal(DropoutShortcut(nn.Identity(), 0.5, False).eval()(x, f), 0.5 * x)


def test_conv1x1_shortcut_is_on_every_unit():
    model = build_resnet(20, block="original", shortcut="conv1x1")
    for unit in model.units:
        proj = unit.shortcut.down
        assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1)


def test_ghost_bn_normalizes_each_chunk_separately():
    bn = GhostBatchNorm2d(3, bn_batch=4).train()
    x = torch.cat([torch.randn(4, 3, 2, 2), 10 + 5 * torch.randn(4, 3, 2, 2)])
    y = bn(x)
    for chunk in y.split(4):
        assert torch.allclose(chunk.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    model = build_resnet(20, bn_batch=64)
    assert all(isinstance(m, GhostBatchNorm2d) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ---- everything composes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block, shortcut, unit", list(itertools.product(ORDERINGS, SHORTCUTS, UNITS))
)
def test_every_block_shortcut_unit_combination_trains_with_finite_gradients(block, shortcut, unit):
    torch.manual_seed(0)
    model = build_resnet(TINY[unit], block=block, shortcut=shortcut, unit=unit, widths=(4, 8, 16))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("downsample", ["zero_pad", "projection"])
@pytest.mark.parametrize("unit", UNITS)
def test_both_downsampling_options_work_for_every_unit(unit, downsample):
    model = build_resnet(TINY[unit], unit=unit, downsample=downsample, widths=(4, 8, 16))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = build_resnet(20, widths=(4, 8, 16))
    b = build_resnet(20, widths=(4, 8, 16), checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for m in (a, b):
        nn.functional.cross_entropy(m(x), y).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)
    # The recomputation in backward must not update BN's running statistics a second time.
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        assert torch.allclose(ba.float(), bb.float(), atol=1e-6), name
