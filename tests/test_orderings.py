"""Residual units as data (idmap.models.orderings): the paper's five defined once, a user's own written in
a block file on Hydra's search path, and a malformed one refused in one line."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, ROOT, TINY, make_cfg, run_train
from idmap import IdmapError
from idmap.models.resnet import SHORTCUTS, UNITS, build_resnet, count_parameters, model_kwargs
from idmap.models.orderings import ORDERINGS, Ordering, block_of, check_config, parse
from idmap.analysis.report import main as report_main

USER_UNIT = """\
# @package model
# Full pre-activation with a BN closing the branch: a unit the paper did not try.
block: bn_relu_conv_bn
ordering:
  layer: [bn, relu, conv]
  last: [bn, relu, conv, bn]
"""


def test_the_paper_block_files_name_the_one_definition_of_each_ordering():
    files = {p.stem: OmegaConf.load(p) for p in (CONF / "block").glob("*.yaml")}
    assert set(files) == set(ORDERINGS)
    for name, cfg in files.items():
        assert cfg == {"block": name}, f"conf/block/{name}.yaml must only name its ordering"


def test_an_ordering_given_as_data_builds_the_paper_unit_it_spells():
    for name, ordering in ORDERINGS.items():
        data = {"layer": list(ordering.layer), "last": list(ordering.last),
                "after_add": list(ordering.after_add)}
        torch.manual_seed(0)
        by_name = build_resnet(20, block=name, widths=(4, 8, 16))
        torch.manual_seed(0)
        by_data = build_resnet(20, block=parse(data, name), widths=(4, 8, 16))
        assert str(by_name) == str(by_data) and by_data.arch["block"] == name
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(by_name(x), by_data(x))


@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("unit", UNITS)
def test_a_new_ordering_composes_with_every_shortcut_and_unit_type(shortcut, unit):
    ordering = parse({"layer": ["bn", "relu", "conv"], "last": ["bn", "relu", "conv", "bn"]}, "mine")
    depth = {"basic": 8, "bottleneck": 11, "single": 5}[unit]
    model = build_resnet(depth, block=ordering, unit=unit, shortcut=shortcut, widths=(4, 8, 16))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert model.arch["block"] == "mine"
    # The BN closing each branch is there: one more BN per unit than full pre-activation's.
    paper = build_resnet(depth, block="full_preact", unit=unit, shortcut=shortcut, widths=(4, 8, 16))
    assert count_parameters(model) > count_parameters(paper)


@pytest.mark.parametrize("data, message", [
    ({"layer": ["bn", "relu"], "last": ["bn", "relu", "conv"]},
     "ordering.layer must wrap exactly one conv, it has 0"),
    ({"layer": ["conv", "bn"], "last": ["conv", "relu", "conv"]},
     "ordering.last must wrap exactly one conv, it has 2"),
    ({"layer": ["bn", "gelu", "conv"], "last": ["bn", "relu", "conv"]},
     "ordering.layer has unknown op 'gelu'"),
    ({"layer": ["conv"], "last": ["conv"], "after_add": ["conv"]},
     "ordering.after_add comes after the addition and can hold no conv"),
    ({"layer": ["conv"], "lats": ["conv"]}, "ordering has unknown key 'lats'"),
    ({"layer": ["conv"]}, "ordering.last is missing"),
    ({"layer": "bn relu conv", "last": ["conv"]}, "ordering.layer must be a list"),
    ({"layer": ["bn", "relu", "conv"], "last": ["relu", "conv"]},
     "ordering.last must start as ordering.layer does before its conv (bn relu)"),
])
def test_a_malformed_ordering_is_one_line_naming_the_file(data, message):
    with pytest.raises(ValueError) as e:
        parse(data, "mine")
    assert str(e.value).startswith("block/mine.yaml: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_block_file_names_its_ordering_by_the_file():
    data = {"layer": ["conv", "bn", "relu"], "last": ["conv", "bn"]}
    assert block_of({"block": "mine", "ordering": data}, "mine") == Ordering(
        ("conv", "bn", "relu"), ("conv", "bn"), (), "mine")
    assert block_of({"block": "original"}) == "original"
    with pytest.raises(IdmapError, match=r"block/mine.yaml: gives an ordering but names it "
                                         r"full_preact, a paper ordering; set block: mine"):
        check_config({"block": "full_preact", "ordering": data}, "mine")
    with pytest.raises(IdmapError, match=r"block/mine.yaml: names its ordering other; set block: mine"):
        check_config({"block": "other", "ordering": data}, "mine")


@pytest.fixture
def unit_dir(tmp_path) -> Path:
    (tmp_path / "units" / "block").mkdir(parents=True)
    (tmp_path / "units" / "block" / "bn_relu_conv_bn.yaml").write_text(USER_UNIT)
    (tmp_path / "units" / "block" / "two_convs.yaml").write_text(
        "# @package model\nblock: two_convs\nordering:\n  layer: [bn, relu, conv]\n"
        "  last: [conv, bn, relu, conv]\n")
    return tmp_path / "units"


def test_the_readme_unit_on_the_search_path_composes_into_the_builder():
    cfg = make_cfg(*TINY, f"hydra.searchpath=[file://{ROOT / 'docs' / 'examples'}]",
                   "block=bn_relu_conv_bn", "shortcut=exclusive_gating")
    kwargs = model_kwargs(cfg, 10)
    assert kwargs["block"].name == "bn_relu_conv_bn" and kwargs["block"].last[-1] == "bn"
    assert build_resnet(**kwargs).arch["block"] == "bn_relu_conv_bn"


@pytest.mark.slow
def test_a_user_ordering_from_a_search_path_folder_trains_named_by_its_file(unit_dir, tmp_path,
                                                                            capsys):
    sweep = tmp_path / "sweep"
    run_train("-m", *TINY, "trainer.max_iters=20", f"hydra.searchpath=[file://{unit_dir}]",
              "block=bn_relu_conv_bn,full_preact", f"hydra.sweep.dir={sweep}")
    (job,) = [d for d in sweep.iterdir() if "bn_relu_conv_bn" in d.name]  # named by the file
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["model"]["block"] == summary["choices"]["block"] == "bn_relu_conv_bn"
    assert report_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| block=bn_relu_conv_bn |" in out and "| block=full_preact |" in out


def test_a_malformed_ordering_from_the_command_line_is_refused_in_one_line(unit_dir):
    proc = run_train(*TINY, f"hydra.searchpath=[file://{unit_dir}]", "block=two_convs",
                     f"hydra.run.dir={unit_dir.parent / 'run'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: block/two_convs.yaml: ordering.last must wrap exactly "
                                   "one conv, it has 2")
