"""Figures of `tools.experiments`: Fig. 3 (transforms), Fig. 4 (DSC versus threshold) and Fig. 5 (overlays) analogues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scripts.common import MODALITIES

MAP_NAMES = ("t1", "t2", "t1c", "flair", "fused")
OVERLAYS = "overlays.png"
TRANSFORMS = "transforms.png"
CURVES = "curves.png"
CURVE_RUNS = ("cam", "seam_scale", "seam_all", "cmer")  # the main stage-1 rows
FIG4 = "fig4_threshold.png"
FIG4_RUNS = CURVE_RUNS + ("full_supervision",)


def figure_names(out_dir: Path) -> list[str]:
    """The figure files present in `out_dir`, sweeps in the paper's map order, then the overlays."""
    names = [FIG4] + [f"sweep_{n}.png" for n in MAP_NAMES] + [TRANSFORMS, CURVES, OVERLAYS]
    return [n for n in names if (out_dir / n).is_file()]


def mean_curves(data: dict, name: str) -> dict:
    """{run: (thresholds, DSC)} of map `name` from results.json: each seed's mean curve, averaged over seeds.

    Pair evaluations ('cam@t1_t2') and other read-outs ('cam.gradcampp') are left out.
    """
    out = {}
    for run, by_seed in data["runs"].items():
        curves = [record["sweep"][name] for record in by_seed.values() if name in record.get("sweep", {})]
        if "@" not in run and "." not in run and curves:
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


