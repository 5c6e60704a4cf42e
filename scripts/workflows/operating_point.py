"""A model's operating point: the binarisation threshold (and fusion) chosen on validation, and where it lives.

An evaluation of the validation split (`configs/evaluate.yaml` with `--eval_split validation`)
sweeps the binarisation threshold of every map (`scripts.workflows.metrics.dice_curve`) and, for
the fused map, both fusions (mean and max of the gated per-modality maps). `choose_operating_point`
reads those mean DSC-versus-threshold curves and keeps, per map and per fusion, the threshold of
the highest mean DSC (ties: the one closest to 0.5, the paper's fixed read-out). The model's
operating point is the fused map's at the configured fusion, or, with `choose_fusion`, at the
fusion whose best mean DSC is higher.

It is written next to the checkpoint, `<ckpt stem>.operating_point.json` (e.g.
models/model.operating_point.json), with the checkpoint's sha256: weights are never rewritten,
and a record of other weights (a retrained model.pt) is ignored with a warning. Inference
(configs/inference.yaml) binarises at the recorded threshold of its fusion unless `--threshold`
is given (`recorded_threshold`); an evaluation of the test split reports the test DSC at it
(`evaluate_at`). The paper's fixed read-out stays one preset away
(configs/presets/paper_readout.yaml: max fusion, threshold 0.5).

A threshold-free figure sits beside DSC: `dsc_auc`, the area under the mean DSC-versus-threshold
curve divided by the swept range (1 = perfect at every threshold), so a method that is good only
at one threshold and one that is good across thresholds can be told apart (the paper's Fig. 4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from scripts.common import atomic_write_json

logger = logging.getLogger(__name__)

FUSED = "fused"
PAPER_READOUT = {"fusion": "max", "threshold": 0.5}
SUFFIX = ".operating_point.json"


def fused_sweep_name(fusion: str, configured: str | None) -> str:
    """The sweep entry of a fused map: 'fused' for the evaluator's own fusion, else 'fused_<fusion>'."""
    return FUSED if configured is None or fusion == configured else f"{FUSED}_{fusion}"


def dsc_auc(thresholds: Sequence[float], dsc: Sequence[float]) -> float:
    """Area under a DSC-versus-threshold curve over the swept range, divided by that range (in [0, 1]).

    Args:
        thresholds: the swept thresholds (any order; sorted here).
        dsc: the mean DSC at each threshold.

    Returns:
        The normalised trapezoid area; NaN with fewer than two thresholds.
    """
    t, d = np.asarray(thresholds, float), np.asarray(dsc, float)
    if t.size < 2:
        return math.nan
    order = np.argsort(t)
    t, d = t[order], d[order]
    return float(np.sum((t[1:] - t[:-1]) * (d[1:] + d[:-1]) / 2) / (t[-1] - t[0]))


def best_threshold(thresholds: Sequence[float], dsc: Sequence[float], prefer: float = 0.5) -> tuple[float, float]:
    """(threshold, mean DSC) of the highest mean DSC; among equal bests the threshold closest to `prefer`.

    Args:
        thresholds: the swept thresholds.
        dsc: the mean DSC at each threshold.
        prefer: the tie-break target (the fixed read-out).
    """
    t, d = np.asarray(thresholds, float), np.asarray(dsc, float)
    if t.size == 0 or not np.isfinite(d).any():
        return math.nan, math.nan
    top = np.nanmax(d)
    candidates = np.flatnonzero(np.isclose(d, top, rtol=0, atol=1e-12))
    pick = candidates[np.argmin(np.abs(t[candidates] - prefer))]
    return float(t[pick]), float(d[pick])


def value_at(thresholds: Sequence[float], dsc: Sequence[float], threshold: float) -> float:
    """The curve's value at `threshold` (a swept threshold, within 1e-9), NaN when it was not swept."""
    t = np.asarray(thresholds, float)
    hit = np.flatnonzero(np.abs(t - float(threshold)) < 1e-9)
    return float(np.asarray(dsc, float)[hit[0]]) if hit.size else math.nan


def _entry(curve: Mapping) -> dict:
    threshold, dsc = best_threshold(curve["thresholds"], curve["dsc_mean"])
    return {"threshold": threshold, "dsc": dsc, "auc": dsc_auc(curve["thresholds"], curve["dsc_mean"])}


