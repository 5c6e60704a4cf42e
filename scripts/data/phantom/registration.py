"""Residual misregistration between a phantom subject's modalities (a named phantom option).

Real multi-modal MRI is co-registered by software, so its modalities agree to within about a
millimetre and a degree, not exactly; the phantom renders every modality from one anatomy,
so by default they agree to the voxel. Cross-modality terms (L_KD, L_CMER) assume that
pixels correspond across modalities: `misregistration_mm` / `misregistration_deg` move each
acquired modality by its own small random rigid transform (about the volume centre) so that
this assumption can be tested instead of granted. The reference segmentation stays in the
anatomy's frame (the truth), as a reference drawn on a consensus of modalities would.

0 / 0 (the default) changes nothing, and the subject's other random streams do not depend
on these settings.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation


def draw_rigid(rng: np.random.Generator, max_mm: float, max_deg: float) -> dict:
    """One rigid misregistration: shift (mm) and rotation angles (degrees, x / y / z), each
    uniform in [-max, max] per axis."""
    if max_mm < 0 or max_deg < 0:
        raise ValueError(f"misregistration must be >= 0 (got {max_mm} mm, {max_deg} degrees)")
    return {"shift_mm": [float(v) for v in rng.uniform(-max_mm, max_mm, 3)],
            "rotation_deg": [float(v) for v in rng.uniform(-max_deg, max_deg, 3)]}


def apply_rigid(volume: np.ndarray, rigid: dict, spacing: float) -> np.ndarray:
    """Resample `volume` (isotropic `spacing` mm) under `rigid`, about the volume centre.

    Linear interpolation, zeros outside the field of view, the input's dtype kept (int16
    volumes are rounded)."""
    rotation = Rotation.from_euler("xyz", rigid["rotation_deg"], degrees=True).as_matrix()
    centre = (np.asarray(volume.shape, float) - 1.0) / 2.0
    shift_vox = np.asarray(rigid["shift_mm"], float) / float(spacing)
    # output voxel o samples input voxel R^T (o - c - t) + c: the content moves by R, then t
    inverse = rotation.T
    offset = centre - inverse @ (centre + shift_vox)
    moved = ndi.affine_transform(volume.astype(np.float32), inverse, offset=offset, order=1, mode="constant", cval=0.0)
    if np.issubdtype(volume.dtype, np.integer):
        info = np.iinfo(volume.dtype)
        return np.clip(np.rint(moved), info.min, info.max).astype(volume.dtype)
    return moved.astype(volume.dtype)


def misregister(volumes: dict, rng: np.random.Generator, spacing: float, max_mm: float = 0.0,
                max_deg: float = 0.0) -> dict:
    """Move every modality in `volumes` by its own rigid draw (in place); return the draws.

    Args:
        volumes: modality name -> 3-D array (same grid).
        rng: the subject's misregistration stream.
        spacing: isotropic voxel size (mm).
        max_mm: largest shift per axis (mm).
        max_deg: largest rotation per axis (degrees).
    """
    if max_mm == 0 and max_deg == 0:
        return {}
    draws = {}
    for name in sorted(volumes):  # a fixed order: the draws do not depend on dict order
        draws[name] = draw_rigid(rng, max_mm, max_deg)
        volumes[name] = apply_rigid(volumes[name], draws[name], spacing)
    return draws
