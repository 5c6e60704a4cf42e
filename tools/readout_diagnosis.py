"""Where do a trained model's weak masks go wrong? Per-volume DSC under alternative read-outs.

    python -m tools.readout_diagnosis --ckpt_dir RUN/models --dataset_dir DATA --cache_dir CACHE
        [--split validation] [--modalities "['t1','t2']"]

Reads `model.pt` of a training run of configs/train.yaml (same dataset, cache and
geometry settings) and prints, per modality and fused (max), the mean per-volume DSC % of:
the paper's read-out (tumour-channel CAM, max-normalised, gated at p > gate_threshold,
binarised at 0.5), the class-difference CAM relu(CAM_tumour - CAM_healthy), oracle gating
(the ground-truth slice labels instead of the classifier) and higher thresholds. A
developer tool (docs/recipe.md): it reuses the map engine's functions, never replaces them.
"""

from __future__ import annotations

import argparse
import ast

import numpy as np
import torch

ROOT_CONFIG = "configs/train.yaml"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8)


def _dsc(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """MONAI's Dice of one binary volume; empty truth and empty prediction count as 1."""
    from monai.metrics import compute_dice

    return float(compute_dice(pred[None, None].float(), truth[None, None].float(), ignore_empty=False))


def volume_readouts(nets, image: torch.Tensor, truth: torch.Tensor, gate_threshold: float) -> dict:
    """{read-out name: per-modality map volumes (K, H, W, D) whose mask is map > 0.5}."""
    from scripts.model.cams import max_normalise, pooling_of, tumour_probability

    brain = (image != 0).reshape(-1, image.shape[-1]).any(0)
    tumour_slices = truth.reshape(-1, truth.shape[-1]).any(0)
    out: dict[str, list] = {}
    with torch.no_grad():
        for k, net in enumerate(nets):
            maps = net(image[k].permute(2, 0, 1)[:, None]).float()  # (D, C, H, W)
            keep = ((tumour_probability(maps, 1, *pooling_of(net)) > gate_threshold) & brain).float()[:, None, None]
            oracle = (tumour_slices & brain).float()[:, None, None]
            cam = max_normalise(maps[:, 1])
            views = {"paper": cam * keep, "class_difference": max_normalise(maps[:, 1] - maps[:, 0]) * keep,
                     "oracle_gating": cam * oracle}
            for t in THRESHOLDS[1:]:  # rescaled so that "> 0.5" means "> t"
                views[f"threshold_{t}"] = (cam * keep > t).float()
            for name, view in views.items():
                out.setdefault(name, []).append(view.permute(1, 2, 0))
    return {name: torch.stack(v) for name, v in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--modalities", help="e.g. \"['t1','t2']\" (default: the config's)")
    args = parser.parse_args(argv)

    from monai.bundle import ConfigParser

    from scripts.data.slices import VolumeDataset
    from scripts.data.subjects import load_datalist

    config = ConfigParser()
    config.read_config(ROOT_CONFIG)
    config.update({"dataset_dir": args.dataset_dir, "cache_dir": args.cache_dir, "precision": "fp32",
                   "channels_last": False})
    if args.modalities:
        config["modalities"] = ast.literal_eval(args.modalities)
    network = config.get_parsed_content("network_def")
    state = torch.load(f"{args.ckpt_dir}/model.pt", map_location="cpu", weights_only=False)
    network.load_state_dict(state.get("model", state))
    network.eval()
    records = load_datalist(config.get_parsed_content("datalist"), args.split)
    dataset = VolumeDataset(records, config.get_parsed_content("volume_cache"), list(network.modalities))
    gate = float(config.get_parsed_content("gate_threshold"))
    scores: dict[str, list] = {}
    for item in dataset:
        truth = item["mask"][0] > 0.5
        for name, volumes in volume_readouts(network.nets, item["image"], truth, gate).items():
            masks = volumes > 0.5
            row = [_dsc(m, truth) for m in masks] + [_dsc(masks.any(0), truth)]
            scores.setdefault(name, []).append(row)
    columns = list(network.modalities) + ["fused"]
    print(f"per-volume DSC %, {len(dataset)} {args.split} volumes")
    print("| read-out | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, rows in scores.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in np.mean(rows, axis=0) * 100) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
