"""The checkpoint file: run state in a format that cannot run code.

Checkpoints hold tensors and plain containers only and are read with `weights_only=True`, so a
checkpoint from elsewhere cannot run code. What goes in them is TrainState's (state.py).
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path

import torch

from idmap import IdmapError, one_line
from idmap.rundir import atomic_write, checkpoint_path

FORMAT = 1


def save_checkpoint(path: str | Path, state: dict) -> None:
    # Serialised in memory first: torch.save reports a full disk as a RuntimeError of its own,
    # a plain write reports it as ENOSPC, which atomic_write turns into a clear message.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint of a run directory or checkpoint file: its model's weights, its run config
    (model, shortcut, dataset and trainer sections) and its number of classes at least."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise IdmapError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, or objects that are not plain data
        # Never torch's own advice for objects that are not plain data: loading them could run code.
        why = ("it holds objects other than tensors and plain data, which idmap never loads"
               if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc) else _clipped(one_line(exc)))
        raise IdmapError(f"checkpoint {path} is unreadable ({why}). It may be truncated or not written by "
                         f"idmap: {_WHAT_TO_DO}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise IdmapError(f"{path} is not an idmap checkpoint (format {FORMAT})")
    config = state.get("config")
    if not (isinstance(config, dict) and isinstance(state.get("num_classes"), int)
            and all(isinstance(config.get(k), dict) for k in ("model", "shortcut", "dataset", "trainer"))):
        raise IdmapError(_not_fitting(path, "it holds no run config and number of classes"))
    return state


# A run's results are never overwritten (run.launch.claim), so moving a bad checkpoint aside would not
# let its run start again in the same folder: another folder it is.
_WHAT_TO_DO = "point at an intact copy of the run's own checkpoint, or start the run afresh in another run directory"


def _clipped(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _not_fitting(path: str | Path, why: str) -> str:
    return (f"checkpoint {checkpoint_path(path)} does not fit ({why}); it was written for another model or by "
            f"another program: {_WHAT_TO_DO}")


@contextlib.contextmanager
def fits(path: str | Path):
    """Restoring from the checkpoint at `path`, or reading its config: one that lacks a key, holds
    weights of another shape or values of another type becomes an IdmapError naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        raise IdmapError(_not_fitting(path, one_line(exc)[:300])) from exc


def model_from_state(state: dict, path: str | Path = "the checkpoint") -> torch.nn.Module:
    """A checkpoint's model, rebuilt from its config and loaded with its weights (on the CPU)."""
    from idmap.models.resnet import build_resnet, model_kwargs

    with fits(path):
        model = build_resnet(**model_kwargs(state["config"], state["num_classes"]))
        model.load_state_dict(state["model"])
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """The trained model of a run directory or checkpoint file, and the run's config as a dict."""
    state = load_checkpoint(path, map_location)
    return model_from_state(state, path), state["config"]
