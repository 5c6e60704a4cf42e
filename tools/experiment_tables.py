"""The page of `tools.experiments`: the paper's Tables I-V and Fig. 3 analogues rendered from results.json.

Every cell is computed from the document's per-volume rows (`tools.experiment_report.cell`) and
shows, where the paper has one, the paper's number beside it (`tools.paper_numbers`). The same
text is tables.md (next to results.json) and the docs page (`write_docs`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from scripts.common import atomic_write_text
from tools import experiment_readouts as ro
from tools import paper_numbers as paper
from tools.experiment_figures import FIG4, OVERLAYS
from tools.experiment_report import (ABLATIONS, BASELINES, DEEPLAB_RUN, MAIN_ROWS, MAP_ORDER, PAIR_KEYS,
                                     SWITCH_PREFIX, TRANSFORM_KINDS, best_epochs, cell, map_names, run_summary,
                                     transform_runs)

READOUT = "gradcampp"
READOUT_NOTE = (
    "The tables above binarise every method's fused map at the recipe's read-out (mean fusion, threshold 0.5). "
    "That read-out was chosen in the stage-1 study on CMER runs only (docs/recipe.md), so it is CMER's operating "
    "point, not the baselines'. Below: the same networks at the paper's read-out (max fusion, 0.5), at the "
    "operating point chosen on each model's validation split (scripts/workflows/operating_point.py; records "
    "written before it existed show '-'), and at the best threshold on the test split itself (an oracle: an "
    "upper bound for any threshold, not a fair read-out), with the threshold-free area under the DSC curve. "
    "Every number is read off the DSC-versus-threshold curves the records hold.")
LABELS = {"cam": "CAM", "seam_scale": "SEAM (scale)", "seam_all": "SEAM (all)", "cmer": "CMER (proposed)",
          "stage2": "stage 2, `auto` pseudo-masks", "stage2_all": "stage 2, all four maps fused (the paper's)",
          "full_supervision": "full supervision (upper bound)"}


def _num(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{scale * value:.{digits}f}"


def fmt_cell(c: dict, scale: float = 1.0, reference: float | None = None) -> str:
    """'mean ± std [ci_low, ci_high]' (+ ' · *paper x*' with a `reference`); '-' for an empty cell."""
    if not c["n"]:
        text = "-"
    else:
        text = f"{_num(c['mean'], scale)} ± {_num(c['std'], scale)}"
        if c["ci_low"] is not None and math.isfinite(c["ci_low"]):
            text += f" [{_num(c['ci_low'], scale)}, {_num(c['ci_high'], scale)}]"
    return text if reference is None else f"{text} · *{reference:.1f}*"


def _dsc(data, run, name, seeds=None, reference=None) -> str:
    return fmt_cell(cell(data, run, name, "dsc", seeds), 100.0, reference)


def _assd(data, run, name, seeds=None, reference=None) -> str:
    return fmt_cell(cell(data, run, name, "assd", seeds), 1.0, reference)


def _n_seeds(data, run, seeds=None) -> str:
    names = map_names(data, run)
    c = cell(data, run, "fused" if "fused" in names else names[0], "dsc", seeds)
    return f"{c['n']} ({c['seeds']})"


def _first(data) -> list:
    return data["seeds"][:1]


def table_ii(data: dict, metric: str = "dsc", runs=MAIN_ROWS, seeds=None) -> str:
    """Four modalities: methods x (T1, T2, T1c, FLAIR, fused), DSC % or ASSD mm, the paper's mean in italics."""
    fmt = _dsc if metric == "dsc" else _assd
    lines = ["| method | " + " | ".join(MAP_ORDER) + " | volumes (seeds) |", "|---" * (len(MAP_ORDER) + 2) + "|"]
    for run in (r for r in runs if r in data["runs"]):
        label = LABELS.get(run.split(".")[0], run) + (" (GradCAM++)" if "." in run else "")
        cells = [fmt(data, run, n, seeds, paper.table_ii(run, n, metric)) for n in MAP_ORDER]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_n_seeds(data, run, seeds)} |")
    return "\n".join(lines) + "\n"


