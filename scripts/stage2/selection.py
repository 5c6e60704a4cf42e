"""Which networks' maps make the pseudo-masks: `pseudo_modalities: auto`.

The max fusion of the paper takes every network's map; a network that has not learnt to tell
tumour slices from healthy ones adds its false positives to every fused mask (docs/stage2.md:
on the default phantom the T1 / T1c / T2 networks classify at 68-77 % and their maps pull the
fused DSC from FLAIR's 53 % down to 24 %). `auto` keeps the networks whose slice accuracy on
the validation split reaches `min_slice_accuracy`. The criterion needs slice-level labels only,
the labels weak supervision already trains on, never a pixel mask.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from scripts.common import MODALITIES
from scripts.data.volumes import VolumeCache
from scripts.workflows.map_engine import MapEngine

logger = logging.getLogger(__name__)


def slice_accuracies(model, volume_cache: VolumeCache, records: Sequence[dict], gate_threshold: float = 0.5,
                     slice_batch_size: int = 32, precision: str | None = None) -> dict[str, float]:
    """Each network's slice classification accuracy on the brain slices of `records`.

    Args:
        model: the MultiModalCAM (stage 1).
        volume_cache: the VolumeCache of the preprocessed volumes.
        records: the subjects scored (the validation split).
        gate_threshold: a slice is classified 'tumour' when its tumour probability exceeds this.
        slice_batch_size: slices per forward.
        precision: autocast of the networks (scripts.precision); None = fp32.
    """
    engine = MapEngine(gate=False, slice_batch_size=slice_batch_size, precision=precision,
                       slice_normalization=model.settings.slice_normalization)
    modalities = list(model.modalities)
    correct = dict.fromkeys(modalities, 0)
    counted = 0
    for record in records:
        volume = volume_cache.get(record)
        image = torch.as_tensor(volume["image"])[[MODALITIES.index(m) for m in modalities]]
        result = engine(model, image, channels=modalities, brain=volume["brain"])
        # slice labels from the cache's per-slice tumour counts: the image-level labels of training
        labels = np.asarray(volume_cache.info(record)["tumour_pixels"]) > 0
        brain = result.brain.numpy().astype(bool)
        counted += int(brain.sum())
        for index, name in enumerate(result.names):
            predicted = result.probabilities[index].numpy() > gate_threshold
            correct[name] += int((predicted == labels)[brain].sum())
    return {m: correct[m] / counted if counted else float("nan") for m in modalities}


def choose_modalities(accuracies: dict[str, float], min_slice_accuracy: float) -> list[str]:
    """The networks at or above `min_slice_accuracy`, in model order; the best one alone when none is.

    Args:
        accuracies: modality -> slice accuracy (0-1), as `slice_accuracies` returns.
        min_slice_accuracy: the accuracy a network needs for its map to join the pseudo-mask.
    """
    scored = {m: a for m, a in accuracies.items() if a == a}  # drop NaN (no slice scored)
    if not scored:
        logger.warning("no validation slice to score the networks on: every network's map makes the pseudo-masks")
        return list(accuracies)
    chosen = [m for m, a in scored.items() if a >= min_slice_accuracy]
    if not chosen:
        best = max(scored, key=scored.get)
        logger.warning("no network reaches a validation slice accuracy of %.2f (%s): the best one, %s, makes the "
                       "pseudo-masks alone", min_slice_accuracy,
                       ", ".join(f"{m} {a:.3f}" for m, a in scored.items()), best)
        chosen = [best]
    return chosen
