"""Bad input, round 2 (issue 33): one rule everywhere. Bad input is exit code 2 and one line naming
the file or key and what to do, with nothing on disk changed; exit code 1 is for bugs. Each test
here is a kind of case the issue found handled otherwise: accepted without a word, reported as an
internal error, a traceback, a file lost or changed, advice that leads nowhere, a comparison the
paper never makes (tests/test_sweeps.py).

Every summary.json here is a made-up test fixture, not a result."""

import json

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf
from test_sweeps import fake_job, lr_sweep

from idmap import IdmapError, cli
from idmap.checkpoint import save_checkpoint
from idmap.data import load_dataset
from idmap.runtime import resolve_device


def one_line(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


# ---- accepted without a word ---------------------------------------------------------------------


def test_plan_refuses_the_settings_train_py_refuses(capsys):
    one_line(capsys, cli.plan([*TINY, "optim.lr=-1"]), "job 0", "optim.lr=-1.0 is not allowed")


def test_report_and_curves_by_a_key_no_run_has(tmp_path, capsys):
    sweep = lr_sweep(tmp_path)
    one_line(capsys, cli.report([str(sweep), "--by", "optim.lrr"]), "--by optim.lrr: no run has", "optim.lr")
    one_line(capsys, cli.curves([str(sweep), "--by", "optim.lrr", "-o", str(tmp_path / "c.png")]), "--by optim.lrr")
    assert not (tmp_path / "c.png").exists()


def test_an_image_folder_with_an_empty_class_is_refused(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            if (split, cls) != ("train", "dog"):
                Image.new("RGB", (4, 4)).save(tmp_path / split / cls / "0.png")
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "image_size": 4, "label": ""})
    with pytest.raises(IdmapError, match=f"{tmp_path / 'train' / 'dog'} holds no images"):
        load_dataset(cfg)


# ---- bad input reported as an internal error -----------------------------------------------------


def test_a_device_that_is_none_here_is_bad_input(tmp_path, capsys):
    with pytest.raises(IdmapError, match="'tpu' is not one"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(IdmapError, match="CUDA is not available"):
            resolve_device("cuda:3")
        code = cli.signals(["--blocks", "original", "--depths", "8", "--device", "cuda", "-o", str(tmp_path / "s.png")])
        one_line(capsys, code, "CUDA is not available")


def test_a_figure_format_matplotlib_cannot_write_is_refused_before_any_work(tmp_path, capsys):
    one_line(capsys, cli.curves([str(tmp_path), "-o", str(tmp_path / "c.xyz")]), "no figure format 'xyz'", "png, ps")
    one_line(capsys, cli.signals(["--blocks", "original", "-o", str(tmp_path / "s")]), "no figure format ''")


def test_a_checkpoint_without_its_config_is_bad_input(tmp_path, capsys):
    save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}, "iteration": 1})
    for command, args in ((cli.evaluate, []), (cli.landscape, ["-o", str(tmp_path / "l")]),
                          (cli.signals, ["-o", str(tmp_path / "s.png")])):
        where = ["--runs", str(tmp_path)] if command is cli.signals else [str(tmp_path)]
        one_line(capsys, command([*where, *args, "--device", "cpu"]), f"checkpoint {tmp_path / 'checkpoint.pt'} "
                 "does not fit (it holds no run config")


def test_one_foreign_summary_among_good_runs_is_named_and_skipped(tmp_path, capsys):
    sweep = lr_sweep(tmp_path)
    foreign = fake_job(sweep, ["optim.lr=0.1"], 5.0, 9)
    (foreign / "summary.json").write_text(json.dumps({"status": "completed", "choices": ["a"], "max_iters": "lots"}))
    assert cli.report([str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {foreign}: summary.json is not a run's (choices is ['a']), skipped" in err
    assert "| optim.lr=0.1 |" in out
