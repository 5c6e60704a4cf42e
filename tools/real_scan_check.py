"""Does a model find the tumour on real scans? Per case and modality, with the gate and the map apart.

    python -m tools.real_scan_check --ckpt_path models/model.pt --data DIR [--out runs/real_check]
        [--gate_threshold 0.5 --gate_source own|mean --threshold T --fusion mean] [--device cpu]

Without --threshold the masks are binarised as inference does: at the operating point recorded
beside the checkpoint for the fusion (an evaluation of the phantom's validation split writes it,
`<ckpt stem>.operating_point.json`), else at 0.5. One `false_firing_<case>.png` per case shows
the healthy slices each network fires on most (where it takes anatomy for tumour).

DIR is any layout the bundle reads (BraTS 2018-21 / 2023+ folders, nested or not, MSD Task01,
a datalist JSON); subjects with a `seg` are scored, the others only described. Each case goes
through the route inference takes (LoadSubjectd, the one preprocessing at the model's recorded
spacing / size / normalisation, the map engine), the reference through the same geometry
(nearest). Printed and written to OUT (real_check.md / .json, one overlay PNG per case), per
case and map (each modality's gated map, and the fused one):

    dsc           mask DSC at the read-out threshold (what inference delivers)
    best_dsc      the best DSC over the sweep 0.05 ... 0.95, and at which threshold (`best_t`)
    oracle_dsc    the ungated map on the reference's tumour slices only, at its best threshold:
                  how well the map localises when the gate is right (map vs gate failure)
    recall        tumour-slice recall: share of tumour slices whose gate opens (fused: mask non-empty)
    healthy_fire  share of healthy brain slices whose gate opens (fused: mask non-empty)
    p_tumour      median tumour probability of the network's slice classifier on tumour slices, and
                  `p_healthy` on healthy brain slices: how far from the gate threshold it misses
    tumour_z      median intensity of reference tumour voxels after preprocessing, and the
                  healthy brain's 99th percentile (`brain_p99`): an intensity mismatch shows here
    hf_ratio      fine texture: std of x - mean3x3(x) inside the tumour over that inside normal
                  brain (brain edges left out); real tumours are smoother than their surroundings

`--speckle SD` (a diagnostic that reads the reference) adds N(0, SD) noise, in z units, inside the
reference tumour after preprocessing: whether a network's gate waits for texture, not intensity.

A developer tool (nothing here trains or selects a model): the project is judged on real scans
it never tuned on (../shared/real-dev/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

FUSED = "fused"
COLUMNS = ("dsc", "best_dsc", "best_t", "oracle_dsc", "recall", "healthy_fire", "p_tumour", "p_healthy", "tumour_z",
           "brain_p99", "hf_ratio")


def load_model(ckpt_path: str, device: torch.device):
    """MultiModalCAM with the settings the checkpoint records, weights loaded, in eval mode."""
    from scripts.model.networks import MultiModalCAM, model_settings, read_checkpoint

    settings = model_settings(ckpt_path)
    network = MultiModalCAM(**settings)
    state = read_checkpoint(ckpt_path)
    network.load_state_dict(state["model"] if "model" in state and isinstance(state["model"], dict) else state)
    return network.to(device).eval(), settings


def _zoomed(volume, zoom: float):
    """The same voxels declared `zoom` times larger (the affine's linear part scaled): after resampling to the
    model's spacing the head is `zoom` times bigger."""
    volume = volume.clone()
    affine = volume.affine.clone()
    affine[:3, :3] = affine[:3, :3] * float(zoom)
    volume.affine = affine
    return volume


def prepare_case(record: dict, settings: dict, smooth_mm: float = 0.0, zoom: float = 1.0) -> dict:
    """One subject through inference's loading and preprocessing; the seg (if any) on the same grid.

    Args:
        record: the subject's record (scripts.data.subjects).
        settings: the model's recorded settings (modalities, spacing, spatial_size, normalization).
        smooth_mm: a diagnostic: Gaussian blur (sigma, mm) of the scans as loaded, before the
            preprocessing resamples them (0 = inference's route exactly).
        zoom: a diagnostic: the head scaled by this factor (its voxels declared larger) before the
            preprocessing, the reference with it (1 = inference's route exactly).

    Returns {"image": (K, H, W, D) tensor, "modalities": [...], "truth": (H, W, D) bool or None}.
    """
    from monai.transforms import GaussianSmooth

    from scripts.data.preprocessing import volume_preprocessing
    from scripts.data.volumes import load_volume
    from scripts.workflows.inference import LoadSubjectd

    loaded = LoadSubjectd(settings["modalities"])(dict(record))
    image = loaded["image"]
    if smooth_mm > 0:
        sigma = [float(smooth_mm) / float(s) for s in image.pixdim]
        image = GaussianSmooth(sigma=sigma)(image)  # a MetaTensor in, a MetaTensor (same affine) out
    data, label_keys = {"image": image}, []
    if record.get("seg"):
        data["seg"] = load_volume(record["seg"], str(record["subject"]), "seg")
        label_keys = ["seg"]
    if zoom != 1.0:
        data = {key: _zoomed(value, zoom) for key, value in data.items()}
    prep = volume_preprocessing(settings["spacing"], settings["spatial_size"], settings["normalization"],
                                image_keys=("image",), label_keys=label_keys)(data)
    image = torch.as_tensor(prep["image"]).as_subclass(torch.Tensor).float()
    truth = torch.as_tensor(prep["seg"]).as_subclass(torch.Tensor)[0] > 0 if label_keys else None
    return {"image": image, "modalities": loaded["modalities"], "truth": truth}


def fine_texture_ratio(channel: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> float | None:
    """Std of the residual x - mean3x3(x), in-plane, inside the tumour over inside normal brain.

    Pixels next to the background are left out (the brain's edge is not texture)."""
    from scipy import ndimage as ndi

    residual = channel - ndi.uniform_filter(channel, size=(3, 3, 1), mode="nearest")
    inner = ndi.binary_erosion(brain, structure=np.ones((3, 3, 1), bool))
    tumour, normal = inner & truth, inner & ~truth
    if tumour.sum() < 10 or normal.sum() < 10:
        return None
    return float(residual[tumour].std() / max(residual[normal].std(), 1e-6))


def _dsc(pred: np.ndarray, truth: np.ndarray) -> float:
    denominator = pred.sum() + truth.sum()
    return float(2.0 * np.logical_and(pred, truth).sum() / denominator) if denominator else 1.0


def score_case(gated, ungated, image: torch.Tensor, truth: torch.Tensor | None, threshold: float,
               gate_threshold: float, gate_source: str = "own") -> dict:
    """{map name: {column: value}} for one case (module docstring); columns needing a reference
    are None without one. A network's gate opens on its own probability, or with `gate_source`
    "mean" on the networks' mean (then every network's recall / healthy_fire is that shared gate's)."""
    from scripts.model.cams import gate_probabilities
    from scripts.workflows.metrics import DEFAULT_SWEEP, dice_curve

    opens = gate_probabilities(gated.probabilities, gate_source).numpy()

    brain = gated.brain.numpy()
    truth_np = truth.numpy().astype(bool) if truth is not None else None
    tumour_slices = truth_np.reshape(-1, truth_np.shape[-1]).any(0) & brain if truth_np is not None else None
    healthy_slices = brain & ~tumour_slices if tumour_slices is not None else brain
    brain_voxels = image.abs().sum(0).numpy() > 0
    rows = {}
    names = list(gated.names) + [FUSED]
    for index, name in enumerate(names):
        volume = (gated.fused if name == FUSED else gated.maps[index]).numpy()
        if name == FUSED:
            fired = (volume > threshold).reshape(-1, volume.shape[-1]).any(0)  # the mask is non-empty on the slice
        else:
            fired = opens[index] > gate_threshold
        row = dict.fromkeys(COLUMNS)
        row["healthy_fire"] = float(fired[healthy_slices].mean()) if healthy_slices.any() else None
        if name != FUSED:
            probability = gated.probabilities[index].numpy()
            row["p_healthy"] = float(np.median(probability[healthy_slices])) if healthy_slices.any() else None
            if tumour_slices is not None and tumour_slices.any():
                row["p_tumour"] = float(np.median(probability[tumour_slices]))
            channel = image[index].numpy()  # the image's channels are the networks' modalities, in order
            healthy = channel[brain_voxels & ~truth_np] if truth_np is not None else channel[brain_voxels]
            row["brain_p99"] = float(np.percentile(healthy, 99)) if healthy.size else None
            if truth_np is not None and truth_np.any():
                row["tumour_z"] = float(np.median(channel[truth_np]))
                row["hf_ratio"] = fine_texture_ratio(channel, truth_np, brain_voxels)
        if truth_np is not None:
            row["dsc"] = _dsc(volume > threshold, truth_np)
            curve = dice_curve(volume.astype(np.float32), truth_np, DEFAULT_SWEEP)
            row["best_dsc"], row["best_t"] = float(curve.max()), float(DEFAULT_SWEEP[int(curve.argmax())])
            row["recall"] = float(fired[tumour_slices].mean()) if tumour_slices.any() else None
            raw = (ungated.fused if name == FUSED else ungated.maps[index]).numpy() * tumour_slices
            row["oracle_dsc"] = float(dice_curve(raw.astype(np.float32), truth_np, DEFAULT_SWEEP).max())
        rows[name] = row
    return rows


def overlay(case: str, prepared: dict, gated, threshold: float, out_png: Path) -> Path:
    """One row per map (modalities, fused) at three slices: CAM heat over the image, reference
    contour white, mask contour red."""
    from matplotlib.figure import Figure

    from scripts.workflows.figures import _save, cam_overlay, contour_of

    truth = prepared["truth"]
    image = prepared["image"].numpy()
    area = (truth.numpy() if truth is not None else gated.fused.numpy() > threshold).reshape(-1, image.shape[-1]).sum(0)
    if area.max() == 0:
        area = gated.fused.numpy().reshape(-1, image.shape[-1]).sum(0)
    centre = int(np.argmax(area))
    depth = image.shape[-1]
    zs = sorted({max(0, min(depth - 1, centre + d)) for d in (-4, 0, 4)})
    names = list(gated.names) + [FUSED]
    fig = Figure(figsize=(2.0 * len(zs), 2.0 * len(names) + 0.4), dpi=100)
    for r, name in enumerate(names):
        k = gated.names.index("flair") if name == FUSED and "flair" in gated.names else min(r, len(gated.names) - 1)
        volume = gated.fused if name == FUSED else gated.maps[r]
        for c, z in enumerate(zs):
            ax = fig.add_subplot(len(names), len(zs), r * len(zs) + c + 1)
            plane = image[k, :, :, z]
            if (plane != 0).any():  # background shown as the darkest brain value, not as mid-grey z = 0
                plane = np.where(plane != 0, plane, plane[plane != 0].min())
            rgb = cam_overlay(np.rot90(plane), np.rot90(volume[:, :, z].numpy()),
                              None if truth is None else np.rot90(truth[:, :, z].numpy()))
            rgb[contour_of(np.rot90(volume[:, :, z].numpy() > threshold))] = (255, 0, 0)
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(f"{name} z={z}", fontsize=7)
            ax.set_axis_off()
    fig.suptitle(f"{case}: CAM (heat), mask > {threshold:g} (red), reference (white)", fontsize=8)
    return _save(fig, out_png)


def false_firing(case: str, prepared: dict, gated, ungated, out_png: Path, gate_threshold: float = 0.5,
                 count: int = 4) -> Path | None:
    """Where each network fires on healthy slices: per modality, the `count` slices without reference
    tumour (all slices for a case without a reference) with the highest tumour probability above the
    gate, the ungated CAM as heat over that modality's image and the slice's relative height in the
    brain. None when no network fires on a healthy slice. A diagnosis (issue 31, item 3): which
    anatomy the networks take for tumour."""
    from matplotlib.figure import Figure

    from scripts.workflows.figures import _save, cam_overlay

    image = prepared["image"].numpy()
    brain = gated.brain.numpy()
    truth = prepared["truth"]
    healthy = brain & ~(truth.numpy().reshape(-1, image.shape[-1]).any(0) if truth is not None else np.zeros_like(brain))
    heights = np.flatnonzero(brain)
    rows = []
    for k, name in enumerate(gated.names):
        probability = gated.probabilities[k].numpy()
        fired = np.flatnonzero(healthy & (probability > gate_threshold))
        top = fired[np.argsort(-probability[fired])][:count]
        rows.append((k, name, sorted(top.tolist()), probability))
    if not any(top for _, _, top, _ in rows):
        return None
    fig = Figure(figsize=(2.0 * count, 2.1 * len(rows) + 0.4), dpi=100)
    for r, (k, name, top, probability) in enumerate(rows):
        for c, z in enumerate(top):
            ax = fig.add_subplot(len(rows), count, r * count + c + 1)
            plane = image[k, :, :, z]
            if (plane != 0).any():
                plane = np.where(plane != 0, plane, plane[plane != 0].min())
            ax.imshow(cam_overlay(np.rot90(plane), np.rot90(ungated.maps[k][:, :, z].numpy())), interpolation="nearest")
            height = (z - heights.min()) / max(heights.max() - heights.min(), 1)
            ax.set_title(f"{name} z={z} p={probability[z]:.2f} h={height:.2f}", fontsize=7)
            ax.set_axis_off()
    fig.suptitle(f"{case}: healthy slices where each network fires (ungated CAM; h = relative height in the brain)",
                 fontsize=8)
    return _save(fig, out_png)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(results: dict, settings: dict) -> str:
    """One table: a row per case and map."""
    lines = [f"Read-out: gate ({settings.get('gate_source', 'own')}) > {settings['gate_threshold']:g}, "
             f"fusion {settings['fusion']}, mask > "
             f"{settings['threshold']:g}; model {settings['ckpt_path']}", "",
             "| case | map | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for case, rows in results.items():
        for name, row in rows.items():
            lines.append(f"| {case} | {name} | " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def run_check(ckpt_path: str, data: str, out: str | None, gate_threshold: float = 0.5, threshold: float | None = None,
              fusion: str = "mean", device: str = "cpu", subjects=None, smooth_mm: float = 0.0,
              speckle: float = 0.0, normalization: str | None = None, zoom: float = 1.0,
              gate_source: str = "own") -> dict:
    """Score every case under `data` (module docstring); write the table, JSON and overlays to `out`.

    Args:
        ckpt_path: a stage-1 model.pt (MultiModalCAM state dict with its recorded settings).
        data: a folder in any supported layout, or a datalist JSON.
        out: output folder (created); None writes nothing.
        gate_threshold: tumour probability a slice must exceed to keep its map.
        threshold: binarisation threshold of every map; None = inference's rule: the operating point
            recorded beside the checkpoint for `fusion` (chosen on the phantom's validation split by an
            evaluation), else 0.5.
        fusion: "mean" or "max" over the modalities.
        device: torch device name.
        subjects: only these subject ids (default all).
        smooth_mm: diagnostic Gaussian blur of the scans before preprocessing (`prepare_case`).
        speckle: diagnostic N(0, speckle) noise (z units) inside the reference tumour, after
            preprocessing (cases without a reference are left as they are).
        normalization: the intensity normalisation of the scans (None: the model's recorded
            one; "robust" clips each modality to its brain's 0.5-99.5th percentiles first).
        zoom: diagnostic scaling of the heads before preprocessing (`prepare_case`).
        gate_source: "own" (each network's gate follows its own slice probability) or "mean" (the
            networks' mean probability opens every gate), as the configs' `gate_source`.

    Returns:
        {case: {map: {column: value}}}.
    """
    from scripts.common import atomic_write_json, atomic_write_text
    from scripts.data.subjects import discover_subjects
    from scripts.workflows.map_engine import MapEngine

    from scripts.workflows.operating_point import recorded_threshold

    torch_device = torch.device(device)
    network, model = load_model(ckpt_path, torch_device)
    if threshold is None:
        threshold = recorded_threshold(ckpt_path, fusion, gate_source=gate_source)
    if normalization is not None:
        model = {**model, "normalization": normalization}
    records = [r for r in discover_subjects(data, allow_missing=True) if not subjects or r["subject"] in subjects]
    gated_engine = MapEngine(gate_threshold=gate_threshold, fusion=fusion, threshold=threshold, gate_source=gate_source,
                             slice_normalization=model["slice_normalization"])
    ungated_engine = MapEngine(gate=False, fusion=fusion, threshold=threshold,
                               slice_normalization=model["slice_normalization"])
    settings = {"ckpt_path": str(ckpt_path), "gate_threshold": gate_threshold, "gate_source": gate_source,
                "threshold": threshold,
                "fusion": fusion, "smooth_mm": smooth_mm, "speckle": speckle, "zoom": zoom, "model": model}
    results = {}
    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for record in records:
        case = str(record["subject"])
        prepared = prepare_case(record, model, smooth_mm, zoom)
        if speckle > 0 and prepared["truth"] is not None:
            noise = torch.randn(prepared["image"].shape, generator=torch.Generator().manual_seed(0))
            prepared["image"] = prepared["image"] + float(speckle) * noise * prepared["truth"]
        gated = gated_engine(network, prepared["image"].to(torch_device), channels=prepared["modalities"])
        ungated = ungated_engine(network, prepared["image"].to(torch_device), channels=prepared["modalities"])
        results[case] = score_case(gated, ungated, prepared["image"], prepared["truth"], threshold, gate_threshold,
                                   gate_source)
        if out_dir:
            overlay(case, prepared, gated, threshold, out_dir / f"overlay_{case}.png")
            false_firing(case, prepared, gated, ungated, out_dir / f"false_firing_{case}.png", gate_threshold)
        print(f"{case}: fused dsc {_fmt(results[case][FUSED]['dsc'])}", file=sys.stderr, flush=True)
    if out_dir:
        atomic_write_json(out_dir / "real_check.json", {"settings": settings, "cases": results})
        atomic_write_text(out_dir / "real_check.md", markdown(results, settings))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt_path", default="models/model.pt")
    parser.add_argument("--data", required=True, help="folder of real scans (any supported layout) or datalist")
    parser.add_argument("--out", default="runs/real_check")
    parser.add_argument("--gate_threshold", type=float, default=0.5)
    parser.add_argument("--threshold", type=float, default=None,
                        help="binarisation threshold (default: as inference, the model's recorded operating point, "
                             "else 0.5)")
    parser.add_argument("--fusion", choices=("mean", "max"), default="mean")
    parser.add_argument("--gate_source", choices=("own", "mean"), default="own",
                        help="whose slice probability opens a network's gate: its own, or the networks' mean")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--subjects", nargs="*", default=None)
    parser.add_argument("--smooth_mm", type=float, default=0.0, help="diagnostic: blur the scans first (sigma, mm)")
    parser.add_argument("--zoom", type=float, default=1.0,
                        help="diagnostic: scale the heads by this factor before preprocessing (their voxels declared larger)")
    parser.add_argument("--speckle", type=float, default=0.0,
                        help="diagnostic: N(0, SD) noise inside the reference tumour (z units)")
    from scripts.data.volumes import NORMALIZATIONS

    parser.add_argument("--normalization", choices=NORMALIZATIONS, default=None,
                        help="the scans' intensity normalisation (default: the model's recorded one)")
    args = parser.parse_args(argv)
    results = run_check(args.ckpt_path, args.data, args.out, args.gate_threshold, args.threshold, args.fusion,
                        args.device, args.subjects, args.smooth_mm, args.speckle, args.normalization, args.zoom,
                        args.gate_source)
    print(Path(args.out, "real_check.md").read_text() if args.out else markdown(results, {
        "ckpt_path": args.ckpt_path, "gate_threshold": args.gate_threshold, "threshold": args.threshold,
        "fusion": args.fusion, "gate_source": args.gate_source}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
