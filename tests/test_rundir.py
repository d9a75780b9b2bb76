"""The run directory's TensorBoard record: the paper's figures as a custom-scalars layout."""

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2

from idmap.train.runlog import LAYOUT, SCALARS
from idmap.train.trainer import train


def _layout(run_dir) -> layout_pb2.Layout:
    (events,) = run_dir.glob("events.out.tfevents.*")
    for event in EventFileLoader(str(events)).Load():
        for value in event.summary.value:
            if value.tag == "custom_scalars__config__":
                return layout_pb2.Layout.FromString(value.tensor.string_val[0])
    raise AssertionError("no custom-scalars layout in the events file")


def test_each_run_charts_train_and_test_error_together_as_figures_1_and_6(tmp_path, tiny_cfg):
    train(tiny_cfg, tmp_path)
    charts = {c.title: list(c.multiline.tag) for cat in _layout(tmp_path).category for c in cat.chart}
    assert charts["error (%): train and test"] == ["error/train", "error/test"]
    assert charts["loss: train and test"] == ["loss/train", "loss/test"]
    logged = {tag for tag, _ in SCALARS}
    assert all(tag in logged for chart in LAYOUT.values() for tags in chart.values() for tag in tags)
