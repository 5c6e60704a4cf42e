"""Synthetic multi-modal brain-tumour phantom: the bundle's embedded default dataset.

Real BraTS cannot be shipped, so each subject is simulated from physics:

1. Anatomy: the MNI ICBM152 2009a tissue-probability maps that the nilearn wheel carries
   (grey matter, white matter, brain mask; CSF = intracranial space minus GM and WM),
   placed in the BraTS field of view (240 x 240 x 155 mm) and resampled straight onto
   the requested grid (so a 2 mm phantom is generated at 2 mm from the start). Each
   subject gets its own small affine and smooth elastic deformation.
2. Tumour: a centre in white/grey matter, a whole-tumour volume drawn log-uniformly in
   5-150 cm3, an irregular core (merged blobs whose distance is perturbed by smooth
   noise), an enhancing rim around a necrotic centre for high grade (HGG) or a
   non-enhancing core for low grade (LGG), and oedema grown along a white-matter-weighted
   geodesic distance. Before painting, the tumour pushes the surrounding tissue outwards
   (volume-conserving radial mass effect that fades with distance).
3. Images: per-tissue T1 / T2 / PD (textbook ranges, per-subject draws) through the spin
   echo equation (T1w, T2w), the inversion-recovery equation with the CSF-nulling TI
   (FLAIR) and a gadolinium-shortened T1 for the enhancing rim (T1c); tissue signals are
   mixed by partial-volume fractions, then a smooth bias field, Rician noise and a
   receiver gain are applied; background is 0 as in skull-stripped BraTS.

Images are stored as int16 (like BraTS), labels as uint8 with BraTS 2019 values
1 = necrotic / non-enhancing core, 2 = oedema, 4 = enhancing tumour. The affine is RAS
with the voxel size on its diagonal; world coordinates are MNI millimetres.

Everything is deterministic given (seed, subject index): subject i is the same whatever
the number of subjects generated.
"""

from __future__ import annotations

import argparse
import functools
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

from scripts.common import atomic_path

# ---------------------------------------------------------------------------------------
# Grid and layout

# BraTS volumes: 240 x 240 x 155 voxels of 1 mm.
GRID_SHAPE_1MM = (240, 240, 155)
# Index in the 1 mm BraTS grid of template voxel (0, 0, 0). x and y centre the template
# brain's bounding box; z leaves ~6 mm above the vertex (the template brain fills its
# lowest 155 slices, so the lowest 6 mm of brainstem fall out of view, as in BraTS).
TEMPLATE_OFFSET_VOXELS = np.array([22.0, 3.0, -6.0])
MODALITY_FILES = ("t1", "t1ce", "t2", "flair")
GRADES = ("HGG", "LGG")
LABEL_NECROTIC_CORE = 1  # necrosis (HGG) or non-enhancing tumour (LGG)
LABEL_OEDEMA = 2
LABEL_ENHANCING = 4
# Entropy tags that keep the per-subject streams apart from the grade stream.
SUBJECT_STREAM = 0
GRADE_STREAM = 1

# ---------------------------------------------------------------------------------------
# Tissue physics (1.5 T textbook ranges, see shared/reference/mr-physics.md)

# T1, T2 in ms: drawn per subject within the range; PD is relative, jittered.
TISSUE_PROPERTIES: dict[str, dict[str, tuple[float, float] | float]] = {
    "wm": {"t1": (600.0, 800.0), "t2": (70.0, 90.0), "pd": 0.70},
    "gm": {"t1": (950.0, 1300.0), "t2": (90.0, 110.0), "pd": 0.80},
    "csf": {"t1": (3500.0, 4500.0), "t2": (1500.0, 2200.0), "pd": 1.00},
    "oedema": {"t1": (1100.0, 1500.0), "t2": (120.0, 250.0), "pd": 0.90},
    "tumour": {"t1": (1000.0, 1400.0), "t2": (100.0, 150.0), "pd": 0.85},  # non-enhancing
    "necrosis": {"t1": (1800.0, 3000.0), "t2": (200.0, 500.0), "pd": 0.95},
    # Enhancing tumour before contrast is solid tumour; its post-contrast T1 is below.
    "enhancing": {"t1": (1000.0, 1400.0), "t2": (90.0, 120.0), "pd": 0.85},
}
PD_JITTER = 0.03  # relative, per subject and tissue
RELAXATION_JITTER = 0.15  # per-tissue spread around the subject's shared quantile
# Gadolinium: 1/T1_post = 1/T1_pre + r1 * C; C is chosen so the rim lands in this range.
GADOLINIUM_R1_PER_MM_MS = 4.0e-3  # 4 /(mM s)
ENHANCING_T1_POST_MS = (300.0, 500.0)

# Sequence parameters (ms). TI nulls CSF of the protocol's nominal T1 at this TR:
# TI = T1 ln(2 / (1 + exp(-TR/T1))) (-> T1 ln 2 for TR >> T1).
FLAIR_PROTOCOL_CSF_T1_MS = 4000.0
FLAIR_TR_MS = 9000.0
FLAIR_TI_MS = FLAIR_PROTOCOL_CSF_T1_MS * math.log(
    2.0 / (1.0 + math.exp(-FLAIR_TR_MS / FLAIR_PROTOCOL_CSF_T1_MS))
)
SEQUENCES: dict[str, dict] = {
    "t1": {"kind": "spin_echo", "tr": 500.0, "te": 15.0, "contrast_agent": False},
    "t1ce": {"kind": "spin_echo", "tr": 500.0, "te": 15.0, "contrast_agent": True},
    "t2": {"kind": "spin_echo", "tr": 4000.0, "te": 100.0, "contrast_agent": False},
    "flair": {"kind": "inversion_recovery", "tr": FLAIR_TR_MS, "te": 120.0,
              "ti": FLAIR_TI_MS, "contrast_agent": False},
}

# Acquisition: bias field = exp(amplitude * smooth unit noise); SNR is relative to WM.
BIAS_LOG_AMPLITUDE = (0.04, 0.12)
BIAS_CORRELATION_MM = 120.0
SNR_WHITE_MATTER = (18.0, 35.0)
RECEIVER_GAIN = (2000.0, 4000.0)  # arbitrary units -> int16 values of a few hundreds+
INT16_MAX = 32767

# ---------------------------------------------------------------------------------------
# Anatomy variation

