"""Rank 0's log of a run as it trains: metrics.jsonl (rewritten atomically at each evaluation), the
TensorBoard events (scalars, the paper's figure layout, hparams) and summary.json at the end;
the files and their writes are idmap.rundir's. `throughput` reads a run's rate back from its metrics."""

from __future__ import annotations

import contextlib
import errno
import math
import threading
from pathlib import Path

from idmap import BAD_PLACE, IdmapError
from idmap.rundir import DiskFull, Summary, write_metrics, write_summary


# TensorBoard: the paper's figures 1 and 6 draw train error (dashed) and test error (solid) on one
# chart; custom scalars put both tags of a run on one chart (TensorBoard draws every line solid),
# and with several runs loaded each run's pair overlays the others', coloured by run.
SCALARS = [("error/train", "train_error"), ("error/test", "test_error"), ("loss/train", "train_loss"),
           ("loss/test", "test_loss"), ("lr", "lr"), ("throughput/images_per_sec", "images_per_sec")]
LAYOUT = {"paper (figures 1 and 6)": {"error (%): train and test": ["error/train", "error/test"],
                                      "loss: train and test": ["loss/train", "loss/test"]}}


def throughput(metrics: list[dict], after_first: bool = False) -> float | None:
    """A run's images/s over its training time: total images over total seconds, each evaluation's
    rate covering the iterations since `window_from` (a resume's window starts at the resume), or
    in files older than that key since the evaluation before. A plain mean of the rates would weigh
    a slow stretch as little as a fast one. `after_first` leaves out the first window (start-up,
    compile, autotuning). None when no window has a rate."""
    windows = list(zip([{"iteration": 0}, *metrics], metrics))[1 if after_first else 0:]
    iterations = seconds = 0.0
    for before, entry in windows:
        n, rate = entry["iteration"] - entry.get("window_from", before["iteration"]), entry.get("images_per_sec")
        if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0:
            iterations, seconds = iterations + n, seconds + n / rate  # the batch size cancels out
    return iterations / seconds if seconds else None


def _quiet_writer_thread(args, hook=threading.excepthook) -> None:
    # TensorBoard's writer thread keeps a failed write for the writer's next call, which RunLog
    # reports in one line; the thread's own traceback would only repeat it.
    if type(args.thread).__name__ != "_AsyncWriterThread" or not issubclass(args.exc_type, OSError):
        hook(args)


class RunLog:
    """Rank 0's writer of a run's logs: metrics.jsonl and TensorBoard events."""

    def __init__(self, run_dir: Path, hparams: dict, metrics: list[dict], start_it: int):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir)
        threading.excepthook = _quiet_writer_thread
        with self._events():
            # purge_step drops events a killed run logged after its last checkpoint.
            self.writer = SummaryWriter(str(self.dir), purge_step=start_it if start_it else None)
            if not start_it:
                self._write_header(hparams)
        write_metrics(self.dir, metrics)

    @contextlib.contextmanager
    def _events(self):
        """A full or read-only disk under the events file: one line naming it, as for every file."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in BAD_PLACE:
                raise
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise (DiskFull if full else IdmapError)(f"cannot write the TensorBoard events in {self.dir} "
                                                     f"({exc.strerror}){'; free some space' if full else ''}") from exc

    def _write_header(self, hparams: dict) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        for s in hparams_summary(hparams, {"error/test": 0.0, "error/train": 0.0, "hparam/final_test_error": 0.0}):
            self.writer.file_writer.add_summary(s)
        self.writer.add_custom_scalars({
            category: {title: ["Multiline", tags] for title, tags in charts.items()}
            for category, charts in LAYOUT.items()})

    def evaluation(self, metrics: list[dict]) -> None:
        """The latest of `metrics` is new: rewrite the file, log its scalars."""
        write_metrics(self.dir, metrics)
        entry = metrics[-1]
        with self._events():
            for tag, key in SCALARS:
                self.writer.add_scalar(tag, entry[key], entry["iteration"])
            self.writer.flush()

    def close(self, summary: Summary) -> None:
        final = summary["final_test_error"]
        with self._events():
            self.writer.add_scalar("hparam/final_test_error", math.nan if final is None else final,
                                   summary["iterations"])
            self.writer.close()
        write_summary(self.dir, summary)
