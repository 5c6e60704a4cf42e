"""One run of `tools.experiments`: train it with the bundle's workflows, evaluate it, return its record.

Each run is the bundle's own training and evaluation (configs/train.yaml + a method preset +
configs/evaluate.yaml through MONAI's ConfigWorkflow; stage 2 through configs/stage2.yaml), so
the numbers are the ones a user gets from the documented commands. A model already trained in
the run's folder is reused (an interrupted call picks up where it stopped); the record
(`tools.experiment_records`) is returned only once every evaluation of the run is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scripts.common import MODALITIES, atomic_torch_save, atomic_write_json
from tools import experiment_figures as figs
from tools import experiment_report as report
from tools.experiment_plan import Plan, Run, run_dir, run_overrides
from tools.experiment_records import file_sha256
from tools.experiment_report import BASELINES, BUNDLE_ROOT

logger = logging.getLogger(__name__)

# The evaluation of models/model_per_modality.pt (each network at its own best validation epoch), recorded as
# `<run>.per_modality` beside `<run>` (all networks at the best fused epoch, models/model.pt).
PER_MODALITY = "per_modality"

SETTING_KEYS = ("seed", "epochs", "batch_size", "lr", "weight_decay", "backbone", "base_channels", "spatial_size",
                "spacing", "split", "phantom", "precision")


@dataclass
class Context:
    """What every run of one call shares: the plan, the output folder, the common overrides, the command."""

    plan: Plan
    out_dir: Path
    common: dict
    command: str = ""


def _config_files(*files: str) -> list[str]:
    return [str(BUNDLE_ROOT / f) for f in files]


def _workflow(files, run_id: str, overrides: dict):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=files, run_id=run_id, meta_file=str(BUNDLE_ROOT / "configs/metadata.json"),
                              logging_file=str(BUNDLE_ROOT / "configs/logging.conf"), **overrides)
    workflow.initialize()
    return workflow


def train(run: Run, folder: Path, plan: Plan, overrides: dict) -> float:
    """Train one run with the bundle's training workflow; return the wall time in seconds."""
    files = _config_files("configs/train.yaml", *plan.presets, f"configs/methods/{run.method}.yaml")
    overrides = {**overrides, "modalities": list(run.modalities), "ckpt_dir": str(folder / "models"),
                 "output_dir": str(folder / "train")}
    start = time.time()
    workflow = _workflow(files, "training", overrides)
    workflow.run()
    workflow.finalize()
    return time.time() - start


def evaluate(run: Run, plan: Plan, overrides: dict, modalities, ckpt_path: Path, out_dir: Path,
             readout: str | None = None, split: str = "testing"):
    """Evaluate a checkpoint on a datalist split with the bundle's evaluation workflow.

    `readout` replaces the CAM read-out (e.g. "gradcampp", the paper's second block). The validation
    split records the model's operating point beside `ckpt_path`, choosing the fusion too
    (scripts.workflows.operating_point); the test split reports its DSC at it.
    Returns (EvaluationResult, the run's settings for the record, the report's operating point).
    """
    files = _config_files("configs/train.yaml", *plan.presets, f"configs/methods/{run.method}.yaml",
                          "configs/evaluate.yaml")
    overrides = {**overrides, "modalities": list(modalities), "ckpt_path": str(ckpt_path),
                 "output_dir": str(out_dir), "eval_title": f"{run.name} ({'-'.join(modalities)})",
                 "eval_split": split, "choose_fusion": True,
                 "overwrite": True}  # the runner owns its eval folders: a rerun replaces them
    if run.method == "full_supervision":  # a segmentation network: its softmax, ungated
        overrides.update(method="softmax", gate=False)
    elif readout:
        overrides.update(method=readout, eval_title=f"{run.name}, {readout} ({'-'.join(modalities)})")
    workflow = _workflow(files, "evaluating", overrides)
    workflow.run()
    report_handler = workflow.parser.get_parsed_content("evaluate#report")
    return report_handler.result, run_settings(workflow.parser), report_handler.operating_point


def run_settings(parser) -> dict:
    """The settings a table depends on (SETTING_KEYS) and the split the datalist holds."""
    settings = {key: parser.get_parsed_content(key) for key in SETTING_KEYS}
    settings["dataset"] = Path(parser.get_parsed_content("dataset_dir")).name
    datalist = Path(parser.get_parsed_content("datalist"))
    if datalist.is_file():
        stored = json.loads(datalist.read_text())
        settings.update(split_counts=stored.get("split"), split_seed=stored.get("seed"))
    return report.jsonable(settings)


