"""results.json of `tools.experiments` and everything rendered from it: tables, docs page, model card.

The document (`build_document`) holds the per-volume rows of every run and seed, so each table
cell, interval and paired test below is computed from results.json alone (statistics in
`tools.experiment_stats`). `render_page` writes tables.md and the docs page (`write_docs`)
from the same text; `update_metadata` copies the main CMER row into configs/metadata.json.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

from scripts.common import MODALITIES, atomic_write_text
from scripts.workflows.metrics import EMPTY_CASES
from tools import experiment_stats as st

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("cam", "seam_scale", "seam_all")
ABLATIONS = ("kd_only", "kd_er", "er_cmer", "cmer")  # Table III, in its row order
MAIN_ROWS = BASELINES + ("cmer", "stage2", "stage2_all", "full_supervision")  # Table II, every seed
MAP_ORDER = ("t1", "t2", "t1c", "flair", "fused")  # the paper's column order
DEEPLAB_RUN = "cmer_deeplab"
SWITCH_PREFIX = "cmer+"
METRIC_RANGE = {"dsc": (0.0, 1.0), "assd": (0.0, math.inf)}  # intervals are clipped to these
ROW_KEYS = ("subject", "map", "dsc", "assd", "tp", "fp", "fn", "empty_case")
PENDING = "pending"  # a claim whose runs are not all recorded: not tested yet
TRANSFORM_KINDS = ("flip", "rotation", "scale", "translation")  # Fig. 3: CMER with one kind at a time
PAIR_KEYS = ("t1_t2", "t1c_flair", "t1_flair", "t1c_t2")  # Table I's pairs, as in run names


def _claims() -> tuple:
    """The paper's claims tested per volume: (better run, its map, worse run, its map, label)."""
    claims = [("cmer", "fused", "seam_all", "fused", "CMER > SEAM (all)"),
              ("seam_all", "fused", "cam", "fused", "SEAM (all) > CAM"),
              ("cmer", "fused", "cam", "fused", "CMER > CAM"),
              ("cmer", "fused", "seam_scale", "fused", "CMER > SEAM (scale)")]
    for m in MODALITIES:
        claims += [("cmer", m, "seam_all", m, f"CMER > SEAM (all), {m}"), ("seam_all", m, "cam", m,
                                                                             f"SEAM (all) > CAM, {m}")]
    claims += [("cmer.gradcampp", "fused", "seam_all.gradcampp", "fused", "GradCAM++: CMER > SEAM (all)"),
               ("seam_all.gradcampp", "fused", "cam.gradcampp", "fused", "GradCAM++: SEAM (all) > CAM"),
               ("kd_er", "fused", "kd_only", "fused", "Table III: KD + ER > KD"),
               ("er_cmer", "fused", "kd_er", "fused", "Table III: ER + CMER > KD + ER"),
               ("cmer", "fused", "er_cmer", "fused", "Table III: KD + ER + CMER > ER + CMER"),
               ("cmer", "fused", "kd_er", "fused", "Table III: KD + ER + CMER > KD + ER")]
    for key in PAIR_KEYS:
        a, b = key.split("_")
        claims += [(f"cmer_{key}", "fused", f"cmer_{key}", a, f"pair {a}-{b}: fused > {a}"),
                   (f"cmer_{key}", "fused", f"cmer_{key}", b, f"pair {a}-{b}: fused > {b}"),
                   (f"cmer_{key}", "fused", f"seam_all@{key}", "fused", f"pair {a}-{b}: CMER > SEAM (all)")]
    claims += [("full_supervision", m, "cmer", m, f"full supervision > CMER, {m}") for m in MODALITIES]
    # Fig. 3's text (section IV-C.3): against the CAM baseline, rotation improves every modality; scaling
    # improves T1, T1c and T2 and degrades FLAIR; translation degrades T1 and improves T2, T1c and FLAIR.
    for kind, worse_on in (("rotation", ()), ("scale", ("flair",)), ("translation", ("t1",))):
        for m in MODALITIES:
            run = f"cmer_{kind}"
            claims.append(("cam", m, run, m, f"Fig. 3: CAM > {kind} alone, {m}") if m in worse_on
                          else (run, m, "cam", m, f"Fig. 3: {kind} alone > CAM, {m}"))
    return tuple(claims)


CLAIMS = _claims()


def transform_runs() -> dict:
    """Fig. 3's bars, {label: run}: no transform (CAM), CMER with each kind alone, CMER with all of them."""
    return {"CAM (none)": "cam", **{kind: f"cmer_{kind}" for kind in TRANSFORM_KINDS}, "all (CMER)": "cmer"}


