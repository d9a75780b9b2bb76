"""The one evaluation: mean cross-entropy, error and a confusion matrix of a model on a data set, in
chunks, on the data's device. The trainer, the loss landscape and `scripts/evaluate.py` all call
`evaluate`, so a checkpoint's test error is the same number wherever it is computed."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from idmap import IdmapError, cli, one_line_message
from idmap.train.checkpoint import fits, load_checkpoint, model_from_state
from idmap.rundir import checkpoint_path, write_files
from idmap.train.inputs import Inputs
from idmap.train.runtime import autocast, resolve_device, set_tf32


@dataclass
class Evaluation:
    """Sums on the device; reading a property is a host sync."""

    totals: torch.Tensor  # float64 [summed cross-entropy, mistakes]
    confusion: torch.Tensor | None  # int64 [true class, predicted class], when asked for
    count: int

    @property
    def loss(self) -> float:
        return self.totals[0].item() / self.count

    @property
    def error(self) -> float:
        """Test error in %."""
        return 100.0 * self.totals[1].item() / self.count

    def means(self) -> torch.Tensor:
        """[mean loss, error rate in 0..1], still on the device (no sync)."""
        return self.totals / self.count


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
             autocast: contextlib.AbstractContextManager | None = None,
             num_classes: int | None = None) -> Evaluation:
    """Evaluates `model` in eval mode (BN on running statistics) on x, y in chunks of `batch_size`;
    `prepare` turns a chunk of x into the model's input (e.g. uint8 -> normalised float), so the
    whole set need not be converted at once. The model's train/eval mode is restored afterwards.
    `num_classes`: also count a confusion matrix."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=y.device, dtype=torch.float64)
    confusion = (torch.zeros(num_classes * num_classes, device=y.device, dtype=torch.int64)
                 if num_classes else None)
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            with autocast or contextlib.nullcontext():
                out = model(prepare(xb) if prepare else xb).float()
            pred = out.argmax(1)
            totals += torch.stack([F.cross_entropy(out, yb, reduction="sum").double(),
                                   (pred != yb).sum().double()])
            if confusion is not None:
                confusion += torch.bincount(yb * num_classes + pred, minlength=num_classes**2)
    finally:
        model.train(was_training)
    if confusion is not None:
        confusion = confusion.view(num_classes, num_classes)
    return Evaluation(totals, confusion, len(y))


# --------------------------------------------------------------------------------------------------
# `scripts/evaluate.py`: a checkpoint on its own test set or on another one with the same classes.
# --------------------------------------------------------------------------------------------------
RUN_STATS, EVAL_STATS = "run's training set", "evaluation set's training set"


def _schema(*nodes) -> DictConfig:
    """`nodes` merged over DatasetConfig's defaults, so a misspelled key or a wrong type fails."""
    from idmap.config import DatasetConfig

    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), *nodes)


