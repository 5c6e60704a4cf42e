"""Image formation: tissue fractions and per-voxel relaxation -> the four MR images.

Each tissue's T1, T2 and PD vary in space (multi-scale texture: cellularity and free
water change both relaxation times together; tumour compartments vary far more than
normal tissue), every voxel's signal is the partial-volume sum of its tissues' signals
under the subject's protocol, and the acquisition adds its point-spread function (2D
sequences acquire thick slices), a bias field, Rician noise and a receiver gain.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from scripts.data.phantom.anatomy import GRID_SHAPE_1MM, csf_fraction, grid_axes_mm
from scripts.data.phantom.fields import SmoothRandomField, texture_field
from scripts.data.phantom.physics import signal_function

MODALITY_FILES = ("t1", "t1ce", "t2", "flair")
INT16_MAX = 32767

# Texture: log-standard deviation of T1, T2, PD per tissue (and of the contrast agent's
# concentration for enhancing tissue). Normal tissue varies a little (regional myelin and
# iron), tumour compartments a lot (cellularity, microcysts, haemorrhage, necrosis).
NORMAL_TEXTURE = {"t1": 0.06, "t2": 0.08, "pd": 0.02}
NORMAL_TEXTURE_MM = (2.0, 10.0)
TUMOUR_TEXTURE = {
    "tumour": {"t1": 0.22, "t2": 0.75, "pd": 0.07},
    "necrosis": {"t1": 0.20, "t2": 0.65, "pd": 0.06},
    "enhancing": {"t1": 0.35, "t2": 0.35, "pd": 0.06, "gd": 0.6},
    "cyst": {"t1": 0.08, "t2": 0.15, "pd": 0.02},
    "oedema": {"t1": 0.42, "t2": 0.45, "pd": 0.06},
}
TUMOUR_TEXTURE_MM = (1.5, 4.0, 10.0)  # several scales (the phantom option `tumour_texture_mm`)
TUMOUR_TEXTURE_WEIGHTS = (0.25, 0.5, 1.0)  # fine scales weak: real tumours are smooth at the voxel scale (docs/recipe.md, "Real scans")
WATER_COUPLING = 0.7  # share of the T2 texture that follows the T1 ("water") texture

# Acquisition, drawn per subject and modality.
BIAS_LOG_AMPLITUDE = {1.5: (0.08, 0.18), 3.0: (0.12, 0.25)}
BIAS_CORRELATION_MM = 120.0
SNR_NORMAL_BRAIN = {1.5: (10.0, 25.0), 3.0: (15.0, 35.0)}  # mean normal-brain signal / noise sigma
# Per-modality factor on that SNR, calibrated to the voxel noise of real BraTS-space scans
# (robust std of image - 3x3x3 median over normal brain / brain median: T1 0.024, T1c 0.045,
# T2 0.046, FLAIR 0.049 on four 1 mm cases; docs/phantom.md). Those images went through
# BraTS's co-registration to 1 mm, which smooths the acquired noise; their T1 is the
# quietest. The realism report checks the result (its "voxel noise" bands).
SNR_MODALITY_FACTOR = {"t1": 2.8, "t1ce": 1.3, "t2": 1.5, "flair": 1.6}
NORMAL_BRAIN_LEVEL = (400.0, 2500.0)  # stored mean of normal brain (scanner scaling)
IN_PLANE_FWHM_MM = (0.9, 1.3)
THICK_SLICE_MM = (3.0, 6.0)  # 2D acquisitions
THIN_SLICE_MM = (1.0, 1.3)  # 3D acquisitions
FLAIR_3D_SHARE = 0.4


def _fwhm_sigma(fwhm_mm: float, spacing: float) -> float:
    """Gaussian sigma (voxels) that brings the grid's own 1-voxel blur up to `fwhm_mm`."""
    return float(np.sqrt(max(fwhm_mm**2 - spacing**2, 0.0)) / 2.3548 / spacing)


