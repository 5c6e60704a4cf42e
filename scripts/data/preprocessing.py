"""The one volume preprocessing: a MONAI Compose of MONAI transforms, defined once.

Every route to a map runs it: the training cache (`scripts.data.volumes.VolumeCache`, hence
training, validation and evaluation) and inference (`configs/inference.yaml`, after
`LoadSubjectd`). It starts from channel-first volumes already in memory (MetaTensors with
their affine), so any loader can feed it:

    Orientationd          RAS, so the axial slices are the last axis
    Spacingd              to the model's training spacing (bilinear images, nearest labels),
                          so a tumour has the same size in pixels at any input resolution
    ClipBrainPercentilesd clip to the brain's 0.5-99.5th percentiles, per channel  ("robust" only)
    NormalizeIntensityd   z-score over brain (non-zero) voxels, per channel  ("volume", "robust")
    ResizeWithPadOrCropd  in-plane to the model's slice size, centred

Each geometric step is invertible, so `Invertd` with this Compose puts maps and masks back
on the input's exact grid (shape and affine).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, NormalizeIntensityd, Orientationd, ResizeWithPadOrCropd, Spacingd

from scripts.data.volumes import NORMALIZATIONS  # noqa: F401  (one list; volumes keeps monai out of its imports)
ROBUST_PERCENTILES = (0.5, 99.5)  # "robust": the brain's intensities are clipped to these before the z-score
FIELD_OF_VIEW_MM = 240.0  # BraTS: 240 x 240 mm in-plane; an adult brain is below ~200 x 180 mm
BRAIN_EXTENT_MM = 200.0  # a slice narrower than this may crop brain
# Explicit world-axis labels (both readers return RAS affines); also silences MONAI 1.6's
# warning that the default of `labels` will change.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def target_pixdim(spacing) -> tuple[float, float, float] | None:
    """(x, y, z) mm from one value or three; None = keep the input grid (no Spacingd).

    A non-positive value keeps the input's spacing on that axis (MONAI's Spacing rule).
    """
    if spacing is None:
        return None
    values = [float(v) for v in (spacing if isinstance(spacing, (list, tuple)) else [spacing])]
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ValueError(f"spacing is one value or three (mm), got {spacing!r}")
    return tuple(values)


def in_plane_size(spacing, field_of_view_mm: float = FIELD_OF_VIEW_MM, multiple: int = 8) -> list[int]:
    """Slice size (H, W) that holds `field_of_view_mm` at `spacing`, rounded up to `multiple`
    (the U-Net's three poolings): 80 x 80 at 3 mm, 240 x 240 at 1 mm."""
    pixdim = target_pixdim(spacing)
    if pixdim is None or min(pixdim[:2]) <= 0:
        raise ValueError(f"in_plane_size needs a positive spacing, got {spacing!r}")
    return [int(math.ceil(field_of_view_mm / s / multiple) * multiple) for s in pixdim[:2]]


def field_of_view_warning(spacing, spatial_size) -> str | None:
    """A warning text when slices of `spatial_size` at `spacing` are narrower than a brain."""
    pixdim = target_pixdim(spacing)
    if pixdim is None or spatial_size is None or min(pixdim[:2]) <= 0:
        return None
    extent = [int(n) * s for n, s in zip(spatial_size, pixdim[:2])]
    if min(extent) >= BRAIN_EXTENT_MM:
        return None
    return (f"spatial_size {list(spatial_size)} at spacing {list(pixdim[:2])} mm covers {extent} mm in-plane, less "
            f"than a brain ({BRAIN_EXTENT_MM:g} mm): brain at the edges is cropped. Fix: spatial_size "
            f"{in_plane_size(spacing)} (240 mm) for this spacing.")


def check_field_of_view(spacing, spatial_size) -> None:
    """Warn (once, before any work) when the configured slices crop brain."""
    message = field_of_view_warning(spacing, spatial_size)
    if message:
        warnings.warn(message, stacklevel=2)


class ClipBrainPercentilesd(MapTransform):
    """Clip each channel to percentiles of its brain (non-zero) voxels; the background stays 0.

    MONAI's `ClipIntensityPercentilesd` takes its percentiles over every voxel, so on a
    skull-stripped scan they depend on how much background the field of view holds; here
    they are the brain's own, so one bright vessel or a residue of skull cannot stretch the
    z-score that follows (scanners differ most in such outliers, not in the brain's bulk).

    Args:
        keys: image keys (channel-first).
        lower: lower percentile (0-100) of the brain's intensities.
        upper: upper percentile (0-100).
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, lower: float = ROBUST_PERCENTILES[0], upper: float = ROBUST_PERCENTILES[1],
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = lower / 100.0, upper / 100.0

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            clipped = image.clone()
            for channel in range(image.shape[0]):
                values = image[channel]
                brain = values != 0
                if int(brain.sum()) < 2:
                    continue  # an empty (missing) modality: nothing to clip
                inside = values[brain].float()
                # torch.quantile refuses > 16M elements: a regular subsample keeps it exact enough
                inside = inside[:: max(1, inside.numel() // 4_000_000)]
                low, high = torch.quantile(inside, torch.tensor([self.lower, self.upper], dtype=inside.dtype))
                clipped[channel] = torch.where(brain, values.clamp(float(low), float(high)), values)
            d[key] = clipped
        return d


def volume_preprocessing(spacing=None, spatial_size: Sequence[int] | None = None, normalization: str = "volume",
                         image_keys: Sequence[str] = ("image",), label_keys: Sequence[str] = ()) -> Compose:
    """The preprocessing Compose (module docstring) over channel-first MetaTensors.

    Args:
        spacing: target voxel spacing in mm (one value or three); None keeps the input grid,
            a non-positive value keeps that axis' input spacing.
        spatial_size: in-plane (H, W) after padding / cropping; None derives it from
            `spacing` (`in_plane_size`: 240 mm), or keeps the size when there is no spacing.
        normalization: "volume" (z-score over non-zero voxels, per channel), "robust" (the
            same after clipping each channel to its brain's `ROBUST_PERCENTILES`) or "none".
        image_keys: keys of images (bilinear resampling, normalised).
        label_keys: keys of label maps (nearest resampling, not normalised).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    image_keys, label_keys = list(image_keys), list(label_keys)
    keys = image_keys + label_keys
    pixdim = target_pixdim(spacing)
    if spatial_size is None and pixdim is not None and min(pixdim[:2]) > 0:
        spatial_size = in_plane_size(pixdim)
    transforms = [Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS)]
    if pixdim is not None:
        # zeros outside the input: the background stays 0, so "brain" (non-zero) keeps its meaning
        transforms.append(Spacingd(keys=keys, pixdim=pixdim, mode=["bilinear"] * len(image_keys) +
                                   ["nearest"] * len(label_keys), padding_mode="zeros"))
    if normalization == "robust":
        transforms.append(ClipBrainPercentilesd(keys=image_keys))
    if normalization in ("volume", "robust"):
        transforms.append(NormalizeIntensityd(keys=image_keys, nonzero=True, channel_wise=True))
    if spatial_size is not None:
        if len(spatial_size) != 2:
            raise ValueError(f"spatial_size is the in-plane (H, W), got {spatial_size}")
        transforms.append(ResizeWithPadOrCropd(keys=keys, spatial_size=(*[int(s) for s in spatial_size], -1)))
    return Compose(transforms)