def jsonable(value):
    """`value` with NaN / inf as None and numpy scalars, tuples and arrays as plain JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def seed_key(seed) -> str:
    """The name of a seed in results.json and in the run folders: 'seed<s>'."""
    return f"seed{seed}"


def run_record(rows, sweep: dict | None = None) -> dict:
    """The JSON record of one evaluation: its per-volume rows reduced to ROW_KEYS, and its
    DSC-versus-threshold curves {map: {thresholds, dsc_mean}} (EvaluationResult.sweep)."""
    curves = {name: {"thresholds": c["thresholds"], "dsc_mean": c["dsc_mean"]} for name, c in (sweep or {}).items()}
    return jsonable({"rows": [{k: row.get(k) for k in ROW_KEYS} for row in rows], "sweep": curves})


# ----------------------------------------------------------------------------- environment


def git_commit(root: Path = BUNDLE_ROOT) -> str:
    """`git rev-parse --short HEAD` of the bundle, or 'unknown' without git or a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo when present, else platform.processor() (may be '')."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str, precision: str | None = None) -> dict:
    """CPU, cores, torch / monai versions, the device (with the GPU name) and the precision."""
    import monai
    import torch

    from scripts.precision import cpu_kind

    info = {"cpu": cpu_model(), "cpu_kind": cpu_kind(), "processor": platform.processor(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "monai": monai.__version__, "device": str(device), "precision": precision or "unknown"}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ----------------------------------------------------------------------------- document


def _seeds_of(data: dict, seeds=None) -> list[str]:
    return [seed_key(s) for s in (data["seeds"] if seeds is None else seeds)]


def per_seed_values(data: dict, run: str, name: str, metric: str, seeds=None) -> dict[str, list]:
    """{seed key: per-volume `metric` of map `name` of `run`} over the seeds that ran it."""
    out = {}
    for key in _seeds_of(data, seeds):
        record = data["runs"].get(run, {}).get(key)
        if record is not None:
            out[key] = [r[metric] for r in record["rows"] if r["map"] == name]
    return out


def keyed_values(data: dict, run: str, name: str, metric: str = "dsc", seeds=None) -> dict[tuple, float]:
    """{(seed key, subject): `metric`} of map `name` of `run`: the pairing key of the tests."""
    out = {}
    for key in _seeds_of(data, seeds):
        record = data["runs"].get(run, {}).get(key)
        for r in [] if record is None else record["rows"]:
            if r["map"] == name:
                out[(key, r["subject"])] = r[metric]
    return out


def cell(data: dict, run: str, name: str, metric: str = "dsc", seeds=None) -> dict:
    """`experiment_stats.cell_stats` of one table cell (all seeds, or only `seeds`)."""
    seed = data.get("statistics", {}).get("bootstrap_seed", st.BOOTSTRAP_SEED)
    return st.cell_stats(per_seed_values(data, run, name, metric, seeds), seed=seed, bounds=METRIC_RANGE[metric])


def map_names(data: dict, run: str) -> list[str]:
    """The map names of a run's rows, in the paper's order."""
    names = {r["map"] for record in data["runs"].get(run, {}).values() for r in record["rows"]}
    return [n for n in MAP_ORDER if n in names] + sorted(names - set(MAP_ORDER))


def run_summary(data: dict, run: str, seeds=None) -> dict:
    """Per map of `run`: DSC and ASSD cells, pooled r_u / r_o and empty-case counts over seeds."""
    summary = {}
    for name in map_names(data, run):
        rows = [r for key in _seeds_of(data, seeds) for r in data["runs"][run].get(key, {"rows": []})["rows"]
                if r["map"] == name]
        tp, fp, fn = (sum(r[k] or 0 for r in rows) for k in ("tp", "fp", "fn"))
        entry = {}
        for metric in ("dsc", "assd"):
            c = cell(data, run, name, metric, seeds)
            entry.update({f"{metric}_mean": c["mean"], f"{metric}_std": c["std"], f"{metric}_n": c["n"],
                          f"{metric}_ci": [c["ci_low"], c["ci_high"]], f"{metric}_ci_kind": c["ci_kind"],
                          f"{metric}_seeds": c["seeds"]})
        entry.update({"r_u_pooled": fn / tp if tp else math.nan, "r_o_pooled": fp / tp if tp else math.nan,
                      **{case: sum(r.get("empty_case") == case for r in rows) for case in EMPTY_CASES}})
        summary[name] = entry
    return summary


def best_epochs(data: dict, run: str) -> dict[str, dict]:
    """{seed key: the validation entry of the epoch with the best key metric} of a run's training curves
    (the epoch whose weights were kept; `data['curves']`, empty when the records have none)."""
    out = {}
    for seed, curves in (data.get("curves") or {}).get(run, {}).items():
        key, epochs = curves.get("key_metric"), curves.get("epochs") or []
        scored = [e for e in epochs if isinstance(e.get(key), (int, float))]
        if scored:
            out[seed] = max(scored, key=lambda e: e[key])  # first of equal bests, as the checkpoint handler keeps
    return out


def compare_claims(data: dict, claims=CLAIMS, registration=None) -> list[dict]:
    """The tests of every claim (better run and map, worse run and map, label) on the document's rows.

    Primary: a paired t test over the seed means (`experiment_stats.seed_comparison`), Holm-corrected over
    the claims that have one (`verdict`, `reason`, `p_value`, `p_holm`, `ci_low` / `ci_high` over seeds).
    Secondary: the paired Wilcoxon test per (seed, subject) (`volume_*`, Holm-corrected in its own family).
    With `registration` (`tools.experiment_claims.Registration`) and the records' provenance
    (`data['provenance']`): when each claim was defined and whether that was after a record it reads
    (`post_hoc`).
    """
    seed = data.get("statistics", {}).get("bootstrap_seed", st.BOOTSTRAP_SEED)
    out = []
    for claim in claims:
        better, better_map, worse, worse_map, label = claim
        b, w = keyed_values(data, better, better_map), keyed_values(data, worse, worse_map)
        volume = st.paired_comparison(b, w, seed=seed)
        result = {**{f"volume_{k}": v for k, v in volume.items()}, "n": volume["n"],
                  "mean_better": volume["mean_better"], "mean_worse": volume["mean_worse"], **st.seed_comparison(b, w)}
        if better not in data["runs"] or worse not in data["runs"]:
            result.update(verdict=PENDING, reason="a run is not recorded yet", volume_verdict=PENDING)
        out.append({"claim": label, "better": better, "better_map": better_map, "worse": worse,
                    "worse_map": worse_map, "map": better_map, "metric": "dsc", **result})
    tested = [c for c in out if c["verdict"] != PENDING]
    st.apply_holm(tested)
    st.apply_holm(tested, prefix="volume_")
    if registration is not None:
        provenance = data.get("provenance") or {}
        for claim, entry in zip(claims, out):
            reads = {}
            for run in (entry["better"], entry["worse"]):
                name = record_name(run)
                for seed_name in data["runs"].get(run, {}):
                    if f"{seed_name}/{name}" in provenance:
                        reads[(name, seed_name)] = provenance[f"{seed_name}/{name}"]
            entry.update(registration.check(claim, reads))
    return out


def record_name(evaluation: str) -> str:
    """The run record an evaluation comes from: 'cam@t1_t2' and 'cam.gradcampp' -> 'cam'."""
    return evaluation.split("@")[0].split(".")[0]


def build_document(*, command: str, seeds, pairs, runs: dict, wall: dict, settings: dict, machine: dict,
                   figures: list, dataset: str, commands=None, provenance: dict | None = None,
                   registration=None) -> dict:
    """The results.json object: provenance, per-seed rows, pooled summaries and claim tests.

    `runs` is {run name: {seed key: run_record(...)}} (pair evaluations as 'cam@t1_t2');
    `commands` every command that contributed rows (default: `command`); `provenance`
    {'seed<s>/<record>': {commit, date}} of the records and `registration` (`tools.experiment_claims`)
    date each claim against them.
    """
    data = {
        "command": command, "commands": list(commands or [command]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
        "machine": machine, "seeds": [int(s) for s in seeds], "dataset": dataset, "pairs": [list(p) for p in pairs],
        "statistics": {"confidence": st.CONFIDENCE, "alpha": st.ALPHA, "min_pairs": st.MIN_PAIRS,
                       "min_seeds": st.MIN_SEEDS, "correction": "holm",
                       "bootstrap_samples": st.BOOTSTRAP_SAMPLES, "bootstrap_seed": st.BOOTSTRAP_SEED},
        "settings": settings, "wall_seconds": wall, "figures": list(figures), "runs": runs,
        "provenance": dict(provenance or {}),
    }
    data["summary"] = {run: run_summary(data, run) for run in runs}
    data["comparisons"] = compare_claims(data, registration=registration)
    return jsonable(data)


# ----------------------------------------------------------------------------- model card


def update_metadata(data: dict, metadata_path: str | os.PathLike, run: str = "cmer") -> dict:
    """Set metadata.json's eval_metrics from `run`'s pooled DSC (mean over the test volumes of every seed)."""
    metadata_path = Path(metadata_path)
    summary = data["summary"].get(run)
    if not summary:
        raise ValueError(f"results.json has no '{run}' run to copy into {metadata_path}")
    meta = json.loads(metadata_path.read_text())
    first = next(iter(data["settings"].values()), {})
    split = first.get("split_counts", {})
    volumes = summary.get("fused", next(iter(summary.values())))["dsc_n"]
    seeds = [int(s) for s in data["seeds"] if seed_key(s) in data["runs"].get(run, {})]  # the ones recorded
    description = (f"{data['dataset']}; {first.get('phantom', {}).get('subjects', '?')} subjects at "
                   f"{first.get('spacing', '?')} mm per seed, test split {split.get('testing', '?')} volumes per "
                   f"seed, seeds {seeds}, {volumes} test volumes in all; see docs/results.md")
    metrics = {"dataset": description}
    metrics.update({f"mean_dice_{n}": round(summary[n]["dsc_mean"], 3) for n in ("fused",) + MODALITIES
                    if n in summary and summary[n]["dsc_mean"] is not None})
    meta["eval_metrics"] = metrics
    atomic_write_text(metadata_path, json.dumps(meta, indent=4) + "\n")
    return metrics
