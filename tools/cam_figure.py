"""A figure of a trained model's tumour CAMs on validation slices, per modality (docs/recipe.md).

    python -m tools.cam_figure --ckpt runs/stage1_study/topk01/fp32/seed1337/models/model.pt \
        --datalist runs/stage1_study/splits/seed1337.json --out docs/figures/recipe_cams_topk.png

Rows: validation subjects (every `--every`-th), each at its slice with the most tumour. Columns:
the FLAIR slice with the reference outline, then each network's ungated, max-normalised tumour
CAM (the map the 0.5 threshold reads), titled with the network's slice probability. Several
checkpoints (`--ckpt A B`) are drawn one above the other, labelled by `--labels`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def _model(ckpt: str):
    from scripts.model.networks import MultiModalCAM, model_settings, read_checkpoint

    settings = model_settings(ckpt)
    net = MultiModalCAM(settings["modalities"], backbone=settings["backbone"], base_channels=settings["base_channels"],
                        pooling=settings["pooling"])
    state = read_checkpoint(ckpt)
    net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return net.eval(), settings


def _slices(datalist: str, settings: dict, cache_dir: str, subjects: int, every: int):
    from scripts.data.slices import SliceDataset
    from scripts.data.subjects import load_datalist
    from scripts.data.volumes import VolumeCache

    cache = VolumeCache(cache_dir, spatial_size=settings["spatial_size"], spacing=settings["spacing"],
                        normalization=settings["normalization"])
    data = SliceDataset(load_datalist(datalist, "validation"), cache, settings["modalities"], 0.0,
                        settings["slice_normalization"])
    best: dict = {}
    for index, (record_index, _) in enumerate(data.index):
        if int(data.labels[index]) == 1:
            area = float(np.asarray(data[index]["mask"]).sum())
            name = data.records[record_index]["subject"]
            if area > best.get(name, (0.0, None))[0]:
                best[name] = (area, index)
    chosen = [best[name][1] for name in sorted(best)][::every][:subjects]
    return [data[i] for i in chosen]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", nargs="+", required=True, help="model.pt of one or more runs")
    parser.add_argument("--labels", nargs="*", help="one label per checkpoint")
    parser.add_argument("--datalist", required=True, help="the runs' datalist (validation split)")
    parser.add_argument("--cache_dir", default="data/cache")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--every", type=int, default=4, help="every n-th validation subject")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scripts.common import atomic_path
    from scripts.model.cams import maps_and_probabilities

    labels = args.labels or [Path(c).parent.parent.name for c in args.ckpt]
    models = [_model(c) for c in args.ckpt]
    items = _slices(args.datalist, models[0][1], args.cache_dir, args.subjects, args.every)
    modalities = models[0][1]["modalities"]
    rows = len(items) * len(models)
    fig, axes = plt.subplots(rows, 1 + len(modalities), figsize=(2.0 * (1 + len(modalities)), 2.1 * rows),
                             squeeze=False)
    flair = modalities.index("flair") if "flair" in modalities else 0
    for m, (net, _) in enumerate(models):
        for s, item in enumerate(items):
            row = axes[m * len(items) + s]
            image, mask = item["image"], np.asarray(item["mask"]).squeeze()
            row[0].imshow(image[flair].numpy().T, cmap="gray", origin="lower")
            row[0].contour(mask.T, [0.5], colors="w", linewidths=0.7, origin="lower")
            row[0].set_title(f"{labels[m]}: {item['subject']}"[:34], fontsize=7)
            for k, name in enumerate(modalities):
                cam, prob = maps_and_probabilities(net.nets[k], image[k][None, None], "cam")
                row[1 + k].imshow(cam[0].numpy().T, cmap="jet", vmin=0, vmax=1, origin="lower")
                row[1 + k].contour(mask.T, [0.5], colors="w", linewidths=0.7, origin="lower")
                row[1 + k].set_title(f"{name} p={float(prob[0]):.2f}", fontsize=7)
            for ax in row:
                ax.axis("off")
    fig.tight_layout()
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, format="png", dpi=70)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
