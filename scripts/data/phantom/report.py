"""Realism report: how a dataset's tumour contrasts compare with real BraTS-space MRI.

For every subject with a segmentation, per modality: the mean intensity of each tumour
compartment divided by the mean of normal-appearing brain (brain minus tumour), the
oedema divided by the 4-voxel ring of brain around the whole tumour, the coefficient of
variation (std / mean) inside each compartment and inside normal brain, and the voxel noise
of normal brain (robust std of the image minus its 3x3x3 median, over the brain's median).
Medians over
subjects are printed per grade next to the target bands of the realistic-phantom issue
(ratios of 1 mm BraTS-space data, medians over >= 20 subjects) with PASS / FAIL.

Works on any layout `scripts.data.subjects.discover_subjects` reads (the phantom, BraTS
2018-2023, MSD Task01, a datalist), so the same numbers can be taken on real data:

    python -m scripts.data.phantom report --data DIR [--out report.md] [--json report.json]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

MODALITIES = ("t1", "t1c", "t2", "flair")
TITLES = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR", "all": "all"}
COMPARTMENTS = ("core", "oedema", "enhancing")
# Labels of each compartment per layout (whole tumour = label > 0 in all of them).
COMPARTMENT_LABELS = {
    "brats2018-2021": {"core": (1,), "oedema": (2,), "enhancing": (4,)},
    "brats2023": {"core": (1,), "oedema": (2,), "enhancing": (3,)},
    "msd": {"core": (2,), "oedema": (1,), "enhancing": (3,)},
}
RING_MM = 4.0  # the ring of brain around the whole tumour: 4 voxels of real 1 mm data (in voxels elsewhere: mm / spacing)
MIN_VOXELS = 20  # compartments smaller than this are not measured

# One real skull-stripped BraTS-space case (TCGA-LGG, 1 mm, BraTS-algorithm reference),
# measured with this definition: ratio to normal brain / CV inside the compartment.
REAL_ANCHOR = {
    ("ratio", "core"): {"t1": 0.74, "t1c": 0.70, "t2": 1.55, "flair": 1.64},
    ("cv", "core"): {"t1": 0.38, "t1c": 0.38, "t2": 0.21, "flair": 0.19},
    ("ratio", "oedema"): {"t1": 1.06, "t1c": 0.99, "t2": 1.22, "flair": 1.47},
    ("cv", "oedema"): {"t1": 0.38, "t1c": 0.39, "t2": 0.34, "flair": 0.27},
    ("cv", "normal"): {"t1": 0.43, "t1c": 0.42, "t2": 0.50, "flair": 0.32},
    ("ring", "oedema"): {"flair": 1.16},
    ("volume", "brain"): {"all": 1.25},  # litres
}
NORMAL_CV_TOLERANCE = 0.35  # normal-brain CV within +-35 % of the real values
# Voxel noise of normal-appearing brain: robust std (1.4826 x MAD) of (image - its 3x3x3
# median filter), divided by the median of the brain. Four real skull-stripped BraTS-space
# cases at 1 mm: medians below, every case and modality within 0.016-0.071 (the band).
NOISE_REAL_MEDIAN = {"t1": 0.024, "t1c": 0.045, "t2": 0.046, "flair": 0.049}
NOISE_BAND = (0.016, 0.071)
# Head size: the volume (litres) of the skull-stripped brain mask (voxels non-zero in any modality:
# brain and the CSF around it). Adult intracranial volume is about 1.2-1.7 L (mean near 1.45 L; men
# larger than women); BraTS keeps each head's own size (rigid registration to SRI24). The three real
# cases of ../shared/real-dev measure 1.25, 1.62 and 1.64 L. The band holds the median over subjects.
# The default phantom fails it (about 2.0 L: the MNI template's size); smaller heads were measured and
# not adopted (docs/recipe.md, "Head size").
BRAIN_VOLUME_BAND_L = (1.30, 1.65)
MAD_TO_STD = 1.4826


def _bands() -> list[dict]:
    """Target bands: (quantity, compartment, modality) -> [low, high] on the median over
    the subjects of the listed grades."""
    bands = []

    def add(quantity, compartment, modality, low, high, grades=("HGG", "LGG")):
        bands.append({"quantity": quantity, "compartment": compartment, "modality": modality,
                      "low": low, "high": high, "grades": grades})

    for modality, core, oedema in (("t1", (0.65, 0.85), (0.92, 1.08)), ("t1c", (0.65, 0.85), (0.92, 1.08)),
                                   ("t2", (1.35, 1.80), (1.10, 1.40)), ("flair", (1.40, 1.85), (1.30, 1.65))):
        add("ratio", "core", modality, *core)
        add("ratio", "oedema", modality, *oedema)
    add("ratio", "enhancing", "t1c", 1.4, 2.2, grades=("HGG",))
    add("max_ratio", "any", "t1c", 0.0, 1.15, grades=("LGG",))  # no low-grade compartment enhances
    add("ring", "oedema", "flair", 1.05, 1.35)
    for modality in MODALITIES:
        for compartment in COMPARTMENTS:
            grades = ("HGG",) if compartment == "enhancing" else ("HGG", "LGG")
            add("cv", compartment, modality, 0.15, 0.40, grades=grades)
        real = REAL_ANCHOR[("cv", "normal")][modality]
        add("cv", "normal", modality, round(real * (1 - NORMAL_CV_TOLERANCE), 3),
            round(real * (1 + NORMAL_CV_TOLERANCE), 3))
        add("noise", "normal", modality, *NOISE_BAND)
    add("volume", "brain", "all", *BRAIN_VOLUME_BAND_L)
    return bands


BANDS = _bands()


def compartment_masks(seg: np.ndarray, layout: str) -> dict[str, np.ndarray]:
    labels = COMPARTMENT_LABELS.get(layout, COMPARTMENT_LABELS["brats2018-2021"])
    return {name: np.isin(seg, values) for name, values in labels.items()}


def ring_mask(tumour: np.ndarray, brain: np.ndarray, voxels: int = 4) -> np.ndarray:
    """Brain voxels within `voxels` (Euclidean, in voxels) of the whole tumour, outside it."""
    if not tumour.any():
        return np.zeros_like(tumour)
    box = tuple(slice(max(s.start - voxels - 1, 0), s.stop + voxels + 1)
                for s in ndi.find_objects(tumour.astype(np.uint8))[0])
    distance = ndi.distance_transform_edt(~tumour[box])
    ring = np.zeros_like(tumour)
    ring[box] = (distance > 0) & (distance <= voxels)
    return ring & brain


def voxel_noise(image: np.ndarray, normal: np.ndarray, brain: np.ndarray) -> float:
    """Robust std of (image - 3x3x3 median) over normal brain, over the brain's median.

    Voxels whose 3x3x3 neighbourhood leaves the brain are not counted (the zero background
    would make an edge, not noise); the MAD keeps texture edges inside the brain from
    dominating."""
    residual = image - ndi.median_filter(image, size=3, mode="nearest")
    core = normal & ndi.binary_erosion(brain, structure=np.ones((3, 3, 3), bool))
    values = residual[core] if core.any() else residual[normal]
    if values.size == 0:
        return math.nan
    spread = MAD_TO_STD * float(np.median(np.abs(values - np.median(values))))
    return spread / float(np.median(image[brain]))


def subject_statistics(images: dict[str, np.ndarray], seg: np.ndarray, layout: str = "brats2018-2021",
                       spacing: float = 1.0, voxel_ml: float | None = None) -> dict:
    """{(quantity, compartment): {modality: value}} for one subject.

    Brain = voxels non-zero in any modality (skull-stripped data have a zero background);
    normal brain = brain minus the whole tumour; `spacing` (mm, in-plane) sizes the ring;
    `voxel_ml` (the voxel's volume, ml), when given, adds the brain mask's volume in litres
    (`("volume", "brain")`, under modality "all")."""
    brain = np.zeros(seg.shape, bool)
    for image in images.values():
        brain |= image != 0
    tumour = (seg > 0) & brain
    normal = brain & ~tumour
    masks = {name: mask & brain for name, mask in compartment_masks(seg, layout).items()}
    ring = ring_mask(tumour, brain, max(1, int(round(RING_MM / spacing))))
    out: dict = {}
    if voxel_ml is not None:
        out[("volume", "brain")] = {"all": float(brain.sum()) * float(voxel_ml) / 1000.0}
    for modality, image in images.items():
        image = image.astype(np.float64)
        normal_mean = image[normal].mean() if normal.any() else math.nan
        out.setdefault(("cv", "normal"), {})[modality] = float(image[normal].std() / normal_mean)
        out.setdefault(("noise", "normal"), {})[modality] = voxel_noise(image, normal, brain)
        ratios = []
        for name, mask in masks.items():
            if mask.sum() < MIN_VOXELS:
                continue
            values = image[mask]
            ratio = float(values.mean() / normal_mean)
            ratios.append(ratio)
            out.setdefault(("ratio", name), {})[modality] = ratio
            out.setdefault(("cv", name), {})[modality] = float(values.std() / values.mean())
            if name == "oedema" and ring.sum() >= MIN_VOXELS:
                out.setdefault(("ring", name), {})[modality] = float(values.mean() / image[ring].mean())
        if ratios:
            out.setdefault(("max_ratio", "any"), {})[modality] = max(ratios)
    return out


def _load_record(record: dict) -> tuple[dict[str, np.ndarray], np.ndarray, float, float]:
    """Images, segmentation, in-plane voxel size (mm) and voxel volume (ml) of one discovered subject,
    on the file's grid."""
    from scripts.common import canonical_modalities, canonical_modality
    from scripts.data.volumes import load_volume

    if "image4d" in record:
        volume = np.asarray(load_volume(record["image4d"], record["subject"], "4D image"))
        images = {m: volume[i] for i, m in enumerate(canonical_modalities(record["channels"]))}
    else:
        images = {canonical_modality(m): np.asarray(load_volume(p, record["subject"], m))[0]
                  for m, p in record["images"].items()}
    seg_volume = load_volume(record["seg"], record["subject"], "seg")
    pixdim = np.asarray(seg_volume.pixdim, float)[:3]
    spacing, voxel_ml = float(np.mean(pixdim[:2])), float(np.prod(pixdim)) / 1000.0
    return images, np.rint(np.asarray(seg_volume)[0]).astype(np.int16), spacing, voxel_ml


def dataset_statistics(data: str | Path, limit: int | None = None,
                       log: Callable[[str], None] | None = None) -> list[dict]:
    """Per-subject statistics of every subject with a segmentation under `data`."""
    from scripts.data.subjects import DataError, discover_subjects

    records = [r for r in discover_subjects(data) if r.get("seg")]
    if not records:
        raise DataError(f"no subject with a segmentation under {data}. Fix: the report needs the tumour "
                        f"labels (the *_seg files) to find the compartments.")
    records = records[:limit] if limit else records
    rows = []
    for i, record in enumerate(records):
        images, seg, spacing, voxel_ml = _load_record(record)
        stats = subject_statistics(images, seg, record.get("layout", "brats2018-2021"), spacing, voxel_ml)
        rows.append({"subject": record["subject"], "grade": record.get("grade") or "all", "stats": stats})
        if log is not None:
            log(f"[{i + 1}/{len(records)}] {record['subject']}")
    return rows


def medians(rows: list[dict], grades: Sequence[str]) -> dict:
    """{(quantity, compartment, modality): median over subjects of these grades}."""
    collected: dict = {}
    for row in rows:
        if row["grade"] not in grades and "all" not in grades:
            continue
        for (quantity, compartment), values in row["stats"].items():
            for modality, value in values.items():
                collected.setdefault((quantity, compartment, modality), []).append(value)
    return {key: float(np.median(values)) for key, values in collected.items()}


def evaluate_bands(rows: list[dict]) -> list[dict]:
    """Each band with the per-grade medians and a verdict: PASS when every grade present in
    the data (or, for data without grades, all subjects) has its median inside the band."""
    present = sorted({row["grade"] for row in rows})
    results = []
    for band in BANDS:
        key = (band["quantity"], band["compartment"], band["modality"])
        checked = [g for g in present if g in band["grades"]] or (["all"] if present == ["all"] else [])
        values = {g: medians(rows, [g]).get(key) for g in checked}
        values = {g: v for g, v in values.items() if v is not None}
        verdict = ("n/a" if not values else
                   "PASS" if all(band["low"] <= v <= band["high"] for v in values.values()) else "FAIL")
        results.append({**band, "medians": values, "verdict": verdict})
    return results


QUANTITY_TITLES = {"ratio": "ratio to normal brain", "ring": "ratio to the 4-voxel ring",
                   "cv": "CV inside", "max_ratio": "largest compartment ratio",
                   "noise": "voxel noise (robust, / brain median)", "volume": "volume (L)"}


def format_report(rows: list[dict], title: str = "") -> str:
    """Markdown: one row per band with the medians per grade, the real anchor and the verdict."""
    results = evaluate_bands(rows)
    grades = sorted({row["grade"] for row in rows})
    counts = {g: sum(row["grade"] == g for row in rows) for g in grades}
    lines = [f"### {title}" if title else "", "",
             "Medians over subjects (" + ", ".join(f"{g}: {n}" for g, n in counts.items()) + ").", "",
             "| modality | quantity | compartment | " + " | ".join(grades) + " | real case | band | verdict |",
             "|---|---|---|" + "---|" * len(grades) + "---|---|---|"]
    for r in results:
        real = (NOISE_REAL_MEDIAN.get(r["modality"]) if r["quantity"] == "noise"
                else REAL_ANCHOR.get((r["quantity"], r["compartment"]), {}).get(r["modality"]))
        digits = 3 if r["quantity"] == "noise" else 2
        cells = [f"{r['medians'][g]:.{digits}f}" if g in r["medians"] else "-" for g in grades]
        real_text = f"{real:.{digits}f}" if real is not None else "-"
        lines.append(f"| {TITLES[r['modality']]} | {QUANTITY_TITLES[r['quantity']]} | {r['compartment']} | "
                     + " | ".join(cells) + f" | {real_text} | {r['low']:.{digits}f}-{r['high']:.{digits}f} | {r['verdict']} |")
    passed = sum(r["verdict"] == "PASS" for r in results)
    failed = sum(r["verdict"] == "FAIL" for r in results)
    lines += ["", f"{passed} bands pass, {failed} fail, {len(results) - passed - failed} not measurable."]
    return "\n".join(lines).lstrip("\n")


def rows_to_json(rows: list[dict]) -> list[dict]:
    return [{"subject": r["subject"], "grade": r["grade"],
             "stats": {f"{q}/{c}": v for (q, c), v in r["stats"].items()}} for r in rows]
