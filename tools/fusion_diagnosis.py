"""Would a fused map that averages only the networks whose gate is open do better? A diagnostic.

    python -m tools.fusion_diagnosis --ckpt_path MODEL --datalist SPLIT.json --real ../shared/real-dev

Mean fusion (the default) averages all K gated maps, so a network whose gate stays shut on a slice pulls the fused
map down there ("averages its silence in": docs/recipe.md, "Real scans, 2026-12-08"). The alternative here divides
by the number of open gates instead. Per fusion it picks the threshold on the datalist's validation split (mean
per-volume DSC over the sweep) and scores the referenced real cases at that threshold. Prints one JSON line; never
trains or selects a shipped model.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def open_gate_mean(maps: np.ndarray, probabilities: np.ndarray, gate_threshold: float = 0.5) -> np.ndarray:
    """Mean of the (K, H, W, D) gated maps over the networks whose slice probability (K, D) is above the gate."""
    opened = probabilities > gate_threshold
    return (maps.sum(0) / np.maximum(opened.sum(0), 1)[None, None, :]).astype(np.float32)


def fused_maps(engine, network, prepared: dict, gate_threshold: float) -> dict:
    """{"mean": the default's fused map, "open": `open_gate_mean`} of one prepared case."""
    out = engine(network, prepared["image"], channels=prepared["modalities"])
    maps, probabilities = out.maps.numpy(), out.probabilities.numpy()
    return {"mean": maps.mean(0).astype(np.float32), "open": open_gate_mean(maps, probabilities, gate_threshold)}


def diagnose(ckpt_path: str, datalist: str, real: str, gate_threshold: float = 0.5) -> dict:
    """Validation-chosen threshold and real-case DSC per fusion (module docstring)."""
    from scripts.data.subjects import discover_subjects, load_datalist
    from scripts.workflows.map_engine import MapEngine
    from scripts.workflows.metrics import DEFAULT_SWEEP, dice_curve
    from tools.real_scan_check import load_model, prepare_case

    network, settings = load_model(ckpt_path, torch.device("cpu"))
    engine = MapEngine(gate_threshold=gate_threshold, fusion="mean", threshold=0.5, gate_source="own",
                       slice_normalization=settings["slice_normalization"])
    curves: dict[str, list] = {"mean": [], "open": []}
    result: dict = {"ckpt_path": str(ckpt_path)}
    with torch.no_grad():
        for record in load_datalist(datalist, "validation"):
            prepared = prepare_case(record, settings)
            for name, fused in fused_maps(engine, network, prepared, gate_threshold).items():
                curves[name].append(dice_curve(fused, prepared["truth"].numpy(), DEFAULT_SWEEP))
        for name, rows in curves.items():
            curve = np.mean(rows, 0)
            best = int(curve.argmax())
            result[name] = {"validation_dsc": float(curve[best]), "threshold": float(DEFAULT_SWEEP[best])}
        for record in discover_subjects(real, allow_missing=True):
            prepared = prepare_case(record, settings)
            if prepared["truth"] is None:
                continue
            truth = prepared["truth"].numpy()
            for name, fused in fused_maps(engine, network, prepared, gate_threshold).items():
                threshold = np.array([result[name]["threshold"]], dtype=np.float32)
                result[name][str(record["subject"])] = float(dice_curve(fused, truth, threshold)[0])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--datalist", required=True, help="the model's split (its validation section is read)")
    parser.add_argument("--real", required=True, help="folder of real scans with references (any supported layout)")
    parser.add_argument("--gate_threshold", type=float, default=0.5)
    args = parser.parse_args(argv)
    print(json.dumps(diagnose(args.ckpt_path, args.datalist, args.real, args.gate_threshold)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
