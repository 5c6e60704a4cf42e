"""Slice sampling for training: plain shuffling (the paper) or class-balanced draws, over
the whole training set or a fixed number of slices per epoch.

Brain slices of the phantom and of BraTS are mostly healthy (about 2:1); a class-balanced
sampler shows the networks as many tumour slices as healthy ones per epoch. A fixed epoch
length (`max_slices_per_epoch`, a cap: a smaller training set still gets one pass per
epoch) decouples the optimiser steps of a run from the size of the training set: more
subjects then mean more variety for the same compute, and validation and the epoch-based
schedules keep their cadence.

Height-balanced draws (`height_bins`) remove a shortcut: tumours sit mostly in mid-brain
slices, so on the phantom a slice's height in the head alone predicts its label with 79 %
accuracy against 66 % for "always healthy" (`python -m tools.slice_confound`). Drawing
tumour and healthy slices equally often within each band of height makes the label
independent of the height in what the networks see, while every band keeps its share.
"""

from __future__ import annotations

import torch


def slice_sampler(dataset, balanced: bool, seed: int = 0, max_slices_per_epoch: int | None = None,
                  height_bins: int = 0):
    """The training sampler: None for the paper's plain shuffling over the whole set (the
    DataLoader shuffles), a `RandomSampler` drawing `max_slices_per_epoch` slices per epoch
    without replacement (a fresh random subset every epoch) when the set is larger, or a
    `WeightedRandomSampler` that draws tumour and healthy slices equally often (with
    replacement), overall or within each of `height_bins` bands of slice height.

    Args:
        dataset: a dataset with a `labels` tensor (0 healthy / 1 tumour per slice) and, for
            `height_bins`, a `heights` tensor in [0, 1], e.g. `scripts.data.slices.SliceDataset`.
        balanced: True = class-balanced draws; False = uniform.
        seed: seed of the sampler's generator (draws are reproducible).
        max_slices_per_epoch: at most this many slices per epoch; None or a number >= the
            dataset's length = len(dataset) (one pass).
        height_bins: 0 = off; N >= 2 = class-balanced within N equal bands of height (implies
            class balance; a band holding one class only keeps its share, unbalanced).
    """
    if max_slices_per_epoch is not None and int(max_slices_per_epoch) < 1:
        raise ValueError(f"max_slices_per_epoch must be >= 1 (got {max_slices_per_epoch}); "
                         "set it to null for one pass over the training slices")
    if height_bins and int(height_bins) < 2:
        raise ValueError(f"height_bins must be 0 (off) or >= 2 (got {height_bins})")
    labels = torch.as_tensor(dataset.labels, dtype=torch.int64)
    num_samples = len(labels) if max_slices_per_epoch is None else min(int(max_slices_per_epoch), len(labels))
    generator = torch.Generator().manual_seed(int(seed))
    if not balanced and not height_bins:
        if num_samples == len(labels):
            return None
        return torch.utils.data.RandomSampler(range(len(labels)), replacement=False, num_samples=num_samples,
                                              generator=generator)
    if height_bins:
        weights = _height_balanced_weights(labels, torch.as_tensor(dataset.heights, dtype=torch.float64),
                                           int(height_bins))
    else:
        counts = torch.bincount(labels, minlength=2).clamp(min=1).to(torch.float64)
        weights = (1.0 / counts)[labels]
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=num_samples, replacement=True,
                                                  generator=generator)


def _height_balanced_weights(labels: torch.Tensor, heights: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-slice weights: each band keeps its share of draws, split equally between its classes."""
    band = (heights.clamp(0.0, 1.0) * bins).long().clamp(max=bins - 1)
    cell = band * 2 + labels
    cell_count = torch.bincount(cell, minlength=2 * bins).to(torch.float64)
    band_count = torch.bincount(band, minlength=bins).to(torch.float64)
    classes_in_band = (cell_count.view(bins, 2) > 0).sum(1).to(torch.float64)
    # P(band) = its share of slices; within it, each present class gets an equal part
    return band_count[band] / classes_in_band[band] / cell_count[cell]
