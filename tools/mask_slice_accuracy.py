"""How well do a model's masks tell tumour slices from healthy ones?

    python -m tools.mask_slice_accuracy --ckpt RUN/models/model.pt --dataset_dir DATA --cache_dir CACHE
        [--method softmax|cam] [--gate true|false] [--split validation] [--min_pixels 1 5 10 20]

A slice counts as 'tumour' when the model's mask (map > threshold, the map engine's read-out)
has at least k pixels on it; the tool prints, per modality, the slice accuracy this implies
on the split's brain slices (the validator's slices and labels: any tumour voxel = tumour)
for each k, next to the rate of the majority class. Run on a fully supervised model
(`--method softmax --gate false`), it bounds what a slice classifier of the same network and
data can be expected to reach: where pixel labels give 85-90 %, a weak network's 90 % slice
accuracy is not a fair target (docs/recipe.md). A developer tool: it calls the map engine,
never replaces it; the model's recorded settings give the geometry.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

MIN_PIXELS = (1, 5, 10, 20)


def slice_accuracy(mask: np.ndarray, truth: np.ndarray, brain: np.ndarray, min_pixels: int) -> tuple[int, int]:
    """(correct, counted) over the brain slices of one volume.

    Args:
        mask: (H, W, D) bool, the model's mask.
        truth: (H, W, D) bool, the ground-truth tumour.
        brain: (D,) bool, the slices that hold brain (the ones counted).
        min_pixels: a slice is predicted 'tumour' when its mask has at least this many pixels.
    """
    depth = mask.shape[-1]
    predicted = mask.reshape(-1, depth).sum(0) >= min_pixels
    label = truth.reshape(-1, depth).any(0)
    return int((predicted == label)[brain].sum()), int(brain.sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a model.pt of configs/train.yaml (weak or full supervision)")
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--method", default="cam", help="the map engine's read-out: cam (weak) | softmax (full)")
    parser.add_argument("--gate", default="true", help="zero the maps of slices classified healthy (true | false)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--min_pixels", type=int, nargs="+", default=list(MIN_PIXELS))
    args = parser.parse_args(argv)

    from scripts.common import MODALITIES
    from scripts.data.subjects import load_datalist
    from scripts.data.volumes import VolumeCache
    from scripts.runtime import as_flag
    from scripts.stage2.pseudo_labels import load_cam_model
    from scripts.workflows.map_engine import MapEngine

    model = load_cam_model(args.ckpt)
    settings = model.settings
    cache = VolumeCache(args.cache_dir, spatial_size=settings.spatial_size, spacing=settings.spacing,
                        normalization=settings.normalization)
    engine = MapEngine(method=args.method, gate=as_flag(args.gate, "gate"), threshold=args.threshold,
                       slice_normalization=settings.slice_normalization)
    records = load_datalist(f"{args.dataset_dir}/datalist.json", args.split)
    counts = {(m, k): [0, 0] for m in model.modalities for k in args.min_pixels}
    tumour = slices = 0
    with torch.no_grad():
        for record in records:
            volume = cache.get(record)
            image = torch.as_tensor(volume["image"])[[MODALITIES.index(m) for m in model.modalities]]
            result = engine(model, image, channels=list(model.modalities), brain=volume["brain"])
            truth = volume["mask"][0].numpy() > 0
            brain = result.brain.numpy().astype(bool)
            tumour += int(truth.reshape(-1, truth.shape[-1]).any(0)[brain].sum())
            slices += int(brain.sum())
            for index, modality in enumerate(result.names):
                mask = result.maps[index].numpy() > args.threshold
                for k in args.min_pixels:
                    correct, counted = slice_accuracy(mask, truth, brain, k)
                    counts[(modality, k)][0] += correct
                    counts[(modality, k)][1] += counted
    print(f"{len(records)} {args.split} volumes, {slices} brain slices, {100 * tumour / max(slices, 1):.1f} % with "
          f"tumour; majority class {100 * max(tumour, slices - tumour) / max(slices, 1):.1f} %")
    print(f"slice accuracy % of the masks ({args.method}, gate {as_flag(args.gate, 'gate')}, "
          f"map > {args.threshold:g}): a slice is 'tumour' when its mask has >= k pixels")
    print("| modality | " + " | ".join(f"k >= {k}" for k in args.min_pixels) + " |")
    print("|---|" + "---|" * len(args.min_pixels))
    for modality in model.modalities:
        cells = [100 * c / max(n, 1) for c, n in (counts[(modality, k)] for k in args.min_pixels)]
        print(f"| {modality} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
