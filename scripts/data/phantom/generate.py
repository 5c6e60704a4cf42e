"""Generation of phantom subjects and datasets (BraTS 2019 layout, int16 NIfTI)."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from scripts.common import atomic_path
from scripts.data.phantom.anatomy import (add_atrophy, add_dural_sinuses, csf_fraction, draw_anatomy_warp, fill_enclosed_cisterns,
                                          grid_affine, warp_anatomy)
from scripts.data.phantom.confounders import draw_confounders
from scripts.data.phantom.physics import (FIELD_STRENGTHS, GADOLINIUM_R1_PER_MM_MS, draw_protocols,
                                         draw_tissue_properties, signal_table)
from scripts.data.phantom.registration import misregister
from scripts.data.phantom.render import (MODALITY_FILES, TUMOUR_TEXTURE_MM, TUMOUR_TEXTURE_WEIGHTS, acquire,
                                         check_tumour_texture, draw_acquisition, render_clean)
from scripts.data.phantom.tumour import GRADES, LABEL_ENHANCING, LABEL_NECROTIC_CORE, simulate_tumour

# Entropy tags that keep the per-subject streams apart from the grade stream.
SUBJECT_STREAM = 0
GRADE_STREAM = 1
# Appended streams leave the earlier ones unchanged (SeedSequence children are indexed).
STREAMS = ("anatomy", "tumour", "contrast", "acquisition", "atrophy", "confounders", "texture", "misregistration")
FIELD_3T_SHARE = 0.5


def _subject_rngs(index: int, seed: int) -> dict[str, np.random.Generator]:
    """Independent streams so that, e.g., the brain does not depend on the grade."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative (got index={index}, seed={seed})")
    streams = np.random.SeedSequence([seed, index, SUBJECT_STREAM]).spawn(len(STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(STREAMS, streams)}


def _check_spacing(spacing: float) -> float:
    spacing = float(spacing)
    if not (0.5 <= spacing <= 8.0):
        raise ValueError(f"spacing must be between 0.5 and 8 mm (got {spacing})")
    return spacing


def generate_subject(index: int, seed: int, spacing: float = 1.0, grade: str = "HGG",
                     return_details: bool = False, misregistration_mm: float = 0.0,
                     misregistration_deg: float = 0.0, tumour_texture_mm=TUMOUR_TEXTURE_MM,
                     tumour_texture_weights=TUMOUR_TEXTURE_WEIGHTS, cisterns_and_sinuses: bool = False) -> dict:
    """One phantom subject in memory (no I/O).

    `cisterns_and_sinuses`: the basal cisterns the template's brain mask leaves out become CSF
    (`anatomy.fill_enclosed_cisterns`), with the circle of Willis in them (`confounders.draw_basal_arteries`),
    and the dural sinuses enhance on T1c (`anatomy.add_dural_sinuses`); False gives the phantom without them
    (every other draw is the same either way).

    `tumour_texture_mm` / `tumour_texture_weights`: the scales (mm) of the tumour compartments'
    texture and their weights (`scripts.data.phantom.render`; docs/recipe.md, "Real scans").

    `misregistration_mm` / `misregistration_deg` > 0 move each modality by its own random
    rigid transform (up to that much per axis; `scripts.data.phantom.registration`); the
    segmentation stays in the anatomy's frame.

    Returns {"t1", "t1ce", "t2", "flair": int16 arrays, "seg": uint8 labels {0,1,2,4},
    "affine": 4x4 RAS voxel-to-world}. With `return_details`, also the underlying
    tissue fractions "gm", "wm", "csf" (after atrophy and mass effect, before the tumour
    is painted) and "details" (tumour volumes, centre, field strength, protocols, tissue
    properties, acquisition settings, confounders).
    """
    if grade not in GRADES:
        raise ValueError(f"grade must be one of {GRADES} (got {grade!r})")
    spacing = _check_spacing(spacing)
    tumour_texture_mm, tumour_texture_weights = check_tumour_texture(tumour_texture_mm, tumour_texture_weights)
    rngs = _subject_rngs(index, seed)
    warp = draw_anatomy_warp(rngs["anatomy"])
    anatomy = warp_anatomy(warp, spacing)
    seg, box, tumour_fractions, centre_vox = simulate_tumour(rngs["tumour"], anatomy, warp, grade, spacing)
    # After the tumour: its mass effect resamples the template inside its box, which would
    # otherwise undo the atrophy there (a visible box of other contrast).
    atrophy = add_atrophy(anatomy, rngs["atrophy"], spacing)
    if cisterns_and_sinuses:  # the holes last: the sinuses can close a cleft into one (the torcula's)
        atrophy.update(add_dural_sinuses(anatomy, rngs["atrophy"], spacing))
        fill_enclosed_cisterns(anatomy)
    contrast = rngs["contrast"]
    field = FIELD_STRENGTHS[1] if contrast.random() < FIELD_3T_SHARE else FIELD_STRENGTHS[0]
    properties = draw_tissue_properties(contrast, field)
    protocols = draw_protocols(contrast, field)
    confounders = draw_confounders(rngs["confounders"], anatomy, seg, spacing, cisterns_and_sinuses)
    clean = render_clean(anatomy, confounders, box, tumour_fractions, properties, protocols,
                         GADOLINIUM_R1_PER_MM_MS[field], rngs["texture"], spacing,
                         tumour_texture_mm=tumour_texture_mm, tumour_texture_weights=tumour_texture_weights)
    settings = draw_acquisition(rngs["acquisition"], protocols, field)
    brain = anatomy["mask"] >= 0.5
    normal = brain & (seg == 0)
    out = {m: acquire(clean[m], brain, normal, rngs["acquisition"], spacing, settings[m]) for m in MODALITY_FILES}
    misregistered = misregister(out, rngs["misregistration"], spacing, misregistration_mm, misregistration_deg)
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
            "field_T": field,
            "protocols": protocols,
            "properties": properties,
            "signals": signal_table(properties, protocols),
            "acquisition": settings,
            "atrophy": atrophy,
            "confounders": confounders["details"],
            "misregistration": misregistered,
            "tumour_texture": {"mm": list(tumour_texture_mm), "weights": list(tumour_texture_weights)},
            "cisterns_and_sinuses": bool(cisterns_and_sinuses),
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
                     *, overwrite: bool = False, log: Callable[[str], None] | None = None,
                     misregistration_mm: float = 0.0, misregistration_deg: float = 0.0,
                     tumour_texture_mm=TUMOUR_TEXTURE_MM, tumour_texture_weights=TUMOUR_TEXTURE_WEIGHTS,
                     cisterns_and_sinuses: bool = False) -> list[dict]:
    """Write `subjects` phantoms in the BraTS 2019 layout under `out_dir`.

    `misregistration_mm` / `misregistration_deg`: per-modality rigid misregistration (see
    `generate_subject`; 0 = the modalities agree exactly). `tumour_texture_mm` /
    `tumour_texture_weights`: the tumour texture's scales and weights; `cisterns_and_sinuses`:
    basal cisterns, arteries and dural sinuses (see `generate_subject`).

    Returns records {"subject", "grade", "dir"}. Refuses (FileExistsError, nothing
    written) if a folder of any of these subject indices (either grade) already holds
    files, unless `overwrite`, which replaces them.
    """
    if subjects < 1 or seed < 0:
        raise ValueError(f"subjects must be >= 1 and seed >= 0 (got {subjects}, {seed})")
    spacing = _check_spacing(spacing)
    check_tumour_texture(tumour_texture_mm, tumour_texture_weights)  # before anything is written
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
        arrays = generate_subject(i, seed, spacing, record["grade"], return_details=True,
                                  misregistration_mm=misregistration_mm, misregistration_deg=misregistration_deg,
                                  tumour_texture_mm=tumour_texture_mm, tumour_texture_weights=tumour_texture_weights,
                                  cisterns_and_sinuses=cisterns_and_sinuses)
        for stale in existing.get(i, []):
            if stale != Path(record["dir"]):  # same index under the other grade: replaced
                shutil.rmtree(stale)
        write_subject(Path(record["dir"]), record["subject"], arrays)
        if log is not None:
            d = arrays["details"]
            log(f"[{i + 1}/{subjects}] {record['subject']} ({d['field_T']:g} T, T1 {d['protocols']['t1']['kind']}): whole tumour {d['wt_cm3']:.1f} cm3, "
                f"core {d['core_cm3']:.1f} cm3, enhancing {d['enhancing_cm3']:.1f} cm3 "
                f"({time.perf_counter() - start:.1f} s)")
    return records




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
