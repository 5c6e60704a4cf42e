"""Read-outs of the results page: each main method's test DSC at the reported, the paper's, the validation-chosen
and the best (oracle) binarisation, and the threshold-free area under its DSC-versus-threshold curve.

Every number comes from the DSC-versus-threshold curves the records hold (`evaluations.<run>.sweep`:
per map, the mean test DSC at each swept threshold, the same empty-case rule as the per-volume DSC)
and, for records written since the operating point existed, from `operating_point` (chosen on the
validation split; scripts/workflows/operating_point.py):

- **reported**: the fused map at the recipe's fusion and threshold (mean, 0.5): the page's tables;
- **paper**: max fusion at 0.5 (`fused_max` curve; records older than it show '-');
- **validation-chosen**: the test DSC at the (fusion, threshold) chosen on validation;
- **best on test**: the threshold of the highest mean test DSC: an oracle, a bound on what any
  threshold could give, not a fair read-out (it looks at the test split);
- **area**: the area under the fused DSC-versus-threshold curve over the swept range / the range.

Gaps between two methods are paired by seed and given with the t interval over seeds.
"""

from __future__ import annotations

import math

import numpy as np

from scripts.workflows.operating_point import PAPER_READOUT, best_threshold, dsc_auc, value_at
from tools import experiment_stats as st

READOUT_RUNS = ("cam", "seam_scale", "seam_all", "cmer", "full_supervision")
GAPS = (("cmer", "cam"), ("cmer", "seam_all"))
KINDS = ("reported", "paper", "validation", "oracle")
KIND_LABELS = {"reported": "reported (mean, 0.5)", "paper": "paper (max, 0.5)",
               "validation": "validation-chosen", "oracle": "best on test (oracle)"}


def _pct(value, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}"


def _curve(data: dict, run: str, seed: str, name: str):
    sweep = (data["runs"].get(run, {}).get(seed) or {}).get("sweep") or {}
    return sweep.get(name)


def seed_readouts(data: dict, run: str, seed: str, threshold: float = 0.5) -> dict:
    """{kind: (DSC, threshold, fusion)} of one run and seed, plus 'area' (NaN where the record lacks it).

    Args:
        data: the results.json object.
        run: a run name.
        seed: a seed key ('seed1337').
        threshold: the recipe's binarisation threshold (the reported read-out).
    """
    out = {kind: (math.nan, math.nan, None) for kind in KINDS}
    out["area"] = math.nan
    fused = _curve(data, run, seed, "fused")
    if fused is None:
        return out
    t, d = fused["thresholds"], fused["dsc_mean"]
    out["reported"] = (value_at(t, d, threshold), threshold, "mean")
    best_t, best_d = best_threshold(t, d)
    out["oracle"] = (best_d, best_t, "mean")
    out["area"] = dsc_auc(t, d)
    paper = _curve(data, run, seed, "fused_max")
    if paper is not None:
        out["paper"] = (value_at(paper["thresholds"], paper["dsc_mean"], PAPER_READOUT["threshold"]),
                        PAPER_READOUT["threshold"], "max")
    point = (data.get("operating_points") or {}).get(run, {}).get(seed)
    if point and point.get("validation") and point.get("test"):
        chosen = point["validation"]
        out["validation"] = (point["test"].get("chosen", math.nan), chosen.get("threshold"), chosen.get("fusion"))
    return out


def _seeds(data: dict, run: str) -> list[str]:
    return [s for s in (f"seed{x}" for x in data["seeds"]) if s in data["runs"].get(run, {})]


def mean_curve_best(data: dict, run: str) -> tuple[float, float, dict]:
    """(threshold, DSC) of the best point of the seed-averaged fused curve, and each seed's DSC there."""
    seeds = _seeds(data, run)
    curves = [_curve(data, run, s, "fused") for s in seeds]
    if not curves or any(c is None for c in curves):
        return math.nan, math.nan, {}
    t = curves[0]["thresholds"]
    mean = np.mean([c["dsc_mean"] for c in curves], axis=0)
    best_t, best_d = best_threshold(t, mean)
    return best_t, best_d, {s: value_at(t, c["dsc_mean"], best_t) for s, c in zip(seeds, curves)}


