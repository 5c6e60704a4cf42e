"""Anatomy of a phantom subject: the BraTS grid, the MNI ICBM152 2009a tissue maps that
the nilearn wheel carries, a per-subject affine + elastic warp of them, and age-related
widening of the CSF spaces (glioma patients are mostly 40-70 years old; the template is
an average of young adults whose sulci are blurred away)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from scripts.data.phantom.fields import SmoothRandomField, texture_field

# BraTS volumes: 240 x 240 x 155 voxels of 1 mm.
GRID_SHAPE_1MM = (240, 240, 155)
# Index in the 1 mm BraTS grid of template voxel (0, 0, 0). x and y centre the template
# brain's bounding box; z leaves ~6 mm above the vertex (the template brain fills its
# lowest 155 slices, so the lowest 6 mm of brainstem fall out of view, as in BraTS).
TEMPLATE_OFFSET_VOXELS = np.array([22.0, 3.0, -6.0])
# Anatomy variation

AFFINE_ROTATION_DEG = 4.0
AFFINE_SCALE = (0.94, 1.04)  # isotropic
AFFINE_ANISOTROPY = 0.03  # extra per-axis relative scale
AFFINE_SHIFT_MM = 3.0
ELASTIC_AMPLITUDE_MM = (1.5, 3.5)  # std of each displacement component
ELASTIC_CORRELATION_MM = 28.0
SLAB_SLICES_1MM = 32  # z-slab height at 1 mm when warping (bounds memory)
# Atrophy: a share of grey matter near the brain surface and of the tissue lining the
# ventricles becomes CSF (wider sulci, larger ventricles).
SULCAL_WIDENING = (0.45, 0.85)  # share of superficial GM turned into CSF, per subject
SULCAL_DEPTH_MM = 10.0
SULCAL_TEXTURE_MM = (2.0, 5.0)  # sulci are thin clefts: fine-scale pattern of the widening
SULCAL_SHARPNESS = 5.0  # steep: widening concentrates in clefts that become nearly pure CSF
VENTRICULAR_WIDENING = (0.4, 1.0)  # share of periventricular tissue turned into CSF
VENTRICLE_MIN_DEPTH_MM = 15.0
VENTRICLE_CSF = 0.6
VENTRICULAR_RIM_MM = 6.0
# Skull stripping (BraTS) keeps the subarachnoid CSF around the brain: a shell of CSF
# outside the template's brain mask, per subject.
EXTRA_AXIAL_CSF_MM = (1.5, 4.0)
# Dural venous sinuses (cisterns_and_sinuses): real skull-stripped BraTS scans keep the superior
# sagittal sinus (a bright midline dot at the front and back of T1c slices above the ventricles)
# and the transverse sinuses (curved bands behind the cerebellum). Tubes just outside the brain.
SINUS_SUBJECT_SHARE = 0.8
SINUS_RADIUS_MM = (3.5, 6.0)  # how far outside the brain surface the sinus reaches
SINUS_ENHANCING_SHARE = (0.5, 0.9)  # share of the sinus voxel that is enhancing blood
SAGITTAL_SINUS_HALF_WIDTH_MM = 5.0  # superior sagittal sinus: within this of the mid-sagittal plane,
SAGITTAL_SINUS_FROM_HEIGHT = 0.45  # above this relative height (0 = lowest brain slice, 1 = vertex)
TRANSVERSE_SINUS_HEIGHTS = (0.12, 0.32)  # transverse sinuses: this band of relative height,
TRANSVERSE_SINUS_POSTERIOR = 0.3  # in the posterior share of the brain's front-to-back extent


# Grid geometry


def grid_shape(spacing: float) -> tuple[int, int, int]:
    """ceil(240/s), ceil(240/s), ceil(155/s)."""
    return tuple(int(math.ceil(n / spacing - 1e-9)) for n in GRID_SHAPE_1MM)


def grid_axes_mm(spacing: float, shape: Sequence[int] | None = None) -> list[np.ndarray]:
    """Voxel centres along each axis, in millimetres of the 1 mm grid's index space.

    The field of view always starts at the 1 mm grid's first voxel edge (-0.5 mm).
    """
    shape = grid_shape(spacing) if shape is None else shape
    return [(spacing * np.arange(n) + (spacing - 1.0) / 2.0).astype(np.float32) for n in shape]


def grid_affine(spacing: float) -> np.ndarray:
    """RAS voxel-to-world (MNI mm) affine for the grid at `spacing`."""
    origin_1mm = _template_1mm()["origin"] - TEMPLATE_OFFSET_VOXELS
    affine = np.eye(4)
    affine[:3, :3] *= spacing
    affine[:3, 3] = origin_1mm + (spacing - 1.0) / 2.0
    return affine


# ---------------------------------------------------------------------------------------
# Template anatomy (cached: loading and smoothing the 1 mm maps take seconds)


def _to_uint8(prob: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _template_1mm() -> dict:
    """ICBM152 2009a GM / WM / brain mask / depth (mm) as uint8 arrays, 197x233x189."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32) > 0
    if not (gm.shape == wm.shape == mask.shape == t1_img.shape):
        raise RuntimeError("nilearn's MNI152 maps disagree in shape; reinstall nilearn")
    gm *= mask
    wm *= mask
    # The probability maps are independent estimates; GM + WM must fit in the voxel.
    total = np.maximum(gm + wm, 1.0)
    gm /= total
    wm /= total
    # Depth below the brain surface (mm) only guides where a tumour may sit: a 2 mm
    # estimate is plenty and needs an eighth of the memory of the 1 mm transform.
    coarse_depth = ndi.distance_transform_edt(mask[::2, ::2, ::2], sampling=2.0).astype(np.float32)
    depth = np.repeat(np.repeat(np.repeat(coarse_depth, 2, 0), 2, 1), 2, 2)[tuple(slice(0, n) for n in mask.shape)]
    centre = np.array(ndi.center_of_mass(mask)) + TEMPLATE_OFFSET_VOXELS
    return {
        "gm": _to_uint8(gm), "wm": _to_uint8(wm), "mask": _to_uint8(mask.astype(np.float32)),
        "depth": np.clip(np.rint(depth), 0, 255).astype(np.uint8),
        "origin": np.asarray(t1_img.affine[:3, 3], dtype=float),
        "brain_centre_mm": centre,  # in 1 mm grid index space
    }