def draw_acquisition(rng: np.random.Generator, protocols: dict, field: float) -> dict[str, dict]:
    """Per-modality point-spread function, SNR, bias amplitude and gain."""
    out = {}
    flair_3d = rng.random() < FLAIR_3D_SHARE
    for modality, protocol in protocols.items():
        three_d = protocol["kind"] == "mprage" or (modality == "flair" and flair_3d)
        out[modality] = {
            "slice_mm": float(rng.uniform(*(THIN_SLICE_MM if three_d else THICK_SLICE_MM))),
            "in_plane_fwhm_mm": float(rng.uniform(*IN_PLANE_FWHM_MM)),
            "snr": float(rng.uniform(*SNR_NORMAL_BRAIN[field])) * SNR_MODALITY_FACTOR.get(modality, 1.0),
            "bias_log_amplitude": float(rng.uniform(*BIAS_LOG_AMPLITUDE[field])),
            "level": float(rng.uniform(*NORMAL_BRAIN_LEVEL)),
        }
    return out


def _relaxation_maps(props: dict, texture: dict, amplitudes: dict):
    """Per-voxel (pd, t1, t2, gd) of one tissue from its subject means and the textures.

    Free water raises PD, T1 and T2 together ("water"); T1 and T2 also vary on their own
    (cellularity, protein, blood products: "own", "other"), otherwise the PD and T1
    changes would cancel on T1-weighted images."""
    water, own, other = texture["water"], texture["own"], texture["other"]
    coupled = np.sqrt(1.0 - WATER_COUPLING**2)
    t1 = props["t1"] * np.exp(amplitudes["t1"] * (WATER_COUPLING * water + coupled * other))
    t2 = props["t2"] * np.exp(amplitudes["t2"] * (WATER_COUPLING * water + coupled * own))
    pd = np.clip(props["pd"] * np.exp(amplitudes["pd"] * water), 0.0, 1.0)
    gd = props.get("gd_mM", 0.0) * np.exp(amplitudes.get("gd", 0.0) * own - 0.5 * amplitudes.get("gd", 0.0) ** 2)
    return pd, t1, t2, gd


def _tissue_signal(f, protocol: dict, props: dict, maps, r1: float):
    pd, t1, t2, gd = maps
    if protocol["contrast_agent"] and "gd_mM" in props:
        t1 = 1.0 / (1.0 / t1 + r1 * gd)
    return f(pd, t1, t2)


def check_tumour_texture(scales_mm, weights) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The tumour texture's correlation lengths (mm) and their weights, checked; ValueError names the fix."""
    scales = tuple(float(v) for v in scales_mm)
    weights = tuple(float(v) for v in weights)
    if not scales or len(scales) != len(weights):
        raise ValueError(f"tumour_texture_mm {list(scales)} and tumour_texture_weights {list(weights)} must be "
                         f"non-empty lists of the same length (one weight per scale)")
    if min(scales) <= 0 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"tumour_texture_mm must be > 0 and tumour_texture_weights >= 0 with a positive sum "
                         f"(got {list(scales)} / {list(weights)})")
    return scales, weights


