import datetime
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF, TINY, make_cfg, run_train
from idmap.train.runlog import throughput
from idmap.train.checkpoint import load_checkpoint, load_model
from idmap.train.trainer import BatchStream, learning_rate, train

RUN_FILES = ["summary.json", "metrics.jsonl", "checkpoint.pt", ".hydra/config.yaml", ".hydra/overrides.yaml"]


def test_end_to_end_run_writes_every_file_and_learns(tmp_path):
    run_dir = tmp_path / "run"
    run_train(*TINY, "trainer.max_iters=60", f"hydra.run.dir={run_dir}")
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["iterations"] == 60
    assert summary["choices"]["block"] == "full_preact" and summary["choices"]["dataset"] == "synthetic"
    assert summary["dataset"] == {"name": "synthetic", "label": "synthetic"}
    assert summary["model"] == {"depth": 8, "unit": "basic", "block": "full_preact", "downsample": "zero_pad"}
    for key in ("params", "wall_time_s", "device", "torch_version", "git_commit", "seed", "best_test_error"):
        assert key in summary
    # Where and when, as results pages print beside each number: the CPU's model and threads.
    assert summary["device_name"].endswith(f"{torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)})")
    assert datetime.datetime.fromisoformat(summary["ended"]).tzinfo is not None
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [20, 40, 60]
    assert set(metrics[0]) == {"iteration", "epoch", "lr", "train_loss", "train_error", "test_loss",
                               "test_error", "images_per_sec", "window_from", "elapsed", "time"}
    assert summary["final_test_error"] == metrics[-1]["test_error"]
    # Its windows' images over their training seconds (the batch size cancels out).
    assert summary["images_per_sec"] == pytest.approx(60 / sum(20 / m["images_per_sec"] for m in metrics))
    assert metrics[-1]["test_error"] < metrics[0]["test_error"] or metrics[-1]["test_error"] < 30
    assert metrics[-1]["test_error"] < 60  # chance is 90%

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"error/train", "error/test", "loss/train", "loss/test", "lr", "throughput/images_per_sec"} <= set(tags)
    test_curve = [e.value for e in events.Scalars("error/test")]
    assert len(test_curve) == 3 and test_curve[-1] == pytest.approx(metrics[-1]["test_error"])


def test_a_runs_images_per_sec_is_its_images_over_its_training_seconds():
    # 21,000 iterations at 311 images/s then 33,000 at 868 (the original ordering's CPU stretches):
    # 54,000 iterations in 21,000/311 + 33,000/868 units of time, not the mean of the two rates.
    windows = [{"iteration": 1000 * (k + 1), "images_per_sec": 311 if k < 21 else 868} for k in range(54)]
    assert throughput(windows) == pytest.approx(54_000 / (21_000 / 311 + 33_000 / 868))  # ~507, not 590
    assert throughput(windows, after_first=True) == pytest.approx(53_000 / (20_000 / 311 + 33_000 / 868))
    assert throughput([{"iteration": 10, "images_per_sec": None}]) is None
    # A resume at 1,900 starts the next window there: its rate (compile included) is 100 iterations'.
    resumed = [{"iteration": 1000, "images_per_sec": 100.0}, {"iteration": 2000, "images_per_sec": 10.0,
                                                               "window_from": 1900}]
    assert throughput(resumed) == pytest.approx(1100 / (1000 / 100 + 100 / 10))


def test_a_two_job_multirun_gives_two_run_dirs(tmp_path):
    sweep = tmp_path / "sweep"
    run_train("-m", *TINY, "trainer.max_iters=4", "trainer.eval_every=4", "block=original,full_preact",
              f"hydra.sweep.dir={sweep}")
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    blocks = {json.loads(p.read_text())["choices"]["block"] for p in summaries}
    assert blocks == {"original", "full_preact"}


def test_default_run_dirs_never_collide():
    import yaml

    hydra = yaml.safe_load((CONF / "train.yaml").read_text())["hydra"]
    # Microseconds in the run and sweep dir names: jobs started in the same second get their own.
    assert "%f" in hydra["run"]["dir"] and "%f" in hydra["sweep"]["dir"]


GROUPS = ["block", "shortcut", "depth", "dataset", "protocol"]


