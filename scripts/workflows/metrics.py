"""Per-volume evaluation of binarised tumour maps: DSC, ASSD, r_u / r_o, threshold sweep.

Every metric is computed per subject on the 3D volume (slices stacked in order), then
summarised per map name (the modalities plus "fused") as mean +- std over subjects
(population std, ddof=0).

- DSC: `monai.metrics.compute_dice(include_background=True, ignore_empty=False)`.
  MONAI's default `ignore_empty=True` returns NaN when the truth is empty, which would drop
  false positives on tumour-free volumes from the mean; with False it follows the rule below.
- ASSD (mm): `monai.metrics.compute_average_surface_distance(symmetric=True,
  spacing=...)`, only when both masks are non-empty (MONAI returns inf / NaN otherwise).
- Masks: map strictly greater than the threshold (default 0.5).

Empty-case rule (counted per map name in the summary):

| prediction | truth     | DSC | ASSD                       | counted as    |
|------------|-----------|-----|----------------------------|---------------|
| empty      | empty     | 1   | 0                          | `both_empty`  |
| empty      | non-empty | 0   | NaN, excluded from mean    | `empty_pred`  |
| non-empty  | empty     | 0   | NaN, excluded from mean    | `empty_truth` |

r_u = FN / TP (under-segmentation) and r_o = FP / TP (over-segmentation), the paper's
Table V, reported two ways: pooled over the test set (sum FN / sum TP, the headline
value) and as the mean of the per-volume ratios over volumes with TP > 0.

The DSC-versus-threshold curve (the paper's Fig. 4) uses the same rule from voxel counts:
one pass per volume counts the voxels above every threshold (19 calls of compute_dice over
full volumes would be 19 passes); the test suite checks it equals compute_dice at 0.5.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice

from scripts.common import MODALITIES, atomic_write_text
from scripts.model.cams import binarise, fuse_maps

FUSED = "fused"
DEFAULT_SWEEP = np.round(np.arange(0.05, 0.96, 0.05), 2)
EMPTY_CASES = ("both_empty", "empty_pred", "empty_truth")
ROW_FIELDS = ("subject", "map", "dsc", "assd", "tp", "fp", "fn", "r_u", "r_o", "empty_case")
SUMMARY_FIELDS = (
    "map", "n", "dsc_mean", "dsc_std", "assd_mean", "assd_std", "assd_n",
    "r_u_pooled", "r_o_pooled", "r_u_mean", "r_o_mean", "tp_sum", "fp_sum", "fn_sum",
    *EMPTY_CASES, "threshold",
)


@dataclass
class EvaluationResult:
    """Per-subject rows, per-map summaries and per-map DSC-versus-threshold curves."""

    threshold: float
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, dict] = field(default_factory=dict)
    sweep: dict[str, dict] = field(default_factory=dict)  # name -> thresholds, dsc_mean, dsc_std

    @property
    def map_names(self) -> list[str]:
        return list(self.summary)

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (thresholds, mean DSC) for `figures.plot_threshold_sweep`."""
        return {name: (c["thresholds"], c["dsc_mean"]) for name, c in self.sweep.items()}


# ---------------------------------------------------------------------------------------
# Per-volume metrics


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_volume(x) -> np.ndarray:
    """(H,W,D) array; a leading channel axis of size 1 is dropped."""
    arr = _as_numpy(x)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D volume (H,W,D), got shape {arr.shape}")
    return arr


def _as_map(x) -> np.ndarray:
    """Float (H,W,D) map (integer or bool maps, e.g. ready-made masks, become float32)."""
    arr = _as_volume(x)
    return arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)


def voxel_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """True positive, false positive and false negative voxel counts of two bool volumes."""
    return {
        "tp": int(np.count_nonzero(pred & truth)),
        "fp": int(np.count_nonzero(pred & ~truth)),
        "fn": int(np.count_nonzero(~pred & truth)),
    }


def empty_case(pred: np.ndarray, truth: np.ndarray) -> str:
    """'' for two non-empty masks, else which side is empty (module docstring rule)."""
    pred_empty, truth_empty = not pred.any(), not truth.any()
    if pred_empty and truth_empty:
        return "both_empty"
    if pred_empty:
        return "empty_pred"
    if truth_empty:
        return "empty_truth"
    return ""


