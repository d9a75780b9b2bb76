"""The run directory: the one module that knows its file names and how each is written and read.

    <run>/.hydra/config.yaml    the composed config (Hydra writes it)
    <run>/summary.json          status and headline numbers (SUMMARY)
    <run>/metrics.jsonl         one object per evaluation (METRICS)
    <run>/checkpoint.pt         run state (CHECKPOINT; format in checkpoint.py)
    <run>/events.out.tfevents.* TensorBoard
    <run>/.lock                 held (flock) by the one process that runs it (LOCK)

Every file is written atomically (temporary file, fsync, rename), so a kill at any instant leaves
the previous version intact. Readers (report, plots, landscape, signals, evaluation) come here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import subprocess
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypedDict

from idmap import IdmapError
from idmap.paths import REPO

SUMMARY, METRICS, CHECKPOINT = "summary.json", "metrics.jsonl", "checkpoint.pt"
HYDRA_DIR = ".hydra"  # Hydra's record of the composed config and the command-line overrides
HYDRA_CONFIG, HYDRA_OVERRIDES = Path(HYDRA_DIR) / "config.yaml", Path(HYDRA_DIR) / "overrides.yaml"
HYDRA_LOG = "train.log"  # Hydra's log of the job (named after train.py)
MULTIRUN = "multirun.yaml"  # a sweep directory's record of the sweep (Hydra writes it)
_MARKERS = (SUMMARY, METRICS, HYDRA_DIR)  # any of these makes a folder a run directory
LOCK = ".lock"


class Status(str, Enum):
    """A run's status in summary.json. A str, so that it is written and compared as the text it
    was before (json, f-strings, `summary["status"] == Status.COMPLETED` for a status read back)."""

    RUNNING = "running"
    COMPLETED = "completed"  # all its iterations trained
    DIVERGED = "diverged"  # a non-finite loss: the paper's "fail"
    INTERRUPTED = "interrupted"  # stopped by a signal after its checkpoint: resumable
    FAILED = "failed"  # an error ended it (or a job was not collected)
    REFUSED = "refused"  # bad input: it never started (a sweep's progress line only)

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Summary(TypedDict, total=False):
    """summary.json: what every writer may set (train.trainer.new_summary at the start, the loop at
    the end, mark_failed and the sweep's records after a failure). write_summary and update_summary
    refuse any other key, so a reader knows every key there is."""

    status: Status
    final_test_error: Optional[float]  # %, at the last evaluation; None when diverged or unfinished
    best_test_error: Optional[float]
    final_train_error: Optional[float]
    iterations: int  # trained so far
    max_iters: int  # the run's length
    params: int
    wall_time_s: float  # seconds in the training loop: training, evaluations and checkpoints
    images_per_sec: Optional[float]
    peak_memory_mb: Optional[float]
    device: str
    device_name: str  # the CPU's model and threads too (of the last segment)
    # One per process that trained the run (a resumed run has several): {iterations: [from, to],
    # elapsed: the run's wall_time_s at both ends, device_name, torch_version, git_commit, started}.
    # A run checkpointed by an older idmap lacks its earlier segments.
    segments: list
    torch_version: str
    git_commit: Optional[str]
    seed: int
    dataset: dict  # {name, label}
    choices: dict  # Hydra's group choices
    model: dict  # as built: depth, unit, block, downsample
    shortcut: dict
    tags: dict
    config: dict  # the resolved run config
    error: Optional[str]  # why it diverged or failed
    traceback: str  # a failure's, for the developer
    failed_resume: str  # a completed job a resumed sweep could not continue (run.sweep_status)
    ended: str  # ISO time


def _known(fields: dict) -> dict:
    unknown = sorted(set(fields) - set(Summary.__annotations__))
    if unknown:  # a programming error: every key is declared in Summary
        raise ValueError(f"summary.json has no key {unknown[0]!r} (rundir.Summary)")
    return fields

_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
class DiskFull(IdmapError):
    """The disk filled while a file was written; its previous version is intact."""


def write_files(files: dict, mode: str = "wb") -> None:
    """Writes {path: write(f)} as one set: each to a temporary file in its folder (fsync), then all
    renamed over their paths, so a failure (a full disk, a bug in a figure) leaves the earlier set
    whole, and a symlink at a path is replaced, never written through."""
    temps: dict[Path, str] = {}
    path = None
    try:
        for path, write in files.items():
            path = Path(path)
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temps[path], 0o666 & ~_UMASK)  # mkstemp makes files 0600; give them the usual mode
        for path, tmp in list(temps.items()):
            os.replace(tmp, path)
            del temps[path]
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"disk full while writing {path}; the previous version of it is intact: free "
                           "some space") from exc
        raise
    finally:
        for tmp in temps.values():  # none renamed yet, or a rename failed
            Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`."""
    write_files({Path(path): write}, mode)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str), mode="w")


