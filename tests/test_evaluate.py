"""scripts/evaluate.py: a checkpoint's test error as the trainer computes it, per class, on its own
data set or another one with the same classes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY, make_cfg
from idmap.train.checkpoint import load_checkpoint, save_checkpoint
from idmap.train.data import load_dataset
from idmap.train.evaluation import EVAL_STATS, RUN_STATS, main, slug
from idmap.train.trainer import train

# The TINY run's data set again, named as a config group plus fields.
TINY_DATA = [a for a in TINY if a.startswith("dataset")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny trained run shared by the tests: (run dir, the summary train() returned)."""
    run_dir = tmp_path_factory.mktemp("run")
    summary = train(make_cfg(*TINY), run_dir)
    assert summary["status"] == "completed"
    return run_dir, summary


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IDMAP_CACHE", str(tmp_path / "cache"))  # image folders' decoded copies


def evaluate_json(capsys, *argv) -> tuple[dict, str]:
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    path = next(line[len("wrote "):] for line in out.splitlines() if line.endswith(".json"))
    return json.loads(open(path).read()), out


def fails(capsys, *argv) -> str:
    """The one stderr line of an evaluation refused as bad input (exit 2)."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def image_folder(root, classes=None):
    """The TINY synthetic set written as root/{train,test}/<class>/*.png (lossless: the same pixels)."""
    cfg = make_cfg(*TINY).dataset
    ds = load_dataset(cfg)
    names = classes or ds.classes
    for split, xs, ys in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        for i, (x, y) in enumerate(zip(xs, ys.tolist())):
            d = root / split / names[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(d / f"{i:05d}.png")
    return root


def test_the_error_is_the_trainers_final_test_error_exactly(run, capsys, tmp_path):
    run_dir, summary = run
    result, out = evaluate_json(capsys, run_dir, "--device", "cpu", "-o", tmp_path)
    assert abs(result["test_error"] - summary["final_test_error"]) <= 1e-9
    assert result["iteration"] == 40 and result["normalization"] == RUN_STATS
    assert f"test error  {summary['final_test_error']:.2f}%" in out
    metrics = load_checkpoint(run_dir)["metrics"]
    assert result["test_loss"] == pytest.approx(metrics[-1]["test_loss"], abs=1e-9)


def test_json_png_and_per_class_errors_agree_with_the_confusion_matrix(run, capsys, tmp_path):
    result, out = evaluate_json(capsys, run[0], "-o", tmp_path)
    assert (tmp_path / "evaluation_synthetic.json").is_file()
    assert (tmp_path / "confusion_synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    confusion = np.array(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == result["images"] == 256
    per_class = [result["per_class_error"][c] for c in result["classes"]]
    rows = confusion.sum(1)
    assert per_class == pytest.approx(100 * (1 - confusion.diagonal() / rows))
    assert np.dot(per_class, rows) / rows.sum() == pytest.approx(result["test_error"])
    assert 100 * (1 - np.trace(confusion) / confusion.sum()) == pytest.approx(result["test_error"])
    for key in ("test_loss", "data", "checkpoint", "device", "torch_version", "date"):
        assert key in result
    assert all(f"class_{i}" in out for i in range(10))


def test_a_data_set_with_other_classes_is_refused(run, capsys, tmp_path):
    err = fails(capsys, run[0], *TINY_DATA, "dataset.num_classes=5", "-o", tmp_path)
    assert "5 classes" in err and "10" in err
    # Same number of classes, other names: refused too (labels are indices into the run's classes).
    folder = image_folder(tmp_path / "other", [f"thing_{i}" for i in range(10)])
    err = fails(capsys, run[0], "--data", folder, "dataset.image_size=16", "-o", tmp_path)
    assert "thing_0" in err and "class_0" in err
    assert not list(tmp_path.glob("evaluation_*.json"))


def test_missing_checkpoint_and_bad_overrides_exit_2(run, capsys, tmp_path):
    assert "no checkpoint" in fails(capsys, tmp_path / "nowhere")
    assert "nmae" in fails(capsys, run[0], "dataset.nmae=x", "-o", tmp_path)
    assert "dataset=nope" in fails(capsys, run[0], "dataset=nope", "-o", tmp_path)
    assert "trainer.device" in fails(capsys, run[0], "trainer.device=cpu", "-o", tmp_path)
    assert f"--data {tmp_path / 'gone'}: no train/ or test/ folder" in fails(capsys, run[0], "--data",
                                                                               tmp_path / "gone", "-o", tmp_path)
    (tmp_path / "tests_only" / "test" / "class_0").mkdir(parents=True)
    assert "no train/ folder; an image folder is DIR/{train,test}/<class>/*" in fails(
        capsys, run[0], "--data", tmp_path / "tests_only", "-o", tmp_path)


def test_a_dataset_group_override_names_the_data_set(run, capsys, tmp_path):
    run_dir, summary = run
    result, _ = evaluate_json(capsys, run_dir, *TINY_DATA, "--label", "synthetic again", "-o", tmp_path)
    assert result["data"] == "synthetic again" and result["normalization"] == RUN_STATS
    assert abs(result["test_error"] - summary["final_test_error"]) <= 1e-9
    # dataset=synthetic alone is train.py's synthetic set (1000 test images at 32x32): other data.
    other, _ = evaluate_json(capsys, run_dir, "dataset=synthetic", "-o", tmp_path)
    assert other["images"] == 1000 and other["dataset"]["image_size"] == 32
    assert {p.name for p in tmp_path.glob("evaluation_*.json")} == {
        "evaluation_synthetic-again.json", "evaluation_synthetic.json"}


def test_another_image_folder_with_the_same_classes_uses_the_runs_statistics(run, capsys, tmp_path):
    run_dir, summary = run
    folder = image_folder(tmp_path / "copy")
    result, _ = evaluate_json(capsys, run_dir, "--data", folder, "dataset.image_size=16", "-o", tmp_path)
    assert result["normalization"] == RUN_STATS and result["data"] == f"imagefolder: {folder}"
    assert (tmp_path / f"evaluation_{slug(result['data'])}.json").is_file()
    # The same pixels in another order: the same mistakes.
    assert result["test_error"] == pytest.approx(summary["final_test_error"], abs=1e-9)


def test_without_the_runs_data_the_evaluation_sets_statistics_are_used_and_said(run, capsys, tmp_path):
    state = load_checkpoint(run[0])
    state["config"]["dataset"].update(name="imagefolder", root=str(tmp_path / "gone"), download=False)
    save_checkpoint(tmp_path / "moved.pt", state)
    result, out = evaluate_json(capsys, tmp_path / "moved.pt", *TINY_DATA, "-o", tmp_path)
    assert result["normalization"] == EVAL_STATS and "gone" in result["normalization_note"]
    assert EVAL_STATS in out
    # Here the evaluation set is the training set, so its statistics are the run's.
    assert abs(result["test_error"] - run[1]["final_test_error"]) <= 1e-9


def test_the_script_runs_as_a_user_runs_it(run):
    run_dir, summary = run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(run_dir), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"test error  {summary['final_test_error']:.2f}%" in proc.stdout
    assert (run_dir / "evaluation_synthetic.json").is_file() and (run_dir / "confusion_synthetic.png").is_file()