def _group(name: str) -> DictConfig:
    """The data set `dataset=NAME` gives train.py: conf/dataset/NAME.yaml over the schema's
    defaults, composed as train.py composes it."""
    from idmap.config import compose_config

    try:
        return compose_config(f"dataset={name}").dataset
    except Exception as exc:  # an option Hydra does not have: one line with the options
        why = one_line_message(exc).removeprefix("In 'train': ")  # Hydra naming its own file
        raise IdmapError(f"dataset={name}: {why}") from None


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(group names from `dataset=NAME`, `KEY=VALUE` fields from `dataset.KEY=VALUE`)."""
    from idmap.overrides import check_overrides

    check_overrides(overrides)  # dataset=NAME is a name, never a path to some YAML
    groups, fields = [], []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if key == "dataset" and sep:
            groups.append(value)
        elif key.startswith("dataset.") and sep:
            fields.append(f"{key[len('dataset.'):]}={value}")
        else:
            raise IdmapError(f"expected dataset=NAME or dataset.KEY=VALUE, got {arg!r}")
    return groups, fields


def dataset_config(run_dataset: dict, overrides: Sequence[str] = (), data_dir: str | Path | None = None,
                   label: str | None = None) -> DictConfig:
    """The data set to evaluate on, resolved: the run's own unless overridden. `dataset=NAME` means
    what it means to train.py (conf/dataset/NAME.yaml over the defaults, not over the run's data set,
    whose root and label would not fit it) but keeps the run's normalization mode; `data_dir` is an
    image folder; `dataset.KEY=VALUE` then sets single fields, `label` the name reports print."""
    groups, fields = _split_overrides(overrides)
    try:
        cfg = _schema(run_dataset)
        if groups:
            cfg = _schema(_group(groups[-1]), {"normalization": cfg.normalization})
        if data_dir is not None:
            cfg = _schema(cfg, {"name": "imagefolder", "root": str(data_dir), "download": False,
                                "label": f"imagefolder: {data_dir}"})
        cfg = _schema(cfg, OmegaConf.from_dotlist(fields))
        if label:
            cfg.label = label
        # Resolved now (e.g. ${oc.env:IDMAP_DATA,data}) so the JSON records the folder actually read.
        return _schema(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except MissingMandatoryValue as exc:
        raise IdmapError(f"dataset.{exc.key} has no value; set dataset.{exc.key}=...") from None
    except OmegaConfBaseException as exc:
        raise IdmapError(f"bad dataset override: {str(exc).splitlines()[0]}") from None


def _same_data(a: DictConfig, b: DictConfig) -> bool:
    """Whether two data sets hold the same images: equal but for their VIEW keys (config.Role)."""
    from idmap.config import DatasetConfig, Role, with_role

    view = with_role(Role.VIEW, DatasetConfig)

    def strip(c: DictConfig) -> dict:
        return {k: v for k, v in OmegaConf.to_container(c).items() if k not in view}

    return strip(a) == strip(b)


@dataclass
class EvalInputs:
    """The evaluation set and how to normalise it for the model."""

    data: Any  # data.ImageData
    mean: torch.Tensor
    std: torch.Tensor
    normalization: str  # RUN_STATS | EVAL_STATS
    run_classes: list[str] | None  # the training set's class names, when it could be loaded
    note: str | None = None  # why the evaluation set's own statistics were used


def load_inputs(run_ds: DictConfig, eval_ds: DictConfig) -> EvalInputs:
    """Loads the evaluation set and the mean/std the model was trained with: the run's training
    set's (as the trainer computes them). Another evaluation set is normalised with them too, so
    only the images change; when the run's data is not here, with that set's own training statistics."""
    from idmap.train import data as datamod

    mode = eval_ds.normalization
    data = datamod.load_dataset(eval_ds)  # an IdmapError here: nothing to evaluate on
    if _same_data(run_ds, eval_ds):
        return EvalInputs(data, *datamod.normalization(data.train_x, mode), RUN_STATS, data.classes)
    try:
        # Needed for its statistics only: never a download.
        run_data = datamod.load_dataset(_schema(run_ds, {"download": False}))
    except IdmapError as exc:
        mean, std = datamod.normalization(data.train_x, mode)
        return EvalInputs(data, mean, std, EVAL_STATS, None, f"the run's data set is not available ({exc})")
    mean, std = datamod.normalization(run_data.train_x, mode)
    if mean.shape[-1] > 1 and mean.shape[-2:] != data.test_x.shape[-2:]:
        raise IdmapError(f"{data.label} has {tuple(data.test_x.shape[-2:])} images but the run's per-pixel "
                         f"normalization is {tuple(mean.shape[-2:])}")
    return EvalInputs(data, mean, std, RUN_STATS, run_data.classes)


def check_classes(num_classes: int, run_classes: list[str] | None, data) -> None:
    """The evaluation set must have the model's classes, in the same order (labels are indices)."""
    if data.num_classes != num_classes:
        raise IdmapError(f"{data.label} has {data.num_classes} classes but the checkpoint's model has "
                         f"{num_classes}; evaluate on a data set with the run's classes")
    if run_classes is not None and list(run_classes) != list(data.classes):
        i = next(i for i, (a, b) in enumerate(zip(run_classes, data.classes)) if a != b)
        raise IdmapError(f"{data.label}'s classes differ from the run's: class {i} is {data.classes[i]!r} "
                         f"there but {run_classes[i]!r} in the training set")


