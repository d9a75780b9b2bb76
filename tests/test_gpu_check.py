"""idmap-gpu-check (idmap.gpu_check): its rehearsal runs every step on this CPU and leaves a bundle the
device tool brings back whole; a step that hangs costs its row only; the one-call recipe in
docs/benchmarks.md fits the device tool's 2,000 characters."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from idmap import gpu_check
from idmap.gpu_check_runs import bench_rows, read_test_results
from idmap.gpu_check_sizes import REHEARSAL, train_overrides

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"[A-Za-z0-9._-]+")


@pytest.fixture
def one_thread():
    """Tiny nets in this process: a second thread only spins (five times the CPU time on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
def test_the_rehearsal_runs_every_step_on_a_cpu_and_its_bundle_comes_back_whole(tmp_path):
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--rehearse", "--out", str(out),
                           "--long-dir", str(tmp_path / "long")], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_device_tool_takes(out)
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
    report = json.loads((out / "results.json").read_text())
    assert [s["step"] for s in report["steps"]] == [s.name for s in gpu_check.STEPS]
    for step in report["steps"]:
        # A step that broke would read "failed: ..."; a rehearsal has every step ok or skipped.
        assert step["status"].startswith(("ok", "skipped")), step
        assert step["items"], step
    rows = {s["step"]: {i["name"]: i["status"] for i in s["items"]} for s in report["steps"]}
    assert rows["smoke"]["tf32"].startswith("skipped: needs CUDA")
    assert rows["smoke"]["ordering full_preact"] == "ok" and rows["smoke"]["shortcut dropout"] == "ok"
    assert rows["resume"]["deterministic: bit-exact"] == "ok"
    assert rows["packing"]["CUDA MPS"].startswith("skipped: needs CUDA")
    assert all(s == "ok" for s in rows["fidelity"].values()) and all(s == "ok" for s in rows["long"].values())
    # The short table is the last thing printed, and the summary's first table.
    table = proc.stdout.rstrip().splitlines()[-len(gpu_check.STEPS) - 2:]
    assert table[0].startswith("| step | result |")
    assert "\n".join(table) in (out / "summary.md").read_text()
    print(f"rehearsal: {seconds:.0f} s")  # the issue asks for at most 90 s on the 2-core machine


def test_a_step_that_runs_past_its_cap_costs_its_row_and_the_check_goes_on(tmp_path, monkeypatch):
    # The step's child is a stand-in that records one row, then hangs: a real step started with a
    # short cap may finish first on a fast machine (each row skips itself when its time is spent).
    record = tmp_path / "smoke.json"
    hang = f"import json, time; json.dump({{'items': [{{'name': 'a', 'status': 'ok'}}], 'headline': ''}}, " \
           f"open({str(record)!r}, 'w')); time.sleep(120)"
    real = gpu_check.run_logged
    monkeypatch.setattr(gpu_check, "run_logged", lambda cmd, log, deadline: real([sys.executable, "-c", hang],
                                                                                  log, deadline))
    ctx = gpu_check.Context(REHEARSAL, True, tmp_path, time.time() + 3, None, tmp_path / "long")
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


def test_the_step_caps_share_the_budget_left_and_the_last_step_gets_all_of_it():
    end = time.time() + 400
    first = gpu_check.cap(end, 0) - time.time()
    weights = [s.weight for s in gpu_check.STEPS]
    assert first == pytest.approx(400 * weights[0] / sum(weights), abs=1)
    assert gpu_check.cap(end, len(weights) - 1) == pytest.approx(end, abs=1)


def test_bench_rows_are_read_from_what_bench_printed_even_when_it_was_cut_short(tmp_path):
    log = tmp_path / "bench.log"
    log.write_text("| 20 | classic | 1,000 | 128.0 | 50 | 1.00x | 136.5 |\n"
                   "| 20 | fp32 | failed: out of memory |  |  |  |  |\n"
                   "| 20 | classic | 1,000 | 128.0 | 50 | 1.00x | 136.5 |\n"  # the final table repeats rows
                   "Traceback (most recent call last):\n")
    rows = bench_rows(log)
    assert [r["setting"] for r in rows] == ["classic", "fp32"]
    assert rows[0]["images_per_sec"] == 1000.0 and rows[0]["speedup"] == 1.0
    assert rows[1]["images_per_sec"] is None


