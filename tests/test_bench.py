"""idmap.perf.bench (scripts/bench.py): the throughput table, on a CPU in seconds; the speed switches on a GPU, where
they must all run and compiled training must follow eager training."""

import json

import pytest
import torch
from conftest import TINY, make_cfg

import idmap.perf.bench as bench
from idmap.rundir import METRICS
from idmap.train.trainer import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# A ResNet-8 with narrow stages on 256 images: seconds per row on a loaded CPU.
SMOKE = ["--depths", "8", "--iters", "2", "--warmup", "1", "--num-train", "256", "--batch-size", "16",
         "--workers", "0", "--widths", "4", "8", "16"]


def table(text: str) -> dict[str, list[str]]:
    """Setting name -> its cells after the name, for the body rows of the markdown table."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    assert rows[0][:2] == [" depth ", " loop / setting "], rows[0]
    return {cells[1].strip(): [c.strip() for c in cells[2:]] for cells in rows[1:]}


def number(cell: str) -> float:
    return float(cell.replace(",", "").removesuffix("x"))


def assert_measured(cells: list[str], cuda: bool) -> None:
    ips, ms, peak, speedup, minutes = cells
    assert number(ips) > 0 and number(ms) > 0 and number(speedup) > 0, cells
    assert (number(peak) > 0) if cuda else peak == "", cells
    # The paper's 64k iterations at this row's ms/iter (both cells rounded to 0.1).
    assert number(minutes) == pytest.approx(64_000 * number(ms) / 60_000, rel=0.01, abs=0.1)


def test_a_cpu_runs_every_setting_but_tf32_and_cuda_graphs_compile_included():
    """Inductor compiles for the CPU (a C++ compiler is all it needs): on a CPU with AVX-512 bf16 it
    is the largest speed-up there is, so the compiled rows run there too."""
    args = bench.parse_args([*SMOKE, "--device", "cpu"])
    run, skipped = bench.plan(args, torch.device("cpu"), 8)
    assert [s.name for s in run] == [s.name for s in bench.SETTINGS if not s.cuda_only and s.min_depth <= 8]
    assert "bf16+channels_last+fused_sgd+compile" in [s.name for s in run]
    assert "bf16+channels_last+fused_sgd+compile+ghost_bn" in [s.name for s in run]
    assert set(skipped) == {"tf32", "tf32+channels_last", "bf16+channels_last+fused_sgd+compile-reduce-overhead",
                            "bf16+channels_last+fused_sgd+checkpointing",
                            "bf16+channels_last+fused_sgd+compile+checkpointing"}


# Every eager row a CPU runs, and one compiled row (the setting of the CPU runs in docs/results.md):
# each compile costs tens of seconds on a 2-core machine, and the plan above says which rows run.
CPU_ROWS = ["fp32", "bf16+channels_last", "bf16+channels_last+fused_sgd", "bf16+channels_last+fused_sgd+ghost_bn",
            "bf16+channels_last+fused_sgd+ghost_bn_chunked", "bf16+channels_last+fused_sgd+compile+ghost_bn"]


def test_cpu_table_has_the_header_and_a_row_of_numbers_per_setting(tmp_path, capsys):
    out, rows_file = tmp_path / "bench.md", tmp_path / "rows.jsonl"
    assert bench.main([*SMOKE, "--device", "cpu", "--out", str(out), "--rows", str(rows_file),
                       "--settings", *CPU_ROWS]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    first = text.splitlines()[0]
    assert first.startswith("Device: ") and f"torch {torch.__version__}" in first
    assert "`python scripts/bench.py --depths 8 --iters 2" in first
    assert "generated 32x32 uint8 images (dataset=synthetic), not CIFAR-10" in text

    rows = table(text)
    assert list(rows) == ["classic", *CPU_ROWS]
    assert rows["classic"][3] == "1.00x"
    for cells in rows.values():
        assert_measured(cells, cuda=False)
    records = [json.loads(line) for line in rows_file.read_text().splitlines()]  # the same rows, unrounded
    assert [r["setting"] for r in records] == list(rows) and records[0]["speedup"] == 1.0
    assert [bench.row(r) for r in records] == [line for line in text.splitlines() if line.startswith("| 8 |")]


def test_settings_a_cpu_leaves_out_are_named_with_the_reason(capsys, monkeypatch):
    monkeypatch.setattr(bench, "project", lambda *a, **kw: (1.0, None))  # the notes, not the timings
    monkeypatch.setattr(bench, "classic", lambda *a, **kw: (1.0, None))
    assert bench.main([*SMOKE, "--device", "cpu"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- not run: ")]
    assert any("tf32+channels_last" in n and "on a CPU" in n for n in notes)
    assert any("compile-reduce-overhead" in n and "on a CPU" in n for n in notes)
    assert any("+checkpointing" in n and "below depth 1000" in n for n in notes)


def test_a_failing_setting_is_a_failed_row_and_the_benchmark_goes_on(monkeypatch, capsys):
    def train_or_oom(cfg, run_dir):
        if cfg.trainer.precision == "bf16":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train(cfg, run_dir)

    monkeypatch.setattr(bench, "train", train_or_oom)
    assert bench.main([*SMOKE, "--device", "cpu", "--settings", "bf16+channels_last", "fp32"]) == 0
    rows = table(capsys.readouterr().out)
    assert list(rows) == ["classic", "bf16+channels_last", "fp32"]
    assert rows["bf16+channels_last"][0] == "failed: out of memory"
    assert_measured(rows["fp32"], cuda=False)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
def test_every_setting_runs_on_cuda(capsys):
    """Named settings run at any depth, so the depth-8 net exercises compile, CUDA graphs and
    checkpointing too."""
    assert bench.main([*SMOKE, "--device", "cuda", "--warmup", "3", "--settings", *bench.BY_NAME]) == 0
    rows = table(capsys.readouterr().out)
    assert list(rows) == ["classic", *bench.BY_NAME]
    for cells in rows.values():
        assert_measured(cells, cuda=True)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision, rel", [("fp32", 2e-3), ("bf16", 3e-2)])
def test_compiled_training_follows_eager_training(tmp_path, precision, rel):
    """torch.compile is the same maths: the mean train loss of the first 10 iterations (same seed,
    same batches) agrees with eager's up to rounding, which bf16 makes coarser."""
    losses = {}
    for mode in ("none", "default"):
        torch.compiler.reset()
        cfg = make_cfg(*TINY, "trainer.device=cuda", f"trainer.precision={precision}", f"trainer.compile={mode}",
                       "trainer.max_iters=10", "trainer.eval_every=10", "trainer.checkpoint_every=10")
        train(cfg, tmp_path / mode)
        losses[mode] = json.loads((tmp_path / mode / METRICS).read_text().splitlines()[0])["train_loss"]
    assert losses["default"] == pytest.approx(losses["none"], rel=rel)


