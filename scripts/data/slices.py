"""Torch datasets over the volume cache: axial slices for training, whole volumes for validation.

`SliceDataset` is map-style over (subject, z) so a sampler can shuffle globally or balance
classes; `VolumeDataset` serves one preprocessed subject per item.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from scripts.common import MODALITIES, canonical_modalities
from scripts.data.subjects import DataError
from scripts.data.volumes import VolumeCache

logger = logging.getLogger(__name__)

SLICE_NORMALIZATIONS = ("none", "zscore")


# --------------------------------------------------------------------------- datasets


def _require_segmentations(records: list[dict]) -> None:
    unlabelled = [r["subject"] for r in records if not r.get("seg")]
    if unlabelled:
        raise DataError(f"subjects {unlabelled[:5]}{' ...' if len(unlabelled) > 5 else ''} have no seg file, so "
                        f"their slices cannot be labelled. Fix: add <id>_seg files, or keep unlabelled subjects "
                        f"out of training/validation (they can go to VolumeDataset for inference).")


class SliceDataset(torch.utils.data.Dataset):
    """Axial slices that hold brain, labelled 1 when they hold any tumour voxel.

    Map-style over (subject, z) so a sampler can shuffle globally or balance classes
    (`.labels`). The index comes from the cache's per-slice metadata, never from images.
    MONAI's GridPatchDataset/PatchIterd is iterable-only (no global shuffle), hence this class.

    Args:
        records: subject records (with segmentations).
        cache: the VolumeCache holding the preprocessed volumes.
        modalities: channels served, in this order.
        brain_threshold: a slice is kept when its brain fraction is above this.
        slice_normalization: "none" or "zscore" (the paper's per-slice z-score).
        require_positive: raise when no kept slice holds tumour.
    """

    def __init__(self, records: Sequence[dict], cache: VolumeCache, modalities: Sequence[str] = MODALITIES,
                 brain_threshold: float = 0.0, slice_normalization: str = "none", require_positive: bool = True):
        if slice_normalization not in SLICE_NORMALIZATIONS:
            raise ValueError(f"slice_normalization must be one of {SLICE_NORMALIZATIONS}, got {slice_normalization!r}")
        self.records = list(records)
        self.cache = cache
        self.modalities = canonical_modalities(modalities)
        self.channel_indices = [MODALITIES.index(m) for m in self.modalities]
        self.brain_threshold = float(brain_threshold)
        self.slice_normalization = slice_normalization
        _require_segmentations(self.records)
        self.index, labels, heights = self._build_index()
        self.labels = torch.tensor(labels, dtype=torch.int64)
        # height of each slice within its volume's brain (0 = lowest brain slice, 1 = highest)
        self.heights = torch.tensor(heights, dtype=torch.float32)
        self._check_not_degenerate(require_positive)

    def _build_index(self) -> tuple[list[tuple[int, int]], list[int], list[float]]:
        index, labels, heights = [], [], []
        for record_index, record in enumerate(self.records):
            meta = self.cache.info(record)
            with_brain = [z for z, fraction in enumerate(meta["brain_fraction"]) if fraction > 0]
            low, high = (with_brain[0], with_brain[-1]) if with_brain else (0, 0)
            kept = 0
            for z, (fraction, tumour) in enumerate(zip(meta["brain_fraction"], meta["tumour_pixels"])):
                if fraction > self.brain_threshold:
                    index.append((record_index, z))
                    labels.append(int(tumour > 0))
                    heights.append((z - low) / (high - low) if high > low else 0.5)
                    kept += 1
            if kept == 0:  # said here too, as the cache may have been built by an earlier run
                logger.warning("subject %s: no slice has a brain fraction above %g (%d tumour voxels in its seg): "
                               "the subject is left out of this dataset. Check its images.", record["subject"],
                               self.brain_threshold, sum(meta["tumour_pixels"]))
        return index, labels, heights

    def _check_not_degenerate(self, require_positive: bool) -> None:
        subjects = [r["subject"] for r in self.records]
        if not self.index:
            raise DataError(f"no slice of subjects {subjects[:5]} has a brain fraction above {self.brain_threshold}. "
                            f"Fix: lower brain_threshold or check that the images are not all zero.")
        if require_positive and int(self.labels.sum()) == 0:
            segs = [r["seg"] for r in self.records[:3]]
            raise DataError(f"no positive (tumour) slice among the {len(self.records)} subjects {subjects[:5]} "
                            f"(seg files e.g. {segs}): every seg is empty on the brain slices, so a classifier "
                            f"cannot learn. Fix: check the seg files, or re-split so this split holds tumour cases.")

    @property
    def positive_fraction(self) -> float:
        return float(self.labels.float().mean()) if len(self.labels) else 0.0

    @property
    def subjects(self) -> list[str]:
        return [self.records[i]["subject"] for i, _ in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict:
        record_index, z = self.index[item]
        record = self.records[record_index]
        image, mask = self.cache.get_slice(record, z)
        image = torch.from_numpy(image[self.channel_indices])
        if self.slice_normalization == "zscore":
            image = slice_zscore(image)
        return {"image": image, "label": self.labels[item].clone(), "mask": torch.from_numpy(mask[None].astype(np.float32)),
                "subject": str(record["subject"]), "z": z}


def slice_zscore(image: torch.Tensor) -> torch.Tensor:
    """The paper's per-slice, per-modality z-score over the whole slice (background included)."""
    from monai.transforms import NormalizeIntensity

    normalised = NormalizeIntensity(nonzero=False, channel_wise=True)(image)
    return torch.as_tensor(normalised, dtype=torch.float32).as_subclass(torch.Tensor)


class VolumeDataset(torch.utils.data.Dataset):
    """One item per subject for per-volume evaluation: image (K,H,W,D), mask (1,H,W,D) float32,
    brain (D,), subject, spacing, has_mask, present (the modalities with a file; a missing one is
    zero-filled in `image` and its network skipped by the map engine, as at inference).

    Args:
        records: subject records.
        cache: the VolumeCache holding the preprocessed volumes.
        modalities: channels served, in this order.
    """

    def __init__(self, records: Sequence[dict], cache: VolumeCache, modalities: Sequence[str] = MODALITIES):
        self.records = list(records)
        self.cache = cache
        self.modalities = canonical_modalities(modalities)
        self.channel_indices = [MODALITIES.index(m) for m in self.modalities]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> dict:
        cached = self.cache.get(self.records[item])
        return {"image": cached["image"][self.channel_indices].contiguous(), "mask": cached["mask"].float(),
                "brain": cached["brain"], "subject": cached["subject"], "spacing": cached["spacing"],
                "has_mask": cached["has_mask"], "present": [m for m in self.modalities if m in cached["present"]]}