def write_metrics(run_dir: Path, metrics: list[dict]) -> None:
    # Rewritten whole (it is small) so that it is never half-written and, after a resume, holds
    # exactly the evaluations up to the checkpoint followed by the new ones.
    atomic_write(Path(run_dir) / METRICS, lambda f: f.writelines(json.dumps(m) + "\n" for m in metrics), mode="w")


def write_summary(run_dir: Path, summary: Summary) -> None:
    write_json(Path(run_dir) / SUMMARY, _known(summary))


def update_summary(run_dir: Path, **fields) -> None:
    """Sets `fields` (Summary's keys) in summary.json, keeping what an unreadable or absent one cannot give."""
    path = Path(run_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        summary = {}
    write_json(path, {**(summary if isinstance(summary, dict) else {}), **_known(fields)})


def mark_failed(run_dir: Path, **fields) -> None:
    """Marks the run failed in its summary.json, unless it completed: a later mistake (a resume with
    a bad setting, a job collected after it finished) must not turn a finished result into a failure."""
    try:
        if read_summary(run_dir)["status"] == Status.COMPLETED:
            return
    except ValueError:  # no summary yet, or an unreadable one: the failure is what it records
        pass
    update_summary(run_dir, status=Status.FAILED, **fields)


def write_hydra_record(run_dir: Path, config: str, hydra: str, overrides: str) -> None:
    """The run's record of its settings, the YAML texts Hydra would write into .hydra/, as one set
    of atomic writes once the run has started (launch.py): a start or resume refused before that
    leaves the record it found, and a full disk leaves no torn one."""
    texts = {HYDRA_CONFIG: config, Path(HYDRA_DIR) / "hydra.yaml": hydra, HYDRA_OVERRIDES: overrides}
    (Path(run_dir) / HYDRA_DIR).mkdir(exist_ok=True)
    write_files({Path(run_dir) / name: (lambda f, t=text: f.write(t)) for name, text in texts.items()}, "w")


def _run_file(path: Path) -> bool:  # a file of a run directory or of a sweep folder
    return (path.name in (SUMMARY, METRICS, CHECKPOINT, LOCK, HYDRA_LOG, MULTIRUN) or path.parent.name == HYDRA_DIR
            or path.name.startswith("events.out.tfevents."))


def write_output(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """An output the user named (a report's CSV, a figure): atomic, its folder made, and never one
    of a run's own files (`--csv RUN/summary.json` would replace the run's result)."""
    path = Path(path)
    if _run_file(path):
        raise IdmapError(f"{path}: {path.name} is a run's own file name, and an output never replaces "
                         "one; choose another file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write, mode)


def figure_format(path: str | Path) -> str:
    """The format a figure's file name asks for; IdmapError for one matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt, formats = Path(path).suffix[1:].lower(), FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise IdmapError(f"{path}: no figure format {fmt!r}; end the name in one of {', '.join(sorted(formats))}")
    return fmt


def write_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """A matplotlib figure in the format its file name says, written as every output is."""
    fmt = figure_format(path)
    write_output(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))


def git_commit() -> str | None:
    """This checkout's commit, "-dirty" when tracked files differ from it; None outside git and for an
    installed copy (whatever repository its folder happens to sit in is not its source)."""
    if REPO is None:
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# --------------------------------------------------------------------------------------------------
# Owning: one process per run directory
# --------------------------------------------------------------------------------------------------
class RunInUse(IdmapError):
    """Another process holds the run directory's lock: it is running there now."""


_HELD: dict[str, int] = {}  # real path of a run directory -> the open file holding its lock


def lock_run_dir(run_dir: Path) -> bool:
    """Takes the run directory's lock for this process, until unlock_run_dir or the process ends
    (the kernel releases a flock however a process dies, so a killed run never leaves it held).
    False when this process holds it already; RunInUse when another one does."""
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    if key in _HELD:
        return False
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a symlink planted as .lock must not make or open a file elsewhere.
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    except OSError as exc:  # a path through a file, no permission, a name too long, a full disk
        raise IdmapError(f"cannot write the run directory {run_dir} ({exc.strerror}); choose another "
                         f"hydra.run.dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # A file system without flock (Lustre mounted without -o flock, some NFS setups): run
            # unguarded rather than not at all, and say so.
            logging.getLogger("idmap").warning("cannot lock %s (%s): nothing stops a second run into "
                                               "it", run_dir, os.strerror(exc.errno or 0))
            _HELD[key] = fd
            return True
        os.close(fd)
        raise RunInUse(f"{run_dir} is in use by another run; wait for it to end (then continue it "
                       f"with trainer.resume={run_dir}) or choose another run directory") from None
    _HELD[key] = fd
    return True


def holds_lock(run_dir: Path) -> bool:
    """Whether this process holds the run directory's lock (lock_run_dir)."""
    return os.path.realpath(run_dir) in _HELD


def unlock_run_dir(run_dir: Path) -> None:
    fd = _HELD.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def check_contained(folder: Path) -> None:
    """A run writes only inside its folder, yet a file written in place follows a symlink (Hydra's
    train.log, a sweep's multirun.yaml): a link in the folder or its .hydra/ that leads out of it
    is refused before anything is written (IdmapError naming it)."""
    folder = Path(folder)
    root = Path(os.path.realpath(folder))
    for where in (folder, folder / HYDRA_DIR):  # .hydra/ itself, as a link out, is refused first
        for entry in sorted(where.iterdir()) if where.is_dir() else []:
            target = Path(os.path.realpath(entry)) if entry.is_symlink() else root
            if target != root and root not in target.parents:
                raise IdmapError(f"{entry} is a link to {os.readlink(entry)}, outside {folder}; nothing is "
                                 f"written through it: replace the link with the file itself, or remove it")


def has_lock_file(run_dir: Path) -> bool:
    return (Path(run_dir) / LOCK).exists()


def results_held(run_dir: Path) -> str | None:
    """What results `run_dir` holds besides a checkpoint ("summary.json (completed)", "metrics.jsonl
    (3 evaluations)"), or None. A failure record of a run that never evaluated holds none; a
    summary.json that cannot be read may still be someone's, so it counts."""
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY).exists():
        try:
            status = read_summary(run_dir)["status"]
        except ValueError as exc:
            return str(exc)
        if status != Status.FAILED:
            return f"{SUMMARY} ({status})"
    if (run_dir / METRICS).exists():
        try:
            rows = read_metrics(run_dir)
        except (OSError, UnicodeDecodeError) as exc:
            return f"{METRICS}, unreadable ({exc})"
        if rows:
            return f"{METRICS} ({len(rows)} evaluations)"
    return None


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    return any((Path(path) / name).exists() for name in _MARKERS)


def run_dirs(dirs: Iterable[Path]) -> Iterator[Path]:
    """Every run directory under `dirs`: one with a summary.json, or one the trainer or Hydra
    started (metrics.jsonl or .hydra/) that may lack it."""
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise IdmapError(f"not a directory: {d}; give run or sweep directories")
        candidates = {d} | {p.parent for name in _MARKERS for p in d.rglob(name)}
        yield from sorted(c for c in candidates if is_run_dir(c))


def read_summary(run_dir: Path) -> Summary:
    """summary.json as a dict; ValueError with a one-line reason when missing or unreadable."""
    try:
        s = json.loads((Path(run_dir) / SUMMARY).read_text())
    except FileNotFoundError:
        raise ValueError("no summary.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable summary.json ({e})") from None
    if not isinstance(s, dict) or not isinstance(s.get("status"), str):
        raise ValueError("summary.json has no status")
    return s


def read_metrics(run_dir: Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The evaluations of one run; a torn last line (a run still writing) is skipped."""
    rows = []
    # Bytes that are not text (a foreign or damaged file) fail as unreadable lines, not the reader.
    for line in (Path(run_dir) / METRICS).read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if warn:
                warn(f"{run_dir}/{METRICS}: skipped an unreadable line")
    return [r for r in rows if isinstance(r, dict) and "iteration" in r]


def has_metrics(run_dir: Path) -> bool:
    return (Path(run_dir) / METRICS).exists()


def checkpoint_path(path: Path) -> Path:
    """A run directory's checkpoint, or `path` itself when it names a file."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def hydra_config_path(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA_CONFIG


def hydra_overrides_path(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA_OVERRIDES


def _read_yaml(path: Path, kind: str, shape: Callable[[Any], bool]):
    """A YAML record Hydra wrote, or IdmapError naming the file: missing, empty, truncated, foreign."""
    from omegaconf import OmegaConf

    what_to_do = "restore it from a copy, or start afresh in another directory"
    try:
        node = OmegaConf.load(path)
        plain = OmegaConf.to_container(node, resolve=False)
    except FileNotFoundError:
        raise IdmapError(f"{path} is missing; {what_to_do}") from None
    except Exception as exc:  # yaml's and OmegaConf's errors: an unparsable or unreadable file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IdmapError(f"{path} is unreadable ({first}); {what_to_do}") from None
    if not shape(plain):
        raise IdmapError(f"{path} is not {kind} as Hydra writes it (empty or foreign); {what_to_do}")
    return plain


def read_overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides as recorded (values such as ${hydra.job.num} unresolved)."""
    return _read_yaml(hydra_overrides_path(run_dir), "a list of overrides",
                      lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v))


def read_hydra_config(run_dir: Path) -> dict:
    """The run's composed config as recorded, unresolved."""
    return _read_yaml(hydra_config_path(run_dir), "a run config",
                      lambda v: isinstance(v, dict) and isinstance(v.get("trainer"), dict))


def override_key(override: str) -> str:
    """The key an override sets: `+model.widths=[8]` sets model.widths."""
    return override.partition("=")[0].lstrip("+~")


def read_sweep_plan(sweep_dir: Path) -> dict:
    """A sweep directory's multirun.yaml `hydra` node, unresolved: its overrides and job folders."""
    def shape(v) -> bool:
        h = v.get("hydra") if isinstance(v, dict) else None
        return (isinstance(h, dict) and isinstance(h.get("overrides"), dict)
                and all(isinstance(h["overrides"].get(k), list) for k in ("task", "hydra"))
                and isinstance(h.get("sweep"), dict) and "subdir" in h["sweep"])

    return _read_yaml(Path(sweep_dir) / MULTIRUN, "a sweep's record", shape)["hydra"]


def recorded_overrides(run_dir: Path) -> list[str]:
    """read_overrides for the readers of results: [] when the record is missing or torn, so such a
    run still reports (without its settings)."""
    try:
        return read_overrides(run_dir)
    except IdmapError:
        return []


def recorded_config(run_dir: Path):
    """The run's recorded config as an OmegaConf node for the readers of results, None when the
    record is missing or torn."""
    from omegaconf import OmegaConf

    try:  # any mapping will do: a reader takes the keys it finds
        return OmegaConf.create(_read_yaml(hydra_config_path(run_dir), "a run config",
                                           lambda v: isinstance(v, dict)))
    except IdmapError:
        return None