@functools.lru_cache(maxsize=2)
def _template_for_spacing(spacing: float) -> dict:
    """Template maps low-pass filtered so that sampling them every `spacing` mm does not
    alias: a Gaussian whose FWHM together with the 1 mm voxel gives `spacing`."""
    template = _template_1mm()
    if spacing <= 1.0:
        return template
    sigma = math.sqrt(spacing**2 - 1.0) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    out = dict(template)
    for name in ("gm", "wm", "mask"):
        out[name] = _to_uint8(ndi.gaussian_filter(template[name].astype(np.float32) / 255.0, sigma))
    return out


def _sample_template(template: dict, names: Sequence[str], coords: np.ndarray) -> dict:
    """Linear interpolation of template maps at template-voxel coordinates (3, ...).

    Points outside the template read 0: this is the pad into the BraTS grid."""
    out = {}
    for name in names:
        values = ndi.map_coordinates(template[name], coords, order=1, mode="constant", cval=0.0,
                                     output=np.float32)
        out[name] = values if name == "depth" else values / np.float32(255.0)  # depth is in mm
    return out



# ---------------------------------------------------------------------------------------
# Per-subject anatomy


@dataclass
class AnatomyWarp:
    """Pull-back from subject grid (mm) to template: q = c + M (p - c) + t + elastic(p)."""

    matrix: np.ndarray
    centre_mm: np.ndarray
    shift_mm: np.ndarray
    elastic: SmoothRandomField

    def grid_template_coords(self, axes_mm: Sequence[np.ndarray], elastic_mm: np.ndarray) -> np.ndarray:
        """Same as `template_coords` for the grid spanned by three 1-D axes; built from
        broadcast 1-D terms, which is much cheaper than a full matrix product."""
        rel = [(a - c).astype(np.float32) for a, c in zip(axes_mm, self.centre_mm)]
        rel = [rel[0][:, None, None], rel[1][None, :, None], rel[2][None, None, :]]
        offset = self.centre_mm + self.shift_mm - TEMPLATE_OFFSET_VOXELS
        out = elastic_mm.copy()
        for k in range(3):
            out[k] += (self.matrix[k, 0] * rel[0] + self.matrix[k, 1] * rel[1]
                       + (self.matrix[k, 2] * rel[2] + np.float32(offset[k])))
        return out

    def template_coords(self, points_mm: np.ndarray, elastic_mm: np.ndarray) -> np.ndarray:
        """(3, ...) grid-mm points and their elastic displacement -> template voxels."""
        rel = points_mm - self.centre_mm.reshape(3, *([1] * (points_mm.ndim - 1)))
        moved = np.tensordot(self.matrix.astype(np.float32), rel, axes=1)
        offset = self.centre_mm + self.shift_mm - TEMPLATE_OFFSET_VOXELS
        return moved + elastic_mm + offset.astype(np.float32).reshape(3, *([1] * (points_mm.ndim - 1)))