def choose_operating_point(sweep: Mapping[str, Mapping], fusion: str, choose_fusion: bool = False,
                           split: str = "validation") -> dict:
    """The operating point of one model from its mean DSC-versus-threshold curves on `split`.

    Args:
        sweep: {map name: {"thresholds", "dsc_mean"}} (EvaluationResult.sweep); the fused map at the
            configured fusion is 'fused', other fusions 'fused_<fusion>' (`fused_sweep_name`).
        fusion: the configured fusion (the one 'fused' was made with).
        choose_fusion: also choose the fusion (mean | max) whose best mean DSC is higher.
        split: the datalist split the curves come from (recorded).

    Returns:
        {"split", "fusion", "threshold", "dsc" (mean DSC there), "auc", "configured_fusion",
        "choose_fusion", "fusions": {fusion: {threshold, dsc, auc}}, "maps": {map: {threshold, dsc, auc}},
        "thresholds"}. A model with one map (no fusion) takes that map's.
    """
    maps = {name: _entry(c) for name, c in sweep.items() if not name.startswith(FUSED)}
    fusions = {}
    for name, curve in sweep.items():
        if name == FUSED:
            fusions[fusion] = _entry(curve)
        elif name.startswith(f"{FUSED}_"):
            fusions[name[len(FUSED) + 1:]] = _entry(curve)
    if fusions:
        chosen = max(fusions, key=lambda f: (fusions[f]["dsc"], f == fusion)) if choose_fusion else fusion
        point = fusions.get(chosen) or _entry(sweep[FUSED])
    elif maps:
        chosen, point = fusion, next(iter(maps.values()))
    else:
        raise ValueError("no DSC-versus-threshold curve to choose an operating point from (sweep_thresholds null?)")
    thresholds = next(iter(sweep.values()))["thresholds"]
    return {"split": split, "fusion": chosen, "threshold": point["threshold"], "dsc": point["dsc"],
            "auc": point["auc"], "configured_fusion": fusion, "choose_fusion": bool(choose_fusion),
            "fusions": fusions, "maps": maps, "thresholds": [float(t) for t in thresholds]}


def evaluate_at(sweep: Mapping[str, Mapping], point: Mapping, fusion: str) -> dict:
    """This split's mean DSC at a recorded operating point, read off its curves.

    Args:
        sweep: this evaluation's curves (as in `choose_operating_point`).
        point: a recorded operating point.
        fusion: the fusion of this evaluation's 'fused' map.

    Returns:
        {"fused": {fusion: DSC at that fusion's recorded threshold}, "chosen": DSC at the recorded
        (fusion, threshold), "maps": {map: DSC at the map's recorded threshold}}; NaN where a curve or
        threshold is missing.
    """
    out = {"fused": {}, "maps": {}, "chosen": math.nan}
    for how, entry in (point.get("fusions") or {}).items():
        curve = sweep.get(fused_sweep_name(how, fusion))
        if curve is not None:
            out["fused"][how] = value_at(curve["thresholds"], curve["dsc_mean"], entry["threshold"])
    out["chosen"] = out["fused"].get(point.get("fusion"), math.nan)
    for name, entry in (point.get("maps") or {}).items():
        if name in sweep:
            out["maps"][name] = value_at(sweep[name]["thresholds"], sweep[name]["dsc_mean"], entry["threshold"])
    return out


# ----------------------------------------------------------------------------- beside the checkpoint


def record_path(ckpt_path) -> Path:
    """<ckpt folder>/<ckpt stem>.operating_point.json."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(ckpt_path.stem + SUFFIX)


def file_sha256(path) -> str | None:
    """sha256 of a file, None when it is absent."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def write_operating_point(ckpt_path, point: Mapping) -> Path:
    """Write `point` beside the checkpoint (atomically), tied to its weights by their sha256.

    Args:
        ckpt_path: the checkpoint the point was chosen for.
        point: `choose_operating_point`'s result.

    Returns:
        The record's path.
    """
    target = record_path(ckpt_path)
    atomic_write_json(target, {**dict(point), "checkpoint": Path(ckpt_path).name,
                               "checkpoint_sha256": file_sha256(ckpt_path)})
    return target


def read_operating_point(ckpt_path) -> dict | None:
    """The operating point recorded for these weights; None when there is none or it belongs to other weights."""
    if ckpt_path is None:
        return None
    path = record_path(ckpt_path)
    if not path.is_file():
        return None
    try:
        point = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("%s is unreadable (%s): the operating point is ignored", path, err)
        return None
    if point.get("checkpoint_sha256") != file_sha256(ckpt_path):
        logger.warning("%s was chosen for other weights than %s (retrained?): ignored; evaluate the validation "
                       "split again to record this model's operating point", path, ckpt_path)
        return None
    return point


def recorded_threshold(ckpt_path, fusion: str = "mean", default: float = 0.5, gate_source: str = "own") -> float:
    """The binarisation threshold recorded for `fusion` beside the checkpoint, else `default`.

    The default of configs/inference.yaml's `threshold` (a `--threshold` given on the command line
    replaces it).

    Args:
        ckpt_path: the checkpoint.
        fusion: the fusion inference uses (each fusion has its own recorded threshold).
        default: the threshold without a record for these weights and this fusion.
        gate_source: the gate inference uses; a record chosen under another gate is not used (records
            written before the option existed were chosen under "own").
    """
    point = read_operating_point(ckpt_path)
    if point is not None and point.get("gate_source", "own") != gate_source:
        logger.info("threshold %g (the operating point of %s was chosen with gate_source %s, not %s)", default,
                    ckpt_path, point.get("gate_source", "own"), gate_source)
        return float(default)
    entry = (point or {}).get("fusions", {}).get(fusion)
    if entry is None and point is not None and len(point.get("fusions") or {}) == 0:
        entry = point  # a one-map model: its map's threshold
    if entry is None or not isinstance(entry.get("threshold"), (int, float)) or not math.isfinite(entry["threshold"]):
        logger.info("threshold %g (no operating point recorded for %s with fusion %s)", default, ckpt_path, fusion)
        return float(default)
    logger.info("threshold %g: the operating point chosen on the %s split for %s (fusion %s)",
                entry["threshold"], point.get("split"), Path(ckpt_path).name, fusion)
    return float(entry["threshold"])
