"""How rough is the tumour against the brain around it, at the model's voxel size? Real or phantom data.

    python -m tools.texture_ratio --data DIR [--spacing 3] [--limit 12] [--out ratios.json]

Every subject with a segmentation goes through the preprocessing inference uses (LoadSubjectd, the
one resampling to `--spacing` mm, the z-score over brain), and per modality two ratios of
standard deviations inside the whole tumour over inside normal brain (slices in-plane, brain
edges and a 2-voxel margin around the tumour left out):

    res    fine: x - mean3x3(x), the scale of one or two voxels (real_scan_check's hf_ratio)
    band   middle: gauss(0.7 voxel) - gauss(2.5 voxels), the scale of a few voxels

It prints one line per subject and the median (range) per modality. Docs/recipe.md ("Real scans")
compares the phantom's values with real BraTS-space scans: a network trained on tumours rougher than
real ones learns the roughness as the tumour. A measuring tool: nothing here trains or selects a model.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

MODALITIES = ("t1", "t1c", "t2", "flair")
MIN_TUMOUR_VOXELS = 20  # smaller whole tumours (after resampling) are not measured


def texture_ratios(image: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]] | None:
    """Tumour / normal-brain std ratios of the two residuals, per channel.

    Args:
        image: (K, H, W, D) preprocessed channels (zero outside the brain).
        truth: (H, W, D) bool whole-tumour mask on the same grid.

    Returns {channel index: {"res": ratio, "band": ratio}}, or None when the tumour is too small.
    """
    from scipy import ndimage as ndi

    brain = np.abs(image).sum(0) > 0
    inner = ndi.binary_erosion(brain, structure=np.ones((3, 3, 1), bool), iterations=2)
    tumour = inner & truth
    normal = inner & ~ndi.binary_dilation(truth, iterations=2)  # partial-volume rim of the tumour left out
    if tumour.sum() < MIN_TUMOUR_VOXELS or normal.sum() < MIN_TUMOUR_VOXELS:
        return None
    out = {}
    for k, channel in enumerate(np.asarray(image, dtype=np.float64)):
        res = channel - ndi.uniform_filter(channel, size=(3, 3, 1), mode="nearest")
        band = ndi.gaussian_filter(channel, (0.7, 0.7, 0)) - ndi.gaussian_filter(channel, (2.5, 2.5, 0))
        out[k] = {name: float(field[tumour].std() / max(field[normal].std(), 1e-6))
                  for name, field in (("res", res), ("band", band))}
    return out


def with_lesion_texture(image, truth, factor: float):
    """The volume (K, H, W, D) after the training's lesion step at a fixed texture factor, contrast kept, on every
    tumour slice (scripts/data/randomisation.py): what the networks see when `lesion_texture` draws `factor`."""
    import torch

    from scripts.data.randomisation import BatchRandomiser

    step = BatchRandomiser(anatomy_prob=0.0, contrast_prob=0.0, bias_prob=0.0, lowres_prob=0.0, blur_prob=0.0,
                           noise_prob=0.0, lesion_prob=1.0, lesion_contrast_log_std=0.0,
                           lesion_texture=(float(factor), float(factor)))
    slices = torch.as_tensor(image).permute(3, 0, 1, 2).contiguous().float()  # (D, K, H, W)
    mask = torch.as_tensor(truth).permute(2, 0, 1)[:, None].float()
    batch = {"image": slices, "mask": mask, "label": mask.flatten(1).any(1).long()}
    return step.randomise(batch, 0)["image"].permute(1, 2, 3, 0).numpy()


def measure(data: str, spacing: float = 3.0, limit: int | None = None, lesion_texture: float | None = None) -> dict:
    """Ratios of every subject with a segmentation under `data` (any layout the bundle reads).

    Args:
        data: a dataset folder or datalist JSON.
        spacing: voxel size (mm) to resample to, as a model trained at that spacing sees the scans.
        limit: only the first `limit` subjects with a segmentation.
        lesion_texture: measure after the training's lesion step at this texture factor (`with_lesion_texture`);
            None = the data as it is.

    Returns {"subjects": {id: {modality: {"res", "band"}}}, "summary": {modality: {ratio: [median, min, max]}}}.
    """
    from scripts.data.subjects import discover_subjects
    from tools.real_scan_check import prepare_case

    settings = {"modalities": list(MODALITIES), "spacing": [float(spacing)] * 3, "spatial_size": None,
                "normalization": "volume"}
    records = [r for r in discover_subjects(data, allow_missing=True) if r.get("seg")][:limit]
    subjects = {}
    for record in records:
        prepared = prepare_case(record, settings)
        image = prepared["image"].numpy()
        if lesion_texture is not None:
            image = with_lesion_texture(image, prepared["truth"].numpy(), lesion_texture)
        ratios = texture_ratios(image, prepared["truth"].numpy())
        if ratios is None:
            continue
        names = prepared["modalities"]
        subjects[str(record["subject"])] = {names[k]: value for k, value in ratios.items()}
        print(record["subject"], "  ".join(f"{m} {v['res']:.2f}/{v['band']:.2f}"
                                           for m, v in subjects[str(record["subject"])].items()), flush=True)
    summary = {}
    for modality in MODALITIES:
        values = {name: [s[modality][name] for s in subjects.values() if modality in s] for name in ("res", "band")}
        if values["res"]:
            summary[modality] = {name: [float(np.median(v)), float(min(v)), float(max(v))] for name, v in values.items()}
    return {"data": str(data), "spacing": float(spacing), "lesion_texture": lesion_texture, "subjects": subjects,
            "summary": summary}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.texture_ratio", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder (any supported layout) or datalist JSON")
    parser.add_argument("--spacing", type=float, default=3.0, help="voxel size (mm) to resample to (default 3)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N subjects with a segmentation")
    parser.add_argument("--lesion-texture", type=float, default=None, metavar="FACTOR",
                        help="measure after the training's lesion step with this texture factor (0 = smooth, 1 = as is)")
    parser.add_argument("--out", help="also write the ratios as JSON here")
    args = parser.parse_args(argv)
    from scripts.data.subjects import DataError

    try:
        result = measure(args.data, args.spacing, args.limit, args.lesion_texture)
    except DataError as error:  # its message ends with the fix
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not result["subjects"]:
        print(f"error: no subject with a segmentation and a tumour of >= {MIN_TUMOUR_VOXELS} voxels in {args.data}. "
              f"Fix: pass a folder whose subjects have a seg file.", file=sys.stderr)
        return 2
    print(f"tumour / normal-brain std at {args.spacing:g} mm, median [min-max] over {len(result['subjects'])} subjects:")
    for modality, ratios in result["summary"].items():
        print(f"  {modality:5s} res {ratios['res'][0]:.2f} [{ratios['res'][1]:.2f}-{ratios['res'][2]:.2f}]   "
              f"band {ratios['band'][0]:.2f} [{ratios['band'][1]:.2f}-{ratios['band'][2]:.2f}]")
    if args.out:
        from scripts.common import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