def _stage2_overrides(run: Run, folder: Path, overrides: dict, stage1_ckpt: Path, output: str) -> dict:
    return {**overrides, "stage1_ckpt_path": str(stage1_ckpt), "ckpt_dir": str(folder / "models"),
            "output_dir": str(folder / output), "stage2_report_after_training": False}


def train_stage2(run: Run, folder: Path, plan: Plan, overrides: dict, stage1_ckpt: Path) -> float:
    """Train the stage-2 network on the pseudo-masks of `stage1_ckpt` (configs/stage2.yaml); wall seconds."""
    files = _config_files("configs/train.yaml", *plan.presets, "configs/stage2.yaml")
    start = time.time()
    workflow = _workflow(files, "training", _stage2_overrides(run, folder, overrides, stage1_ckpt, "train"))
    workflow.run()
    workflow.finalize()
    wall = time.time() - start
    atomic_write_json(folder / "train" / "finished.json", {"wall_seconds": wall})
    return wall


def evaluate_stage2(run: Run, folder: Path, plan: Plan, overrides: dict, stage1_ckpt: Path):
    """The stage-2 report's test rows as an EvaluationResult with one map, 'fused' (whole tumour)."""
    from scripts.workflows.metrics import EvaluationResult, summarise_rows

    files = _config_files("configs/train.yaml", *plan.presets, "configs/stage2.yaml")
    workflow = _workflow(files, "reporting", _stage2_overrides(run, folder, overrides, stage1_ckpt, "eval"))
    workflow.run()
    stage2 = workflow.parser.get_parsed_content("stage2#report")
    workflow.finalize()
    rows = [{**r, "map": "fused"} for r in stage2.rows if r["split"] == stage2.test_split and r["map"] == "stage2"]
    threshold = stage2.stage2_threshold
    return EvaluationResult(threshold=threshold, rows=rows, summary={"fused": summarise_rows(rows, threshold)})


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


def is_trained(folder: Path, stage2: bool = False) -> bool:
    """A finished run: model.pt and validation.md (stage 2: stage2_model.pt and the runner's finished.json)."""
    if stage2:
        return (folder / "models" / "stage2_model.pt").is_file() and (folder / "train" / "finished.json").is_file()
    return (folder / "models" / "model.pt").is_file() and (folder / "train" / "validation.md").is_file()


def _evaluation(result) -> dict:
    return report.run_record(result.rows, result.sweep)


def _ensure_trained(run: Run, folder: Path, ctx: Context, overrides: dict, why: str = "") -> float | None:
    """Train `run` into `folder` unless a finished model is there; the wall seconds, or None when reused."""
    if is_trained(folder):
        logger.info("%s: reusing the trained model in %s", run.key, folder / "models")
        return None
    print(f"\n=== training {run.key} ({'-'.join(run.modalities)}, preset {run.method}){why} ===", flush=True)
    return train(run, folder, ctx.plan, overrides)