@pytest.mark.parametrize(
    "group, option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_option_of_every_group_composes(group, option):
    cfg = make_cfg(f"{group}={option}")
    assert cfg.model.block and cfg.shortcut.name and cfg.dataset.name


def test_the_default_is_full_preact_resnet110_on_cifar10_with_the_papers_protocol():
    cfg = make_cfg()
    assert (cfg.model.block, cfg.model.depth, cfg.model.unit) == ("full_preact", 110, "auto")
    assert cfg.model.bn_batch == 64  # BN over 64 images, as the paper's 2 GPUs x 64
    assert cfg.shortcut.name == "identity" and cfg.dataset.name == "cifar10"
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert list(cfg.optim.milestones) == [32000, 48000] and cfg.trainer.max_iters == 64000
    assert (cfg.trainer.batch_size, cfg.optim.warmup_iters, cfg.optim.warmup_lr) == (128, 400, 0.01)


def test_shortcut_parameters_are_overridable_and_typos_fail_at_startup():
    assert make_cfg("shortcut=exclusive_gating", "shortcut.gate_bias=-7").shortcut.gate_bias == -7
    with pytest.raises(Exception, match="gate_bais"):
        make_cfg("shortcut.gate_bais=-7")
    with pytest.raises(Exception, match="batch_size"):
        make_cfg("trainer.batch_size=many")


@pytest.mark.parametrize("choice, depth, unit", [("20", 20, "basic"), ("110", 110, "basic"),
                                                 ("164", 164, "bottleneck"), ("1001", 1001, "bottleneck"),
                                                 ("1202", 1202, "basic"), ("110_1layer", 110, "single")])
def test_depth_options_give_the_papers_networks(choice, depth, unit):
    from idmap.models.resnet import auto_unit

    m = make_cfg(f"depth={choice}").model
    assert m.depth == depth and (auto_unit(depth) if m.unit == "auto" else m.unit) == unit


def test_a_bare_model_depth_gets_the_papers_unit_too():
    from idmap.models.resnet import auto_unit

    m = make_cfg("model.depth=164").model
    assert auto_unit(m.depth) == "bottleneck" and m.unit == "auto"


def test_paper_schedule_warms_up_then_steps_down():
    o = make_cfg().optim
    lr = lambda it: learning_rate(it, o, list(o.milestones))  # noqa: E731
    assert [lr(0), lr(399), lr(400), lr(31999), lr(32000), lr(47999), lr(48000), lr(63999)] == pytest.approx(
        [0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_torch_preset_is_the_epoch_recipe(tmp_path):
    cfg = make_cfg("protocol=torch")
    assert (cfg.trainer.batch_size, cfg.trainer.epochs, cfg.optim.nesterov, cfg.optim.warmup_iters) == (64, 200, True, 0)
    assert list(cfg.optim.milestone_epochs) == [80, 121]  # the Torch code's 1-based epochs 81 and 122


def test_a_length_or_lr_drops_in_iterations_that_epochs_would_replace_are_refused():
    from idmap import IdmapError
    from idmap.config import compose_checked

    with pytest.raises(IdmapError, match=r"^trainer.max_iters=4 is ignored while trainer.epochs=200 sets the length "
                                         r"\(as in protocol=torch\): give the length as trainer.epochs, or set "
                                         r"trainer.epochs=null$"):
        compose_checked("protocol=torch", "trainer.max_iters=4")
    with pytest.raises(IdmapError, match=r"^optim.milestones=\[10, 20\] are ignored while optim.milestone_epochs="
                                         r"\[80,121\] set the LR drops"):
        compose_checked("protocol=torch", "optim.milestones=[10,20]")
    cfg = compose_checked("protocol=torch", "trainer.epochs=null", "trainer.max_iters=4")  # counted in iterations
    assert cfg.trainer.max_iters == 4 and cfg.optim.milestone_epochs is not None


def test_batch_stream_gives_full_batches_and_every_image_once_per_epoch():
    stream = BatchStream(10, torch.Generator().manual_seed(0))
    seen = torch.cat([stream.next(4) for _ in range(5)])  # 20 = two epochs, batches straddle them
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))


def test_train_in_process_and_reload_the_model(tmp_path, tiny_cfg):
    summary = train(tiny_cfg, tmp_path)
    assert summary["status"] == "completed"
    model, cfg = load_model(tmp_path)
    assert cfg["model"]["depth"] == 8
    state = load_checkpoint(tmp_path)
    assert state["iteration"] == 40 and len(state["metrics"]) == 2


def test_each_process_that_trains_a_run_is_recorded_as_a_segment(tmp_path):
    first = train(make_cfg(*TINY, "trainer.max_iters=20", "trainer.eval_every=10"), tmp_path)
    (segment,) = first["segments"]
    assert segment["iterations"] == [0, 20] and segment["elapsed"] == [0.0, first["wall_time_s"]]
    assert {k: segment[k] for k in ("device_name", "torch_version", "git_commit")} == {
        k: first[k] for k in ("device_name", "torch_version", "git_commit")}
    assert datetime.datetime.fromisoformat(segment["started"]) <= datetime.datetime.fromisoformat(first["ended"])
    extended = train(make_cfg(*TINY, "trainer.max_iters=30", "trainer.eval_every=10", "trainer.resume=true"),
                     tmp_path)  # a second process continues the run: a second segment, the first kept
    assert [s["iterations"] for s in extended["segments"]] == [[0, 20], [20, 30]]
    # Back to back: the second starts where the checkpoint it resumed from left the first.
    (_, first_end), (second_start, second_end) = (s["elapsed"] for s in extended["segments"])
    assert first_end == second_start <= first["wall_time_s"] and second_end == extended["wall_time_s"]
    assert [s["iterations"] for s in load_checkpoint(tmp_path)["segments"]] == [[0, 20], [20, 30]]
    again = train(make_cfg(*TINY, "trainer.max_iters=30", "trainer.eval_every=10", "trainer.resume=true"),
                  tmp_path)  # a process that finds nothing left to train is no segment
    assert [s["iterations"] for s in again["segments"]] == [[0, 20], [20, 30]]


def test_a_non_finite_loss_ends_the_run_as_diverged(tmp_path):
    cfg = make_cfg(*TINY, "optim.lr=1e30", "optim.warmup_iters=0")
    summary = train(cfg, tmp_path)
    assert summary["status"] == "diverged"
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_a_diverged_job_does_not_stop_a_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", *TINY, "trainer.max_iters=10", "trainer.eval_every=10", "optim.lr=1e30,0.1",
                     f"hydra.sweep.dir={sweep}", check=False)
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep.glob("*/summary.json"))
    assert statuses == ["completed", "diverged"]
    assert proc.returncode == 1 and f"failed: {sweep / '0_full_preact_110'}: diverged: non-finite" in proc.stderr