def test_gpu_test_results_are_read_as_pytest_prints_them_so_a_run_cut_short_names_what_finished(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("tests/test_bench.py::test_a PASSED\n"
                   "tests/test_bench.py::test_b[fp32-0.002] SKIPPED (needs CUDA)\n"
                   "tests/test_train.py::test_c FAILED\n"
                   "tests/test_train.py::test_d ")  # killed at the cap while test_d ran
    assert read_test_results(log) == {"test_bench.py::test_a": "ok", "test_bench.py::test_b[fp32-0.002]": "skipped: needs CUDA",
                                 "test_train.py::test_c": "failed: failed"}


def test_without_cuda_the_check_refuses_in_one_line_unless_rehearsing(capsys):
    if gpu_check.steps.cuda_available():
        pytest.skip("CUDA is here")
    assert gpu_check.main(["--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rehearse" in err[0]


def recipe() -> str:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    block = text.split("<!-- gpu-check recipe -->", 1)[1]
    return block.split("```bash\n", 1)[1].split("\n```", 1)[0]


def test_the_one_call_recipe_fits_the_device_tools_2000_characters_and_runs_the_check():
    command = recipe()
    assert len(command) < 2000
    assert command.startswith("python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl "
                              "&& export PYTHONPATH=/tmp/site:$PWD/src;")
    assert "tar xzf .whl/cifar10-jpeg.tar.gz" in command
    assert re.search(r"scripts/gpu_check\.py --budget 4[0-9]0 .*--out \$OUT", command)
    # Its arguments are the command's own.
    args = command.split("scripts/gpu_check.py", 1)[1].split()
    parsed = gpu_check.parse_args([a.replace("$OUT", "out") for a in args])
    assert parsed.budget == 480 and parsed.data == "/tmp/data/cifar10-jpeg"


def test_the_resume_row_fails_when_a_resumed_run_does_not_continue_exactly(tmp_path, monkeypatch, one_thread):
    """The check can fail: a resume that forgets the data order is caught, not called equal."""
    from idmap import gpu_check_steps
    from idmap.state import BatchStream

    overrides = [*train_overrides(REHEARSAL, 6, 2), *REHEARSAL.resnet20, "trainer.checkpoint_every=2",
                 "trainer.deterministic=true"]
    ctx = gpu_check.Context(REHEARSAL, True, tmp_path, time.time() + 120, None, tmp_path / "long")
    try:
        assert gpu_check_steps.resume_pair(ctx, "exact", overrides)["status"] == "ok"
        monkeypatch.setattr(BatchStream, "load_state_dict", lambda self, state: None)
        row = gpu_check_steps.resume_pair(ctx, "broken", overrides)
    finally:
        torch.use_deterministic_algorithms(False)  # trainer.deterministic=true set it for this process
    assert row["status"].startswith("failed: not bit-exact") and row["stopped_at"] < 6


def test_the_ghost_bn_row_times_the_one_pass_and_the_chunked_version_when_to_chunked_exists(tmp_path, monkeypatch,
                                                                                            one_thread):
    """Each net's row times the one-pass and the chunked ghost BN through the trainer's step."""
    from idmap import gpu_check_steps

    ctx = gpu_check.Context(REHEARSAL, True, tmp_path, time.time() + 120, None, tmp_path / "long")
    gpu_check_steps.ghost_bn(ctx)
    assert [i["status"] for i in ctx.items] == ["ok", "ok"]
    assert all(i["ms_per_iter_one_pass"] > 0 and i["speedup"] > 0 for i in ctx.items)


def test_the_jpeg_copy_is_decoded_once_by_its_own_row(tmp_path, monkeypatch):
    from PIL import Image

    from idmap import gpu_check_steps

    monkeypatch.setenv("IDMAP_CACHE", str(tmp_path / "cache"))
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            (tmp_path / "jpeg" / split / c).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (32, 32), (40 * k, 90, 200)).save(tmp_path / "jpeg" / split / c / f"{k}.jpg")
    ctx = gpu_check.Context(REHEARSAL, True, tmp_path, time.time() + 60, str(tmp_path / "jpeg"), tmp_path / "long")
    gpu_check_steps.jpeg_cache(ctx)
    assert ctx.items[0]["status"] == "ok" and (ctx.items[0]["train"], ctx.items[0]["test"]) == (6, 4)
    assert list((tmp_path / "cache").iterdir())  # the runs after it read the cache