def table_gradcampp(data: dict) -> str:
    """The paper's second block: the GradCAM++ read-out of the same networks (first seed), DSC %."""
    return table_ii(data, "dsc", [f"{r}.{READOUT}" for r in BASELINES + ("cmer",)], _first(data))


def table_i(data: dict) -> str:
    """Pairs (first seed): each pair's two modalities and their fusion, per method, DSC %."""
    first = _first(data)
    blocks = []
    for a, b in data["pairs"]:
        key = f"{a}_{b}"
        lines = [f"**{a.upper()} - {b.upper()}**", "", f"| method | {a} | {b} | fused |", "|---|---|---|---|"]
        rows = [(LABELS[m], f"{m}@{key}", m) for m in BASELINES + ("full_supervision",)]
        rows.append(("CMER trained on the pair", f"cmer_{key}", "cmer"))
        for label, run, method in rows:
            if run in data["runs"]:
                refs = paper.TABLE_I.get(key, {}).get(method, (None, None, None))
                lines.append(f"| {label} | " + " | ".join(_dsc(data, run, n, first, ref)
                                                         for n, ref in zip((a, b, "fused"), refs)) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def table_iii(data: dict) -> str:
    """Ablation of the terms (first seed, four modalities): fused DSC % and ASSD mm."""
    first = _first(data)
    flags = {"kd_only": "✓ | - | -", "kd_er": "✓ | ✓ | -", "er_cmer": "- | ✓ | ✓", "cmer": "✓ | ✓ | ✓"}
    lines = ["| L_KD | L_ER | L_CMER | fused DSC | fused ASSD | T1 | T2 | T1c | FLAIR |", "|---" * 9 + "|"]
    for run in (r for r in ABLATIONS if r in data["runs"]):
        dsc_ref, assd_ref = paper.TABLE_III.get(run, (None, None))
        per_map = " | ".join(_dsc(data, run, m, first) for m in ("t1", "t2", "t1c", "flair"))
        lines.append(f"| {flags[run]} | {_dsc(data, run, 'fused', first, dsc_ref)} | "
                     f"{_assd(data, run, 'fused', first, assd_ref)} | {per_map} |")
    return "\n".join(lines) + "\n"


def _per_map_table(data: dict, runs, seeds, labels=None) -> str:
    lines = ["| run | " + " | ".join(MAP_ORDER) + " |", "|---" * (len(MAP_ORDER) + 1) + "|"]
    for label, run in (labels or {r: r for r in runs}).items():
        if run in data["runs"]:
            lines.append(f"| {label} | " + " | ".join(_dsc(data, run, n, seeds) for n in MAP_ORDER) + " |")
    return "\n".join(lines) + "\n"


def table_iv(data: dict) -> str:
    """Backbones (first seed): CMER with the U-Net against CMER with DeepLab, DSC %."""
    return _per_map_table(data, ("cmer", DEEPLAB_RUN), _first(data))


def table_transforms(data: dict) -> str:
    """Fig. 3 as numbers (first seed): CMER with one transform kind at a time against none and all, DSC %."""
    return _per_map_table(data, (), _first(data), transform_runs())


def table_switches(data: dict) -> str:
    """The default against each improvement switch (first seed), DSC %."""
    return _per_map_table(data, ["cmer"] + sorted(r for r in data["runs"] if r.startswith(SWITCH_PREFIX)),
                          _first(data))


def table_controls(data: dict) -> str:
    """Controls (first seed), DSC %: CAM on one view and on two views (the augmentation without ER), SEAM (all),
    CMER with pi = identity (agreement between modalities without equivariance) and CMER."""
    return _per_map_table(data, (), _first(data), {
        "CAM (one view)": "cam", "CAM on two views, no ER (control)": "cam_two_view", "SEAM (all)": "seam_all",
        "CMER with pi = identity (control)": "cmer_identity", "CMER": "cmer"})


def table_v(data: dict) -> str:
    """r_u = FN/TP and r_o = FP/TP at the threshold, pooled over the test volumes of every seed (CAM too,
    which the paper's table leaves out: the SEAM (all) > CAM claims need it)."""
    runs = [r for r in ("cam", "seam_scale", "seam_all", "cmer") if r in data["runs"]]
    summaries = {r: run_summary(data, r) for r in runs}
    lines = ["| modality | ratio | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for name in MAP_ORDER[:-1]:  # the modalities in the paper's order
        for i, ratio in enumerate(("r_u", "r_o")):
            values = []
            for r in runs:
                ref = paper.TABLE_V.get(r, {}).get(name)
                text = _num(summaries[r].get(name, {}).get(f"{ratio}_pooled"), digits=2)
                values.append(text if ref is None else f"{text} · *{ref[i]:.2f}*")
            lines.append(f"| {name} | {ratio} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def first_seed_runs(data: dict) -> list[str]:
    """The recorded one-seed stage-1 runs in the page's order (Table III, Fig. 3, pairs, DeepLab, switches),
    CMER first as their reference."""
    order = ("cmer", *ABLATIONS, *(f"cmer_{k}" for k in TRANSFORM_KINDS), *(f"cmer_{k}" for k in PAIR_KEYS),
             DEEPLAB_RUN, *sorted(r for r in data["runs"] if r.startswith(SWITCH_PREFIX)), "cam_two_view", "cmer_identity")
    return [r for r in dict.fromkeys(order) if r in data["runs"]]


def table_v_first(data: dict) -> str:
    """r_u / r_o of the one-seed runs on the first seed's test volumes (CMER's first seed beside them): the
    evidence for a Table III, Fig. 3 or pair verdict (a map that misses the tumour, or one that spills)."""
    first = _first(data)
    runs = first_seed_runs(data)
    if len(runs) < 2:
        return "No one-seed run is recorded yet.\n"
    lines = ["| run | " + " | ".join(MAP_ORDER) + " |", "|---" * (len(MAP_ORDER) + 1) + "|"]
    for run in runs:
        summary = run_summary(data, run, first)
        cells = [" / ".join(_num(summary[n].get(f"{k}_pooled"), digits=2) for k in ("r_u", "r_o"))
                 if n in summary else "-" for n in MAP_ORDER]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def grade_of(subject: str) -> str | None:
    """'HGG' / 'LGG' when the subject id names its grade (the phantom's ids do), else None."""
    return next((g for g in ("HGG", "LGG") if g in str(subject).upper()), None)


def table_by_grade(data: dict) -> str:
    """DSC (%) of the main stage-1 rows split by tumour grade, mean over the volumes of every seed: HGG have an
    enhancing rim (a T1c signal), LGG none. Empty when a subject id does not name its grade (e.g. BraTS ids)."""
    runs = [r for r in (*BASELINES, "cmer") if r in data["runs"]]
    rows = {r: [row for rec in data["runs"][r].values() for row in rec.get("rows", [])] for r in runs}
    if not runs or not all(grade_of(row["subject"]) for r in runs for row in rows[r]):
        return "The subject ids do not name the tumour grade.\n"
    lines = ["| method | " + " | ".join(MAP_ORDER) + " | volumes HGG / LGG |", "|---" * (len(MAP_ORDER) + 2) + "|"]
    for r in runs:
        cells = []
        for name in MAP_ORDER:
            means = []
            for grade in ("HGG", "LGG"):
                v = [row["dsc"] for row in rows[r] if row["map"] == name and grade_of(row["subject"]) == grade
                     and isinstance(row["dsc"], (int, float))]
                means.append(_num(100 * sum(v) / len(v)) if v else "-")
            cells.append(" / ".join(means))
        n = {g: len({(seed, row["subject"]) for seed, rec in data["runs"][r].items() for row in rec.get("rows", [])
                     if grade_of(row["subject"]) == g}) for g in ("HGG", "LGG")}
        lines.append(f"| {LABELS.get(r, r)} | " + " | ".join(cells) + f" | {n['HGG']} / {n['LGG']} |")
    return "\n".join(lines) + "\n"


def table_learning(data: dict) -> str:
    """What each stage-1 network learnt: slice accuracy and DSC on the validation split at the kept epoch,
    mean over the seeds with curves (the evidence for a weak row: a map cannot localise what its
    classifier does not separate)."""
    order = [r for r in (*BASELINES, "cmer", *first_seed_runs(data), "full_supervision") if best_epochs(data, r)]
    if not order:
        return "No run recorded its training curves yet.\n"
    lines = ["| method | kept epoch | " + " | ".join(MAP_ORDER) + " | seeds |", "|---" * (len(MAP_ORDER) + 3) + "|"]
    for run in dict.fromkeys(order):
        best = list(best_epochs(data, run).values())
        cells = []
        for name in MAP_ORDER:
            parts = []
            for metric in ("val_acc", "val_dsc"):
                values = [e[f"{metric}_{name}"] for e in best if isinstance(e.get(f"{metric}_{name}"), (int, float))]
                parts.append(_num(100 * sum(values) / len(values)) if values else "-")
            cells.append(" / ".join(parts))
        epochs = ", ".join(str(e.get("epoch")) for e in best)
        lines.append(f"| {LABELS.get(run, run)} | {epochs} | " + " | ".join(cells) + f" | {len(best)} |")
    return "\n".join(lines) + "\n"


def verdict_counts(data: dict, key: str = "verdict") -> dict:
    """{verdict: number of claims} of the primary (`verdict`) or the per-volume (`volume_verdict`) analysis."""
    counts: dict[str, int] = {}
    for c in data["comparisons"]:
        counts[c.get(key, c["verdict"])] = counts.get(c.get(key, c["verdict"]), 0) + 1
    return counts


def claims_summary(data: dict) -> str:
    """One paragraph: the verdict counts of both analyses, the claims without a seed-level test, the post hoc ones."""
    comparisons = data["comparisons"]
    primary, volume = verdict_counts(data), verdict_counts(data, "volume_verdict")
    few = sum(1 for c in comparisons if c["verdict"] != "pending" and c.get("seeds", 0) < data["statistics"].get(
        "min_seeds", 3))
    tested = sum(1 for c in comparisons if c.get("p_holm") is not None and math.isfinite(c["p_holm"]))
    post_hoc = [c["claim"] for c in comparisons if c.get("post_hoc")]
    text = (f"**Seed level (the verdict):** {', '.join(f'{v} {n}' for v, n in primary.items())} of {len(comparisons)} "
            f"claims; {tested} have a seed-level test (Holm family of {tested}), {few} rest on fewer than "
            f"{data['statistics'].get('min_seeds', 3)} seeds and are inconclusive at this level. "
            f"**Per volume (secondary, Holm):** {', '.join(f'{v} {n}' for v, n in volume.items())}.")
    if any(c.get("post_hoc") is not None for c in comparisons):
        text += (f" **Post hoc:** {len(post_hoc)} claim{'s' if len(post_hoc) != 1 else ''} defined after records "
                 "they read (marked † below)." if post_hoc else " Every claim was defined before the records it reads.")
    return text + "\n"


def _p(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3g}"


def table_claims(data: dict) -> str:
    """The claims: seed-level difference, t interval, t-test p and Holm p, verdict; the per-volume Wilcoxon beside
    it (secondary); when each claim was defined (post hoc marked)."""
    conf = _num(100 * data["statistics"]["confidence"], digits=0)
    lines = [claims_summary(data), f"| claim | seeds (volumes) | better | worse | difference [{conf} % CI over seeds] "
             "| t-test p (Holm) | **verdict** | per volume: Wilcoxon p (Holm), verdict | defined | reason |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["comparisons"]:
        diff = f"{_num(c['mean_difference'], 100)} [{_num(c['ci_low'], 100)}, {_num(c['ci_high'], 100)}]"
        volume = f"{_p(c.get('volume_p_value'))} ({_p(c.get('volume_p_holm'))}), {c.get('volume_verdict', '-')}"
        defined = "-" if not c.get("defined_commit") else f"{c['defined_commit']}" + (" †" if c.get("post_hoc") else "")
        lines.append(f"| {c['claim']}{' †' if c.get('post_hoc') else ''} | {c.get('seeds', '-')} ({c['n']}) "
                     f"| {_num(c['mean_better'], 100)} | {_num(c['mean_worse'], 100)} | {diff} "
                     f"| {_p(c.get('p_value'))} ({_p(c.get('p_holm'))}) | **{c['verdict']}** | {volume} | {defined} "
                     f"| {c['reason']} |")
    return "\n".join(lines) + "\n"


def missing_seeds(data: dict) -> dict:
    """{main row: seeds it has} for every main row with fewer seeds than the plan."""
    wanted = len(data["seeds"])
    have = {run: len(data["runs"].get(run, {})) for run in MAIN_ROWS}
    return {run: n for run, n in have.items() if n < wanted}


def _machine_lines(data: dict) -> list[str]:
    machines = data.get("machines") or [{**data.get("machine", {}), "runs": [], "commits": [data.get("commit")]}]
    lines = []
    for m in machines:
        where = f"{m.get('cpu')}, {m.get('cores')} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
        runs = f"{len(m['runs'])} runs" if m.get("runs") else ""
        lines.append(f"| machine | {where}; {m.get('device')}, {m.get('precision')}; torch {m.get('torch')}, monai "
                     f"{m.get('monai')}; commits {', '.join(str(c) for c in m.get('commits', []))}; {runs} |")
    return lines


def _setting_lines(data: dict) -> list[str]:
    lines = ["| | value |", "|---|---|", *[f"| command | `{c}` |" for c in data.get("commands", [data["command"]])],
             f"| rendered | {data['date']}, commit {data['commit']} |", *_machine_lines(data),
             f"| seeds | {', '.join(str(s) for s in data['seeds'])} (the first: one-seed rows) |",
             f"| data | {data['dataset']} |"]
    if data.get("recipe"):
        lines.append("| recipe | " + ", ".join(f"{k} {json.dumps(v)}" for k, v in data["recipe"].items()) + " |")
    for key, s in data["settings"].items():
        lines.append(f"| settings {key} | " + ", ".join(f"{k} {json.dumps(v)}" for k, v in s.items()) + " |")
    return lines


def _status_lines(data: dict) -> list[str]:
    lines = []
    missing = missing_seeds(data)
    if missing:
        lines += [f"> **Incomplete.** Main rows with fewer than {len(data['seeds'])} seeds: "
                  + ", ".join(f"{run} ({n})" for run, n in missing.items())
                  + ". The plan continues across sessions (records under "
                  f"`{Path(data.get('records', 'records')).name}/`); every number below is from the runs recorded so far.",
                  ""]
    pending = data.get("pending_runs") or []
    if pending:
        lines += [f"> **Pending.** {len(pending)} of the plan's {data.get('planned_runs', '?')} runs are not recorded "
                  "yet (their tables and claims show '-' / pending): " + ", ".join(pending) + ".", ""]
    for v in data.get("variants") or []:
        lines += [f"> **Mixed (--allow-mixed):** precision {v['precision']} for {', '.join(v['runs'])}.", ""]
    return lines


def render_page(data: dict, figure_dir: str = "", title: str = "Experiments", note: str = "") -> str:
    """The whole markdown page (tables.md or the docs page) from a results.json object.

    `figure_dir` is the folder of the figures relative to the page ('' = next to it).
    """
    s = data["statistics"]
    conf, alpha = _num(100 * s["confidence"], digits=0), s["alpha"]
    figures = [f"{figure_dir}{name}" for name in data.get("figures", [])]
    fig4 = [f for f in figures if f.endswith(FIG4)]
    figures = [f for f in figures if not f.endswith(FIG4)]
    parts = [
        f"# {title}", "", *([note, ""] if note else []), *([ro.headline(data), ""] if ro.headline(data) else []),
        f"{claims_summary(data)}", *_status_lines(data), *_setting_lines(data), "",
        f"Per-volume 3D DSC (%) and ASSD (mm) on the test split: mean ± std over the test volumes of every "
        f"seed pooled, then the {conf} % interval of the mean in brackets: a t interval on the per-seed means "
        f"when a cell has two or more seeds, else a percentile bootstrap over the volumes "
        f"({s['bootstrap_samples']} resamples, seed {s['bootstrap_seed']}); `tools/experiment_stats.py`. "
        "In italics after a cell: the paper's mean on BraTS 2019 (ASSD there in voxels of 1 mm).", "",
        "## Table II analogue: four modalities, DSC (%)", "", table_ii(data),
        "## Table II analogue: four modalities, ASSD (mm)", "", table_ii(data, "assd"),
        "## Table II, second block: GradCAM++ read-out of the same networks (DSC %, first seed)", "",
        table_gradcampp(data),
        "## Table I analogue: pairs (DSC %, first seed)", "", table_i(data),
        "## Table III analogue: ablation of the terms (four modalities, first seed)", "", table_iii(data),
        "## Fig. 3 analogue: one transform kind in the equivariance terms (DSC %, first seed)", "",
        table_transforms(data),
        "## Table IV analogue: backbone (DSC %, first seed; the paper's DeepLab rows are pairs: "
        + ", ".join(f"{k} {v:.1f}" for k, v in paper.TABLE_IV_PROPOSED.items()) + ")", "", table_iv(data),
        "## Table V analogue: r_u = FN/TP, r_o = FP/TP (pooled over volumes and seeds)", "", table_v(data),
        "## r_u / r_o of the one-seed runs (first seed's test volumes; each cell r_u / r_o)", "",
        table_v_first(data),
        "## Improvement switches (DSC %, first seed)", "", table_switches(data),
        "## Controls: equivariance against a second view, agreement without equivariance (DSC %, first seed)", "",
        table_controls(data),
        "## Training: slice accuracy / DSC (%) on the validation split at the kept epoch (mean over seeds)", "",
        "The classifier of each modality (slice tumour / healthy) and its map's DSC at the epoch whose weights "
        "were kept (fused: no accuracy); per-epoch curves in the figure `curves` below.", "", table_learning(data),
        "## Test DSC (%) by tumour grade: HGG / LGG (volumes of every seed)", "", table_by_grade(data),
        "## Read-outs: the operating point, the paper's read-out and the threshold sweep", "", READOUT_NOTE, "",
        *([f"![Fig. 4]({fig4[0]})", ""] if fig4 else []),
        "Fused test DSC (%) per main method and seed at each read-out (threshold in brackets):", "",
        ro.readout_table(data),
        "Fused gaps (DSC points), mean over seeds [95 % t interval over seeds, paired by seed]:", "", ro.gap_table(data),
        "Threshold-free: area under the test DSC-versus-threshold curve (%, 0.05-0.95, divided by the range), mean "
        "over seeds:", "", ro.area_table(data),
        "## The paper's claims, tested over seeds (per volume as a secondary analysis)", "",
        f"Primary: each seed gives one number per side (the mean DSC over the test volumes both runs evaluated); "
        f"difference = better - worse in DSC points, with the {conf} % t interval over the seed differences; "
        f"two-sided paired t test over the seed means (none with fewer than {s.get('min_seeds', 3)} seeds), "
        f"p-values Holm-corrected over the claims tested. Reproduced: the paper's direction and Holm p < {alpha:g}; "
        f"not reproduced: the opposite direction and Holm p < {alpha:g}; inconclusive otherwise; pending: a run not "
        "recorded yet. Secondary: the two-sided Wilcoxon signed-rank test over volumes paired by seed and subject "
        "(its own Holm family); volumes of one run share its weights, so it measures the spread over test volumes, "
        "not over training runs. Defined: the commit from which the claims file (tools/experiment_report.py) holds "
        "the claim unchanged; † = post hoc, defined after a record it reads existed (tools/experiment_claims.py).", "",
        table_claims(data),
        "## Figures", "", *[f"![{Path(f).stem}]({f})" for f in figures], "",
        "## Training wall time (s)", "", "| run | seconds |", "|---|---|",
        *[f"| {k} | {_num(v, digits=0)} |" for k, v in data["wall_seconds"].items()], "",
    ]
    return "\n".join(parts)


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
    if OVERLAYS not in data.get("figures", []) and data.get("overlays") and (figure_dir / f"results_{OVERLAYS}").is_file():
        copied.append(f"results_{OVERLAYS}")  # not redrawn (--report-only reads no data): the committed one stays
    note = ("Generated by `python -m tools.experiments` (the commands below, with `--report-only --write-docs`) "
            "from the committed run records; every number on this page comes from them. Do not edit by hand: "
            "rerun the command. Why a claim is not reproduced or inconclusive, with its evidence: "
            "[results_discussion.md](results_discussion.md) (written by hand from these numbers).")
    text = render_page({**data, "figures": copied}, "figures/", "Results on the embedded phantom", note)
    atomic_write_text(docs_path, text)
    return docs_path

