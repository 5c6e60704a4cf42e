"""Figures of `tools.experiments`: Fig. 4 (DSC versus threshold) and Fig. 5 (overlays) analogues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scripts.common import MODALITIES

MAP_NAMES = ("t1", "t2", "t1c", "flair", "fused")
OVERLAYS = "overlays.png"


def figure_names(out_dir: Path) -> list[str]:
    """The figure files present in `out_dir`, sweeps in the paper's map order, then the overlays."""
    names = [f"sweep_{n}.png" for n in MAP_NAMES] + [OVERLAYS]
    return [n for n in names if (out_dir / n).is_file()]


def mean_curves(data: dict, name: str) -> dict:
    """{run: (thresholds, DSC)} of map `name` from results.json: each seed's mean curve, averaged over seeds.

    Pair evaluations ('cam@t1_t2') are left out.
    """
    out = {}
    for run, by_seed in data["runs"].items():
        curves = [record["sweep"][name] for record in by_seed.values() if name in record.get("sweep", {})]
        if "@" not in run and curves:
            out[run] = (np.asarray(curves[0]["thresholds"], dtype=float),
                        np.mean([np.asarray(c["dsc_mean"], dtype=float) for c in curves], axis=0))
    return out


def sweep_figures(data: dict, out_dir: Path) -> list[Path]:
    """Fig. 4 from results.json: per map name, DSC versus threshold of every run with that map (mean over seeds)."""
    from scripts.workflows.figures import plot_threshold_sweep

    written = []
    for name in MAP_NAMES:
        curves = mean_curves(data, name)
        if curves:
            written.append(plot_threshold_sweep(curves, out_dir / f"sweep_{name}.png",
                                                title=f"{name}: DSC versus threshold"))
    return written


def overlay_figure(models: dict, config_files: list[str], overrides: dict, out_png: Path):
    """Fig. 5: binarised maps of every K = 4 method on one test subject's largest tumour slice.

    `config_files` and `overrides` are those of the runs (one seed): they name the datalist,
    the volume cache and the network settings.
    """
    from monai.bundle import ConfigParser

    from scripts.data.subjects import load_datalist
    from scripts.model.networks import MultiModalCAM
    from scripts.workflows.figures import plot_overlays
    from scripts.workflows.map_engine import volume_maps

    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update(overrides)
    record = load_datalist(parser.get_parsed_content("datalist"), "testing")[0]
    volume = parser.get_parsed_content("volume_cache").get(record)
    image = torch.as_tensor(volume["image"])
    truth = torch.as_tensor(volume["mask"])[0] > 0
    brain = torch.as_tensor(volume["brain"]).bool()
    z = int(truth.flatten(0, 1).sum(0).argmax())
    base_channels = parser.get_parsed_content("base_channels")
    backbone = parser.get_parsed_content("backbone")
    rows = {}
    for run_name, ckpt in models.items():
        net = MultiModalCAM(list(MODALITIES), backbone=backbone, base_channels=base_channels)
        net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        method = "softmax" if run_name == "full_supervision" else "cam"
        maps = volume_maps(net, image[..., z:z + 1], method=method, gate=method == "cam") if brain[z] else {}
        masks = {m: (maps[m][..., 0] > 0.5).numpy() for m in maps}
        if masks:
            masks["fused"] = torch.stack([torch.as_tensor(v) for v in masks.values()]).any(0).numpy()
        rows[run_name] = masks
    images = {m: image[k, :, :, z].numpy() for k, m in enumerate(MODALITIES)}
    return plot_overlays(images, rows, truth[:, :, z].numpy(), out_png, title=f"{record['subject']}, slice {z}")