def fig4_figure(data: dict, out_dir: Path, runs=FIG4_RUNS) -> Path | None:
    """The paper's Fig. 4 from the records: test DSC versus binarisation threshold, one panel per modality and the
    fused map, one line per main method (mean over seeds, the band from the lowest to the highest seed), the
    fused map under max fusion dashed where the records hold it, the reported threshold marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = [r for r in runs if any(rec.get("sweep") for rec in data["runs"].get(r, {}).values())]
    if not present:
        return None
    fig = Figure(figsize=(15.0, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(MAP_NAMES), sharey=True)
    colours = {}
    for ax, name in zip(axes, MAP_NAMES):
        for run in present:
            for key, style in ((name, "-"), ("fused_max", "--") if name == "fused" else (None, None)):
                curves = [r["sweep"][key] for r in data["runs"][run].values() if key and key in r.get("sweep", {})]
                if not curves:
                    continue
                t = np.asarray(curves[0]["thresholds"], dtype=float)
                values = 100 * np.asarray([c["dsc_mean"] for c in curves], dtype=float)
                label = f"{run} ({len(curves)} seeds)" if style == "-" else f"{run}, max fusion"
                line, = ax.plot(t, values.mean(0), style, color=colours.get(run), label=label)
                colours.setdefault(run, line.get_color())
                if len(curves) > 1 and style == "-":
                    ax.fill_between(t, values.min(0), values.max(0), color=line.get_color(), alpha=0.15, linewidth=0)
        ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(name if name == "fused" else name.upper(), fontsize=10)
        ax.set_xlabel("threshold")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test DSC (%)")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("DSC versus binarisation threshold (the paper's Fig. 4): mean over seeds, band = seed range",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    target = Path(out_dir) / FIG4
    fig.savefig(target)
    return target


def seed_parser(config_files: list[str], overrides: dict):
    """The runs' configs, with the seed's datalist written as training writes it when this machine has none."""
    from monai.bundle import ConfigParser

    from scripts.data.datalist import ensure_dataset

    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update(overrides)
    get = parser.get_parsed_content
    ensure_dataset(get("dataset_dir"), datalist=get("datalist_path"), phantom=get("phantom"), split=get("split"),
                   seed=get("seed"), make_phantom=get("make_phantom"), allow_missing=get("allow_missing"))
    return parser


def _test_volume(parser, subject: str | None = None):
    """(subject, image (K,H,W,D), truth (H,W,D) bool) of a test volume (the first of the split by default)."""
    from scripts.data.subjects import load_datalist

    records = load_datalist(parser.get_parsed_content("datalist"), "testing")
    record = next((r for r in records if r["subject"] == subject), records[0]) if subject else records[0]
    volume = parser.get_parsed_content("volume_cache").get(record)
    return record["subject"], torch.as_tensor(volume["image"]), torch.as_tensor(volume["mask"])[0] > 0


def overlay_masks(ckpt, run_name: str, config_files: list[str], overrides: dict) -> dict:
    """Fig. 5 data of one run: its binarised maps (each modality and the fused map, at the configs'
    threshold and fusion) on the first test subject's largest tumour slice, packed for a record.

    `config_files` and `overrides` are the run's own (they name the datalist, cache and read-out).
    """
    from scripts.model.cams import binarise, fuse_maps
    from scripts.model.networks import MultiModalCAM
    from scripts.workflows.map_engine import volume_maps
    from tools.experiment_records import pack_mask

    parser = seed_parser(config_files, overrides)
    subject, image, truth = _test_volume(parser)
    z = int(truth.flatten(0, 1).sum(0).argmax())
    modalities = list(parser.get_parsed_content("modalities"))
    net = MultiModalCAM(modalities, backbone=parser.get_parsed_content("backbone"),
                        base_channels=parser.get_parsed_content("base_channels"))
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    method = "softmax" if run_name == "full_supervision" else "cam"
    channels = [MODALITIES.index(m) for m in modalities]
    maps = volume_maps(net, image[channels][..., z:z + 1], method=method, gate=method == "cam")
    maps = {m: maps[m][..., 0] for m in modalities}
    threshold = float(parser.get_parsed_content("threshold"))
    masks = {m: binarise(v, threshold).numpy() for m, v in maps.items()}
    if method == "cam":  # the read-out's fused map; a segmentation network's softmax has none
        stacked = torch.stack([maps[m] for m in modalities])[None]
        masks["fused"] = binarise(fuse_maps(stacked, parser.get_parsed_content("fusion"))[0], threshold).numpy()
    return {"subject": subject, "slice": z, "shape": list(truth.shape[:2]),
            "masks": {name: pack_mask(mask) for name, mask in masks.items()}}


def overlay_figure(overlays: dict, config_files: list[str], overrides: dict, out_png: Path):
    """Fig. 5 from records: {run: overlay_masks(...)} drawn over that test slice's images and truth.

    `config_files` and `overrides` are those of the runs' first seed (datalist and volume cache).
    """
    from scripts.workflows.figures import plot_overlays
    from tools.experiment_records import unpack_mask

    first = next(iter(overlays.values()))
    subject, z = first["subject"], int(first["slice"])
    _, image, truth = _test_volume(seed_parser(config_files, overrides), subject)
    rows = {run: {name: unpack_mask(text, o["shape"]) for name, text in o["masks"].items()}
            for run, o in overlays.items() if o["subject"] == subject and int(o["slice"]) == z}
    images = {m: image[k, :, :, z].numpy() for k, m in enumerate(MODALITIES)}
    return plot_overlays(images, rows, truth[:, :, z].numpy(), out_png, title=f"{subject}, slice {z}")


def transform_figure(data: dict, out_dir: Path, runs: dict) -> Path | None:
    """Fig. 3: per modality (and fused), test DSC of the baseline, CMER with one transform kind, and CMER
    with all of them (first seed). `runs` is {label: run name} in bar order; None when none ran."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tools.experiment_report import cell

    first = data["seeds"][:1]
    present = {label: run for label, run in runs.items() if run in data["runs"]}
    if len(present) < 2:  # nothing to compare yet
        return None
    fig = Figure(figsize=(8.0, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(present)
    for i, (label, run) in enumerate(present.items()):
        values = [100 * (cell(data, run, name, "dsc", first)["mean"] or 0.0) for name in MAP_NAMES]
        ax.bar(np.arange(len(MAP_NAMES)) + (i - (len(present) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(np.arange(len(MAP_NAMES)), [n.upper() if n != "fused" else "fused" for n in MAP_NAMES])
    ax.set_ylabel("test DSC (%)")
    ax.set_title("Transforms in the equivariance terms (first seed)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    target = Path(out_dir) / TRANSFORMS
    fig.savefig(target)
    return target


def curves_figure(data: dict, out_dir: Path, runs=CURVE_RUNS) -> Path | None:
    """Training curves from the records: per epoch, validation DSC per map (top row) and slice accuracy per
    modality (bottom row) of the main stage-1 runs, mean over the seeds that recorded curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = {run: list(data.get("curves", {}).get(run, {}).values()) for run in runs}
    present = {run: curves for run, curves in present.items() if curves}
    if not present:
        return None
    fig = Figure(figsize=(13.0, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(MAP_NAMES), sharex=True, sharey=True)
    for row, metric in enumerate(("val_dsc", "val_acc")):
        for col, name in enumerate(MAP_NAMES):
            ax = axes[row, col]
            for run, curves in present.items():
                n = min(len(c["epochs"]) for c in curves)
                values = [[e.get(f"{metric}_{name}") for e in c["epochs"][:n]] for c in curves]
                if n and all(isinstance(v, (int, float)) for vs in values for v in vs):
                    ax.plot(np.arange(1, n + 1), 100 * np.mean(values, axis=0), marker=".", label=run)
            ax.set_title(f"{name} {'DSC' if metric == 'val_dsc' else 'slice accuracy'}", fontsize=9)
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("epoch")
        axes[row, 0].set_ylabel("validation (%)")
    axes[0, 0].legend(fontsize=7)
    axes[1, -1].set_visible(False)  # the fused map has no classifier
    fig.tight_layout()
    target = Path(out_dir) / CURVES
    fig.savefig(target)
    return target