def _batched(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """DSC by MONAI; ignore_empty=False gives 1 for two empty masks and 0 for one empty."""
    return float(compute_dice(_batched(pred), _batched(truth), include_background=True, ignore_empty=False))


def assd_mm(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric average surface distance in mm; the empty-case rule instead of inf / NaN."""
    case = empty_case(pred, truth)
    if case == "both_empty":
        return 0.0
    if case:
        return math.nan
    spacing = [float(s) for s in spacing]
    value = compute_average_surface_distance(
        _batched(pred), _batched(truth), include_background=True, symmetric=True, spacing=spacing
    )
    return float(value)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def volume_row(subject: str, name: str, pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """One per-subject row: DSC, ASSD, voxel counts, r_u / r_o and the empty case."""
    counts = voxel_counts(pred, truth)
    return {
        "subject": subject,
        "map": name,
        "dsc": dice_score(pred, truth),
        "assd": assd_mm(pred, truth, spacing),
        **counts,
        "r_u": _ratio(counts["fn"], counts["tp"]),
        "r_o": _ratio(counts["fp"], counts["tp"]),
        "empty_case": empty_case(pred, truth),
    }


# ---------------------------------------------------------------------------------------
# Threshold sweep


def counts_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of `values` strictly above each threshold, in one pass (thresholds sorted)."""
    # searchsorted(side="left") = how many thresholds lie strictly below each value.
    position = np.searchsorted(thresholds, values.ravel(), side="left")
    histogram = np.bincount(position, minlength=len(thresholds) + 1)
    return histogram[::-1].cumsum()[::-1][1:]


def dice_curve(values: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """DSC of (values > t) against truth for every threshold t, empty-case rule included."""
    thresholds = np.asarray(thresholds, dtype=values.dtype)  # compare in the map's precision
    predicted = counts_above(values, thresholds)
    tp = counts_above(values[truth], thresholds)
    truth_total = int(np.count_nonzero(truth))
    denominator = predicted + truth_total  # = 2TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        dsc = np.where(denominator > 0, 2.0 * tp / denominator, 1.0)
    return dsc


# ---------------------------------------------------------------------------------------
# Aggregation


def ordered_names(names: Iterable[str]) -> list[str]:
    """Modalities in the paper's order, then 'fused', then anything else as first seen."""
    names = list(dict.fromkeys(names))
    known = [m for m in MODALITIES if m in names] + ([FUSED] if FUSED in names else [])
    return known + [n for n in names if n not in known]


def with_fused(maps: Mapping[str, np.ndarray], how: str | None = "max") -> dict[str, np.ndarray]:
    """Add the pixel-wise fusion of all maps under 'fused' when there are two or more."""
    maps = dict(maps)
    sources = [n for n in maps if n != FUSED]
    if how and FUSED not in maps and len(sources) > 1:
        stacked = np.stack([maps[n] for n in sources])[None]  # (1,K,H,W,D)
        maps[FUSED] = fuse_maps(stacked, how)[0]
    return maps


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan, 0
    return float(finite.mean()), float(finite.std()), int(finite.size)


def summarise_rows(rows: Sequence[dict], threshold: float) -> dict:
    """Summary of one map name's rows: mean +- std, pooled and mean r_u / r_o, empty counts."""
    dsc_mean, dsc_std, n = _mean_std([r["dsc"] for r in rows])
    assd_mean, assd_std, assd_n = _mean_std([r["assd"] for r in rows])
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    return {
        "n": n,
        "dsc_mean": dsc_mean,
        "dsc_std": dsc_std,
        "assd_mean": assd_mean,
        "assd_std": assd_std,
        "assd_n": assd_n,
        "r_u_pooled": _ratio(fn, tp),
        "r_o_pooled": _ratio(fp, tp),
        "r_u_mean": _mean_std([r["r_u"] for r in rows])[0],
        "r_o_mean": _mean_std([r["r_o"] for r in rows])[0],
        "tp_sum": tp,
        "fp_sum": fp,
        "fn_sum": fn,
        **{case: sum(r["empty_case"] == case for r in rows) for case in EMPTY_CASES},
        "threshold": threshold,
    }


def evaluate_volumes(
    records: Iterable[dict],
    threshold: float = 0.5,
    thresholds_sweep: Sequence[float] | None = DEFAULT_SWEEP,
    fuse: str | None = "max",
) -> EvaluationResult:
    """Evaluate records {subject, spacing, truth (H,W,D) bool, maps {name: (H,W,D) float}}.

    Records are consumed one at a time (a generator keeps one volume in memory). A 'fused'
    map (pixel-wise `fuse` of all maps) is added when a record has two or more maps and no
    'fused' entry; `fuse=None` turns that off.
    """
    sweep_thresholds = None if thresholds_sweep is None else np.sort(np.asarray(thresholds_sweep, dtype=float))
    rows: list[dict] = []
    curves: dict[str, list[np.ndarray]] = {}
    for record in records:
        truth = _as_volume(record["truth"]).astype(bool)
        maps = with_fused({n: _as_map(m) for n, m in record["maps"].items()}, fuse)
        for name, values in maps.items():
            if values.shape != truth.shape:
                raise ValueError(f"{record['subject']}: map {name!r} {values.shape} vs truth {truth.shape}")
            pred = binarise(values, values.dtype.type(threshold))
            rows.append(volume_row(record["subject"], name, pred, truth, record["spacing"]))
            if sweep_thresholds is not None:
                curves.setdefault(name, []).append(dice_curve(values, truth, sweep_thresholds))
    return _assemble(rows, curves, threshold, sweep_thresholds)


def _assemble(rows, curves, threshold, sweep_thresholds) -> EvaluationResult:
    names = ordered_names(r["map"] for r in rows)
    summary = {n: summarise_rows([r for r in rows if r["map"] == n], threshold) for n in names}
    sweep = {}
    for name in names:
        if name in curves:
            stacked = np.stack(curves[name])
            sweep[name] = {
                "thresholds": sweep_thresholds,
                "dsc_mean": stacked.mean(0),
                "dsc_std": stacked.std(0),
            }
    return EvaluationResult(threshold=threshold, rows=rows, summary=summary, sweep=sweep)


# ---------------------------------------------------------------------------------------
# Tables and writers


def _fmt(value: float, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"


def _pm(mean: float, std: float, scale: float = 1.0) -> str:
    return "-" if math.isnan(mean) else f"{_fmt(mean, scale)} ± {_fmt(std, scale)}"


def format_table(summary: Mapping[str, dict]) -> str:
    """Markdown table: rows = map names; DSC (%), ASSD (mm), r_u, r_o, n, empty counts."""
    header = (
        "| map | DSC (%) | ASSD (mm) | r_u pooled (per-vol mean) | r_o pooled (per-vol mean) "
        "| n | ASSD n | both empty | empty pred | empty truth |"
    )
    lines = [header, "|" + "---|" * 10]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {_pm(s['dsc_mean'], s['dsc_std'], 100)} | {_pm(s['assd_mean'], s['assd_std'])} "
            f"| {_fmt(s['r_u_pooled'])} ({_fmt(s['r_u_mean'])}) | {_fmt(s['r_o_pooled'])} ({_fmt(s['r_o_mean'])}) "
            f"| {s['n']} | {s['assd_n']} | {s['both_empty']} | {s['empty_pred']} | {s['empty_truth']} |"
        )
    return "\n".join(lines) + "\n"


def compare_methods(results: Mapping[str, EvaluationResult], metric: str = "dsc") -> str:
    """Markdown table in the paper's layout: methods as rows, map names as columns,
    `metric` ('dsc' in %, or 'assd' in mm) as mean ± std."""
    if metric not in ("dsc", "assd"):
        raise ValueError(f"metric must be 'dsc' or 'assd', got {metric!r}")
    scale, unit = (100.0, "DSC %") if metric == "dsc" else (1.0, "ASSD mm")
    names = ordered_names(n for r in results.values() for n in r.map_names)
    lines = [f"| method ({unit}) | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for method, result in results.items():
        cells = []
        for name in names:
            s = result.summary.get(name)
            cells.append("-" if s is None else _pm(s[f"{metric}_mean"], s[f"{metric}_std"], scale))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(fields: Sequence[str], rows: Iterable[Mapping]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in fields})
    return buffer.getvalue()


def _sweep_rows(result: EvaluationResult) -> list[dict]:
    return [
        {"map": name, "threshold": float(t), "dsc_mean": float(m), "dsc_std": float(s)}
        for name, c in result.sweep.items()
        for t, m, s in zip(c["thresholds"], c["dsc_mean"], c["dsc_std"])
    ]


def summary_markdown(result: EvaluationResult, title: str = "Evaluation") -> str:
    return (
        f"# {title}\n\nPer-volume 3D metrics, masks = map > {result.threshold:g}, mean ± std over "
        "subjects (ddof=0).\n\n"
        + format_table(result.summary)
        + "\nr_u = FN/TP, r_o = FP/TP: pooled over the test set (sum FN / sum TP), the mean of "
        "per-volume ratios (volumes with TP > 0) in brackets.\n"
        "Empty cases: both empty -> DSC 1, ASSD 0; empty prediction or empty truth alone -> "
        "DSC 0, ASSD excluded from the mean ('ASSD n' counts the volumes that have one).\n"
    )


def write_results(result: EvaluationResult, out_dir, title: str = "Evaluation") -> dict[str, Path]:
    """Write per_subject.csv, summary.csv, summary.md and threshold_sweep.csv atomically."""
    out_dir = Path(out_dir)
    summary_rows = [{"map": name, **s} for name, s in result.summary.items()]
    files = {
        "per_subject": (out_dir / "per_subject.csv", _csv_text(ROW_FIELDS, result.rows)),
        "summary": (out_dir / "summary.csv", _csv_text(SUMMARY_FIELDS, summary_rows)),
        "summary_md": (out_dir / "summary.md", summary_markdown(result, title)),
        "threshold_sweep": (
            out_dir / "threshold_sweep.csv",
            _csv_text(("map", "threshold", "dsc_mean", "dsc_std"), _sweep_rows(result)),
        ),
    }
    for path, text in files.values():
        atomic_write_text(path, text)
    return {key: path for key, (path, _) in files.items()}
