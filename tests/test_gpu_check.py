"""idmap-gpu-check (idmap.perf.gpu_check): its rehearsal runs every step of both calls on this CPU and
leaves a bundle the device tool brings back whole; a step that hangs costs its row only; each
step's cap comes with its estimate, part 1 fits 300 s; packing, fused, resume and the MPS waits
are measured as the issue's fixes say; the one-call recipe fits the device tool's 2,000
characters, stops at a failed install and ends every child."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from idmap.perf import gpu_check, gpu_check_processes as runs, gpu_check_steps as steps
from idmap.perf.gpu_check_processes import bench_rows, together_rate
from idmap.perf.gpu_check_sizes import PACKED, REHEARSAL, train_overrides

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"[A-Za-z0-9._-]+")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def one_thread():
    """Tiny nets in this process: a second thread only spins (five times the CPU time on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context(tmp_path, seconds: float, sizes=REHEARSAL, data=None) -> gpu_check.Context:
    return gpu_check.Context(sizes, True, tmp_path, time.time() + seconds, data)


def assert_device_tool_takes(out: Path) -> None:
    """At most 8 files, 16 MiB each, no more than 2 folders down, names of letters, digits, . _ -"""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, rel  # out/a/b/file comes back, out/a/b/c/file does not
        assert all(NAME.fullmatch(part) for part in rel.parts), rel
        assert p.stat().st_size < 16 * 2**20, rel


@pytest.mark.slow
def test_the_rehearsal_runs_every_step_of_both_calls_on_a_cpu_and_its_bundle_comes_back_whole(tmp_path):
    out = tmp_path / "bundle"
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--rehearse", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_device_tool_takes(out)
    # No running.pgids: every process the check started was ended before it returned.
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
    report = json.loads((out / "results.json").read_text())
    assert [s["step"] for s in report["steps"]] == [s.name for s in gpu_check.STEPS]
    for step in report["steps"]:
        # A step that broke would read "failed: ..."; a rehearsal has every step ok or skipped.
        assert step["status"].startswith(("ok", "skipped")), step
        assert step["items"], step
    rows = {s["step"]: {i["name"]: i for i in s["items"]} for s in report["steps"]}
    assert rows["smoke"]["tf32"]["status"].startswith("skipped: needs CUDA")
    assert rows["smoke"]["ordering full_preact"]["status"] == "ok" and rows["smoke"]["shortcut dropout"]["status"] == "ok"
    assert rows["smoke"]["channels_last"]["apart"] <= steps.SAME  # compared with the row without it
    assert rows["resume"]["deterministic: bit-exact"]["status"] == "ok"
    for bench in ("bench-20", "bench-110", "bench-1001"):
        assert any(name.startswith("depth 8: ") for name in rows[bench]), rows[bench]
    # The crash case: a level ended before any run evaluates gives a row, and the step goes on.
    assert rows["packing"]["2 runs ended before their first evaluation"]["gave"].startswith("failed: run ")
    assert rows["packing"]["plain: 2 runs"]["overlap_s"] > 0
    assert rows["packing"]["CUDA MPS"]["status"].startswith("skipped: needs CUDA")
    assert all(i["status"] == "ok" for i in rows["fidelity"].values())
    # The short table is the last thing printed, and the summary's first table.
    table = proc.stdout.rstrip().splitlines()[-len(gpu_check.STEPS) - 2:]
    assert table[0].startswith("| step | result |")
    assert "\n".join(table) in (out / "summary.md").read_text()
    print(f"rehearsal: {seconds:.0f} s")  # the issue asks for at most 90 s on an idle 2-core machine


def test_a_step_that_runs_past_its_cap_costs_its_row_and_the_check_goes_on(tmp_path, monkeypatch):
    # The step's child is a stand-in that records one row, then hangs: a real step started with a
    # short cap may finish first on a fast machine (each row skips itself when its time is spent).
    record = tmp_path / "smoke.json"
    hang = f"import json, time; json.dump({{'items': [{{'name': 'a', 'status': 'ok'}}], 'headline': ''}}, " \
           f"open({str(record)!r}, 'w')); time.sleep(120)"
    real = gpu_check.run_logged
    monkeypatch.setattr(gpu_check, "run_logged", lambda cmd, log, deadline: real([sys.executable, "-c", hang],
                                                                                  log, deadline))
    ctx = context(tmp_path, 3)
    t0 = time.time()
    items = ctx.child("smoke")
    assert time.time() - t0 < 20
    assert items[0] == {"name": "a", "status": "ok"}  # the rows done before the kill are kept
    assert items[-1]["status"].startswith("failed: timed out after") and "(1 rows done)" in items[-1]["status"]
    assert gpu_check.verdict(ctx.items).startswith("failed: 1 of 2")


def test_the_verdict_names_the_first_failure_or_counts_what_ran():
    ok, skip = {"name": "a", "status": "ok"}, {"name": "b", "status": "skipped: needs CUDA"}
    bad = {"name": "c", "status": "failed: out of memory"}
    assert gpu_check.verdict([ok, skip]) == "ok (1 ran, 1 skipped)"
    assert gpu_check.verdict([skip, skip]) == "skipped: needs CUDA"
    assert gpu_check.verdict([ok, bad, skip]) == "failed: 1 of 3 (c: out of memory)"
    assert gpu_check.verdict([]) == "failed: no rows"


def test_each_step_has_a_cap_from_its_estimate_and_part_1_fits_300_s_with_time_left_in_the_window():
    first, second = gpu_check.chosen_steps(1, False), gpu_check.chosen_steps(2, False)
    assert first + second == list(gpu_check.STEPS)  # each step in one call; the rehearsal runs both
    assert gpu_check.chosen_steps(2, True) == list(gpu_check.STEPS)
    assert sum(s.cap_s for s in first) <= 300
    # A 15-minute window: a start (up to 2 min), part 1's call and part 2's (each with ~80 s for
    # the install, the unpacking and a margin) and the pause between them.
    assert 120 + sum(s.cap_s for s in first) + sum(s.cap_s for s in second) + 2 * 80 <= 15 * 60 - 60
    assert all(len(s.estimate) > 40 and "~" in s.estimate for s in gpu_check.STEPS)
    # Deadlines add up the caps, scaled to the budget: time a step leaves unused goes to the next.
    ends = gpu_check.deadlines(first, 1000.0, 600)
    scale = 600 / sum(s.cap_s for s in first)
    assert ends[0] == pytest.approx(1000 + scale * first[0].cap_s) and ends[-1] == pytest.approx(1600)


def test_the_steps_table_in_the_docs_is_the_codes():
    assert gpu_check.plan_table() in (ROOT / "docs" / "benchmarks.md").read_text()


def test_bench_rows_are_read_from_what_bench_wrote_even_when_it_was_cut_short(tmp_path):
    rows_file = tmp_path / "bench.rows.jsonl"
    classic = {"depth": 20, "setting": "classic", "images_per_sec": 1000.5, "ms_per_iter": 127.9, "peak_mib": 50.0,
               "speedup": 1.0, "minutes_64k": 136.5}
    rows_file.write_text(json.dumps(classic) + "\n" + json.dumps({"depth": 20, "setting": "fp32", "error": "out of memory"})
                         + "\n" + json.dumps({**classic, "images_per_sec": 999.0}) + "\n"  # measured again: the last counts
                         + '{"depth": 20, "setting": "bf16", "images_per')  # cut off mid-write
    rows = bench_rows(rows_file)
    assert [r["setting"] for r in rows] == ["classic", "fp32"]
    assert rows[0]["images_per_sec"] == 999.0 and rows[0]["speedup"] == 1.0
    assert rows[1]["error"] == "out of memory" and "images_per_sec" not in rows[1]
    assert bench_rows(tmp_path / "absent.jsonl") == []


def test_without_cuda_the_check_refuses_in_one_line_unless_rehearsing(capsys):
    if gpu_check.steps.cuda_available():
        pytest.skip("CUDA is here")
    assert gpu_check.main(["--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rehearse" in err[0]


# ---- finding 1: a packing run ended before its first metrics line ------------------------------
def test_packing_with_a_run_ended_before_its_first_metrics_line_gives_a_row_not_a_crash(tmp_path, monkeypatch):
    """Each run claims its folder (as train.py does before Hydra writes) and is ended at the cap
    before it evaluates: a folder with no metrics.jsonl."""
    def claims_then_hangs(overrides, run_dir):
        return [sys.executable, "-c", f"import os, time; os.makedirs({str(run_dir)!r}); time.sleep(60)"]

    monkeypatch.setattr(runs, "train_cmd", claims_then_hangs)
    ctx = context(tmp_path, 4, dataclasses.replace(REHEARSAL, packing_cut_s=None))
    runs.packing(ctx)
    assert (tmp_path / "packing" / "plain-2-0").is_dir()
    rows = {i["name"]: i["status"] for i in ctx.items}
    assert rows["plain: 2 runs"] == "failed: run 0 killed at its cap before its first evaluation"
    assert not runs.RUNNING  # both ended


# ---- finding 6: the aggregate over the span in which the runs trained together ------------------
def metrics(*windows):
    """metrics.jsonl entries for windows (end iteration, end on the wall clock, images/s) at batch 100."""
    return [{"iteration": it, "time": end, "images_per_sec": rate} for it, end, rate in windows]


def test_packings_aggregate_counts_only_the_span_in_which_every_run_trained():
    # Run a is alone from 0 to 5 s (1,000 img/s), shares the GPU with b from 5 to 10 s (500 img/s
    # each), then b is alone until 15 s. Each run's own rate is 750 img/s; together they trained
    # 1,000 img/s while both ran. The first window of each (iterations 0 to 10) is its warm-up.
    a = metrics((10, -1.0, 1000), (60, 5.0, 1000), (85, 10.0, 500))
    b = metrics((10, 4.0, 1000), (35, 10.0, 500), (85, 15.0, 1000))
    from idmap.train.runlog import throughput

    assert throughput(a, after_first=True) + throughput(b, after_first=True) == pytest.approx(1500)
    rate, seconds = together_rate([a, b], 100, after=10)
    assert (rate, seconds) == (pytest.approx(1000), pytest.approx(5))
    late = metrics((10, 11.0, 1000), (35, 13.5, 1000))  # started after a had finished
    assert together_rate([a, late], 100, after=10) is None


def test_the_trainer_stamps_each_window_with_the_wall_clock(tmp_path, one_thread):
    from conftest import TINY, make_cfg
    from idmap.rundir import read_metrics
    from idmap.train.trainer import train

    t0 = time.time()
    train(make_cfg(*TINY), tmp_path)
    stamps = [m["time"] for m in read_metrics(tmp_path)]
    assert t0 < stamps[0] < stamps[1] <= time.time()


# ---- finding 5: the fused probe under the trainer's flags, timed as the trainer's windows -------
def test_the_fused_probe_runs_under_the_trainers_flags(tmp_path, one_thread):
    torch.backends.cudnn.benchmark = False
    ctx = context(tmp_path, 120)
    steps.fused(ctx)
    assert [i["status"] for i in ctx.items] == ["ok"]
    assert torch.backends.cudnn.benchmark  # runtime.configure's, as in every packed run
    assert "trainer.channels_last=false" in PACKED and "trainer.precision=bf16" in PACKED  # one list for both


def test_steps_are_timed_between_two_events_without_a_sync_per_step(monkeypatch):
    calls = {"fn": 0, "record": 0, "sync": 0}

    class Event:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            calls["record"] += 1
            self.t = calls["fn"]

        def synchronize(self):
            calls["sync"] += 1

        def elapsed_time(self, end):
            return 1000.0 * (end.t - self.t)  # one second per call, in ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.__setitem__("sync", calls["sync"] + 1))
    seconds = steps.step_seconds(lambda: calls.__setitem__("fn", calls["fn"] + 1), torch.device("cuda", 0), iters=10)
    assert seconds == 1.0 and calls == {"fn": 13, "record": 2, "sync": 1}


# ---- finding 12: MPS's logs in the bundle, its waits inside the step's cap ----------------------
def test_mps_logs_come_back_and_its_start_and_quit_wait_no_longer_than_the_cap(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-cuda-mps-control"
    fake.parent.mkdir()
    # Starts (writing its log), then never answers `quit`.
    fake.write_text('#!/bin/sh\nif [ "$1" = -d ]; then echo started > "$CUDA_MPS_LOG_DIRECTORY/control.log"; '
                    'exit 0; fi\nexec sleep 60\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    ctx = context(tmp_path, 2)
    env, why = runs.mps_daemon(ctx)
    assert why == "" and env["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "mps" / "log")
    t0 = time.time()
    assert runs.mps_control(ctx, env, [], b"quit\n") == "no answer by the step's cap"
    assert time.time() - t0 < 5
    gpu_check.write_bundle(tmp_path / "out", {"steps": [], "rehearse": True, "when": "", "budget_s": 1,
                                              "command": ""}, tmp_path, ctx.extra_logs)
    with tarfile.open(tmp_path / "out" / gpu_check.LOGS_TAR) as tar:
        assert "logs/log-control.log" in tar.getnames()


# ---- finding 13: only a bit-exact resume passes -----------------------------------------------
def test_the_resume_step_passes_no_broken_resume(tmp_path, monkeypatch, one_thread):
    """Weights restored at bf16 precision: within 1e-2 of the uninterrupted run's, yet wrong."""
    import idmap.train.state

    load = idmap.train.state.TrainState.load_state_dict

    def rounded(self, state, with_sums=True):
        load(self, state, with_sums)
        for p in self.model.parameters():
            p.data.copy_(p.data.bfloat16())

    monkeypatch.setattr(idmap.train.state.TrainState, "load_state_dict", rounded)
    ctx = context(tmp_path, 120)
    steps.resume(ctx)
    assert ctx.items and all(i["status"].startswith("failed: not bit-exact") for i in ctx.items), ctx.items


def test_the_resume_row_fails_when_a_resumed_run_does_not_continue_exactly(tmp_path, monkeypatch, one_thread):
    """The check can fail: a resume that forgets the data order is caught, not called equal."""
    from idmap.train.state import BatchStream

    overrides = [*train_overrides(REHEARSAL, 6, 2), *REHEARSAL.resnet20, "trainer.checkpoint_every=2",
                 "trainer.deterministic=true"]
    ctx = context(tmp_path, 120)
    try:
        assert steps.resume_pair(ctx, "exact", overrides)["status"] == "ok"
        monkeypatch.setattr(BatchStream, "load_state_dict", lambda self, state: None)
        row = steps.resume_pair(ctx, "broken", overrides)
    finally:
        torch.use_deterministic_algorithms(False)  # trainer.deterministic=true set it for this process
    assert row["status"].startswith("failed: not bit-exact") and row["stopped_at"] < 6


# ---- smoke: a switch that keeps the maths is checked against the row without it ------------------
def test_a_smoke_row_whose_loss_leaves_its_references_fails(tmp_path, one_thread):
    ctx = context(tmp_path, 120)
    base = [*train_overrides(REHEARSAL, 2, 2), *REHEARSAL.resnet20]
    assert steps.train_row(ctx, steps.Row("base", []), base)["status"] == "ok"
    same = steps.train_row(ctx, steps.Row("fused SGD", [], ref="base", rtol=steps.SAME), [*base, "optim.impl=fused"])
    assert same["status"] == "ok" and same["apart"] <= steps.SAME
    other = steps.train_row(ctx, steps.Row("another seed", [], ref="base", rtol=steps.SAME), [*base, "seed=7"])
    assert other["status"].startswith("failed: train loss") and "'base'" in other["status"]


def test_the_ghost_bn_row_times_the_one_pass_and_the_chunked_version_when_to_chunked_exists(tmp_path, one_thread):
    """Each net's row times the one-pass and the chunked ghost BN through the trainer's step."""
    ctx = context(tmp_path, 120)
    steps.ghost_bn(ctx)
    assert [i["status"] for i in ctx.items] == ["ok", "ok"]
    assert all(i["ms_per_iter_one_pass"] > 0 and i["speedup"] > 0 for i in ctx.items)


def test_the_jpeg_copy_is_decoded_once_by_its_own_row(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("IDMAP_CACHE", str(tmp_path / "cache"))
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            (tmp_path / "jpeg" / split / c).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (32, 32), (40 * k, 90, 200)).save(tmp_path / "jpeg" / split / c / f"{k}.jpg")
    ctx = context(tmp_path, 60, data=str(tmp_path / "jpeg"))
    steps.jpeg_cache(ctx)
    assert ctx.items[0]["status"] == "ok" and (ctx.items[0]["train"], ctx.items[0]["test"]) == (6, 4)
    assert list((tmp_path / "cache").iterdir())  # the runs after it read the cache


# ---- every child ended -----------------------------------------------------------------------
def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for a parent that is not this process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_check_that_is_sent_sigterm_ends_every_process_it_started(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--rehearse", "--out", str(out)],
                            env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listed = out / gpu_check.RUNNING_PGIDS
    groups = []
    while not groups and proc.poll() is None:  # until the first step's child is listed
        time.sleep(0.05)
        groups = [-int(line) for line in (listed.read_text().split() if listed.exists() else [])]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert groups and not any(alive(pid) for pid in groups)
    assert not listed.exists()


# ---- the one-call recipe ----------------------------------------------------------------------
def recipe() -> str:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    block = text.split("<!-- gpu-check recipe -->", 1)[1]
    return block.split("```bash\n", 1)[1].split("\n```", 1)[0]


def test_the_one_call_recipe_fits_the_device_tools_2000_characters_and_runs_part_1_in_its_budget():
    command, docs = recipe(), (ROOT / "docs" / "benchmarks.md").read_text()
    assert len(command) < 2000
    assert command.startswith("python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl "
                              "&& export PYTHONPATH=/tmp/site:$PWD/src || exit;")
    assert "tar xzf .whl/cifar10-jpeg.tar.gz -C /tmp/data || exit;" in command
    # Its arguments are the command's own; the budget is part 1's caps.
    args = command.split("scripts/gpu_check.py", 1)[1].split(";")[0].split()
    parsed = gpu_check.parse_args([a.replace("$OUT", "out") for a in args])
    assert parsed.part == 1 and parsed.budget is None and parsed.data == "/tmp/data/cifar10-jpeg"
    assert f"$OUT/{gpu_check.RUNNING_PGIDS}" in command
    assert "`timeout_s` 380" in docs and "`--part 2`" in docs and "`timeout_s` 330" in docs


def run_recipe(tmp_path: Path, fail_pip: bool) -> tuple[int, str]:
    """The recipe in bash, /tmp/ moved under tmp_path, with a python3 that records its calls: pip
    fails or not; the check leaves a process group behind, as a check that died would, and lists it."""
    bin_dir, checkout, out = tmp_path / "bin", tmp_path / "checkout", tmp_path / "out"
    for d in (bin_dir, checkout / ".whl", out):
        d.mkdir(parents=True)
    with tarfile.open(checkout / ".whl" / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        (tmp_path / "cifar10-jpeg").mkdir()
        tar.add(tmp_path / "cifar10-jpeg", "cifar10-jpeg")
    (bin_dir / "python3").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
        f'if [ "$2" = pip ]; then exit {int(fail_pip)}; fi\n'
        # The group is listed once it exists: the child writes its pid after setsid (a loaded
        # machine may not have run setsid yet when `$!` is known).
        f"setsid sh -c 'echo $$ > {tmp_path}/left.tmp && mv {tmp_path}/left.tmp {tmp_path}/left; exec sleep 300' &\n"
        f'while [ ! -s {tmp_path}/left ]; do sleep 0.01; done\n'
        f'echo "-$(cat {tmp_path}/left)" > "$OUT/{gpu_check.RUNNING_PGIDS}"; exit 1\n')
    (bin_dir / "python3").chmod(0o755)
    command = recipe().replace("/tmp/", f"{tmp_path}/")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(out)}
    rc = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, timeout=60).returncode
    return rc, (tmp_path / "calls").read_text()


def test_the_recipe_stops_at_a_failed_wheel_install(tmp_path):
    rc, calls = run_recipe(tmp_path, fail_pip=True)
    assert rc != 0 and "gpu_check.py" not in calls


def test_the_recipe_ends_every_process_a_check_left_running(tmp_path):
    rc, calls = run_recipe(tmp_path, fail_pip=False)
    assert rc == 1 and "scripts/gpu_check.py --part 1" in calls  # the check's own exit status
    left = int((tmp_path / "left").read_text())
    deadline = time.monotonic() + 10  # killed at once; gone once the kernel has reaped it
    while alive(left) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(left)
