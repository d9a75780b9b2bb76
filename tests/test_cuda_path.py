"""The CUDA path as a CPU can check it (issue 20, part 1): resume onto another device, the data
order's generator, compile with activation checkpointing, state left between runs in one process,
TF32 flags, and what the throughput counts. The meta device stands in for a GPU where the fault
is a tensor on the wrong device."""

import functools
import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo

import idmap.train.runtime as runtime
from conftest import TINY, make_cfg, run_train
from idmap import IdmapError
from idmap.train.checkpoint import load_checkpoint, save_checkpoint
from idmap.models.resnet import build_resnet
from idmap.rundir import CHECKPOINT, METRICS
from idmap.train.state import BatchStream, RunExists, TrainState
from idmap.train.trainer import build, run_inputs, train

SHORT = [*TINY, "trainer.max_iters=20", "trainer.eval_every=20", "trainer.checkpoint_every=20"]


@pytest.fixture
def checkpointed(tmp_path):
    """A finished CPU run's directory and config."""
    cfg = make_cfg(*SHORT)
    train(cfg, tmp_path / "run")
    return tmp_path / "run", cfg


@pytest.fixture
def fresh_flags():
    """Leaves the process's numeric flags as a fresh process has them."""
    yield
    torch.use_deterministic_algorithms(False)
    runtime.set_tf32("default")


# ---- finding 1: resume on another device -----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta")  # meta tensors hold no values
def test_resume_onto_a_device_restores_the_rng_states_as_cpu_byte_tensors(checkpointed):
    """torch.set_rng_state and Generator.set_state take CPU ByteTensors only: a checkpoint read
    onto the run's device (a GPU, or meta here) must still hand them CPU tensors."""
    run_dir, cfg = checkpointed
    meta = torch.device("meta")
    model = build_resnet(8, widths=(8, 16, 32)).to(meta)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stream = BatchStream(512, torch.Generator().manual_seed(1))
    state = TrainState(model, optimizer, stream, torch.zeros(2, device=meta, dtype=torch.float64),
                       load_checkpoint(run_dir)["config"], 10)
    state.resume_from(run_dir / CHECKPOINT, resume=True)
    assert state.iteration == 20
    saved = load_checkpoint(run_dir)
    assert torch.equal(stream.g.get_state(), saved["stream"]["generator"])
    assert torch.equal(torch.get_rng_state(), saved["rng_cpu"])


# ---- finding 3: one data order on every device --------------------------------------------------


def test_a_run_on_another_device_draws_the_same_data_order_from_a_cpu_generator(checkpointed):
    _, cfg = checkpointed
    data = run_inputs(cfg, torch.device("cpu"), cfg.trainer.batch_size)
    on_cpu, _ = build(cfg, data, torch.device("cpu"), 1)
    elsewhere, _ = build(cfg, data, torch.device("meta"), 1)  # stands in for CUDA
    assert elsewhere.stream.g.device.type == "cpu"
    for _ in range(20):  # over an epoch boundary (16 batches of 32 in 512 images)
        assert torch.equal(on_cpu.stream.next(32), elsewhere.stream.next(32))
    a, b = on_cpu.stream.state_dict(), elsewhere.stream.state_dict()
    assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["perm"], b["perm"])