def _rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_anatomy_warp(rng: np.random.Generator) -> AnatomyWarp:
    """Small random affine about the brain centre plus a smooth elastic field."""
    angles = np.deg2rad(rng.uniform(-AFFINE_ROTATION_DEG, AFFINE_ROTATION_DEG, 3))
    scales = rng.uniform(*AFFINE_SCALE) * (1.0 + rng.uniform(-AFFINE_ANISOTROPY, AFFINE_ANISOTROPY, 3))
    shift = rng.uniform(-AFFINE_SHIFT_MM, AFFINE_SHIFT_MM, 3)
    elastic = SmoothRandomField(rng, (0.0, 0.0, 0.0), GRID_SHAPE_1MM, ELASTIC_CORRELATION_MM,
                                channels=3, amplitude=rng.uniform(*ELASTIC_AMPLITUDE_MM))
    return AnatomyWarp(matrix=_rotation_matrix(angles) @ np.diag(scales),
                       centre_mm=_template_1mm()["brain_centre_mm"], shift_mm=shift, elastic=elastic)


def warp_anatomy(warp: AnatomyWarp, spacing: float) -> dict[str, np.ndarray]:
    """Deformed GM, WM, brain-mask fractions, depth (mm) and hemisphere coordinate
    "midline_mm" on the subject grid."""
    template = _template_for_spacing(spacing)
    shape = grid_shape(spacing)
    axes = grid_axes_mm(spacing, shape)
    names = ("gm", "wm", "mask", "depth")  # "mask" third: sampled first, on every voxel
    out = {name: np.empty(shape, np.float32) for name in (*names, "midline_mm")}
    # Signed distance (template mm) from the template's mid-sagittal plane, MNI x = 0:
    # tells the hemispheres apart whatever the subject's deformation.
    midline_index = -template["origin"][0]
    slab = max(1, int(SLAB_SLICES_1MM / spacing))
    for z0 in range(0, shape[2], slab):
        slab_axes = (axes[0], axes[1], axes[2][z0:z0 + slab])
        coords = warp.grid_template_coords(slab_axes, warp.elastic.on_grid(slab_axes))
        mask = _sample_template(template, ("mask",), coords)["mask"]
        out["mask"][:, :, z0:z0 + slab] = mask
        out["midline_mm"][:, :, z0:z0 + slab] = coords[0] - midline_index
        # Most of the field of view is background: sample the other maps in the brain only.
        inside = mask > 0
        inside_coords = coords[:, inside]
        for name, values in _sample_template(template, names[:2] + names[3:], inside_coords).items():
            full = np.zeros(mask.shape, np.float32)
            full[inside] = values
            out[name][:, :, z0:z0 + slab] = full
    return out


def csf_fraction(anatomy: dict[str, np.ndarray]) -> np.ndarray:
    """CSF = intracranial fraction not taken by GM or WM."""
    return np.clip(anatomy["mask"] - anatomy["gm"] - anatomy["wm"], 0.0, 1.0)



def ventricle_mask(anatomy: dict) -> np.ndarray:
    """Deep voxels that are mostly CSF: the ventricles (and the deep cisterns)."""
    csf = csf_fraction(anatomy)
    return (csf > VENTRICLE_CSF * np.maximum(anatomy["mask"], 1e-3)) & (anatomy["depth"] > VENTRICLE_MIN_DEPTH_MM)


def add_atrophy(anatomy: dict, rng: np.random.Generator, spacing: float) -> dict:
    """Turn a per-subject share of superficial GM and of periventricular tissue into CSF
    and add the extra-axial CSF shell (in place); returns the amounts drawn."""
    gm, wm, mask, depth = anatomy["gm"], anatomy["wm"], anatomy["mask"], anatomy["depth"]
    brain = mask > 0
    sulcal = rng.uniform(*SULCAL_WIDENING)
    clefts = texture_field(rng, gm.shape, spacing, SULCAL_TEXTURE_MM, (1.0, 0.6))
    # Sigmoid of the texture: patches of strong widening (sulci) next to intact gyri.
    pattern = 1.0 / (1.0 + np.exp(-SULCAL_SHARPNESS * (clefts - 0.5)))
    superficial = np.exp(-np.maximum(depth, 0.0) / SULCAL_DEPTH_MM)
    lost_gm = np.where(brain, gm * np.clip(2.5 * sulcal * pattern * superficial, 0.0, 0.95), 0.0)
    gm -= lost_gm
    ventricular = rng.uniform(*VENTRICULAR_WIDENING)
    ventricles = ventricle_mask(anatomy)
    if ventricles.any():
        distance = ndi.distance_transform_edt(~ventricles, sampling=spacing)
        rim = np.exp(-distance / VENTRICULAR_RIM_MM) * (distance > 0)
        share = np.clip(ventricular * rim, 0.0, 0.9)
        gm *= 1.0 - share
        wm *= 1.0 - share
    shell_mm = rng.uniform(*EXTRA_AXIAL_CSF_MM)
    outside = mask < 0.5
    distance = ndi.distance_transform_edt(outside, sampling=spacing)
    shell = np.where(outside, np.clip((shell_mm - distance) / spacing + 0.5, 0.0, 1.0), 0.0)
    np.maximum(mask, shell.astype(np.float32), out=mask)
    return {"sulcal_widening": float(sulcal), "ventricular_widening": float(ventricular),
            "extra_axial_csf_mm": float(shell_mm)}