def per_class_error(confusion: torch.Tensor) -> list[float | None]:
    """Error in % of each true class (a row of the confusion matrix); None for a class without images."""
    rows = confusion.sum(1).tolist()
    right = confusion.diagonal().tolist()
    return [100.0 * (n - r) / n if n else None for n, r in zip(rows, right)]


def slug(label: str) -> str:
    """A file-name part from a data label: "CIFAR-10 (JPEG copy)" -> "cifar-10-jpeg-copy"."""
    s = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return s[:80].rstrip("-") or "data"


def _model(state: dict) -> torch.nn.Module:
    try:
        return model_from_state(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise IdmapError(f"cannot rebuild the checkpoint's model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), data_dir: str | Path | None = None,
                        label: str | None = None, device: str = "auto", batch_size: int | None = None) -> dict:
    """A run directory's or checkpoint file's model on the test split of its data set (or of the one
    `overrides`/`data_dir` name), evaluated as the trainer evaluates it: same `evaluate`, same input
    normalisation, the run's precision and memory format. Returns what `write_evaluation` records."""
    ckpt = checkpoint_path(Path(path))
    dev = resolve_device(device)
    state = load_checkpoint(ckpt)  # IdmapError when missing or unreadable
    run_cfg, k = state["config"], state["num_classes"]
    with fits(ckpt):  # the run's own settings, as the checkpoint recorded them
        run_ds = _schema(run_cfg["dataset"])
        trainer = OmegaConf.create(run_cfg["trainer"])
        precision, batch_size = str(trainer.precision), batch_size or int(trainer.eval_batch_size)
        channels_last = bool(trainer.channels_last)
    eval_ds = dataset_config(run_cfg["dataset"], overrides, data_dir, label)
    inputs = load_inputs(run_ds, eval_ds)
    data = inputs.data
    check_classes(k, inputs.run_classes, data)
    # The run's matmul/convolution precision, as runtime.configure sets it; not its deterministic
    # mode, which would refuse the confusion matrix's bincount on CUDA.
    set_tf32(precision)
    # The trainer's pipeline: the test split on the device, read as the run read it.
    on_device = Inputs(data, inputs.mean, inputs.std, dev, channels_last, train=False)
    model = _model(state).to(dev).to(memory_format=on_device.format)
    result = evaluate(model, on_device.test_x, on_device.test_y, batch_size, on_device.prepare,
                      autocast(precision, dev), num_classes=k)
    confusion = result.confusion.cpu()
    return {
        "data": data.label,
        "test_error": result.error,
        "test_loss": result.loss,
        "images": result.count,
        "per_class_error": dict(zip(data.classes, per_class_error(confusion))),
        "classes": list(data.classes),
        "confusion": confusion.tolist(),
        "checkpoint": str(ckpt),
        "iteration": state.get("iteration"),
        "normalization": inputs.normalization,
        "normalization_mode": eval_ds.normalization,
        "normalization_note": inputs.note,
        "dataset": OmegaConf.to_container(eval_ds),
        "run_data": run_ds.label or run_ds.name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": precision,
        "batch_size": batch_size,
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def confusion_figure(result: dict):
    """Rows: true class, columns: predicted; colours are row fractions (classes of any size compare),
    numbers are counts (up to 20 classes, beyond that they would not fit)."""
    from matplotlib.figure import Figure

    counts = np.asarray(result["confusion"], dtype=np.int64)
    k = len(counts)
    rows = counts.sum(1, keepdims=True)
    fractions = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    side = min(14.0, max(5.0, 0.5 * k + 2.5))
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    if k <= 30:
        ax.set_xticks(range(k), result["classes"], rotation=90, fontsize=8)
        ax.set_yticks(range(k), result["classes"], fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if fractions[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"{result['data']}: test error {result['test_error']:.2f}%, iteration {result['iteration']}",
                 fontsize=9)
    return fig


def write_evaluation(result: dict, out: str | Path) -> tuple[Path, Path]:
    """evaluation_<slug>.json and confusion_<slug>.png in `out`, written as one set (an earlier
    pair stays whole if either fails); the slug is the data label's, so evaluations on different
    data sets sit side by side."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = slug(result["data"])
    json_path, png_path = out / f"evaluation_{name}.json", out / f"confusion_{name}.png"
    fig = confusion_figure(result)
    text = json.dumps(result, indent=2, default=str).encode()
    write_files({json_path: lambda f: f.write(text),
                 png_path: lambda f: fig.savefig(f, format="png", dpi=120)})
    return json_path, png_path


def format_evaluation(result: dict) -> str:
    """What the script prints: the headline numbers (rounded as the trainer logs them) and the
    error of each class."""
    lines = [
        f"checkpoint  {result['checkpoint']} (iteration {result['iteration']})",
        f"data        {result['data']}: {result['images']} test images",
        f"normalised  with the {result['normalization']} statistics ({result['normalization_mode']})",
        (f"test error  {result['test_error']:.2f}%  loss {result['test_loss']:.4f}  "
         f"({result['device']}, {result['precision']}, batch {result['batch_size']})"),
        "",
    ]
    width = max(len("class"), *(len(c) for c in result["classes"]))
    lines.append(f"{'class':<{width}}  {'images':>6}  {'error %':>7}")
    for c, row in zip(result["classes"], result["confusion"]):
        err = result["per_class_error"][c]
        lines.append(f"{c:<{width}}  {sum(row):>6}  {'-' if err is None else f'{err:.2f}':>7}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`scripts/evaluate.py`: exit 0, or 2 with one line on stderr for bad input."""
    p = cli.ArgumentParser(
        description="Test error, loss, per-class error and confusion matrix of a checkpoint.",
        epilog="Overrides: dataset=NAME (a conf/dataset/ file) and dataset.KEY=VALUE, e.g. "
               "dataset=cifar10_jpeg dataset.root=/data/cifar10-jpeg")
    p.add_argument("path", type=Path, help="run directory or checkpoint file")
    p.add_argument("overrides", nargs="*", metavar="dataset...=VALUE", help="data set to evaluate on")
    p.add_argument("--data", type=Path, help="an image folder (DIR/{train,test}/<class>/*: the test images "
                                             "are evaluated) with the run's classes")
    p.add_argument("--label", help="what to call the evaluation data (also names the output files)")
    p.add_argument("--device", default="auto", type=cli.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=cli.number(int, 1, strict=False),
                   help="default: the run's trainer.eval_batch_size")
    p.add_argument("-o", "--out", type=Path, help="output folder (default: the checkpoint's folder)")
    args = p.parse_intermixed_args(argv)  # overrides may come after options
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # data loading says what takes time
    try:
        missing = [f"{s}/" for s in ("train", "test") if args.data is not None and not (args.data / s).is_dir()]
        if missing:  # named as the flag given, before the data loader names dataset.root
            raise IdmapError(f"--data {args.data}: no {' or '.join(missing)} folder; an image folder is "
                             f"DIR/{{train,test}}/<class>/*")
        result = evaluate_checkpoint(args.path, args.overrides, args.data, args.label, args.device,
                                     args.batch_size)
        paths = write_evaluation(result, args.out or checkpoint_path(args.path).parent)
    except IdmapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result["normalization_note"]:
        print(f"warning: {result['normalization_note']}; normalised with the {EVAL_STATS} statistics "
              f"instead", file=sys.stderr)
    print(format_evaluation(result))
    print()
    for path in paths:
        print(f"wrote {path}")
    return 0