def test_a_checkpoint_whose_data_order_came_from_a_gpu_generator_is_refused_in_one_line(checkpointed):
    run_dir, cfg = checkpointed
    state = load_checkpoint(run_dir)
    state["stream"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    save_checkpoint(run_dir / CHECKPOINT, {k: v for k, v in state.items() if k != "format"})
    cfg.trainer.resume, cfg.trainer.max_iters = True, 40
    with pytest.raises(RunExists, match="data order drawn on a GPU by an older idmap") as info:
        train(cfg, run_dir)
    assert "\n" not in str(info.value)
    assert load_checkpoint(run_dir)["iteration"] == 20  # the run is left as it was


# ---- finding 4: a resume that changes a speed switch says so -------------------------------------


@pytest.mark.parametrize("switch", [None, "trainer.precision=bf16", "optim.impl=loop", "trainer.channels_last=true"])
def test_a_resume_that_changes_a_speed_switch_warns_in_one_line(checkpointed, caplog, switch):
    run_dir, _ = checkpointed
    cfg = make_cfg(*SHORT, "trainer.max_iters=21", "trainer.resume=true", *([switch] if switch else []))
    with caplog.at_level(logging.WARNING, logger="idmap"):
        assert train(cfg, run_dir)["status"] == "completed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if switch is None:
        assert warnings == []
    else:
        key, value = switch.split("=")
        assert len(warnings) == 1 and f"{key}: " in warnings[0] and f"-> {value}" in warnings[0].lower(), warnings
        assert "equal up to rounding, not bit for bit" in warnings[0]


# ---- finding 2: compile with activation checkpointing -------------------------------------------


def test_compiled_training_with_activation_checkpointing_updates_bn_statistics_once_per_step(tmp_path):
    """Dynamo refused the eager recomputation's context_fn; compiled, the graph updates BN's
    running statistics once, in the forward, as the eager run without checkpointing does. Ghost
    BN (2 chunks of 16) is compiled too: one update per chunk."""
    runs = {}
    for name, extra in [("eager", []), ("compiled", ["trainer.compile=default", "model.checkpointing=true"])]:
        cfg = make_cfg(*TINY, "trainer.max_iters=3", "trainer.eval_every=3", "trainer.checkpoint_every=3",
                       "model.bn_batch=16", *extra)
        assert train(cfg, tmp_path / name)["status"] == "completed"
        runs[name] = load_checkpoint(tmp_path / name)["model"]
    for key, value in runs["eager"].items():
        if key.endswith("num_batches_tracked"):
            assert runs["compiled"][key] == value == 3 * 2, key
        else:
            torch.testing.assert_close(runs["compiled"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---- finding 7: each run sets what it uses ------------------------------------------------------


def test_a_run_after_a_deterministic_one_in_the_same_process_is_not_deterministic(tmp_path, fresh_flags):
    seen = []
    original = TrainState.save

    def save(self, *args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainState, "save", save)
        train(make_cfg(*SHORT, "trainer.deterministic=true"), tmp_path / "a")
        train(make_cfg(*SHORT), tmp_path / "b")
    assert seen == [True, False]


def test_compiled_runs_one_after_another_each_compile(tmp_path, monkeypatch):
    """With dynamo's recompile limit at 1, a second compiled model in the same process would be
    refused (silently run eager, by default) unless each run starts dynamo afresh. The eager
    backend keeps this to dynamo's tracing, which is what the limit counts."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for name, block in [("a", "full_preact"), ("b", "original")]:
            cfg = make_cfg(*SHORT, "trainer.max_iters=2", "trainer.eval_every=2", "trainer.checkpoint_every=2",
                           "trainer.compile=default", f"block={block}")
            assert train(cfg, tmp_path / name)["status"] == "completed"


# ---- finding 8: fp32 means fp32 on old and new torch --------------------------------------------


def test_fp32_turns_tf32_off_through_the_fp32_precision_settings(fresh_flags):
    b = torch.backends
    for precision, conv, matmul in [("fp32", "ieee", "ieee"), ("tf32", "tf32", "tf32"), ("fp32", "ieee", "ieee"),
                                    ("default", "tf32", "ieee"), ("bf16", "ieee", "ieee")]:
        runtime.set_tf32(precision)
        assert (b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision) == (conv, conv), precision
        assert b.cuda.matmul.fp32_precision == matmul, precision
        # The legacy flags still read (inductor's convolution templates read cuDNN's), and agree.
        assert (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32) == (conv == "tf32", matmul == "tf32"), precision


def test_fp32_turns_tf32_off_through_allow_tf32_on_a_torch_without_fp32_precision(monkeypatch, fresh_flags):
    monkeypatch.delattr(type(torch.backends.cudnn), "conv")  # as torch before 2.9
    assert not runtime._fp32_precision_api()
    for precision, conv, matmul in [("fp32", False, False), ("tf32", True, True), ("default", True, False)]:
        runtime.set_tf32(precision)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (conv, matmul), precision


# ---- finding 11: checkpoints are no training time -----------------------------------------------


def test_checkpoint_time_does_not_count_in_images_per_sec(tmp_path, monkeypatch):
    """On a clock that only steps (10 ms each) and checkpoints (100 s each) move, the measured
    rate is the steps' alone."""
    import idmap.train.trainer as trainer

    clock = [0.0]
    step, save = trainer.Loop.step, TrainState.save

    def timed(seconds, original):
        def run(*args, **kwargs):
            clock[0] += seconds
            return original(*args, **kwargs)
        return run

    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: clock[0], time=lambda: clock[0]))
    monkeypatch.setattr(trainer.Loop, "step", timed(0.01, step))
    monkeypatch.setattr(TrainState, "save", timed(100.0, save))
    cfg = make_cfg(*TINY, "trainer.checkpoint_every=5")  # 40 iterations, evaluations at 20 and 40
    train(cfg, tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    # The second window follows the checkpoints at 20 (after the evaluation), 25, 30 and 35.
    for entry in metrics:
        assert entry["images_per_sec"] == pytest.approx(20 * cfg.trainer.batch_size / 0.2), entry


# ---- finding 9: a pooled job sees exactly its GPU -----------------------------------------------


@pytest.mark.parametrize("seen", [1, 4])
def test_a_pooled_job_whose_cuda_sees_more_than_its_gpu_fails_in_one_line(tmp_path, monkeypatch, seen):
    """Without NVML, counting GPUs starts CUDA before the job's mask is set, which CUDA then ignores."""
    import idmap.run.gpu_pool as gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpus, "_cuda_device_count", lambda: seen)
    pool = SimpleNamespace(enabled=True, jobs_per_gpu=1, lock_dir=str(tmp_path))
    if seen == 1:
        with gpus.pin_job_to_gpu(pool, num_gpus=4) as device:
            assert device == "cuda:0"
        return
    with pytest.raises(IdmapError, match="claimed GPU 0, but CUDA .* sees 4 GPUs") as info:
        with gpus.pin_job_to_gpu(pool, num_gpus=4):
            pass
    assert "\n" not in str(info.value)


# ---- finding 10: process groups -----------------------------------------------------------------


def test_a_bad_value_for_spawned_processes_is_one_line_before_any_process_starts(tmp_path):
    proc = run_train(*TINY, "trainer.world_size=2", "trainer.log_every=0", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: trainer.log_every=0 is not allowed; it must be an integer >= 1", proc.stderr


@pytest.fixture
def two_gpus(monkeypatch):
    """launch.py's view of a node with two GPUs; init_process_group records its arguments."""
    import idmap.run.launch as launch

    calls = []

    def init_process_group(backend, init_method=None, rank=-1, world_size=-1, device_id=None):
        calls.append(dict(backend=backend, rank=rank, device_id=device_id))

    monkeypatch.setattr(launch, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(launch.dist, "init_process_group", init_process_group)
    return launch, calls


def test_each_rank_binds_its_own_gpu_to_its_process_group(two_gpus, monkeypatch):
    launch, calls = two_gpus
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    launch._start_group("cuda", 1, 1, 2, "env://")
    assert calls == [dict(backend="nccl", rank=1, device_id=torch.device("cuda", 1))]


def test_two_ranks_on_one_gpu_are_refused_in_one_line(two_gpus, monkeypatch, tiny_cfg, tmp_path):
    launch, calls = two_gpus
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun: every process sees both GPUs
    with pytest.raises(IdmapError, match="3 processes on this node but 2 GPU"):
        launch._start_group("cuda", 2, 2, 3, "env://")
    tiny_cfg.trainer.world_size, tiny_cfg.trainer.device = 4, "cuda"
    with pytest.raises(IdmapError, match="4 processes on this node but 2 GPU"):
        launch._spawn(tiny_cfg, tmp_path, {})
    assert calls == []

    def duplicate(*args, **kwargs):  # what NCCL says when a scheduler gave two tasks one GPU
        raise RuntimeError("NCCL error: invalid usage\nLast error:\nDuplicate GPU detected : rank 1 and rank 0")

    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setattr(launch.dist, "init_process_group", duplicate)
    with pytest.raises(IdmapError, match="NCCL cannot put two ranks on one GPU") as info:
        launch._start_group("cuda", 2, 2, 3, "env://")
    assert "\n" not in str(info.value)
