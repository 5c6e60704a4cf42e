"""Slice sampling for training: plain shuffling (the paper) or class-balanced draws.

Brain slices of the phantom and of BraTS are mostly healthy (about 2:1); a class-balanced
sampler shows the networks as many tumour slices as healthy ones per epoch.
"""

from __future__ import annotations

import torch


def slice_sampler(dataset, balanced: bool, seed: int = 0):
    """A `WeightedRandomSampler` that draws tumour and healthy slices equally often (with
    replacement, one epoch = len(dataset) draws), or None for plain shuffling.

    Args:
        dataset: a dataset with a `labels` tensor (0 healthy / 1 tumour per slice), e.g.
            `scripts.data.slices.SliceDataset`.
        balanced: False = None (the DataLoader shuffles); True = class-balanced sampler.
        seed: seed of the sampler's generator (draws are reproducible).
    """
    if not balanced:
        return None
    labels = torch.as_tensor(dataset.labels, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=2).clamp(min=1).to(torch.float64)
    weights = (1.0 / counts)[labels]
    generator = torch.Generator().manual_seed(int(seed))
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(labels), replacement=True,
                                                  generator=generator)
