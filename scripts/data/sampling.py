"""Slice sampling for training: plain shuffling (the paper) or class-balanced draws, over
the whole training set or a fixed number of slices per epoch.

Brain slices of the phantom and of BraTS are mostly healthy (about 2:1); a class-balanced
sampler shows the networks as many tumour slices as healthy ones per epoch. A fixed epoch
length (`samples_per_epoch`) decouples the optimiser steps of a run from the size of the
training set: more subjects then mean more variety for the same compute, and validation
and the epoch-based schedules keep their cadence.
"""

from __future__ import annotations

import torch


def slice_sampler(dataset, balanced: bool, seed: int = 0, samples_per_epoch: int | None = None):
    """The training sampler: None for the paper's plain shuffling over the whole set (the
    DataLoader shuffles), a `RandomSampler` drawing `samples_per_epoch` slices per epoch
    without replacement (a fresh random subset every epoch), or a `WeightedRandomSampler`
    that draws tumour and healthy slices equally often (with replacement).

    Args:
        dataset: a dataset with a `labels` tensor (0 healthy / 1 tumour per slice), e.g.
            `scripts.data.slices.SliceDataset`.
        balanced: True = class-balanced draws; False = uniform.
        seed: seed of the sampler's generator (draws are reproducible).
        samples_per_epoch: slices per epoch; None = len(dataset) (one pass). Larger than
            the dataset is allowed (uniform: whole passes plus a partial one).
    """
    labels = torch.as_tensor(dataset.labels, dtype=torch.int64)
    num_samples = len(labels) if samples_per_epoch is None else int(samples_per_epoch)
    if num_samples < 1:
        raise ValueError(f"samples_per_epoch must be >= 1 (got {samples_per_epoch}); "
                         "set it to null for one pass over the training slices")
    generator = torch.Generator().manual_seed(int(seed))
    if not balanced:
        if samples_per_epoch is None:
            return None
        return torch.utils.data.RandomSampler(range(len(labels)), replacement=False, num_samples=num_samples,
                                              generator=generator)
    counts = torch.bincount(labels, minlength=2).clamp(min=1).to(torch.float64)
    weights = (1.0 / counts)[labels]
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=num_samples, replacement=True,
                                                  generator=generator)
