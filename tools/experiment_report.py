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
import shutil
import subprocess
import time
from pathlib import Path

from scripts.common import MODALITIES, atomic_write_text
from scripts.workflows.metrics import EMPTY_CASES
from tools import experiment_stats as st

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("cam", "seam_scale", "seam_all")
ABLATIONS = ("kd_only", "kd_er", "er_cmer", "cmer")  # Table III, in its row order
MAIN_ROWS = BASELINES + ("cmer", "stage2", "full_supervision")  # Table II, every seed
MAP_ORDER = ("t1", "t2", "t1c", "flair", "fused")  # the paper's column order
DEEPLAB_RUN = "cmer_deeplab"
SWITCH_PREFIX = "cmer+"
METRIC_RANGE = {"dsc": (0.0, 1.0), "assd": (0.0, math.inf)}  # intervals are clipped to these
ROW_KEYS = ("subject", "map", "dsc", "assd", "tp", "fp", "fn", "empty_case")
# The paper's claims tested per volume: (better run, worse run, map, label).
CLAIMS = (
    ("cmer", "seam_all", "fused", "CMER > SEAM (all)"),
    ("cmer", "cam", "fused", "CMER > CAM"),
    ("cmer", "seam_scale", "fused", "CMER > SEAM (scale)"),
    ("kd_er", "kd_only", "fused", "Table III: KD + ER > KD"),
    ("er_cmer", "kd_er", "fused", "Table III: ER + CMER > KD + ER"),
    ("cmer", "er_cmer", "fused", "Table III: KD + ER + CMER > ER + CMER"),
)


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

    info = {"cpu": cpu_model(), "processor": platform.processor(), "cores": os.cpu_count(),
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


def compare_claims(data: dict, claims=CLAIMS) -> list[dict]:
    """The paired test of every claim whose two runs are in the document (module docstring)."""
    seed = data.get("statistics", {}).get("bootstrap_seed", st.BOOTSTRAP_SEED)
    out = []
    for better, worse, name, label in claims:
        result = st.paired_comparison(keyed_values(data, better, name), keyed_values(data, worse, name), seed=seed)
        out.append({"claim": label, "better": better, "worse": worse, "map": name, "metric": "dsc", **result})
    return out


def build_document(*, command: str, seeds, pairs, runs: dict, wall: dict, settings: dict, machine: dict,
                   figures: list, dataset: str, commands=None) -> dict:
    """The results.json object: provenance, per-seed rows, pooled summaries and claim tests.

    `runs` is {run name: {seed key: run_record(...)}} (pair evaluations as 'cam@t1_t2');
    `commands` every command that contributed rows (default: `command`).
    """
    data = {
        "command": command, "commands": list(commands or [command]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
        "machine": machine, "seeds": [int(s) for s in seeds], "dataset": dataset, "pairs": [list(p) for p in pairs],
        "statistics": {"confidence": st.CONFIDENCE, "alpha": st.ALPHA, "min_pairs": st.MIN_PAIRS,
                       "bootstrap_samples": st.BOOTSTRAP_SAMPLES, "bootstrap_seed": st.BOOTSTRAP_SEED},
        "settings": settings, "wall_seconds": wall, "figures": list(figures), "runs": runs,
    }
    data["summary"] = {run: run_summary(data, run) for run in runs}
    data["comparisons"] = compare_claims(data)
    return jsonable(data)


# ----------------------------------------------------------------------------- tables


def _num(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{scale * value:.{digits}f}"


def fmt_cell(c: dict, scale: float = 1.0) -> str:
    """'mean ± std [ci_low, ci_high]' ('-' for an empty cell; no interval when it has none)."""
    if not c["n"]:
        return "-"
    text = f"{_num(c['mean'], scale)} ± {_num(c['std'], scale)}"
    if c["ci_low"] is not None and math.isfinite(c["ci_low"]):
        text += f" [{_num(c['ci_low'], scale)}, {_num(c['ci_high'], scale)}]"
    return text


def _dsc(data, run, name, seeds=None) -> str:
    return fmt_cell(cell(data, run, name, "dsc", seeds), 100.0)


def _assd(data, run, name, seeds=None) -> str:
    return fmt_cell(cell(data, run, name, "assd", seeds))


def _n_seeds(data, run, seeds=None) -> str:
    c = cell(data, run, "fused" if "fused" in map_names(data, run) else map_names(data, run)[0], "dsc", seeds)
    return f"{c['n']} ({c['seeds']})"


def table_ii(data: dict, metric: str = "dsc") -> str:
    """Four modalities, every seed: methods x (T1, T2, T1c, FLAIR, fused), DSC % or ASSD mm."""
    fmt = _dsc if metric == "dsc" else _assd
    lines = ["| method | " + " | ".join(MAP_ORDER) + " | volumes (seeds) |", "|---" * (len(MAP_ORDER) + 2) + "|"]
    for run in (r for r in MAIN_ROWS if r in data["runs"]):
        lines.append(f"| {run} | " + " | ".join(fmt(data, run, n) for n in MAP_ORDER) + f" | {_n_seeds(data, run)} |")
    return "\n".join(lines) + "\n"


def table_i(data: dict) -> str:
    """Pairs (first seed): each pair's two modalities and their fusion, per method, DSC %."""
    first = data["seeds"][:1]
    blocks = []
    for a, b in data["pairs"]:
        key = f"{a}_{b}"
        lines = [f"**{a.upper()} - {b.upper()}**", "", f"| method | {a} | {b} | fused |", "|---|---|---|---|"]
        rows = [(m, f"{m}@{key}") for m in BASELINES + ("full_supervision",)] + [("cmer (pair)", f"cmer_{key}")]
        for label, run in rows:
            if run in data["runs"]:
                lines.append(f"| {label} | " + " | ".join(_dsc(data, run, n, first) for n in (a, b, "fused")) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def table_iii(data: dict) -> str:
    """Ablation of the terms (first seed, four modalities): fused DSC % and ASSD mm."""
    first = data["seeds"][:1]
    flags = {"kd_only": "✓ | - | -", "kd_er": "✓ | ✓ | -", "er_cmer": "- | ✓ | ✓", "cmer": "✓ | ✓ | ✓"}
    lines = ["| L_KD | L_ER | L_CMER | fused DSC | fused ASSD |", "|---|---|---|---|---|"]
    for run in (r for r in ABLATIONS if r in data["runs"]):
        lines.append(f"| {flags[run]} | {_dsc(data, run, 'fused', first)} | {_assd(data, run, 'fused', first)} |")
    return "\n".join(lines) + "\n"


def _per_map_table(data: dict, runs, seeds) -> str:
    lines = ["| run | " + " | ".join(MAP_ORDER) + " |", "|---" * (len(MAP_ORDER) + 1) + "|"]
    for run in (r for r in runs if r in data["runs"]):
        lines.append(f"| {run} | " + " | ".join(_dsc(data, run, n, seeds) for n in MAP_ORDER) + " |")
    return "\n".join(lines) + "\n"


def table_iv(data: dict) -> str:
    """Backbones (first seed): CMER with the U-Net against CMER with DeepLab, DSC %."""
    return _per_map_table(data, ("cmer", DEEPLAB_RUN), data["seeds"][:1])


def table_switches(data: dict) -> str:
    """The faithful default against each improvement switch (first seed), DSC %."""
    return _per_map_table(data, ["cmer"] + sorted(r for r in data["runs"] if r.startswith(SWITCH_PREFIX)),
                          data["seeds"][:1])


def table_v(data: dict) -> str:
    """r_u = FN/TP and r_o = FP/TP at the threshold, pooled over the test volumes of every seed."""
    runs = [r for r in ("seam_scale", "seam_all", "cmer") if r in data["runs"]]
    summaries = {r: run_summary(data, r) for r in runs}
    lines = ["| modality | ratio | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for name in MAP_ORDER[:-1]:  # the modalities in the paper's order
        for ratio in ("r_u", "r_o"):
            values = [_num(summaries[r].get(name, {}).get(f"{ratio}_pooled"), digits=2) for r in runs]
            lines.append(f"| {name} | {ratio} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def table_claims(data: dict) -> str:
    """The paired tests of the paper's claims: difference, interval, Wilcoxon p, verdict."""
    conf = _num(100 * data["statistics"]["confidence"], digits=0)
    lines = [f"| claim | map | pairs | better | worse | difference [{conf} % CI] | Wilcoxon p | verdict | reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in data["comparisons"]:
        diff = f"{_num(c['mean_difference'], 100)} [{_num(c['ci_low'], 100)}, {_num(c['ci_high'], 100)}]"
        p = "-" if c["p_value"] is None else f"{c['p_value']:.3g}"
        lines.append(f"| {c['claim']} | {c['map']} | {c['n']} | {_num(c['mean_better'], 100)} "
                     f"| {_num(c['mean_worse'], 100)} | {diff} | {p} | **{c['verdict']}** | {c['reason']} |")
    return "\n".join(lines) + "\n"


def _setting_lines(data: dict) -> list[str]:
    m = data["machine"]
    machine = f"{m.get('cpu')}, {m.get('cores')} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
    lines = ["| | value |", "|---|---|", *[f"| command | `{c}` |" for c in data.get("commands", [data["command"]])],
             f"| date | {data['date']} |", f"| commit | {data['commit']} |", f"| machine | {machine} |",
             f"| software | Python {m.get('python')}, torch {m.get('torch')}, monai {m.get('monai')} |",
             f"| device, precision | {m.get('device')}, {m.get('precision')} |",
             f"| seeds | {', '.join(str(s) for s in data['seeds'])} |", f"| data | {data['dataset']} |"]
    for key, s in data["settings"].items():
        lines.append(f"| settings {key} | " + ", ".join(f"{k} {json.dumps(v)}" for k, v in s.items()) + " |")
    return lines


def render_page(data: dict, figure_dir: str = "", title: str = "Experiments", note: str = "") -> str:
    """The whole markdown page (tables.md or the docs page) from a results.json object.

    `figure_dir` is the folder of the figures relative to the page ('' = next to it).
    """
    s = data["statistics"]
    conf, alpha = _num(100 * s["confidence"], digits=0), s["alpha"]
    figures = [f"{figure_dir}{name}" for name in data.get("figures", [])]
    parts = [
        f"# {title}", "", *([note, ""] if note else []), *_setting_lines(data), "",
        f"Per-volume 3D DSC (%) and ASSD (mm) on the test split: mean ± std over the test volumes of every "
        f"seed pooled, then the {conf} % interval of the mean in brackets: a t interval on the per-seed means "
        f"when a cell has two or more seeds, else a percentile bootstrap over the volumes "
        f"({s['bootstrap_samples']} resamples, seed {s['bootstrap_seed']}); `tools/experiment_stats.py`. "
        "Each seed sets the training seed, the phantom and the split.", "",
        "## Table II analogue: four modalities, DSC (%)", "", table_ii(data),
        "## Table II analogue: four modalities, ASSD (mm)", "", table_ii(data, "assd"),
        "## Table I analogue: pairs (first seed)", "", table_i(data),
        "## Table III analogue: ablation of the terms (four modalities, fused, first seed)", "", table_iii(data),
        "## Table IV analogue: backbone (DSC %, first seed)", "", table_iv(data),
        "## Table V analogue: r_u = FN/TP, r_o = FP/TP (pooled over volumes and seeds)", "", table_v(data),
        "## Improvement switches (DSC %, first seed)", "", table_switches(data),
        "## The paper's claims, paired per volume", "",
        f"Volumes paired by seed and subject; difference = better - worse in DSC points; {conf} % paired "
        f"bootstrap interval; two-sided Wilcoxon signed-rank test. Reproduced: the paper's direction and "
        f"p < {alpha:g}; not reproduced: the opposite direction and p < {alpha:g}; inconclusive otherwise "
        f"(also with fewer than {s['min_pairs']} non-zero differences).", "", table_claims(data),
        "## Figures", "", *[f"![{Path(f).stem}]({f})" for f in figures], "",
        "## Training wall time (s)", "", "| run | seconds |", "|---|---|",
        *[f"| {k} | {_num(v, digits=0)} |" for k, v in data["wall_seconds"].items()], "",
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- docs + model card


def write_docs(results_json: str | os.PathLike, docs_path: str | os.PathLike) -> Path:
    """Write the docs page from results.json; the figures are copied to <docs folder>/figures/results_*."""
    results_json, docs_path = Path(results_json), Path(docs_path)
    data = json.loads(results_json.read_text())
    figure_dir = docs_path.parent / "figures"
    copied = []
    for name in data.get("figures", []):
        source = results_json.parent / name
        if source.is_file():
            figure_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, figure_dir / f"results_{name}")
            copied.append(f"results_{name}")
    note = ("Generated by `python -m tools.experiments` (the command below, with `--write-docs`) from its "
            "results.json; every number on this page comes from that file. Do not edit by hand: rerun the command.")
    text = render_page({**data, "figures": copied}, "figures/", "Results on the embedded phantom", note)
    atomic_write_text(docs_path, text)
    return docs_path


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
    description = (f"{data['dataset']}; {first.get('phantom', {}).get('subjects', '?')} subjects at "
                   f"{first.get('spacing', '?')} mm per seed, test split {split.get('testing', '?')} volumes per "
                   f"seed, seeds {data['seeds']}, {volumes} test volumes in all; see docs/results.md")
    metrics = {"dataset": description}
    metrics.update({f"mean_dice_{n}": round(summary[n]["dsc_mean"], 3) for n in ("fused",) + MODALITIES
                    if n in summary and summary[n]["dsc_mean"] is not None})
    meta["eval_metrics"] = metrics
    atomic_write_text(metadata_path, json.dumps(meta, indent=4) + "\n")
    return metrics
