"""Warnings (not errors) about inputs that load fine but are unlikely to be what the user meant.

Each warning says what was measured, with the numbers, and what it means for the run:

- a modality that is constant (e.g. all zero): its network learns / sees nothing;
- no brain-like foreground (almost no non-zero voxel) while the seg marks tumour: the
  subject's slices are left out of training;
- no zero background (> `MAX_FOREGROUND` of the volume non-zero): the training data are
  skull-stripped with a zero background (BraTS, the phantom); random noise or a volume that
  is not skull-stripped looks like this and gets unreliable maps;
- an oblique affine: the angle between the voxel axes and the nearest world axes (the
  volume is reoriented along the nearest axes, not resampled);
- at inference, a mask covering more than `MAX_TUMOUR_FRACTION` of the foreground: whole
  tumours in BraTS cover well under that, so such a mask means the input is unlike the
  training data;
- segmentation labels outside the layout's set (BraTS 2018-2021: 0, 1, 2, 4; BraTS 2023+ and
  MSD: 0, 1, 2, 3), counted per value: labels above 0 are taken as tumour, below 0 as background;
- a volume far smaller than a head (a crop or a test file; not blamed on skull-stripping);
- a brain of mostly negative values (MR magnitude images are >= 0: an inverted contrast);
- T1 and T2 files that look swapped: the brain's intensity skewness (T1: bright white matter,
  the bulk of the brain, so skewed low; T2: bright CSF and oedema, skewed high; on the phantom and
  the real development scans T2's exceeds T1's by 0.6-3.2) is higher in the t1 file than in the
  t2 file. Only this pair is compared: T1c (enhancement) and FLAIR (lesions) vary too much.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import torch

logger = logging.getLogger(__name__)

OBLIQUE_DEGREES = 1.0  # below this an affine counts as axis-aligned (scanner rounding)
MIN_FOREGROUND = 0.005  # fraction of the volume; a skull-stripped brain fills ~10-30 %
MAX_FOREGROUND = 0.9
MAX_TUMOUR_FRACTION = 0.3  # of the foreground
MIN_HEAD_MM = 100.0  # a volume whose largest extent is below this cannot hold a head (150-200 mm)
MAX_NEGATIVE_FRACTION = 0.9  # of the non-zero voxels; a z-scored brain has about half below 0
SWAP_SKEW_MARGIN = 0.25  # t1's skewness above t2's by more than this: swapped files


def oblique_degrees(affine) -> float:
    """Largest angle (degrees) between a voxel axis of `affine` and its nearest world axis."""
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    norms[norms == 0] = 1.0
    cosines = np.abs(matrix / norms).max(axis=0).clip(0.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def _emit(messages: list[str]) -> list[str]:
    for message in messages:
        logger.warning(message)
    return messages


def volume_warnings(volumes: Mapping[str, torch.Tensor], files: Mapping[str, str], subject: str,
                    seg: torch.Tensor | None = None, log: bool = True) -> list[str]:
    """Warnings about one subject's raw volumes ({modality: (1, X, Y, Z)}, all on one grid).

    Args:
        volumes: the loaded modalities (before any normalisation).
        files: {modality: path}, for the messages.
        subject: the subject id, for the messages.
        seg: the label map, when there is one.
        log: also log each warning (logger `scripts.data.sanity`).
    """
    messages = []
    foreground = None
    for modality, volume in volumes.items():
        data = torch.as_tensor(volume)
        low, high = float(data.min()), float(data.max())
        if low == high:
            messages.append(f"subject {subject}: {modality} file {files.get(modality)} is constant (every voxel = "
                            f"{low:g}); its network gets no information from it. Check the file (a failed "
                            f"conversion or an empty export?).")
        nonzero = (data != 0).reshape(data.shape[-3:]) if data.ndim >= 3 else data != 0
        foreground = nonzero if foreground is None else foreground | nonzero
    if foreground is not None:
        fraction = float(foreground.float().mean())
        tumour = int((torch.as_tensor(seg) > 0).sum()) if seg is not None else 0
        if fraction < MIN_FOREGROUND:
            dropped = f"; the seg marks {tumour} tumour voxels, but these slices are left out of training" if tumour else ""
            messages.append(f"subject {subject}: no brain-like foreground: {100 * fraction:.2f} % of the voxels are "
                            f"non-zero (a skull-stripped brain fills about 10-30 %){dropped}. Check the images.")
        elif fraction > MAX_FOREGROUND:
            guess = "noise, or not skull-stripped?"
            first = next(iter(volumes))
            if max(_extents_mm(volumes[first])) < MIN_HEAD_MM:  # too small to be a head: do not blame skull-stripping
                shape = " x ".join(str(int(n)) for n in volumes[first].shape[-3:])
                extent = " x ".join(f"{e:.0f}" for e in _extents_mm(volumes[first]))
                guess = (f"a crop or a test file? {first} file {files.get(first)} is {shape} voxels ({extent} mm), far "
                         f"smaller than a head (150-200 mm)")
            messages.append(f"subject {subject}: {100 * fraction:.1f} % of the voxels are non-zero (no zero "
                            f"background); the model was trained on skull-stripped volumes with a zero background, "
                            f"so its maps of this input ({guess}) are unreliable.")
    messages += _contrast_messages(volumes, files, subject)
    first = next(iter(volumes), None)
    affine = getattr(volumes[first], "affine", None) if first is not None else None
    if affine is not None:
        angle = oblique_degrees(affine)
        if angle > OBLIQUE_DEGREES:
            messages.append(f"subject {subject}: {first} file {files.get(first)} has an oblique affine (voxel axes "
                            f"{angle:.1f} degrees from the nearest world axes); it is used along the nearest axes "
                            f"without resampling (outputs keep its own grid and affine).")
    return _emit(messages) if log else messages


def _extents_mm(volume) -> list[float]:
    """Physical extent (mm) of a (1, X, Y, Z) volume along its voxel axes (1 mm voxels without an affine)."""
    affine = getattr(volume, "affine", None)
    sizes = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0) if affine is not None else np.ones(3)
    return [float(n * s) for n, s in zip(volume.shape[-3:], sizes)]


def _brain_skewness(volume) -> float | None:
    """Skewness of the non-zero voxels between their 1st and 99th percentiles (None: too few voxels)."""
    data = torch.as_tensor(volume).as_subclass(torch.Tensor).double().reshape(-1)
    data = data[data != 0]
    if data.numel() < 100:
        return None
    low, high = torch.quantile(data[:: max(1, data.numel() // 100000)], torch.tensor([0.01, 0.99], dtype=data.dtype))
    data = data[(data >= low) & (data <= high)]
    spread = data.std()
    if data.numel() < 100 or spread == 0:
        return None
    return float((((data - data.mean()) / spread) ** 3).mean())


def _contrast_messages(volumes: Mapping[str, torch.Tensor], files: Mapping[str, str], subject: str) -> list[str]:
    """An inverted brain (mostly negative) per modality; swapped t1 / t2 files (module docstring)."""
    messages = []
    for modality, volume in volumes.items():
        data = torch.as_tensor(volume).as_subclass(torch.Tensor)
        nonzero = data[data != 0]
        negative = float((nonzero < 0).float().mean()) if nonzero.numel() else 0.0
        if negative > MAX_NEGATIVE_FRACTION:
            messages.append(f"subject {subject}: {modality} file {files.get(modality)} has {100 * negative:.1f} % "
                            f"negative values in its brain (MR magnitude images are >= 0): an inverted contrast or a "
                            f"difference image? Its network was trained on positive images; check the file.")
    if "t1" in volumes and "t2" in volumes:
        t1, t2 = _brain_skewness(volumes["t1"]), _brain_skewness(volumes["t2"])
        if t1 is not None and t2 is not None and t1 - t2 > SWAP_SKEW_MARGIN:
            messages.append(f"subject {subject}: the t1 file {files.get('t1')} looks like a T2 and the t2 file "
                            f"{files.get('t2')} like a T1 (brain intensity skewness t1 {t1:+.2f}, t2 {t2:+.2f}; T1 "
                            f"scans, with their bright white matter, are skewed lower than T2 scans): are the t1 and "
                            f"t2 files swapped? Each network reads the contrast it was trained on; check the names.")
    return messages


# Labels a segmentation of each layout holds (whole tumour = label > 0 in all of them).
SEG_LABELS = {"brats2018-2021": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3), "msd": (0, 1, 2, 3)}
SEG_LAYOUT_NAMES = {"brats2018-2021": "BraTS 2018-2021", "brats2023": "BraTS 2023+", "msd": "MSD Task01"}


def label_warnings(seg: torch.Tensor, file: str, subject: str, layout: str | None = None, log: bool = True) -> list[str]:
    """A warning counting the voxels of each label outside the layout's set (`SEG_LABELS`; any
    other layout: 0-4), since every non-zero label is taken as tumour.

    Args:
        seg: the label map as loaded.
        file: the seg file, for the message.
        subject: the subject id, for the message.
        layout: the record's layout (brats2018-2021, brats2023, msd, datalist, ...).
        log: also log the warning.
    """
    allowed = SEG_LABELS.get(str(layout), (0, 1, 2, 3, 4))
    values, counts = torch.unique(torch.as_tensor(seg), return_counts=True)
    unexpected = [(float(v), int(n)) for v, n in zip(values.tolist(), counts.tolist()) if float(v) not in allowed]
    if not unexpected:
        return []
    listed = ", ".join(f"{v:g} ({n} voxel{'s' if n != 1 else ''})" for v, n in unexpected[:8])
    more = f" and {len(unexpected) - 8} more values" if len(unexpected) > 8 else ""
    name = SEG_LAYOUT_NAMES.get(str(layout), "BraTS or MSD")
    message = (f"subject {subject}: seg file {file} holds labels outside {{{', '.join(map(str, allowed))}}} ({name}): "
               f"{listed}{more}; labels above 0 are taken as tumour, labels below 0 as background. Check the file (another label convention, "
               f"a resampled or corrupt export?).")
    return _emit([message]) if log else [message]


def mask_warning(mask: torch.Tensor, foreground: torch.Tensor, subject: str, log: bool = True,
                 what: str = "mask") -> list[str]:
    """A warning when `mask` covers more than MAX_TUMOUR_FRACTION of `foreground` (same shape), or
    lies mostly outside it (the CAM mask and the stage-2 mask alike).

    Args:
        mask: the binary tumour mask.
        foreground: the voxels with brain (non-zero input).
        subject: the subject id, for the message.
        log: also log the warning.
        what: the mask's name in the message ("mask", "stage-2 mask").
    """
    brain, mask = torch.as_tensor(foreground).bool(), torch.as_tensor(mask).bool()
    inside = int(brain.sum())
    if inside == 0:
        return []
    fraction = int((mask & brain).sum()) / inside
    outside = int((mask & ~brain).sum())
    if fraction <= MAX_TUMOUR_FRACTION and outside <= 0.5 * int(mask.sum()):
        return []
    beyond = f" and {outside} voxels outside it (tumours lie inside the brain)" if outside else ""
    message = (f"subject {subject}: the {what} covers {100 * fraction:.1f} % of the brain (whole tumours cover less "
               f"than {100 * MAX_TUMOUR_FRACTION:.0f} %){beyond}; the input is probably unlike the training data "
               f"(another contrast, intensity scale or noise). Do not trust this mask.")
    return _emit([message]) if log else [message]
