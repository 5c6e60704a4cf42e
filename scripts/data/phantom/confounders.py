"""Healthy-tissue findings that look like tumour on one modality, so that no single
modality's brightness is a rule a classifier can learn:

- white-matter hyperintensities (small-vessel disease, common above 50 years): caps and
  bands around the ventricles and punctate deep lesions, bright on T2 and FLAIR;
- enhancing structures on T1c: choroid plexus in the ventricles, cortical veins and dura
  at the brain surface;
- CSF flow artefacts on FLAIR: inflowing, not-inverted CSF in the ventricles is not nulled;
- with `cisterns_and_sinuses`: the arteries of the basal cisterns (circle of Willis) and the
  dural venous sinuses a skull-stripped scan keeps (the superior sagittal sinus along the
  midline above the ventricles, the transverse sinuses behind the cerebellum), bright on T1c.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from scripts.data.phantom.anatomy import ventricle_mask
from scripts.data.phantom.fields import texture_field

WMH_SUBJECT_SHARE = 0.6
PERIVENTRICULAR_BAND_MM = (1.5, 5.0)  # decay length of the periventricular band
PERIVENTRICULAR_FRACTION = (0.3, 0.8)
DEEP_WMH_SHARE_OF_WM = (0.002, 0.02)  # share of white-matter voxels with a deep lesion
WMH_TEXTURE_MM = (3.0, 8.0)
TUMOUR_CLEARANCE_MM = 8.0  # no confounder touches the tumour or its surroundings
CHOROID_SHARE_OF_VENTRICLES = (0.03, 0.10)
SURFACE_VESSEL_SUBJECT_SHARE = 0.7
SURFACE_VESSEL_SHARE = (0.01, 0.04)  # share of superficial brain voxels with an enhancing vessel
SURFACE_DEPTH_MM = 2.5
VESSEL_TEXTURE_MM = (1.5, 4.0)
CSF_FLOW_SUBJECT_SHARE = 0.4
CSF_FLOW_SHARE_OF_VENTRICLES = (0.05, 0.3)
CSF_FLOW_STRENGTH = (0.2, 0.6)  # share of the ventricular CSF signal that escapes the inversion
# Basal arteries (cisterns_and_sinuses): bright tubes in the suprasellar cistern on real T1c.
BASAL_ARTERY_SHARE_OF_CISTERNS = (0.1, 0.3)


def _top_share(values: np.ndarray, eligible: np.ndarray, share: float) -> np.ndarray:
    """Bool mask of the `share` of eligible voxels with the highest values."""
    if not eligible.any():
        return np.zeros(values.shape, bool)
    cut = np.quantile(values[eligible], 1.0 - share)
    return eligible & (values >= cut)


def draw_basal_arteries(rng: np.random.Generator, anatomy: dict, fine: np.ndarray) -> np.ndarray:
    """Enhancing fraction map of the circle of Willis: a share of the filled basal cisterns
    (anatomy["cisterns"]), where the fine texture is highest (tubes and knots, not a blob).

    Args:
        rng: the confounders' stream (drawn after everything else it draws).
        anatomy: the subject's maps after `fill_enclosed_cisterns`.
        fine: a fine texture field on the grid.
    """
    cisterns = anatomy.get("cisterns")
    share = rng.uniform(*BASAL_ARTERY_SHARE_OF_CISTERNS)
    if cisterns is None or not cisterns.any():
        return np.zeros(fine.shape, np.float32)
    return (0.7 * _top_share(fine, cisterns, share)).astype(np.float32)


def draw_confounders(rng: np.random.Generator, anatomy: dict, seg: np.ndarray, spacing: float,
                     cisterns_and_sinuses: bool = False) -> dict:
    """{"wmh": fraction map, "vessel": fraction map, "csf_flow": FLAIR flow strength map,
    "details": what was drawn} on the full grid.

    Args:
        rng: the subject's confounders stream.
        anatomy: the subject's maps (after atrophy).
        seg: the tumour labels (confounders keep TUMOUR_CLEARANCE_MM away from them).
        spacing: voxel size (mm).
        cisterns_and_sinuses: also the basal arteries (drawn last, so the other confounders are
            the same with and without them) and the dural sinuses of anatomy["sinuses"].
    """
    shape = anatomy["mask"].shape
    brain = anatomy["mask"] >= 0.5
    clearance = ndi.distance_transform_edt(seg == 0, sampling=spacing) > TUMOUR_CLEARANCE_MM
    ventricles = ventricle_mask(anatomy)
    wm = anatomy["wm"]
    details = {}

    wmh = np.zeros(shape, np.float32)
    if rng.random() < WMH_SUBJECT_SHARE and ventricles.any():
        texture = texture_field(rng, shape, spacing, WMH_TEXTURE_MM, (1.0, 1.0))
        distance = ndi.distance_transform_edt(~ventricles, sampling=spacing)
        band = rng.uniform(*PERIVENTRICULAR_BAND_MM)
        strength = rng.uniform(*PERIVENTRICULAR_FRACTION)
        periventricular = strength * np.exp(-distance / band) * (distance > 0) * np.clip(1.0 + 0.5 * texture, 0.0, 2.0)
        deep_share = rng.uniform(*DEEP_WMH_SHARE_OF_WM)
        deep = _top_share(texture, brain & (wm > 0.6) & (distance > 10.0), deep_share)
        wmh = np.clip(np.maximum(periventricular, 0.8 * ndi.gaussian_filter(deep.astype(np.float32), 0.5)), 0.0, 0.9)
        wmh = (wmh * wm * clearance).astype(np.float32)
        details.update(wmh_periventricular_band_mm=float(band), wmh_deep_share=float(deep_share))
    details["wmh_cm3"] = float(wmh.sum() * spacing**3 / 1000.0)

    vessel = np.zeros(shape, np.float32)
    fine = texture_field(rng, shape, spacing, VESSEL_TEXTURE_MM, (1.0, 0.5))
    if ventricles.any():
        choroid = _top_share(fine, ventricles, rng.uniform(*CHOROID_SHARE_OF_VENTRICLES))
        vessel = np.maximum(vessel, 0.7 * choroid)
    if rng.random() < SURFACE_VESSEL_SUBJECT_SHARE:
        surface = brain & (anatomy["depth"] < SURFACE_DEPTH_MM)
        vessel = np.maximum(vessel, 0.6 * _top_share(fine, surface, rng.uniform(*SURFACE_VESSEL_SHARE)))
    vessel = (vessel * clearance).astype(np.float32)
    details["enhancing_structures_cm3"] = float(vessel.sum() * spacing**3 / 1000.0)

    flow = np.zeros(shape, np.float32)
    if rng.random() < CSF_FLOW_SUBJECT_SHARE and ventricles.any():
        patches = texture_field(rng, shape, spacing, (6.0, 12.0), (1.0, 1.0))
        chosen = _top_share(patches, ventricles, rng.uniform(*CSF_FLOW_SHARE_OF_VENTRICLES))
        flow = (rng.uniform(*CSF_FLOW_STRENGTH) * ndi.gaussian_filter(chosen.astype(np.float32), 1.0)).astype(np.float32)
    details["csf_flow_cm3"] = float((flow > 0.05).sum() * spacing**3 / 1000.0)
    if cisterns_and_sinuses:
        arteries = draw_basal_arteries(rng, anatomy, fine) * clearance
        sinuses = anatomy.get("sinuses", np.zeros(shape, np.float32)) * clearance  # anatomy.add_dural_sinuses
        vessel = np.maximum(vessel, np.maximum(arteries, sinuses)).astype(np.float32)
        details.update(basal_arteries_cm3=float(arteries.sum() * spacing**3 / 1000.0),
                       dural_sinuses_cm3=float(sinuses.sum() * spacing**3 / 1000.0))
    return {"wmh": wmh, "vessel": vessel, "csf_flow": flow, "details": details}
