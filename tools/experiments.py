"""The paper's experiments in one command: train every method, evaluate, write the tables.

    python -m tools.experiments --out results/phantom            # the full set
    python -m tools.experiments --out results/quick --quick      # a few minutes (CI)

Each run is the bundle's own training and evaluation (configs/train.yaml + a method
preset + configs/evaluate.yaml through MONAI's ConfigWorkflow), so the numbers are the
ones a user gets from the documented commands. A run whose model and evaluation already
exist is reused, so an interrupted experiment picks up where it stopped.

Writes under --out: runs/<run>/{models,train,eval}, tables.md (analogues of the paper's
Tables I, II, III and V), sweep_<map>.png (Fig. 4), overlays.png (Fig. 5), results.json.

Baselines (CAM, SEAM) and full supervision train every modality network on its own, so
one K = 4 run gives all single-modality baselines; their pair fusions (Table I) come from
evaluating the two networks of that run together.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scripts.common import MODALITIES, atomic_torch_save, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
PAIRS = (("t1", "t2"), ("t1c", "flair"), ("t1", "flair"), ("t1c", "t2"))
BASELINES = ("cam", "seam_scale", "seam_all")
ABLATIONS = ("kd_only", "kd_er", "er_cmer", "cmer")  # Table III, in its row order


@dataclass(frozen=True)
class Run:
    name: str
    method: str  # a file of configs/methods/
    modalities: tuple[str, ...] = MODALITIES
    overrides: tuple = ()  # (config id, value) pairs on top of the method preset


# Improvement switches measured against the faithful default (docs/results.md).
SWITCH_RUNS = (
    Run("cmer+per_sample_sum", "cmer", overrides=(("objective#reduction", "per_sample_sum"),)),
    Run("cmer+mask_out_of_field", "cmer", overrides=(("objective#mask_out_of_field", True),)),
)


@dataclass
class Plan:
    runs: list[Run]
    pairs: tuple = PAIRS
    overrides: dict = field(default_factory=dict)
    presets: tuple[str, ...] = ()


def full_plan() -> Plan:
    # Ordered by importance, so an interrupted experiment has the main comparison first.
    runs = [Run("cam", "cam"), Run("seam_all", "seam_all"), Run("cmer", "cmer"), Run("seam_scale", "seam_scale")]
    runs += [Run(m, m) for m in ABLATIONS if m != "cmer"]
    runs.append(Run("full_supervision", "full_supervision"))
    runs += [Run(f"cmer_{a}_{b}", "cmer", (a, b)) for a, b in PAIRS]
    runs += list(SWITCH_RUNS)
    return Plan(runs)


def quick_plan() -> Plan:
    runs = [Run("cam", "cam"), Run("seam_all", "seam_all"), Run("cmer", "cmer"), Run("cmer_t1_t2", "cmer", ("t1", "t2"))]
    return Plan(runs, pairs=(("t1", "t2"),), presets=("configs/presets/phantom_quick.yaml",))


# ----------------------------------------------------------------------------- running


def _config_files(*files: str) -> list[str]:
    return [str(BUNDLE_ROOT / f) for f in files]


def _workflow(files, run_id: str, overrides: dict):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=files, run_id=run_id, meta_file=str(BUNDLE_ROOT / "configs/metadata.json"),
                              logging_file=str(BUNDLE_ROOT / "configs/logging.conf"), **overrides)
    workflow.initialize()
    return workflow


def train(run: Run, run_dir: Path, plan: Plan, common: dict) -> float:
    """Train one run with the bundle's training workflow; return the wall time in seconds."""
    files = _config_files("configs/train.yaml", *plan.presets, f"configs/methods/{run.method}.yaml")
    overrides = {**common, **plan.overrides, **dict(run.overrides), "modalities": list(run.modalities),
                 "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "train")}
    start = time.time()
    workflow = _workflow(files, "training", overrides)
    workflow.run()
    workflow.finalize()
    return time.time() - start


def evaluate(run: Run, run_dir: Path, plan: Plan, common: dict, modalities, ckpt_path: Path, out_dir: Path):
    """Evaluate a checkpoint on the test split with the bundle's evaluation workflow."""
    files = _config_files("configs/train.yaml", *plan.presets, f"configs/methods/{run.method}.yaml",
                          "configs/evaluate.yaml")
    overrides = {**common, **plan.overrides, **dict(run.overrides), "modalities": list(modalities), "ckpt_path": str(ckpt_path),
                 "output_dir": str(out_dir), "eval_title": f"{run.name} ({'-'.join(modalities)})",
                 "overwrite": True}  # the runner owns its eval folders: a rerun replaces them
    if run.method == "full_supervision":  # a segmentation network: its softmax, ungated
        overrides.update(method="softmax", gate=False)
    workflow = _workflow(files, "evaluating", overrides)
    workflow.run()
    return workflow.parser.get_parsed_content("evaluate#report").result


def sub_checkpoint(ckpt_path: Path, modalities, chosen, target: Path) -> Path:
    """The state dict of the networks of `chosen` modalities, renumbered as a smaller MultiModalCAM."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    index = {m: i for i, m in enumerate(modalities)}
    picked = {}
    for new, name in enumerate(chosen):
        prefix = f"nets.{index[name]}."
        picked.update({f"nets.{new}.{key[len(prefix):]}": value for key, value in state.items() if key.startswith(prefix)})
    atomic_torch_save(picked, target)
    return target


# ----------------------------------------------------------------------------- tables


def _cell(result, name: str, metric: str = "dsc") -> str:
    if result is None or name not in result.summary:
        return "-"
    s = result.summary[name]
    scale = 100.0 if metric == "dsc" else 1.0
    return f"{scale * s[f'{metric}_mean']:.1f} ± {scale * s[f'{metric}_std']:.1f}"


def table_ii(results: dict) -> str:
    """Four modalities: methods x (T1, T2, T1c, FLAIR, fused), DSC % and ASSD mm."""
    order = ("t1", "t2", "t1c", "flair", "fused")  # the paper's column order
    methods = [m for m in BASELINES + ("cmer", "full_supervision") if m in results]
    lines = ["| method | " + " | ".join(f"{n} DSC | {n} ASSD" for n in order) + " |", "|---" * (1 + 2 * len(order)) + "|"]
    for m in methods:
        cells = [f"{_cell(results[m], n)} | {_cell(results[m], n, 'assd')}" for n in order]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_i(results: dict, pair_results: dict, pairs) -> str:
    """Pairs: for each pair, its two modalities and their fusion, per method."""
    blocks = []
    for a, b in pairs:
        key = f"{a}_{b}"
        lines = [f"**{a.upper()} - {b.upper()}**", "", f"| method | {a} | {b} | fused |", "|---|---|---|---|"]
        for m in BASELINES:
            r = pair_results.get((m, key))
            if r is not None:
                lines.append(f"| {m} | {_cell(r, a)} | {_cell(r, b)} | {_cell(r, 'fused')} |")
        r = results.get(f"cmer_{key}")
        if r is not None:
            lines.append(f"| cmer (pair) | {_cell(r, a)} | {_cell(r, b)} | {_cell(r, 'fused')} |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def table_iii(results: dict) -> str:
    """Ablation of the terms on the four-modality setting: fused DSC and ASSD."""
    flags = {"kd_only": "✓ | - | -", "kd_er": "✓ | ✓ | -", "er_cmer": "- | ✓ | ✓", "cmer": "✓ | ✓ | ✓"}
    lines = ["| L_KD | L_ER | L_CMER | fused DSC | fused ASSD |", "|---|---|---|---|---|"]
    for m in ABLATIONS:
        if m in results:
            lines.append(f"| {flags[m]} | {_cell(results[m], 'fused')} | {_cell(results[m], 'fused', 'assd')} |")
    return "\n".join(lines) + "\n"


def table_v(results: dict) -> str:
    """r_u = FN/TP and r_o = FP/TP at threshold 0.5 (pooled over the test volumes)."""
    methods = [m for m in ("seam_scale", "seam_all", "cmer") if m in results]
    lines = ["| modality | ratio | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for name in ("t1", "t2", "t1c", "flair"):
        for ratio in ("r_u", "r_o"):
            cells = []
            for m in methods:
                s = results[m].summary.get(name)
                cells.append("-" if s is None else f"{s[f'{ratio}_pooled']:.2f}")
            lines.append(f"| {name} | {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def sweep_figures(results: dict, out_dir: Path) -> list[Path]:
    """Fig. 4: per map name, DSC versus threshold for every method that has that map."""
    from scripts.workflows.figures import plot_threshold_sweep

    written = []
    for name in ("t1", "t2", "t1c", "flair", "fused"):
        curves = {run: r.curves()[name] for run, r in results.items() if name in r.curves()}
        if curves:
            written.append(plot_threshold_sweep(curves, out_dir / f"sweep_{name}.png", title=f"{name}: DSC versus threshold"))
    return written


def overlay_figure(models: dict, common: dict, plan: Plan, out_png: Path):
    """Fig. 5: binarised maps of every K = 4 method on one test subject's largest tumour slice."""
    from monai.bundle import ConfigParser

    from scripts.data.volumes import VolumeCache
    from scripts.data.subjects import load_datalist
    from scripts.workflows.figures import plot_overlays
    from scripts.workflows.map_engine import volume_maps
    from scripts.model.networks import MultiModalCAM

    parser = ConfigParser()
    parser.read_config(_config_files("configs/train.yaml", *plan.presets))
    parser.update({**common, **plan.overrides})
    datalist = parser.get_parsed_content("datalist")
    record = load_datalist(datalist, "testing")[0]
    cache = VolumeCache(parser.get_parsed_content("cache_dir"), spatial_size=parser.get_parsed_content("spatial_size"))
    volume = cache.get(record)
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


# ----------------------------------------------------------------------------- main


def run_plan(plan: Plan, out_dir: Path, common: dict, only=None, after_each=None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    results, pair_results, wall, models = {}, {}, {}, {}
    outcome = {"results": results, "pair_results": pair_results, "wall": wall, "models": models}
    for run in plan.runs:
        if only and run.name not in only:
            continue
        run_dir = out_dir / "runs" / run.name
        model = run_dir / "models" / "model.pt"
        if model.is_file() and (run_dir / "train" / "validation.md").is_file():
            logger.info("%s: reusing the trained model %s", run.name, model)
        else:
            print(f"\n=== training {run.name} ({'-'.join(run.modalities)}, preset {run.method}) ===", flush=True)
            wall[run.name] = train(run, run_dir, plan, common)
        print(f"\n=== evaluating {run.name} ===", flush=True)
        results[run.name] = evaluate(run, run_dir, plan, common, run.modalities, model, run_dir / "eval")
        if tuple(run.modalities) == MODALITIES and not run.overrides:
            models[run.name] = model
        independent = run.method in BASELINES + ("full_supervision",)
        if independent and tuple(run.modalities) == MODALITIES:
            for a, b in plan.pairs:
                sub = sub_checkpoint(model, MODALITIES, (a, b), run_dir / "models" / f"model_{a}_{b}.pt")
                pair_results[(run.name, f"{a}_{b}")] = evaluate(run, run_dir, plan, common, (a, b), sub,
                                                                run_dir / f"eval_{a}_{b}")
        if after_each is not None:
            after_each(outcome)
    return outcome


def table_switches(results: dict) -> str:
    """The faithful default against each improvement switch (four modalities)."""
    names = ["cmer"] + [r.name for r in SWITCH_RUNS]
    order = ("t1", "t2", "t1c", "flair", "fused")
    lines = ["| run | " + " | ".join(order) + " |", "|---" * (1 + len(order)) + "|"]
    for n in names:
        if n in results:
            lines.append(f"| {n} | " + " | ".join(_cell(results[n], m) for m in order) + " |")
    return "\n".join(lines) + "\n"


def write_report(outcome: dict, plan: Plan, out_dir: Path, common: dict, command: str, figures: bool = True) -> Path:
    results, pair_results = outcome["results"], outcome["pair_results"]
    if figures:
        sweep_figures(results, out_dir)
        if outcome["models"]:
            overlay_figure(outcome["models"], common, plan, out_dir / "overlays.png")
    text = "\n".join([
        f"# Experiments ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`",
        "",
        f"Torch {torch.__version__}, device {common.get('device', 'default')}, threads {torch.get_num_threads()}.",
        "Per-volume 3D DSC (%) and ASSD (mm), mean ± std over the test volumes, threshold 0.5, CAM maps.",
        "",
        "## Table II analogue: four modalities", "", table_ii(results),
        "## Table I analogue: pairs", "", table_i(results, pair_results, plan.pairs),
        "## Table III analogue: ablation of the terms (four modalities, fused)", "", table_iii(results),
        "## Table V analogue: r_u = FN/TP, r_o = FP/TP (pooled)", "", table_v(results),
        "## Improvement switches (DSC %, four modalities)", "", table_switches(results),
        "## Training wall time (s)", "",
        "| run | seconds |", "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in outcome["wall"].items()],
        "",
        "Figures: sweep_<map>.png (Fig. 4), overlays.png (Fig. 5).",
    ])
    target = out_dir / "tables.md"
    atomic_write_text(target, text + "\n")
    summary = {name: r.summary for name, r in results.items()}
    summary.update({f"{m}@{pair}": r.summary for (m, pair), r in pair_results.items()})
    atomic_write_json(out_dir / "results.json", {"command": command, "wall_seconds": outcome["wall"], "summary": summary})
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--quick", action="store_true", help="a few-minute version (small phantom, 4 runs)")
    parser.add_argument("--dataset-dir", help="data folder (default: the phantom of the config)")
    parser.add_argument("--runs", nargs="*", help="only these runs (names as in tables.md)")
    parser.add_argument("--device", help="e.g. cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--set", nargs="*", default=[], metavar="ID=VALUE",
                        help="config overrides for every run, e.g. epochs=4 (values parsed as JSON when they can be)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    plan = quick_plan() if args.quick else full_plan()
    out_dir = Path(args.out).resolve()
    common = {"bundle_root": str(BUNDLE_ROOT), "cache_dir": str(out_dir / "cache")}
    if args.dataset_dir:
        common["dataset_dir"] = str(Path(args.dataset_dir).resolve())
    if args.device:
        common["device"] = f"$torch.device('{args.device}')"
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            plan.overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            plan.overrides[key] = value
    start = time.time()
    command = "python -m tools.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    # tables after every run, so an interrupted experiment still leaves what it measured
    partial = lambda outcome: write_report(outcome, plan, out_dir, common, command, figures=False)  # noqa: E731
    outcome = run_plan(plan, out_dir, common, only=set(args.runs or []), after_each=partial)
    report = write_report(outcome, plan, out_dir, common, command)
    print(f"\n{report.read_text()}\nwrote {report} in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