def render_clean(anatomy: dict, confounders: dict, box: tuple[slice, ...], tumour_fractions: dict,
                 properties: dict, protocols: dict, r1: float, rng: np.random.Generator,
                 spacing: float, tumour_texture_mm=TUMOUR_TEXTURE_MM,
                 tumour_texture_weights=TUMOUR_TEXTURE_WEIGHTS) -> dict[str, np.ndarray]:
    """Noise-free images {modality: float32 full grid}.

    `tumour_texture_mm` / `tumour_texture_weights`: correlation lengths (mm) of the tumour
    compartments' relaxation texture and their weights (its total variance stays the same)."""
    shape = anatomy["mask"].shape
    inside = anatomy["mask"] > 0
    # Normal tissue, on brain voxels only.
    normal_texture = {key: texture_field(rng, shape, spacing, NORMAL_TEXTURE_MM, (1.0, 1.0), voxel_average=True)[inside]
                      for key in ("water", "own", "other")}
    wmh, vessel, flow = (confounders[k][inside] for k in ("wmh", "vessel", "csf_flow"))
    csf = csf_fraction(anatomy)[inside]
    wm = anatomy["wm"][inside] - wmh
    gm = anatomy["gm"][inside]
    keep = 1.0 - vessel  # enhancing structures displace whatever was there
    fractions = {"wm": wm * keep, "gm": gm * keep, "csf": csf * keep, "wmh": wmh * keep, "vessel": vessel}
    maps = {t: _relaxation_maps(properties[t], normal_texture, NORMAL_TEXTURE) for t in fractions}
    # Tumour compartments: in the box only, with their own stronger texture.
    box_inside = inside[box]
    tumour_texture = {key: texture_field(rng, box_inside.shape, spacing, tumour_texture_mm, tumour_texture_weights,
                                         voxel_average=True)[box_inside] for key in ("water", "own", "other")}
    tumour_fracs = {t: f[box_inside] for t, f in tumour_fractions.items()}
    tumour_maps = {t: _relaxation_maps(properties[t], tumour_texture, TUMOUR_TEXTURE[t]) for t in tumour_fracs}
    box_index = np.zeros(shape, bool)
    box_index[box] = box_inside  # brain voxels of the box, in the order of tumour_fracs
    in_box = box_index[inside]  # which brain voxels lie in the box
    tumour_total = sum(tumour_fracs.values()) if tumour_fracs else 0.0

    images = {}
    for modality, protocol in protocols.items():
        f = signal_function(protocol)
        signal = np.zeros(int(inside.sum()), np.float32)
        for tissue, fraction in fractions.items():
            tissue_signal = _tissue_signal(f, protocol, properties[tissue], maps[tissue], r1)
            if tissue == "csf" and protocol["kind"] == "inversion_recovery":
                # Inflowing CSF escaped the inversion: it keeps its plain T2-weighted signal.
                pd, t1, t2, _ = maps["csf"]
                plain = pd * (1.0 - np.exp(-protocol["tr"] / t1)) * np.exp(-protocol["te"] / t2)
                tissue_signal = (1.0 - flow) * tissue_signal + flow * plain
            signal += (fraction * tissue_signal).astype(np.float32)
        if tumour_fracs:
            local = signal[in_box] * (1.0 - tumour_total)
            for tissue, fraction in tumour_fracs.items():
                local += fraction * _tissue_signal(f, protocol, properties[tissue], tumour_maps[tissue], r1)
            signal[in_box] = local
        image = np.zeros(shape, np.float32)
        image[inside] = signal
        images[modality] = image
    return images


def acquire(clean: np.ndarray, brain: np.ndarray, normal: np.ndarray, rng: np.random.Generator,
            spacing: float, settings: dict) -> np.ndarray:
    """Point-spread function, bias field, Rician noise, scaling, zero background, int16.

    The PSF is applied to the noise-free image (2D sequences average thick slices), then
    the bias multiplies it and complex Gaussian noise of sigma = mean normal-brain signal /
    SNR makes the magnitude Rician."""
    in_plane = _fwhm_sigma(settings["in_plane_fwhm_mm"], spacing)
    through = _fwhm_sigma(settings["slice_mm"], spacing)
    if max(in_plane, through) > 0.05:
        clean = ndi.gaussian_filter(clean, (in_plane, in_plane, through), mode="constant")
    axes = grid_axes_mm(spacing, clean.shape)
    bias_field = SmoothRandomField(rng, (0.0, 0.0, 0.0), GRID_SHAPE_1MM, BIAS_CORRELATION_MM,
                                   amplitude=settings["bias_log_amplitude"])
    bbox = ndi.find_objects(brain.astype(np.uint8))[0]
    inside = brain[bbox]
    bias = np.exp(bias_field.on_grid([a[s] for a, s in zip(axes, bbox)])[0][inside])
    noise_rng = np.random.default_rng(rng.integers(2**63))  # size-independent use of the stream
    normal_mean = float(clean[normal].mean())
    sigma = np.float32(normal_mean / settings["snr"])
    real = clean[bbox][inside] * bias + sigma * noise_rng.standard_normal(bias.shape, dtype=np.float32)
    imaginary = sigma * noise_rng.standard_normal(bias.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    image = np.zeros(clean.shape, np.int16)
    local = image[bbox]
    local[inside] = np.clip(np.rint(magnitude * (settings["level"] / normal_mean)), 1, INT16_MAX).astype(np.int16)
    return image