@pytest.mark.parametrize("precision", ["bf16"])
def test_speed_switches_run_on_cpu(tmp_path, precision):
    cfg = make_cfg(*TINY, "trainer.max_iters=4", "trainer.eval_every=4", f"trainer.precision={precision}",
                   "trainer.channels_last=true", "optim.impl=loop")
    assert train(cfg, tmp_path)["status"] == "completed"


def test_ghost_bn_and_activation_checkpointing_run(tmp_path):
    cfg = make_cfg(*TINY, "trainer.max_iters=4", "trainer.eval_every=4", "model.bn_batch=16",
                   "model.checkpointing=true")
    assert train(cfg, tmp_path)["status"] == "completed"


def test_ddp_with_two_cpu_processes_trains_into_one_run_dir(ddp_run):
    run_dir = ddp_run  # `train.py DDP trainer.world_size=2`, shared with tests/test_launch.py
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iterations"] == 6
    assert summary["choices"]["block"] == "full_preact"  # so that report.py can place the run
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # written once, by rank 0
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_jpeg_copy_of_cifar10_trains_clearly_below_chance(jpeg_decoded, tmp_path):
    run_dir = tmp_path / "run"
    run_train(
        "dataset=cifar10_jpeg", f"dataset.root={jpeg_decoded.config.root}",
        "model.depth=8", "model.widths=[8,16,32]", "trainer.batch_size=64", "trainer.max_iters=300",
        "trainer.eval_every=300", "trainer.log_every=50", "trainer.device=cpu", "trainer.progress=false",
        "optim.warmup_iters=0", f"hydra.run.dir={run_dir}", timeout=900,
        env={"IDMAP_CACHE": str(jpeg_decoded.cache)},  # decoded once for the session (conftest)
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == {"name": "imagefolder", "label": "CIFAR-10 (JPEG copy)"}
    # Chance is 90%; on 10,000 test images its spread is 0.3 points, so 75% is far below chance.
    assert summary["final_test_error"] < 75