def stage1_record(run: Run, ctx: Context) -> dict:
    """Train (or reuse) and evaluate a stage-1 run: its maps, and on the first seed its pair and extra
    read-outs and its Fig. 5 slice. Returns the record's run-specific part."""
    plan, folder = ctx.plan, run_dir(ctx.out_dir, run)
    overrides = run_overrides(run, plan, ctx.out_dir, ctx.common)
    wall = _ensure_trained(run, folder, ctx, overrides)
    model = folder / "models" / "model.pt"
    print(f"\n=== evaluating {run.key} ===", flush=True)
    start = time.time()
    validation, _, chosen = evaluate(run, plan, overrides, run.modalities, model, folder / "eval_validation",
                                     split="validation")  # records the operating point beside model.pt
    result, settings, at_test = evaluate(run, plan, overrides, run.modalities, model, folder / "eval")
    evaluations = {run.name: _evaluation(result)}
    point = operating_point_record(chosen, at_test, validation)
    per_modality_point = None
    per_modality = folder / "models" / "model_per_modality.pt"  # each network at its own best epoch (train.yaml)
    if per_modality.is_file():
        pm_validation, _, pm_chosen = evaluate(run, plan, overrides, run.modalities, per_modality,
                                               folder / "eval_per_modality_validation", split="validation")
        pm_result, _, pm_at_test = evaluate(run, plan, overrides, run.modalities, per_modality,
                                            folder / "eval_per_modality")
        evaluations[f"{run.name}.{PER_MODALITY}"] = _evaluation(pm_result)
        per_modality_point = operating_point_record(pm_chosen, pm_at_test, pm_validation)
    plain = tuple(run.modalities) == MODALITIES and not run.overrides
    first = run.seed == plan.seeds[0] and plan.extras
    if plain and first and run.method in BASELINES + ("full_supervision",):
        for a, b in plan.pairs:
            sub = sub_checkpoint(model, MODALITIES, (a, b), folder / "models" / f"model_{a}_{b}.pt")
            pair, _, _ = evaluate(run, plan, overrides, (a, b), sub, folder / f"eval_{a}_{b}")
            evaluations[f"{run.name}@{a}_{b}"] = _evaluation(pair)
    for readout in plan.readouts.get(run.name, ()) if plain and first else ():
        extra, _, _ = evaluate(run, plan, overrides, run.modalities, model, folder / f"eval_{readout}", readout)
        evaluations[f"{run.name}.{readout}"] = _evaluation(extra)
    overlay = None
    if plain and first:
        files = _config_files("configs/train.yaml", *plan.presets, f"configs/methods/{run.method}.yaml")
        overlay = figs.overlay_masks(model, run.name, files, {**overrides, "modalities": list(run.modalities)})
    return {"evaluations": evaluations, "settings": settings, "model_sha256": file_sha256(model), "overlay": overlay,
            "wall_seconds": {"train": wall, "evaluate": time.time() - start}, "curves": validation_curves(folder),
            "operating_point": point, "operating_point_per_modality": per_modality_point}


def operating_point_record(chosen: dict | None, at_test: dict | None, validation) -> dict | None:
    """The record's operating point: chosen on the validation split (per map and per fusion: threshold, mean DSC,
    area under the DSC curve), the validation DSC curves it was read from, and the test DSC at it."""
    if not chosen:
        return None
    return report.jsonable({"validation": chosen["this_split"], "validation_sweep": report.run_record([], validation.sweep)
                            ["sweep"], "test": (at_test or {}).get("at_recorded")})


def validation_curves(folder: Path) -> dict | None:
    """A stage-1 run's training curves: per epoch, validation DSC per map and slice accuracy per modality
    (train/validation_history.json, rounded to 4 digits); the evidence behind a weak row. None when absent."""
    path = Path(folder) / "train" / "validation_history.json"
    if not path.is_file():
        return None
    history = json.loads(path.read_text())
    epochs = [{k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()} for e in history.get("epochs", [])]
    return {"key_metric": history.get("key_metric"), "epochs": epochs}


def stage2_record(run: Run, ctx: Context, stage1_record: dict | None) -> dict:
    """Train (or reuse) and evaluate a stage-2 run on the pseudo-masks of its stage-1 run of the same seed.

    A stage-1 run that has a record but no model here (another machine trained it) is trained
    again; the record keeps the sha256 of the weights stage 2 learnt from and says whether they are
    the recorded ones.
    """
    plan, folder = ctx.plan, run_dir(ctx.out_dir, run)
    overrides = run_overrides(run, plan, ctx.out_dir, ctx.common)
    stage1_run = next((r for r in plan.runs if r.name == run.stage1 and r.seed == run.seed and not r.stage1),
                      dataclasses.replace(run, name=run.stage1, method=run.stage1, overrides=(), stage1=""))
    stage1_folder = run_dir(ctx.out_dir, stage1_run)
    _ensure_trained(stage1_run, stage1_folder, ctx, run_overrides(stage1_run, plan, ctx.out_dir, ctx.common),
                    f", the stage-1 model of {run.key}")
    stage1_ckpt = stage1_folder / "models" / "model.pt"
    wall = None
    if is_trained(folder, stage2=True):
        logger.info("%s: reusing the trained stage-2 model", run.key)
    else:
        print(f"\n=== training {run.key} (stage 2 on {run.stage1}) ===", flush=True)
        wall = train_stage2(run, folder, plan, overrides, stage1_ckpt)
    print(f"\n=== evaluating {run.key} ===", flush=True)
    start = time.time()
    result = evaluate_stage2(run, folder, plan, overrides, stage1_ckpt)
    sha = file_sha256(stage1_ckpt)
    return {"evaluations": {run.name: _evaluation(result)}, "stage1_sha256": sha,
            "stage1_is_recorded_model": None if stage1_record is None else sha == stage1_record.get("model_sha256"),
            "wall_seconds": {"train": wall, "evaluate": time.time() - start}}
