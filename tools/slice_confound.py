"""How much of the slice-level label can be guessed without looking at the tumour?

    python -m tools.slice_confound --data DIR [--modality t1]

A weakly supervised slice classifier may learn where a slice lies in the head instead of
what it shows: tumours sit mostly in mid-brain slices, so "large brain cross-section" or
"middle of the brain" predicts "tumour" better than chance. This tool prints, for any
dataset with segmentations (the phantom or real BraTS), the accuracy of the best such
shortcut next to the majority-class rate:

- brain area: one threshold on the number of brain voxels in the slice (either direction);
- relative height: one window on the slice's height within the brain's axial extent (0 =
  lowest brain slice, 1 = highest), on a 0.05 grid.

Both thresholds are fitted on the same slices they are scored on, so the figures are what
the shortcut can reach at best. A network whose validation slice accuracy stays at these
figures has not shown that it sees the tumour (docs/recipe.md). A developer tool: it reads
the volumes as stored (no resampling); brain = voxels where the modality is non-zero.
"""

from __future__ import annotations

import argparse

import numpy as np
from monai.transforms import LoadImage


def slice_table(records, modality: str) -> dict[str, np.ndarray]:
    """Per brain slice of every record: brain area (voxels), relative height, label (any tumour voxel).

    Args:
        records: subject records of `scripts.data.subjects.discover_subjects` (with "seg").
        modality: the image whose non-zero voxels define the brain.
    """
    load = LoadImage(image_only=True)  # the volumes as stored: no orientation change, no resampling
    area, height, label = [], [], []
    for record in records:
        if record.get("seg") is None:
            continue
        if "images" in record:
            image = np.asarray(load(record["images"][modality]))
        else:
            channel = list(record["channels"]).index(modality)
            image = np.asarray(load(record["image4d"]))[..., channel]
        seg = np.asarray(load(record["seg"])) > 0
        brain_area = (image != 0).reshape(-1, image.shape[2]).sum(0)
        tumour = seg.reshape(-1, seg.shape[2]).any(0)
        z = np.flatnonzero(brain_area)
        if len(z) < 2:
            continue
        rel = (z - z[0]) / (z[-1] - z[0])
        area.extend(brain_area[z]), height.extend(rel), label.extend(tumour[z])
    return {"area": np.asarray(area, float), "height": np.asarray(height, float),
            "label": np.asarray(label, bool)}


def best_threshold_accuracy(values: np.ndarray, label: np.ndarray) -> float:
    """Accuracy of the best rule `value > t` or `value <= t` over every t."""
    best = 0.0
    for t in np.unique(values):
        above = values > t
        best = max(best, float((above == label).mean()), float((~above == label).mean()))
    return best


def best_window_accuracy(values: np.ndarray, label: np.ndarray, step: float = 0.05) -> tuple[float, float, float]:
    """(accuracy, low, high) of the best rule `low <= value <= high` on a `step` grid of [0, 1]."""
    grid = np.round(np.arange(0.0, 1.0 + step / 2, step), 6)
    best = (float((~label).mean()), 0.0, 0.0)
    for i, low in enumerate(grid):
        for high in grid[i:]:
            inside = (values >= low) & (values <= high)
            accuracy = float((inside == label).mean())
            if accuracy > best[0]:
                best = (accuracy, float(low), float(high))
    return best


def main(argv=None) -> int:
    from scripts.data.subjects import discover_subjects

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder (any supported layout) or datalist .json")
    parser.add_argument("--modality", default="t1", help="image whose non-zero voxels are the brain")
    args = parser.parse_args(argv)
    table = slice_table(discover_subjects(args.data), args.modality)
    label = table["label"]
    if not len(label):
        raise SystemExit(f"no labelled brain slices under {args.data}: the tool needs segmentations")
    positive = float(label.mean())
    window = best_window_accuracy(table["height"], label)
    print(f"{len(label)} brain slices, {100 * positive:.1f} % with tumour")
    print("| slice classifier | accuracy % |")
    print("|---|---|")
    print(f"| majority class (always '{'tumour' if positive > 0.5 else 'healthy'}') | {100 * max(positive, 1 - positive):.1f} |")
    print(f"| one threshold on brain area | {100 * best_threshold_accuracy(table['area'], label):.1f} |")
    print(f"| one window on relative height ({window[1]:.2f}-{window[2]:.2f}) | {100 * window[0]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