AFFINE_ROTATION_DEG = 4.0
AFFINE_SCALE = (0.94, 1.04)  # isotropic
AFFINE_ANISOTROPY = 0.03  # extra per-axis relative scale
AFFINE_SHIFT_MM = 3.0
ELASTIC_AMPLITUDE_MM = (1.5, 3.5)  # std of each displacement component
ELASTIC_CORRELATION_MM = 28.0
SLAB_SLICES_1MM = 32  # z-slab height at 1 mm when warping (bounds memory)

# ---------------------------------------------------------------------------------------
# Tumour

WT_VOLUME_CM3 = (5.0, 150.0)  # whole tumour, log-uniform
GRADE_TUMOUR = {
    # core_fraction: core / whole tumour (LGG: less oedema); necrosis: fraction of core;
    # displaced: share of the core volume that pushes tissue (the rest infiltrates it).
    "HGG": {"core_fraction": (0.15, 0.45), "necrosis_fraction": (0.25, 0.6),
            "displaced_fraction": (0.5, 0.9)},
    "LGG": {"core_fraction": (0.55, 0.85), "necrosis_fraction": (0.0, 0.0),
            "displaced_fraction": (0.25, 0.6)},
}
BLOB_COUNT = (1, 4)  # merged ellipsoids, inclusive range
BLOB_OFFSET = 0.5  # blob centres within this fraction of the core radius
BLOB_AXIS_LOG_STD = 0.22
SHAPE_ROUGHNESS = (0.2, 0.4)  # smooth-noise perturbation of the distance, x core radius
SHAPE_CORRELATION = 0.7  # noise correlation length, x core radius
RIM_MIN_MM = 2.0  # thinnest enhancing rim
NECROSIS_ROUGHNESS = 0.3  # irregularity of the necrosis / rim boundary, x core radius
# Oedema travels along white matter: relative speed per tissue for the geodesic distance.
OEDEMA_SPEED = {"wm": 1.0, "gm": 0.1, "csf": 0.02}
OEDEMA_MIN_SPEED = 0.02
OEDEMA_OUTSIDE_BRAIN_SPEED = 1e-3
OEDEMA_GRID_MM = 2.0  # geodesic distance is computed on a grid at least this coarse
OEDEMA_ROUGHNESS = 0.25
OEDEMA_CORRELATION_MM = 12.0
OEDEMA_EDGE_DILUTION = 0.35  # oedema fraction falls to 1 - this at its outer edge
CSF_EXCLUDED_FROM_OEDEMA = 0.5  # voxels mostly CSF are never oedema
LGG_WATER_SHARE = (0.15, 0.2, 0.5)  # mean, spread, maximum share of oedema-like water in LGG
LGG_WATER_CORRELATION_MM = 10.0
PARTIAL_VOLUME_SIGMA_MM = 0.6  # softening of tumour compartments for the images
# Tumour centre: parenchyma, supratentorial, off the midline, deep enough.
CENTRE_MIN_PARENCHYMA = 0.85
CENTRE_MIN_Z_MM = -15.0
CENTRE_MIN_ABS_X_MM = 12.0
CENTRE_DEPTH_MARGIN_MM = 6.0
EXTENT_POLAR_STEPS = 24  # directions at which the core's extent is measured
EXTENT_AZIMUTH_STEPS = 48
BOX_RADIUS_FACTOR = 2.2  # tumour box half-size = factor * WT radius + margin
BOX_MARGIN_MM = 12.0


# ---------------------------------------------------------------------------------------
# Signal equations


def spin_echo_signal(pd, t1, t2, tr, te):
    """S = PD (1 - exp(-TR/T1)) exp(-TE/T2)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery_signal(pd, t1, t2, tr, te, ti):
    """S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2) (magnitude image)."""
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def t1_after_contrast(t1_pre_ms, concentration_mm, r1=GADOLINIUM_R1_PER_MM_MS):
    """1/T1_post = 1/T1_pre + r1 C."""
    return 1.0 / (1.0 / t1_pre_ms + r1 * concentration_mm)


def draw_tissue_properties(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Per-subject T1, T2, PD for every tissue, plus the rim's contrast-agent uptake."""
    # Relaxation times move together between subjects (field strength, temperature and
    # calibration act on all tissues), so one quantile per subject is shared by all
    # tissues and only jittered per tissue: this keeps textbook orderings such as
    # "tumour T1 longer than white matter T1" that independent draws could invert.
    shared = {"t1": rng.random(), "t2": rng.random()}
    props = {}
    for tissue, ranges in TISSUE_PROPERTIES.items():
        props[tissue] = {"pd": float(ranges["pd"] * (1.0 + rng.uniform(-PD_JITTER, PD_JITTER)))}
        for key in ("t1", "t2"):
            low, high = ranges[key]
            quantile = np.clip(shared[key] + rng.uniform(-RELAXATION_JITTER, RELAXATION_JITTER), 0.0, 1.0)
            props[tissue][key] = float(low + quantile * (high - low))
    enhancing = props["enhancing"]
    t1_post_target = rng.uniform(*ENHANCING_T1_POST_MS)
    enhancing["gd_mM"] = float((1.0 / t1_post_target - 1.0 / enhancing["t1"]) / GADOLINIUM_R1_PER_MM_MS)
    enhancing["t1_post"] = float(t1_after_contrast(enhancing["t1"], enhancing["gd_mM"]))
    return props


def tissue_signal(props: dict[str, float], sequence: dict) -> float:
    """Noise-free signal of one tissue for one sequence."""
    t1 = props["t1_post"] if sequence["contrast_agent"] and "t1_post" in props else props["t1"]
    if sequence["kind"] == "spin_echo":
        return float(spin_echo_signal(props["pd"], t1, props["t2"], sequence["tr"], sequence["te"]))
    return float(inversion_recovery_signal(props["pd"], t1, props["t2"], sequence["tr"],
                                           sequence["te"], sequence["ti"]))