def readout_table(data: dict, runs=READOUT_RUNS) -> str:
    """Per main method and seed: fused test DSC (%) at each read-out (threshold in brackets) and the area under
    the fused DSC curve; a 'mean' row per method (for the oracle: the best threshold of the seed-averaged curve,
    one threshold for every seed)."""
    lines = ["| method | seed | " + " | ".join(KIND_LABELS[k] for k in KINDS) + " | area under DSC curve |",
             "|---|---|" + "---|" * (len(KINDS) + 1)]
    for run in (r for r in runs if r in data["runs"]):
        seeds = _seeds(data, run)
        per_seed = {s: seed_readouts(data, run, s) for s in seeds}
        for s in seeds:
            cells = []
            for kind in KINDS:
                value, threshold, fusion = per_seed[s][kind]
                where = "" if not math.isfinite(value) or kind in ("reported", "paper") else (
                    f" ({fusion}, {threshold:g})" if kind == "validation" else f" ({threshold:g})")
                cells.append(_pct(value) + where)
            lines.append(f"| {run} | {s[4:]} | " + " | ".join(cells) + f" | {_pct(per_seed[s]['area'])} |")
        cells = []
        for kind in KINDS:
            values = [per_seed[s][kind][0] for s in seeds]
            mean = float(np.mean(values)) if values and all(math.isfinite(v) for v in values) else math.nan
            if kind == "oracle":
                best_t, best_d, at = mean_curve_best(data, run)
                cells.append(f"{_pct(best_d)} (at {best_t:g}: " + " / ".join(_pct(at[s]) for s in seeds) + ")"
                             if math.isfinite(best_d) else "-")
            else:
                cells.append(_pct(mean))
        areas = [per_seed[s]["area"] for s in seeds]
        area = float(np.mean(areas)) if areas and all(math.isfinite(a) for a in areas) else math.nan
        lines.append(f"| **{run}** | mean of {len(seeds)} | " + " | ".join(f"**{c}**" for c in cells)
                     + f" | **{_pct(area)}** |")
    return "\n".join(lines) + "\n"


def gap(data: dict, better: str, worse: str, kind: str) -> dict:
    """The fused gap `better - worse` at one read-out, paired by seed: {seeds, differences, mean, ci_low, ci_high}."""
    seeds = [s for s in _seeds(data, better) if s in data["runs"].get(worse, {})]
    diffs = {}
    for s in seeds:
        a, b = seed_readouts(data, better, s)[kind][0], seed_readouts(data, worse, s)[kind][0]
        if math.isfinite(a) and math.isfinite(b):
            diffs[s] = a - b
    values = list(diffs.values())
    low, high = st.t_interval(values)
    return {"seeds": len(values), "differences": diffs, "mean": float(np.mean(values)) if values else math.nan,
            "ci_low": low, "ci_high": high}


def gap_table(data: dict, pairs=GAPS) -> str:
    """Fused gaps (DSC points) between methods at each read-out: mean over seeds [95 % t interval over seeds]."""
    lines = ["| gap | " + " | ".join(KIND_LABELS[k] for k in KINDS) + " | area under DSC curve |",
             "|---|" + "---|" * (len(KINDS) + 1)]
    for better, worse in pairs:
        if better not in data["runs"] or worse not in data["runs"]:
            continue
        cells = []
        for kind in KINDS:
            g = gap(data, better, worse, kind)
            cells.append("-" if not g["seeds"] else f"{_pct(g['mean'])} [{_pct(g['ci_low'])}, {_pct(g['ci_high'])}]")
        areas = [seed_readouts(data, better, s)["area"] - seed_readouts(data, worse, s)["area"]
                 for s in _seeds(data, better) if s in data["runs"][worse]]
        low, high = st.t_interval(areas)
        cells.append(f"{_pct(float(np.mean(areas)))} [{_pct(low)}, {_pct(high)}]" if areas else "-")
        lines.append(f"| {better} - {worse} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def area_table(data: dict, runs=READOUT_RUNS, maps=("t1", "t2", "t1c", "flair", "fused")) -> str:
    """The threshold-free figure per map: area under the test DSC-versus-threshold curve (%), mean over seeds."""
    lines = ["| method | " + " | ".join(maps) + " | seeds |", "|---" * (len(maps) + 2) + "|"]
    for run in (r for r in runs if r in data["runs"]):
        seeds = _seeds(data, run)
        cells = []
        for name in maps:
            areas = [dsc_auc(c["thresholds"], c["dsc_mean"]) for c in (_curve(data, run, s, name) for s in seeds) if c]
            cells.append(_pct(float(np.mean(areas))) if areas else "-")
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return "\n".join(lines) + "\n"


def headline(data: dict, pairs=GAPS) -> str:
    """The page's first lines: how much of each main gap survives the read-out each method would choose, and the
    claim verdicts at the seed level (numbers from the records, never typed)."""
    parts = []
    for better, worse in pairs:
        if better not in data["runs"] or worse not in data["runs"]:
            continue
        reported, oracle = gap(data, better, worse, "reported"), gap(data, better, worse, "oracle")
        validation = gap(data, better, worse, "validation")
        text = (f"{better} - {worse} (fused, {reported['seeds']} seeds): {_pct(reported['mean'])} points at the reported "
                f"read-out [{_pct(reported['ci_low'])}, {_pct(reported['ci_high'])}], {_pct(oracle['mean'])} "
                f"[{_pct(oracle['ci_low'])}, {_pct(oracle['ci_high'])}] with each method at its own best test threshold")
        if validation["seeds"]:
            text += f", {_pct(validation['mean'])} at the validation-chosen operating points"
        parts.append(text)
    if not parts:
        return ""
    return ("**Read this first.** The reported read-out (mean fusion, threshold 0.5) was chosen in the stage-1 study "
            "on CMER runs only, so it is CMER's operating point and not the baselines'; the gaps at other read-outs: "
            + "; ".join(parts) + " (section *Read-outs*; the baselines also reuse CMER's tuned recipe: issue 34).")