@pytest.mark.parametrize("strict, conv", [(False, "tf32"), (True, "ieee")])
def test_the_classic_baseline_runs_at_pytorchs_default_tf32_and_the_strict_row_without(monkeypatch, strict, conv):
    """PyTorch ships TF32 convolutions on: the headline speed-up is against that, whatever flags
    an earlier row of the table left."""
    from idmap.config import compose_config
    from idmap.models.resnet import build_resnet
    from idmap.train.runtime import set_tf32

    seen = []

    def build(*args, **kwargs):  # the flags as the classic loop trains
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return build_resnet(*args, **kwargs)

    monkeypatch.setattr(bench, "build_resnet", build)
    args = bench.parse_args([*SMOKE, "--device", "cpu"])
    set_tf32("fp32")  # as a trainer row at trainer.precision=fp32 leaves them
    try:
        bench.classic(compose_config(*bench.base_overrides(args, 8)), args, torch.device("cpu"), strict_fp32=strict)
    finally:
        set_tf32("default")
    assert seen == [(conv, "ieee")]


def test_the_ghost_bn_rows_time_the_one_pass_and_the_chunked_batch_norm():
    from idmap.config import compose_config
    from idmap.models import build_resnet, model_kwargs
    from idmap.models.norm import ChunkedGhostBatchNorm2d, GhostBatchNorm2d

    args = bench.parse_args([*SMOKE, "--device", "cpu"])
    for name, kind in [("bf16+channels_last+fused_sgd+ghost_bn", GhostBatchNorm2d),
                       ("bf16+channels_last+fused_sgd+ghost_bn_chunked", ChunkedGhostBatchNorm2d)]:
        setting = bench.BY_NAME[name]
        overrides = bench.trainer_overrides(args, 8, setting)
        assert "model.bn_batch=8" in overrides  # half of --batch-size 16
        # The trainer builds what the row's overrides say (model.ghost_bn): no builder is swapped.
        model = build_resnet(**model_kwargs(compose_config(*overrides), 10))
        assert {type(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {kind}