def fill_enclosed_cisterns(anatomy: dict) -> np.ndarray:
    """Make the CSF spaces that the template's brain mask leaves out inside the head part of
    it (in place): CSF, with whatever GM / WM the template blurred into them.

    The ICBM152 mask excludes the suprasellar and interpeduncular cisterns: a hole of 4-7 cm3
    in the axial slices around the midbrain, which reads 0 (background) on every modality,
    where a skull-stripped BraTS scan shows the brightest CSF of its T2 (and its T1c the
    circle of Willis). Holes enclosed within an axial slice are filled; open clefts (between
    the temporal poles and the pons) stay outside, as they do after real skull stripping.
    Returns the bool map of the voxels added (also stored as anatomy["cisterns"]).
    """
    brain = anatomy["mask"] >= 0.5
    filled = np.stack([ndi.binary_fill_holes(brain[:, :, k]) for k in range(brain.shape[2])], axis=2)
    added = filled & ~brain
    anatomy["mask"][added] = 1.0
    anatomy["cisterns"] = added
    return added


def _relative_position(brain: np.ndarray, axis: int) -> np.ndarray:
    """0 at the brain's first index along `axis`, 1 at its last (broadcastable to the grid)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero(brain.any(axis=other))[0]
    low, high = (present[0], present[-1]) if present.size else (0, brain.shape[axis] - 1)
    shape = [1, 1, 1]
    shape[axis] = brain.shape[axis]
    return ((np.arange(brain.shape[axis]) - low) / max(high - low, 1)).reshape(shape)


def add_dural_sinuses(anatomy: dict, rng: np.random.Generator, spacing: float) -> dict:
    """Superior sagittal and transverse sinuses just outside the brain (in place): the voxels
    join the intracranial mask (skull stripping keeps them) and anatomy["sinuses"] holds the
    enhancing-blood fraction the confounders render bright on T1c. Returns what was drawn.

    Args:
        anatomy: the subject's maps after `add_atrophy` (its "midline_mm" places the sagittal one),
            before `fill_enclosed_cisterns`.
        rng: a stream of this subject's (its draws come after all others of that stream).
        spacing: voxel size (mm).
    """
    drawn = rng.random() < SINUS_SUBJECT_SHARE
    radius = rng.uniform(*SINUS_RADIUS_MM)
    enhancing = rng.uniform(*SINUS_ENHANCING_SHARE)
    mask = anatomy["mask"]
    brain = mask >= 0.5
    sinuses = np.zeros(mask.shape, np.float32)
    if drawn and brain.any():
        distance = ndi.distance_transform_edt(~brain, sampling=spacing)
        reach = np.where(brain, 0.0, np.clip((radius - distance) / spacing + 0.5, 0.0, 1.0))
        height = _relative_position(brain, 2)
        front_to_back = _relative_position(brain, 1)  # RAS grid: the index grows towards the front
        sagittal = (np.abs(anatomy["midline_mm"]) < SAGITTAL_SINUS_HALF_WIDTH_MM) & (height > SAGITTAL_SINUS_FROM_HEIGHT)
        transverse = ((height > TRANSVERSE_SINUS_HEIGHTS[0]) & (height < TRANSVERSE_SINUS_HEIGHTS[1])
                      & (front_to_back < TRANSVERSE_SINUS_POSTERIOR))
        tube = (reach * (sagittal | transverse)).astype(np.float32)
        np.maximum(mask, np.where(tube > 0, 1.0, 0.0).astype(np.float32), out=mask)
        sinuses = (enhancing * tube).astype(np.float32)
    anatomy["sinuses"] = sinuses
    return {"dural_sinuses": bool(drawn), "sinus_radius_mm": float(radius), "sinus_enhancing_share": float(enhancing)}
