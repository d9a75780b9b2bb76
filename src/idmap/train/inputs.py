"""The run's inputs, one pipeline for training, evaluation and the loss landscape: a data set's
images on the device as uint8, normalised with a training set's statistics (train/data.py's),
in the run's memory format, and the paper's augmented batches: 4-pixel zero padding, a random
32x32 crop and a horizontal flip, drawn from the data order's generator."""

from __future__ import annotations

import torch

from idmap.train import data as datamod
from idmap.train.runtime import memory_format

PAD = 4  # the paper's 4-pixel zero padding before a random 32x32 crop


class Inputs:
    """A data set on `device` as uint8 and how the model reads it. `mean`, `std`: the statistics of
    the training set the model learnt on (the run's own, also when another set is evaluated);
    `train`: whether the training split goes to the device too (evaluation needs the test split only)."""

    def __init__(self, data: datamod.ImageData, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                 channels_last: bool = False, augment: bool = False, train: bool = True):
        self.info, self.augment = data, augment
        self.format = memory_format(channels_last)
        self.mean, self.std = mean.to(device), std.to(device)
        self.test_x, self.test_y = data.test_x.to(device), data.test_y.to(device)
        self.train_x, self.train_y = (data.train_x.to(device), data.train_y.to(device)) if train else (None, None)

    @classmethod
    def of_run(cls, dataset, device: torch.device, channels_last: bool = False, train: bool = True) -> Inputs:
        """A run's own data (its `dataset` config), normalised with its training set's statistics."""
        data = datamod.load_dataset(dataset)
        mean, std = datamod.normalization(data.train_x, dataset.normalization)
        return cls(data, mean, std, device, channels_last, bool(dataset.augment), train)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the model's normalised float input, un-augmented."""
        return datamod.model_input(x, self.mean, self.std, self.format)

    def batch(self, stream, size: int, local: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's slice of the next global batch of `stream` (train.state.BatchStream). The
        data order and the crop/flip draws come from the stream's CPU generator, the same on every
        device, and reach the device as one small tensor per step (pinned, so the copy does not
        wait for the host)."""
        idx = stream.next(size)
        dy, dx, flip = datamod.draw_crop_flip(size, stream.g, PAD)
        drawn = torch.stack([idx, dy, dx, flip.long()])[:, local]
        device = self.train_y.device
        if device.type == "cuda":
            drawn = drawn.pin_memory()
        idx, dy, dx, flip = drawn.to(device, non_blocking=True)
        x = datamod.normalize(self.train_x[idx], self.mean, self.std)
        if self.augment:
            x = datamod.crop_flip(x, dy, dx, flip, PAD)
        return x.contiguous(memory_format=self.format), self.train_y[idx]

    def training_subset(self, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed random subset of `samples` training images (the same for every call), as the model
        reads them, without augmentation. Random, not the first N: image folders list their images
        class by class."""
        pick = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(0))[:samples]
        return self.prepare(self.train_x[pick.to(self.train_y.device)]), self.train_y[pick.to(self.train_y.device)]