def signal_table(properties: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{modality: {tissue: signal}}."""
    return {mod: {tissue: tissue_signal(p, SEQUENCES[mod]) for tissue, p in properties.items()}
            for mod in MODALITY_FILES}


# ---------------------------------------------------------------------------------------
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
# Smooth random fields


class SmoothRandomField:
    """Gaussian random field: i.i.d. normal weights on a lattice of Gaussian bumps.

    The lattice step equals the bump's sigma, which makes the sum of squared bumps
    pi^(3/2) everywhere inside the lattice, so the field has unit variance (times
    `amplitude`). The bumps are separable, so a regular grid is sampled with three small
    matrix products.
    """

    def __init__(self, rng: np.random.Generator, lower_mm, upper_mm, correlation_mm: float,
                 channels: int = 1, amplitude: float = 1.0):
        self.sigma = correlation_mm / 2.0
        self.centres = [
            np.arange(lo - 2 * self.sigma, hi + 2 * self.sigma + 1e-6, self.sigma, dtype=np.float32)
            for lo, hi in zip(lower_mm, upper_mm)
        ]
        shape = (channels, *(len(c) for c in self.centres))
        unit_variance = np.pi ** -0.75
        self.weights = (rng.standard_normal(shape) * (amplitude * unit_variance)).astype(np.float32)

    def on_grid(self, axes_mm: Sequence[np.ndarray]) -> np.ndarray:
        """Field at the grid spanned by three 1-D coordinate arrays -> (channels, x, y, z)."""
        bases = [np.exp(-0.5 * ((np.asarray(a, np.float32)[:, None] - c[None, :]) / self.sigma) ** 2)
                 for a, c in zip(axes_mm, self.centres)]
        return np.einsum("kabc,xa,yb,zc->kxyz", self.weights, *bases, optimize=True).astype(np.float32)


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


# ---------------------------------------------------------------------------------------
# Tumour


def equivalent_radius_mm(volume_mm3: float) -> float:
    return (3.0 * volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)


def draw_tumour_plan(rng: np.random.Generator, grade: str, spacing: float) -> dict:
    """Volumes (in voxels of this grid) and shape parameters of one tumour."""
    ranges = GRADE_TUMOUR[grade]
    voxel_mm3 = spacing**3
    wt_mm3 = 1000.0 * math.exp(rng.uniform(*np.log(WT_VOLUME_CM3)))
    lo, hi = (math.ceil(1000.0 * WT_VOLUME_CM3[0] / voxel_mm3), math.floor(1000.0 * WT_VOLUME_CM3[1] / voxel_mm3))
    wt_voxels = int(np.clip(round(wt_mm3 / voxel_mm3), lo, hi))
    core_voxels = max(1, int(round(wt_voxels * rng.uniform(*ranges["core_fraction"]))))
    return {
        "grade": grade,
        "wt_voxels": wt_voxels,
        "core_voxels": core_voxels,
        "necrosis_fraction": float(rng.uniform(*ranges["necrosis_fraction"])),
        "displaced_fraction": float(rng.uniform(*ranges["displaced_fraction"])),
        "wt_radius_mm": equivalent_radius_mm(wt_voxels * voxel_mm3),
        "core_radius_mm": equivalent_radius_mm(core_voxels * voxel_mm3),
    }


def choose_tumour_centre(rng: np.random.Generator, anatomy: dict, spacing: float,
                         core_radius_mm: float) -> np.ndarray:
    """Voxel index of the tumour centre: deep, supratentorial, off-midline parenchyma,
    drawn with probability rising with the white-matter fraction (gliomas are mostly
    white-matter lesions)."""
    affine = grid_affine(spacing)
    parenchyma = (anatomy["gm"] + anatomy["wm"]) >= CENTRE_MIN_PARENCHYMA * np.maximum(anatomy["mask"], 0.5)
    parenchyma &= anatomy["mask"] > 0.9
    z_world = affine[2, 2] * np.arange(parenchyma.shape[2]) + affine[2, 3]
    parenchyma &= np.abs(anatomy["midline_mm"]) >= CENTRE_MIN_ABS_X_MM
    parenchyma &= (z_world >= CENTRE_MIN_Z_MM)[None, None, :]
    margin = 0.6 * core_radius_mm + CENTRE_DEPTH_MARGIN_MM
    while True:
        candidates = np.flatnonzero(parenchyma & (anatomy["depth"] >= margin))
        if candidates.size or margin < 1.0:
            break
        margin /= 2.0  # small grids: relax the depth demand rather than fail
    if candidates.size == 0:
        raise RuntimeError("no brain parenchyma found for a tumour centre")
    weights = anatomy["wm"].ravel()[candidates].astype(np.float64) ** 2 + 1e-3
    flat = rng.choice(candidates, p=weights / weights.sum())
    return np.array(np.unravel_index(flat, parenchyma.shape))


def tumour_box(centre_vox: np.ndarray, half_size_mm: float, spacing: float, shape) -> tuple[slice, ...]:
    """Cube around the centre, clipped to the grid: all tumour work happens inside it."""
    half = int(math.ceil(half_size_mm / spacing))
    return tuple(slice(max(0, c - half), min(n, c + half + 1)) for c, n in zip(centre_vox, shape))


def core_extent_by_direction(core: np.ndarray, centre_index: np.ndarray, spacing: float) -> np.ndarray:
    """Distance (mm) from the centre to where the core is first left, on a grid of
    directions (polar x azimuth), smoothed over neighbouring directions."""
    polar = (np.arange(EXTENT_POLAR_STEPS) + 0.5) * np.pi / EXTENT_POLAR_STEPS
    azimuth = np.arange(EXTENT_AZIMUTH_STEPS) * 2.0 * np.pi / EXTENT_AZIMUTH_STEPS
    directions = np.stack([np.sin(polar)[:, None] * np.cos(azimuth)[None, :],
                           np.sin(polar)[:, None] * np.sin(azimuth)[None, :],
                           np.cos(polar)[:, None] * np.ones_like(azimuth)[None, :]])
    step_mm = spacing / 2.0
    radii = np.arange(0.0, np.linalg.norm(core.shape) * spacing, step_mm)
    points = (centre_index.reshape(3, 1, 1, 1)
              + directions[..., None] * (radii / spacing).reshape(1, 1, 1, -1))
    inside = ndi.map_coordinates(core.astype(np.uint8), points.reshape(3, -1), order=0, cval=0)
    inside = inside.reshape(points.shape[1:]).astype(bool)
    first_exit = np.argmin(inside, axis=-1)  # index of the first sample outside the core
    extent = first_exit * step_mm
    return ndi.gaussian_filter(extent, 1.0, mode=("nearest", "wrap")).astype(np.float32)


def core_extent_at(points_mm: np.ndarray, centre_mm: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Core extent (mm) in the direction of each point, interpolated between directions."""
    rel = points_mm - centre_mm.reshape((3,) + (1,) * (points_mm.ndim - 1))
    r = np.sqrt(np.sum(rel**2, axis=0))
    polar = np.arccos(np.clip(rel[2] / np.maximum(r, 1e-6), -1.0, 1.0))
    azimuth = np.mod(np.arctan2(rel[1], rel[0]), 2.0 * np.pi)
    index = np.stack([polar / np.pi * EXTENT_POLAR_STEPS - 0.5,
                      azimuth / (2.0 * np.pi) * EXTENT_AZIMUTH_STEPS])
    # Pad azimuth by one column so interpolation wraps around 2 pi.
    padded = np.concatenate([extent, extent[:, :1]], axis=1)
    return ndi.map_coordinates(padded, index, order=1, mode="nearest").astype(np.float32)


def mass_effect_source(points_mm: np.ndarray, centre_mm: np.ndarray, core_extent_mm: np.ndarray,
                       displaced_fraction: float, outer_radius_mm: float) -> np.ndarray:
    """Where each output point takes its tissue from when the core pushes outwards.

    Incompressible tissue around an inserted ball of radius R moves from r0 to r with
    r^3 = r0^3 + R^3, so the pull-back is r0 = (r^3 - R^3)^(1/3). Here R follows the
    core's shape, R = k * extent(direction) with k^3 = `displaced_fraction` (the share of
    the core that displaces tissue; the rest infiltrates it), so the collapsed region
    always lies inside the core. The displacement is kept in full up to the core's edge
    and faded out (cos^2) by `outer_radius_mm`, so far tissue and the skull do not move.
    """
    shape = (3,) + (1,) * (points_mm.ndim - 1)
    rel = points_mm - centre_mm.reshape(shape)
    r = np.sqrt(np.sum(rel**2, axis=0))
    pushed = np.cbrt(displaced_fraction) * core_extent_mm
    r0 = np.cbrt(np.maximum(r**3 - pushed**3, 0.0))
    fade = np.clip((r - core_extent_mm) / np.maximum(outer_radius_mm - core_extent_mm, 1e-6), 0.0, 1.0)
    taper = np.cos(0.5 * np.pi * fade) ** 2
    r_src = r - (r - r0) * taper
    ratio = np.where(r > 0, r_src / np.maximum(r, 1e-6), 0.0)
    return (centre_mm.reshape(shape) + rel * ratio).astype(np.float32)


def apply_mass_effect(anatomy: dict, warp: AnatomyWarp, spacing: float, box: tuple[slice, ...],
                      centre_mm: np.ndarray, core: np.ndarray, plan: dict) -> None:
    """Resample GM / WM inside the box from displaced positions (in place). The brain
    mask is left alone: the skull does not move, so pushed tissue effaces sulci and
    compresses the ventricles instead."""
    axes = [a[s] for a, s in zip(grid_axes_mm(spacing), box)]
    centre_index = np.array([(c - a[0]) / spacing for c, a in zip(centre_mm, axes)])
    extent_by_direction = core_extent_by_direction(core, centre_index, spacing)
    outer = BOX_RADIUS_FACTOR * plan["wt_radius_mm"] + BOX_MARGIN_MM
    # Elastic displacement at the (off-grid) source points is interpolated from the
    # smooth field sampled on the box grid.
    elastic_box = warp.elastic.on_grid(axes)
    template = _template_for_spacing(spacing)
    gm, wm, mask = anatomy["gm"][box], anatomy["wm"][box], anatomy["mask"][box]
    chunk = max(1, int(SLAB_SLICES_1MM / spacing))  # x-slabs bound the memory at 1 mm
    for x0 in range(0, len(axes[0]), chunk):
        part = slice(x0, x0 + chunk)
        points = np.stack(np.meshgrid(axes[0][part], axes[1], axes[2], indexing="ij"))
        extent = core_extent_at(points, centre_mm, extent_by_direction)
        source = mass_effect_source(points, centre_mm, extent, plan["displaced_fraction"], outer)
        box_index = [(source[i] - axes[i][0]) / spacing for i in range(3)]
        elastic = np.stack([ndi.map_coordinates(elastic_box[i], box_index, order=1, mode="nearest")
                            for i in range(3)])
        sampled = _sample_template(template, ("gm", "wm"), warp.template_coords(source, elastic))
        total = np.maximum(sampled["gm"] + sampled["wm"], 1e-6)
        squeeze = np.minimum(1.0, mask[part] / total)  # pushed against the skull: no overflow
        gm[part] = sampled["gm"] * squeeze
        wm[part] = sampled["wm"] * squeeze


def smallest(values: np.ndarray, eligible: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of the `count` eligible voxels with the smallest values."""
    idx = np.flatnonzero(eligible)
    count = min(count, idx.size)
    out = np.zeros(values.shape, bool)
    if count <= 0:
        return out
    chosen = idx[np.argpartition(values.ravel()[idx], count - 1)[:count]]
    out.ravel()[chosen] = True
    return out


def smallest_attached(values: np.ndarray, eligible: np.ndarray, count: int, seed: np.ndarray,
                      attempts: int = 4) -> np.ndarray:
    """Like `smallest`, but only voxels connected to `seed` (oedema islands detached from
    the core by noise are dropped and replaced by the next-smallest attached voxels)."""
    wanted = count
    for _ in range(attempts):
        chosen = smallest(values, eligible, wanted)
        labelled, _ = ndi.label(chosen | seed)
        attached = np.isin(labelled, np.unique(labelled[seed & (labelled > 0)])) & chosen
        deficit = count - int(attached.sum())
        if deficit <= 0 or wanted >= int(eligible.sum()):
            break
        wanted += deficit
    return smallest(np.where(attached, values, np.inf), attached, count)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def core_level_set(rng: np.random.Generator, axes: Sequence[np.ndarray], centre_mm: np.ndarray,
                   core_radius_mm: float) -> np.ndarray:
    """Distance-like function (mm) whose sub-level sets are irregular tumour cores: the
    distance to the nearest of a few random ellipsoid centres, perturbed by smooth noise."""
    points = np.stack(np.meshgrid(*axes, indexing="ij"))
    n_blobs = int(rng.integers(BLOB_COUNT[0], BLOB_COUNT[1] + 1))
    level = np.full(points.shape[1:], np.inf, np.float32)
    for b in range(n_blobs):
        direction = rng.standard_normal(3)
        offset = 0.0 if b == 0 else BLOB_OFFSET * core_radius_mm * rng.uniform(0.3, 1.0)
        blob_centre = centre_mm + offset * direction / np.linalg.norm(direction)
        inverse_axes = np.exp(-rng.normal(0.0, BLOB_AXIS_LOG_STD, 3))
        frame = (_random_rotation(rng).T * inverse_axes[:, None]).astype(np.float32)
        rel = points - blob_centre.astype(np.float32).reshape(3, 1, 1, 1)
        level = np.minimum(level, np.sqrt(np.sum(np.tensordot(frame, rel, axes=1) ** 2, axis=0)))
    lower = [a[0] for a in axes]
    upper = [a[-1] for a in axes]
    noise = SmoothRandomField(rng, lower, upper, SHAPE_CORRELATION * core_radius_mm).on_grid(axes)[0]
    return level + rng.uniform(*SHAPE_ROUGHNESS) * core_radius_mm * noise


def geodesic_distance(source: np.ndarray, cost: np.ndarray, step_mm: float) -> np.ndarray:
    """Shortest-path distance (mm x cost) from `source` over an 18-neighbour voxel graph,
    by repeated min-plus relaxation (Bellman-Ford) until nothing changes."""
    dist = np.where(source, 0.0, np.inf).astype(np.float32)
    edges = []
    for off in np.ndindex(3, 3, 3):
        off = np.array(off) - 1
        if 0 < np.abs(off).sum() <= 2:
            dst = tuple(slice(max(o, 0), n + min(o, 0)) for o, n in zip(off, cost.shape))
            src = tuple(slice(max(-o, 0), n + min(-o, 0)) for o, n in zip(off, cost.shape))
            weight = step_mm * float(np.linalg.norm(off)) * 0.5 * (cost[src] + cost[dst])
            edges.append((dst, src, weight))
    for _ in range(4 * sum(cost.shape)):
        changed = False
        for dst, src, weight in edges:
            candidate = dist[src] + weight
            target = dist[dst]
            better = candidate < target
            if better.any():
                target[better] = candidate[better]
                changed = True
        if not changed:
            break
    return dist


def oedema_distance(core: np.ndarray, gm: np.ndarray, wm: np.ndarray, csf: np.ndarray,
                    mask: np.ndarray, spacing: float) -> np.ndarray:
    """White-matter-weighted geodesic distance from the core, on a grid no finer than
    OEDEMA_GRID_MM (the distance is smooth; the fine grid only costs time)."""
    factor = max(1, int(round(OEDEMA_GRID_MM / spacing)))
    speed = (OEDEMA_SPEED["wm"] * wm + OEDEMA_SPEED["gm"] * gm + OEDEMA_SPEED["csf"] * csf)
    speed = speed / np.maximum(mask, 1e-3)
    speed = np.where(mask > 0.5, np.maximum(speed, OEDEMA_MIN_SPEED), OEDEMA_OUTSIDE_BRAIN_SPEED)
    cost = 1.0 / speed
    if factor > 1:
        cost = ndi.uniform_filter(cost, factor)[::factor, ::factor, ::factor]
        source = ndi.maximum_filter(core, factor)[::factor, ::factor, ::factor]
    else:
        source = core
    dist = geodesic_distance(source, cost.astype(np.float32), spacing * factor)
    if factor > 1:
        fine = np.meshgrid(*[np.arange(n) / factor for n in core.shape], indexing="ij")
        dist = ndi.map_coordinates(np.where(np.isfinite(dist), dist, 1e6).astype(np.float32),
                                   fine, order=1, mode="nearest")
    return np.where(core, 0.0, dist).astype(np.float32)


def same_hemisphere(midline_mm: np.ndarray, centre_index: Sequence[int]) -> np.ndarray:
    """Voxels whose anatomy comes from the centre's cerebral hemisphere (the falx stops
    a solid tumour)."""
    return midline_mm * np.sign(midline_mm[tuple(centre_index)]) > 0


def grow_core(rng: np.random.Generator, allowed: np.ndarray, axes: Sequence[np.ndarray],
              centre_mm: np.ndarray, plan: dict) -> tuple[np.ndarray, np.ndarray]:
    """Tumour core (bool, box grid) of the planned size within `allowed`, and its
    level-set function."""
    level = core_level_set(rng, axes, centre_mm, plan["core_radius_mm"])
    core = smallest(level, allowed, plan["core_voxels"])
    labelled, _ = ndi.label(core)
    seed_label = labelled.ravel()[np.argmin(np.where(core, level, np.inf))]
    return labelled == seed_label, level  # detached noise islands dropped


def paint_tumour(rng: np.random.Generator, anatomy: dict, plan: dict, box: tuple[slice, ...],
                 spacing: float, core: np.ndarray, level: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and tumour-tissue fractions inside the box, around a given core."""
    axes = [a[s] for a, s in zip(grid_axes_mm(spacing), box)]
    gm, wm, mask = anatomy["gm"][box], anatomy["wm"][box], anatomy["mask"][box]
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    brain = mask >= 0.5

    labels = np.zeros(core.shape, np.uint8)
    fractions = {}
    if plan["grade"] == "HGG":
        depth_in_core = ndi.distance_transform_edt(core, sampling=spacing)
        interior = core & (depth_in_core > max(RIM_MIN_MM, spacing))
        lower, upper = [a[0] for a in axes], [a[-1] for a in axes]
        rim_noise = SmoothRandomField(rng, lower, upper, SHAPE_CORRELATION * plan["core_radius_mm"]).on_grid(axes)[0]
        necrosis_level = level + NECROSIS_ROUGHNESS * plan["core_radius_mm"] * rim_noise
        n_necrosis = max(1, int(round(plan["necrosis_fraction"] * core.sum())))
        necrosis = smallest(necrosis_level, interior, n_necrosis)
        enhancing = core & ~necrosis
        labels[necrosis] = LABEL_NECROTIC_CORE
        labels[enhancing] = LABEL_ENHANCING
        fractions["necrosis"], fractions["enhancing"] = necrosis, enhancing
    else:
        labels[core] = LABEL_NECROTIC_CORE
        fractions["tumour"] = core

    distance = oedema_distance(core, gm, wm, csf, mask, spacing)
    lower, upper = [a[0] for a in axes], [a[-1] for a in axes]
    texture = SmoothRandomField(rng, lower, upper, OEDEMA_CORRELATION_MM).on_grid(axes)[0]
    rough_distance = distance * np.maximum(1.0 + OEDEMA_ROUGHNESS * texture, 0.2)
    eligible = brain & ~core & (csf < CSF_EXCLUDED_FROM_OEDEMA * np.maximum(mask, 1e-3)) & (distance < 1e5)
    oedema = smallest_attached(rough_distance, eligible, plan["wt_voxels"] - int(core.sum()), core)
    labels[oedema] = LABEL_OEDEMA

    # Partial volume: soften the hard compartments; oedema thins out towards its edge.
    sigma = PARTIAL_VOLUME_SIGMA_MM / spacing
    soft = {name: ndi.gaussian_filter(m.astype(np.float32), sigma) for name, m in fractions.items()}
    edge = rough_distance[oedema].max() if oedema.any() else 1.0
    dilution = 1.0 - OEDEMA_EDGE_DILUTION * np.clip(rough_distance / max(edge, 1e-6), 0.0, 1.0)
    soft["oedema"] = ndi.gaussian_filter(oedema.astype(np.float32), sigma) * dilution
    if "tumour" in soft:
        # Low-grade tumour is not uniform: a smoothly varying share of its voxels holds
        # extra free water (microcysts, oedematous matrix), modelled as oedema tissue.
        noise = SmoothRandomField(rng, lower, upper, LGG_WATER_CORRELATION_MM).on_grid(axes)[0]
        water = np.clip(LGG_WATER_SHARE[0] + LGG_WATER_SHARE[1] * noise, 0.0, LGG_WATER_SHARE[2])
        soft["oedema"] += soft["tumour"] * water
        soft["tumour"] *= 1.0 - water
    total = sum(soft.values())
    norm = np.maximum(total, 1.0)
    soft = {name: np.where(brain, f / norm, 0.0).astype(np.float32) for name, f in soft.items()}
    return labels, soft


# ---------------------------------------------------------------------------------------
# Image formation


def render_clean(anatomy: dict, tumour_box_slices: tuple[slice, ...], tumour_fractions: dict,
                 signals: dict[str, float]) -> np.ndarray:
    """Noise-free image: partial-volume mix of tissue signals."""
    csf = csf_fraction(anatomy)
    image = (anatomy["gm"] * signals["gm"] + anatomy["wm"] * signals["wm"] + csf * signals["csf"])
    image = image.astype(np.float32)
    tumour_total = sum(tumour_fractions.values())
    local = image[tumour_box_slices] * (1.0 - tumour_total)
    for tissue, fraction in tumour_fractions.items():
        local += fraction * signals[tissue]
    image[tumour_box_slices] = local
    return image


def acquire(clean: np.ndarray, brain: np.ndarray, rng: np.random.Generator, spacing: float,
            wm_signal: float) -> tuple[np.ndarray, dict]:
    """Bias field, Rician noise, receiver gain, zero background, int16.

    Only brain voxels are simulated (the background is set to 0 anyway)."""
    axes = grid_axes_mm(spacing, clean.shape)
    log_amplitude = rng.uniform(*BIAS_LOG_AMPLITUDE)
    bias_field = SmoothRandomField(rng, (0.0, 0.0, 0.0), GRID_SHAPE_1MM, BIAS_CORRELATION_MM,
                                   amplitude=log_amplitude)
    bbox = ndi.find_objects(brain.astype(np.uint8))[0]
    inside = brain[bbox]
    bias = np.exp(bias_field.on_grid([a[s] for a, s in zip(axes, bbox)])[0][inside])
    snr = rng.uniform(*SNR_WHITE_MATTER)
    sigma = np.float32(wm_signal / snr)
    real = clean[bbox][inside] * bias + sigma * rng.standard_normal(bias.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(bias.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary)  # Rician
    gain = rng.uniform(*RECEIVER_GAIN)
    image = np.zeros(clean.shape, np.int16)
    local = image[bbox]
    local[inside] = np.clip(np.rint(magnitude * gain), 0, INT16_MAX).astype(np.int16)
    return image, {"snr": float(snr), "gain": float(gain), "bias_log_amplitude": float(log_amplitude)}


# ---------------------------------------------------------------------------------------
# Public API


def _subject_rngs(index: int, seed: int) -> dict[str, np.random.Generator]:
    """Independent streams so that, e.g., the brain does not depend on the grade."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative (got index={index}, seed={seed})")
    streams = np.random.SeedSequence([seed, index, SUBJECT_STREAM]).spawn(4)
    names = ("anatomy", "tumour", "contrast", "acquisition")
    return {name: np.random.default_rng(s) for name, s in zip(names, streams)}


def _check_spacing(spacing: float) -> float:
    spacing = float(spacing)
    if not (0.5 <= spacing <= 8.0):
        raise ValueError(f"spacing must be between 0.5 and 8 mm (got {spacing})")
    return spacing


def simulate_tumour(rng: np.random.Generator, anatomy: dict, warp: AnatomyWarp, grade: str,
                    spacing: float) -> tuple[np.ndarray, tuple[slice, ...], dict, list[int]]:
    """Place, grow and paint one tumour; pushes the anatomy aside (in place).

    Returns the full-grid label map, the box holding the tumour, the tumour-tissue
    fractions inside that box and the centre voxel."""
    plan = draw_tumour_plan(rng, grade, spacing)
    centre_vox = choose_tumour_centre(rng, anatomy, spacing, plan["core_radius_mm"])
    centre_mm = np.array([grid_axes_mm(spacing)[i][c] for i, c in enumerate(centre_vox)], np.float32)
    box = tumour_box(centre_vox, BOX_RADIUS_FACTOR * plan["wt_radius_mm"] + BOX_MARGIN_MM,
                     spacing, anatomy["mask"].shape)
    box_axes = [a[s] for a, s in zip(grid_axes_mm(spacing), box)]
    local_centre = [c - b.start for c, b in zip(centre_vox, box)]
    allowed = (anatomy["mask"][box] >= 0.5) & same_hemisphere(anatomy["midline_mm"][box], local_centre)
    core, level = grow_core(rng, allowed, box_axes, centre_mm, plan)
    apply_mass_effect(anatomy, warp, spacing, box, centre_mm, core, plan)
    box_labels, box_fractions = paint_tumour(rng, anatomy, plan, box, spacing, core, level)
    seg = np.zeros(anatomy["mask"].shape, np.uint8)
    seg[box] = box_labels
    return seg, box, box_fractions, centre_vox.tolist()


def render_images(anatomy: dict, box: tuple[slice, ...], tumour_fractions: dict,
                  signals: dict[str, dict[str, float]], rng: np.random.Generator,
                  spacing: float) -> tuple[dict[str, np.ndarray], dict]:
    """The four int16 modalities and their acquisition settings."""
    brain = anatomy["mask"] >= 0.5
    images, acquisition = {}, {}
    for modality in MODALITY_FILES:
        clean = render_clean(anatomy, box, tumour_fractions, signals[modality])
        images[modality], acquisition[modality] = acquire(clean, brain, rng, spacing,
                                                          signals[modality]["wm"])
    return images, acquisition


def generate_subject(index: int, seed: int, spacing: float = 1.0, grade: str = "HGG",
                     return_details: bool = False) -> dict:
    """One phantom subject in memory (no I/O).

    Returns {"t1", "t1ce", "t2", "flair": int16 arrays, "seg": uint8 labels {0,1,2,4},
    "affine": 4x4 RAS voxel-to-world}. With `return_details`, also the underlying
    tissue fractions "gm", "wm", "csf" (after mass effect, before the tumour is painted)
    and "details" (tumour volumes, centre, tissue properties, acquisition settings).
    """
    if grade not in GRADES:
        raise ValueError(f"grade must be one of {GRADES} (got {grade!r})")
    spacing = _check_spacing(spacing)
    rngs = _subject_rngs(index, seed)
    warp = draw_anatomy_warp(rngs["anatomy"])
    anatomy = warp_anatomy(warp, spacing)
    seg, box, tumour_fractions, centre_vox = simulate_tumour(rngs["tumour"], anatomy, warp, grade, spacing)
    properties = draw_tissue_properties(rngs["contrast"])
    signals = signal_table(properties)
    out, acquisition = render_images(anatomy, box, tumour_fractions, signals, rngs["acquisition"], spacing)
    out["seg"] = seg
    out["affine"] = grid_affine(spacing)
    if return_details:
        out.update(gm=anatomy["gm"], wm=anatomy["wm"], csf=csf_fraction(anatomy))
        voxel_cm3 = spacing**3 / 1000.0
        out["details"] = {
            "grade": grade,
            "centre_voxel": centre_vox,
            "wt_cm3": float((seg > 0).sum() * voxel_cm3),
            "core_cm3": float(np.isin(seg, (LABEL_NECROTIC_CORE, LABEL_ENHANCING)).sum() * voxel_cm3),
            "enhancing_cm3": float((seg == LABEL_ENHANCING).sum() * voxel_cm3),
            "properties": properties,
            "signals": signals,
            "acquisition": acquisition,
            "flair_ti_ms": FLAIR_TI_MS,
        }
    return out


def subject_grades(subjects: int, seed: int, hgg_fraction: float = 0.5) -> list[str]:
    """Grade of each subject index: a Sturmian (Bresenham) sequence with a seeded phase.

    Subject i is HGG iff floor((i+1) f + u) - floor(i f + u) = 1, u ~ U[0,1) from the seed:
    the grade of i depends only on (seed, i, f), and every prefix of N subjects holds
    floor or ceil of N f high-grade ones."""
    if not 0.0 <= hgg_fraction <= 1.0:
        raise ValueError(f"hgg_fraction must be in [0, 1] (got {hgg_fraction})")
    phase = np.random.default_rng([seed, 0, GRADE_STREAM]).random()
    return ["HGG" if math.floor((i + 1) * hgg_fraction + phase) - math.floor(i * hgg_fraction + phase) == 1
            else "LGG" for i in range(subjects)]


def subject_id(index: int, grade: str) -> str:
    return f"Phantom_{grade}_{index:03d}"


def _nifti(array: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def write_subject(subject_dir: Path, name: str, arrays: dict) -> None:
    """Write the five BraTS files of one subject, each atomically."""
    import nibabel as nib

    for key in (*MODALITY_FILES, "seg"):
        with atomic_path(subject_dir / f"{name}_{key}.nii.gz") as tmp:
            nib.save(_nifti(arrays[key], arrays["affine"]), str(tmp))


def existing_subjects(out_dir: Path, indices) -> dict[int, list[Path]]:
    """Non-empty phantom folders under `out_dir` per subject index, either grade (an
    index must stay unique across grades)."""
    found: dict[int, list[Path]] = {}
    for index in indices:
        for grade in GRADES:
            folder = out_dir / grade / subject_id(index, grade)
            if folder.is_dir() and any(folder.iterdir()):
                found.setdefault(index, []).append(folder)
    return found


def generate_dataset(out_dir, subjects: int, seed: int, spacing: float = 1.0, hgg_fraction: float = 0.5,
                     *, overwrite: bool = False, log: Callable[[str], None] | None = None) -> list[dict]:
    """Write `subjects` phantoms in the BraTS 2019 layout under `out_dir`.

    Returns records {"subject", "grade", "dir"}. Refuses (FileExistsError, nothing
    written) if a folder of any of these subject indices (either grade) already holds
    files, unless `overwrite`, which replaces them.
    """
    if subjects < 1 or seed < 0:
        raise ValueError(f"subjects must be >= 1 and seed >= 0 (got {subjects}, {seed})")
    spacing = _check_spacing(spacing)
    out_dir = Path(out_dir)
    grades = subject_grades(subjects, seed, hgg_fraction)
    records = [{"subject": subject_id(i, g), "grade": g, "dir": str(out_dir / g / subject_id(i, g))}
               for i, g in enumerate(grades)]
    existing = existing_subjects(out_dir, range(subjects))
    if existing and not overwrite:
        names = [folder.name for folders in existing.values() for folder in folders]
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise FileExistsError(
            f"{len(names)} subject(s) with the same index already exist in {out_dir} ({shown}); "
            "nothing was written. Choose another --out or pass --overwrite to replace them."
        )
    for i, record in enumerate(records):
        start = time.perf_counter()
        arrays = generate_subject(i, seed, spacing, record["grade"], return_details=True)
        for stale in existing.get(i, []):
            if stale != Path(record["dir"]):  # same index under the other grade: replaced
                shutil.rmtree(stale)
        write_subject(Path(record["dir"]), record["subject"], arrays)
        if log is not None:
            d = arrays["details"]
            log(f"[{i + 1}/{subjects}] {record['subject']}: whole tumour {d['wt_cm3']:.1f} cm3, "
                f"core {d['core_cm3']:.1f} cm3, enhancing {d['enhancing_cm3']:.1f} cm3 "
                f"({time.perf_counter() - start:.1f} s)")
    return records


# ---------------------------------------------------------------------------------------
# Figure

LABEL_COLOURS = {LABEL_NECROTIC_CORE: (0.9, 0.15, 0.1), LABEL_OEDEMA: (0.2, 0.85, 0.2),
                 LABEL_ENHANCING: (1.0, 0.9, 0.1)}
LABEL_NAMES = {LABEL_NECROTIC_CORE: "1 necrotic / non-enh. core", LABEL_OEDEMA: "2 oedema",
               LABEL_ENHANCING: "4 enhancing"}
FIGURE_TITLES = {"t1": "T1", "t1ce": "T1c", "t2": "T2", "flair": "FLAIR"}
DISPLAY_PERCENTILES = (0.5, 99.5)


def tumour_slice(seg: np.ndarray) -> int:
    """Axial index through the whole tumour's centre of mass (middle slice if none)."""
    if not (seg > 0).any():
        return seg.shape[2] // 2
    return int(round(ndi.center_of_mass(seg > 0)[2]))


def _display(image2d: np.ndarray) -> np.ndarray:
    """RAS array slice (x, y) -> picture rows = anterior at the top, patient left on the left."""
    return np.flipud(image2d.T)


def plot_subjects(subjects: Sequence[dict], out_png, names: Sequence[str] | None = None) -> Path:
    """One row per subject: T1, T1c, T2, FLAIR and the label map on an axial slice
    through the tumour centre. `subjects` hold the arrays of `generate_subject`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(names) if names is not None else [f"subject {i}" for i in range(len(subjects))]
    fig = Figure(figsize=(15, 3.3 * len(subjects)), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(subjects), 5, squeeze=False)
    for row, (arrays, name) in enumerate(zip(subjects, names)):
        z = tumour_slice(arrays["seg"])
        brain_rows = np.flatnonzero(arrays["t1"][:, :, z].any(axis=1))
        brain_cols = np.flatnonzero(arrays["t1"][:, :, z].any(axis=0))
        crop = (slice(max(brain_rows[0] - 3, 0), brain_rows[-1] + 4),
                slice(max(brain_cols[0] - 3, 0), brain_cols[-1] + 4)) if brain_rows.size else (slice(None),) * 2
        for col, modality in enumerate(MODALITY_FILES):
            image = arrays[modality][:, :, z][crop].astype(np.float32)
            brain = arrays[modality] > 0
            # Display window over brain voxels, as a radiologist's viewer would set it.
            low, top = np.percentile(arrays[modality][brain], DISPLAY_PERCENTILES) if brain.any() else (0, 1)
            ax = axes[row, col]
            ax.imshow(_display(np.where(image > 0, image, low)), cmap="gray", vmin=low, vmax=top,
                      interpolation="nearest")
            ax.set_title(f"{name}  {FIGURE_TITLES[modality]}" if col == 0 else FIGURE_TITLES[modality],
                         color="white", fontsize=10)
        seg = arrays["seg"][:, :, z][crop]
        base = arrays["flair"][:, :, z][crop].astype(np.float32)
        base = 0.6 * base / max(float(base.max()), 1.0)
        rgb = np.repeat(base[..., None], 3, axis=2)
        for label, colour in LABEL_COLOURS.items():
            rgb[seg == label] = colour
        ax = axes[row, 4]
        ax.imshow(np.flipud(rgb.transpose(1, 0, 2)), interpolation="nearest")
        ax.set_title("labels (seg)", color="white", fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(rect=(0, 0.06 / len(subjects), 1, 1))
    fig.legend(handles=[Patch(color=c, label=LABEL_NAMES[k]) for k, c in LABEL_COLOURS.items()],
               loc="lower center", ncol=3, fontsize=9, frameon=False, labelcolor="white")
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    return out_png


def load_subject(record: dict) -> dict:
    """Read back the five files of a written subject."""
    import nibabel as nib

    folder = Path(record["dir"])
    arrays = {}
    for key in (*MODALITY_FILES, "seg"):
        image = nib.load(str(folder / f"{record['subject']}_{key}.nii.gz"))
        arrays[key] = np.asarray(image.dataobj)
    arrays["affine"] = image.affine
    return arrays


# ---------------------------------------------------------------------------------------
# CLI


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m scripts.phantom", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (BraTS 2019 layout: HGG/, LGG/)")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--seed", type=int, required=True, help="random seed (>= 0)")
    parser.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm (default 1)")
    parser.add_argument("--hgg-fraction", type=float, default=0.5, help="fraction of HGG subjects")
    parser.add_argument("--figure", help="also write a PNG with the first HGG and LGG subject")
    parser.add_argument("--overwrite", action="store_true", help="replace existing subjects")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    start = time.perf_counter()
    try:
        records = generate_dataset(args.out, args.subjects, args.seed, args.spacing, args.hgg_fraction,
                                   overwrite=args.overwrite, log=lambda line: print(line, flush=True))
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_hgg = sum(r["grade"] == "HGG" for r in records)
    if args.figure:
        shown = [next(r for r in records if r["grade"] == g) for g in GRADES if any(r["grade"] == g for r in records)]
        plot_subjects([load_subject(r) for r in shown], args.figure,
                      names=[f"{r['subject']}" for r in shown])
        print(f"figure: {args.figure}")
    print(f"wrote {len(records)} subjects ({n_hgg} HGG, {len(records) - n_hgg} LGG) at {args.spacing:g} mm "
          f"to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
