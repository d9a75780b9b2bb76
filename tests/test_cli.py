"""Every script ends as train.py does (issue 23): 0 for a result, 2 and one line for bad input, 1 for
an internal error, and a traceback only with --debug."""

import errno
import subprocess
import sys

import pytest
from conftest import ROOT

from idmap import IdmapError
from idmap.cli import run_command


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "internal error:"))]
    assert len(lines) == 1 and text in lines[0], proc.stderr


@pytest.mark.parametrize("name, args, text", [
    ("report", ["{missing}"], "not a directory"),
    ("plot_curves", ["{missing}"], "not a directory"),
    ("evaluate", ["{missing}", "--device", "cpu"], "no checkpoint at"),
    ("landscape", ["{missing}", "--device", "cpu"], "no checkpoint at"),
    ("signals", ["--blocks", "original", "--depths", "100", "-o", "{tmp}/s.png"], "--depths 100: depth 100 is not"),
    ("signals", ["--runs", "{missing}", "-o", "{tmp}/s.png"], "no checkpoint at"),
    ("results", ["{missing}"], "not a directory"),
    ("results", ["{tmp}", "--collect", "{missing}"], "not a directory"),
])
def test_each_script_says_what_is_wrong_with_its_input_in_one_line_and_exits_2(tmp_path, name, args, text):
    args = [a.format(missing=tmp_path / "nowhere", tmp=tmp_path) for a in args]
    _one_line(_script(name, *args), 2, text)


def test_bench_without_cuda_is_bad_input():
    if __import__("torch").cuda.is_available():
        pytest.skip("CUDA is here")
    _one_line(_script("bench", "--device", "cuda"), 2, "CUDA is not available")


def test_an_output_place_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, short_run):
    run_dir = short_run.fresh()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _one_line(_script("plot_curves", str(run_dir), "-o", str(blocker / "curves.png")), 2, str(blocker))
    _one_line(_script("evaluate", str(run_dir), "--device", "cpu", "-o", str(blocker / "out")), 2, str(blocker))
    assert _script("plot_curves", str(run_dir), "-o", str(tmp_path / "curves.png")).returncode == 0


def test_the_exit_codes_of_every_script_come_from_one_place():
    def bad_input(argv):
        raise IdmapError("dataset.root=/x: no such folder")

    def bad_place(argv):
        raise OSError(errno.ENAMETOOLONG, "File name too long", "/x" * 3000)

    def bug(argv):
        raise KeyError("a bug\nwith a long story")

    assert run_command(lambda argv: 0, []) == 0
    assert run_command(bad_input, []) == 2
    assert run_command(bad_place, []) == 2
    assert run_command(bug, []) == 1
    assert run_command(bug, ["--debug"]) == 1 and run_command(bad_input, ["--debug"]) == 2  # the same codes
    assert run_command(lambda argv: len(argv), ["a", "--debug", "b"]) == 2  # --debug is not passed on


def test_an_internal_error_is_one_line_with_exit_1_and_debug_shows_the_traceback(tmp_path):
    # A checkpoint whose model cannot be built is the program's fault here, not the user's: the
    # evaluate command's internals are patched to fail like a bug would.
    code = ("import sys; from idmap import cli; from idmap.train import evaluation; "
            "evaluation.evaluate_checkpoint = lambda *a, **k: 1 / 0; "
            "sys.exit(cli.evaluate(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    _one_line(proc, 1, "internal error: ZeroDivisionError: division by zero (--debug shows the traceback)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), "--debug"], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "internal error: ZeroDivisionError: division by zero"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), "--no-such-flag", "--debug"],
                          capture_output=True, text=True)  # bad input keeps its exit code with the traceback shown
    assert proc.returncode == 2 and "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith(
        "error: ")
