"""The paper's experiments in one command: train every method, evaluate, write the tables.

    python -m tools.experiments --out results/phantom                   # the full plan, seeds 0 1 2
    python -m tools.experiments --out results/phantom --seeds 0 1 2 3 4 # more seeds
    python -m tools.experiments --out results/quick --quick             # a few minutes (CI), seed 0
    python -m tools.experiments --out results/phantom --write-docs docs/results.md --update-metadata
    python -m tools.experiments --out results/phantom --report-only --write-docs docs/results.md

Each run is the bundle's own training and evaluation (configs/train.yaml + a method
preset + configs/evaluate.yaml through MONAI's ConfigWorkflow; stage 2 through
configs/stage2.yaml), so the numbers are the ones a user gets from the documented commands.
A run whose model and evaluation already exist is reused, so an interrupted experiment
picks up where it stopped; `--runs NAME...` restricts the plan (names as in tables.md, or
seed<s>/NAME for one seed) and keeps the other runs' rows of an existing results.json.

Seeds: a seed s sets the training seed (`seed`, which also seeds the datalist split) and the
phantom (`phantom#seed`): each seed's phantom is generated into <out>/data/seed<s> with its
own cache <out>/cache/seed<s>. With --dataset-dir the data are fixed: only the training seed
and the split vary (each seed's datalist in <out>/splits/seed<s>/; a datalist .json given as
--dataset-dir keeps its own split). The main rows (cam, seam_scale, seam_all, cmer, stage2,
full_supervision) run for every seed; the Table III ablations, the Table I pair runs, the
DeepLab backbone (Table IV) and the improvement switches run for the first seed only.

Writes under --out: runs/seed<s>/<run>/{models,train,eval}, results.json (every per-volume
row, pooled summaries, paired tests of the paper's claims: tools/experiment_report.py,
tools/experiment_stats.py), tables.md (analogues of the paper's Tables I-V with intervals),
sweep_<map>.png (Fig. 4), overlays.png (Fig. 5). --write-docs PATH renders the same page from
results.json into PATH (figures copied next to it); --update-metadata copies the main CMER row
into configs/metadata.json's eval_metrics.

Baselines (CAM, SEAM) and full supervision train every modality network on its own, so
one K = 4 run gives all single-modality baselines; their pair fusions (Table I) come from
evaluating the two networks of that run together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scripts.common import MODALITIES, atomic_torch_save, atomic_write_json, atomic_write_text
from tools import experiment_figures as figs
from tools import experiment_report as report
from tools.experiment_report import ABLATIONS, BASELINES, DEEPLAB_RUN, seed_key

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
PAIRS = (("t1", "t2"), ("t1c", "flair"), ("t1", "flair"), ("t1c", "t2"))
DEFAULT_SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
# Set per seed by the runner (seed_overrides): --set may not change them.
SEEDED_KEYS = ("seed", "phantom#seed", "dataset_dir", "cache_dir", "datalist_path", "make_phantom")
SETTING_KEYS = ("seed", "epochs", "batch_size", "lr", "weight_decay", "backbone", "base_channels", "spatial_size",
                "spacing", "split", "phantom", "precision")


@dataclass(frozen=True)
class Run:
    """One training run of the plan: a method preset on some modalities, for one seed."""

    name: str
    method: str  # a file of configs/methods/
    modalities: tuple[str, ...] = MODALITIES
    overrides: tuple = ()  # (config id, value) pairs on top of the method preset
    seed: int = 0
    stage1: str = ""  # stage-2 runs only: the run of the same seed whose model.pt gives the pseudo-masks

    @property
    def key(self) -> str:
        """'seed<s>/<name>': the run's folder under runs/ and its name in the wall-time table."""
        return f"{seed_key(self.seed)}/{self.name}"


# Improvement switches measured against the faithful default (docs/results.md).
SWITCH_RUNS = (
    Run("cmer+per_sample_sum", "cmer", overrides=(("objective#reduction", "per_sample_sum"),)),
    Run("cmer+mask_out_of_field", "cmer", overrides=(("objective#mask_out_of_field", True),)),
)


@dataclass
class Plan:
    """The runs in order, the seeds, the pairs of Table I and what every run shares (presets, --set, data)."""

    runs: list[Run]
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    pairs: tuple = PAIRS
    overrides: dict = field(default_factory=dict)  # --set, for every run
    presets: tuple[str, ...] = ()
    dataset_dir: str | None = None  # --dataset-dir: fixed data for every seed
    device: str | None = None  # --device


def full_plan(seeds=DEFAULT_SEEDS) -> Plan:
    """Every run of the paper's tables, ordered so an interrupted experiment has the most important first:
    the main comparison for every seed, the Table III ablations, full supervision and stage 2 for
    every seed, then the DeepLab backbone, the pair runs and the switches (first seed)."""
    seeds = tuple(int(s) for s in seeds)
    first = seeds[0]
    runs = [Run(m, m, seed=s) for s in seeds for m in ("cam", "seam_all", "cmer", "seam_scale")]
    runs += [Run(m, m, seed=first) for m in ABLATIONS if m != "cmer"]
    runs += [Run("full_supervision", "full_supervision", seed=s) for s in seeds]
    runs += [Run("stage2", "cmer", seed=s, stage1="cmer") for s in seeds]
    runs.append(Run(DEEPLAB_RUN, "cmer", overrides=(("backbone", "deeplab"),), seed=first))
    runs += [Run(f"cmer_{a}_{b}", "cmer", (a, b), seed=first) for a, b in PAIRS]
    runs += [dataclasses.replace(r, seed=first) for r in SWITCH_RUNS]
    return Plan(runs, seeds=seeds)


def quick_plan(seeds=QUICK_SEEDS) -> Plan:
    """A few-minute plan on the small phantom: CAM, SEAM (all), CMER and stage 2 per seed, one pair run."""
    seeds = tuple(int(s) for s in seeds)
    stage2 = (("stage2_epochs", "@epochs"), ("stage2_base_channels", "@base_channels"))
    runs = [r for s in seeds for r in (Run("cam", "cam", seed=s), Run("seam_all", "seam_all", seed=s),
                                       Run("cmer", "cmer", seed=s),
                                       Run("stage2", "cmer", overrides=stage2, seed=s, stage1="cmer"))]
    runs.append(Run("cmer_t1_t2", "cmer", ("t1", "t2"), seed=seeds[0]))
    return Plan(runs, seeds=seeds, pairs=(("t1", "t2"),), presets=("configs/presets/phantom_quick.yaml",))


# ----------------------------------------------------------------------------- seeds and folders


def seed_overrides(seed: int, out_dir: Path, dataset_dir: str | None = None) -> dict:
    """Config overrides of one seed: training seed (which seeds the split), data folder, cache, datalist.

    Without `dataset_dir` the phantom of seed s (`phantom#seed`) is generated into
    <out>/data/seed<s>; with it the data are shared and each seed writes its own split to
    <out>/splits/seed<s>/datalist.json (unless `dataset_dir` is itself a datalist .json).
    """
    out_dir = Path(out_dir)
    overrides = {"seed": int(seed), "cache_dir": str(out_dir / "cache" / seed_key(seed))}
    if dataset_dir is None:
        overrides.update({"dataset_dir": str(out_dir / "data" / seed_key(seed)), "make_phantom": True,
                          "phantom#seed": int(seed)})
        return overrides
    data = Path(dataset_dir).resolve()
    overrides["dataset_dir"] = str(data)
    if not (data.suffix.lower() == ".json" and data.is_file()):
        overrides["datalist_path"] = str(out_dir / "splits" / seed_key(seed) / "datalist.json")
    return overrides


def run_dir(out_dir: Path, run: Run) -> Path:
    """<out>/runs/seed<s>/<run name>."""
    return Path(out_dir) / "runs" / seed_key(run.seed) / run.name


def run_overrides(run: Run, plan: Plan, out_dir: Path, common: dict) -> dict:
    """Every override of a run but its output folders: common < --set < the seed's < the run's own."""
    return {**common, **plan.overrides, **seed_overrides(run.seed, out_dir, plan.dataset_dir), **dict(run.overrides)}


# ----------------------------------------------------------------------------- running


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


def evaluate(run: Run, plan: Plan, overrides: dict, modalities, ckpt_path: Path, out_dir: Path):
    """Evaluate a checkpoint on the test split with the bundle's evaluation workflow.

    Returns (EvaluationResult, the run's settings for results.json).
    """
    files = _config_files("configs/train.yaml", *plan.presets, f"configs/methods/{run.method}.yaml",
                          "configs/evaluate.yaml")
    overrides = {**overrides, "modalities": list(modalities), "ckpt_path": str(ckpt_path),
                 "output_dir": str(out_dir), "eval_title": f"{run.name} ({'-'.join(modalities)})",
                 "overwrite": True}  # the runner owns its eval folders: a rerun replaces them
    if run.method == "full_supervision":  # a segmentation network: its softmax, ungated
        overrides.update(method="softmax", gate=False)
    workflow = _workflow(files, "evaluating", overrides)
    workflow.run()
    return workflow.parser.get_parsed_content("evaluate#report").result, run_settings(workflow.parser)


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


def _run_one(run: Run, plan: Plan, out_dir: Path, common: dict, outcome: dict) -> None:
    folder = run_dir(out_dir, run)
    overrides = run_overrides(run, plan, out_dir, common)
    results, wall = outcome["results"], outcome["wall"]
    if run.stage1:
        stage1 = run_dir(out_dir, dataclasses.replace(run, name=run.stage1, stage1=""))
        if not is_trained(stage1):
            logger.warning("%s: skipped, no finished stage-1 run %s", run.key, stage1)
            return
        if is_trained(folder, stage2=True):
            logger.info("%s: reusing the trained stage-2 model", run.key)
        else:
            print(f"\n=== training {run.key} (stage 2 on {run.stage1}) ===", flush=True)
            wall[run.key] = train_stage2(run, folder, plan, overrides, stage1 / "models" / "model.pt")
        print(f"\n=== evaluating {run.key} ===", flush=True)
        results[(run.seed, run.name)] = evaluate_stage2(run, folder, plan, overrides, stage1 / "models" / "model.pt")
        return
    model = folder / "models" / "model.pt"
    if is_trained(folder):
        logger.info("%s: reusing the trained model %s", run.key, model)
    else:
        print(f"\n=== training {run.key} ({'-'.join(run.modalities)}, preset {run.method}) ===", flush=True)
        wall[run.key] = train(run, folder, plan, overrides)
    print(f"\n=== evaluating {run.key} ===", flush=True)
    results[(run.seed, run.name)], settings = evaluate(run, plan, overrides, run.modalities, model, folder / "eval")
    plain = tuple(run.modalities) == MODALITIES and not run.overrides
    if plain:
        outcome["settings"].setdefault(seed_key(run.seed), settings)
    if plain and run.seed == plan.seeds[0] and run.method in BASELINES + ("full_supervision",):
        for a, b in plan.pairs:
            sub = sub_checkpoint(model, MODALITIES, (a, b), folder / "models" / f"model_{a}_{b}.pt")
            results[(run.seed, f"{run.name}@{a}_{b}")], _ = evaluate(run, plan, overrides, (a, b), sub,
                                                                      folder / f"eval_{a}_{b}")


def selected(plan: Plan, only=None) -> list[Run]:
    """The plan's runs that `only` names (by name or seed<s>/name); all of them without `only`."""
    return [r for r in plan.runs if not only or r.name in only or r.key in only]


def run_plan(plan: Plan, out_dir: Path, common: dict, only=None, after_each=None) -> dict:
    """Train (or reuse) and evaluate the selected runs in order; `after_each(outcome)` after every run.

    Returns {results: {(seed, run): EvaluationResult}, wall: {seed<s>/run: s}, settings:
    {seed<s>: settings}}.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = {"results": {}, "wall": {}, "settings": {}}
    for run in selected(plan, only):
        _run_one(run, plan, out_dir, common, outcome)
        if after_each is not None:
            after_each(outcome)
    return outcome


# ----------------------------------------------------------------------------- report


def _device(plan: Plan) -> str:
    return plan.device or ("cuda:0" if torch.cuda.is_available() else "cpu")


def _precision(plan: Plan, settings: dict) -> str:
    from scripts.precision import resolve_precision

    configured = next(iter(settings.values()), {}).get("precision", "auto")
    try:
        return f"{configured} ({resolve_precision(configured, _device(plan))})"
    except (ValueError, RuntimeError):
        return str(configured)


def earlier_records(out_dir: Path, plan: Plan) -> tuple[dict, dict, dict, list]:
    """(runs, wall, settings, commands) of an existing <out>/results.json, limited to this plan's runs and seeds.

    A call restricted with --runs evaluates only some runs; the others keep their earlier rows.
    """
    path = out_dir / "results.json"
    if not path.is_file():
        return {}, {}, {}, []
    earlier = json.loads(path.read_text())
    names, seeds = {r.name for r in plan.runs}, {seed_key(s) for s in plan.seeds}
    runs = {name: {s: rec for s, rec in by_seed.items() if s in seeds}
            for name, by_seed in earlier.get("runs", {}).items() if name.split("@")[0] in names}
    wall = {k: v for k, v in earlier.get("wall_seconds", {}).items()
            if k.split("/")[0] in seeds and k.split("/", 1)[-1] in names}
    settings = {s: v for s, v in earlier.get("settings", {}).items() if s in seeds}
    commands = earlier.get("commands", [earlier["command"]] if "command" in earlier else [])
    return {k: v for k, v in runs.items() if v}, wall, settings, commands


def results_document(outcome: dict, plan: Plan, out_dir: Path, command: str) -> dict:
    """The results.json object of an outcome merged over the earlier one (`earlier_records`)."""
    runs, wall, settings, commands = earlier_records(out_dir, plan)
    for (seed, name), result in outcome["results"].items():
        runs.setdefault(name, {})[seed_key(seed)] = report.run_record(result.rows, result.sweep)
    wall.update(outcome["wall"])
    settings.update(outcome["settings"])
    dataset = ("phantom generated per seed (phantom seed = seed) into data/seed<s>" if plan.dataset_dir is None
               else f"{Path(plan.dataset_dir).name}, the same data for every seed (split seed = seed)")
    return report.build_document(
        command=command, seeds=plan.seeds, pairs=plan.pairs, runs=runs, wall=wall, settings=settings,
        machine=report.machine_info(_device(plan), _precision(plan, settings)), figures=figs.figure_names(out_dir),
        dataset=dataset, commands=list(dict.fromkeys([*commands, command])))


def overlay_models(plan: Plan, out_dir: Path) -> dict:
    """{run: model.pt} of the finished four-modality stage-1 runs of the first seed (Fig. 5's rows)."""
    first = plan.seeds[0]
    return {r.name: run_dir(out_dir, r) / "models" / "model.pt" for r in plan.runs
            if r.seed == first and not r.stage1 and not r.overrides and tuple(r.modalities) == MODALITIES
            and is_trained(run_dir(out_dir, r))}


def write_report(outcome: dict, plan: Plan, out_dir: Path, common: dict, command: str, figures: bool = True) -> Path:
    """results.json, the figures from it (when `figures`), then tables.md rendered from it; returns tables.md."""
    data = results_document(outcome, plan, out_dir, command)
    atomic_write_json(out_dir / "results.json", data)
    if figures:
        figs.sweep_figures(data, out_dir)
        models = overlay_models(plan, out_dir)
        if models:
            first = Run("cam", "cam", seed=plan.seeds[0])
            figs.overlay_figure(models, _config_files("configs/train.yaml", *plan.presets),
                                run_overrides(first, plan, out_dir, common), out_dir / figs.OVERLAYS)
        data["figures"] = figs.figure_names(out_dir)
        atomic_write_json(out_dir / "results.json", data)
    return render_tables(out_dir)


def render_tables(out_dir: Path) -> Path:
    """tables.md from <out>/results.json."""
    data = json.loads((out_dir / "results.json").read_text())
    target = out_dir / "tables.md"
    atomic_write_text(target, report.render_page(data, title=f"Experiments ({data['date']})"))
    return target


def command_line(argv) -> str:
    """The command as results.json records it: shell-quoted, paths under the working folder relative."""
    here = str(Path.cwd()) + os.sep
    return shlex.join(["python", "-m", "tools.experiments", *(a.replace(here, "") for a in argv)])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--quick", action="store_true", help="a few-minute version (small phantom, seed 0)")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default {' '.join(map(str, DEFAULT_SEEDS))}; "
                        f"--quick: {' '.join(map(str, QUICK_SEEDS))}); each sets the training seed, phantom and split")
    parser.add_argument("--dataset-dir", help="fixed data for every seed (default: a phantom per seed under --out)")
    parser.add_argument("--runs", nargs="*", help="only these runs (names as in tables.md, or seed<s>/NAME)")
    parser.add_argument("--device", help="e.g. cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--set", nargs="*", default=[], metavar="ID=VALUE",
                        help="config overrides for every run, e.g. epochs=4 (values parsed as JSON when they can be)")
    parser.add_argument("--write-docs", metavar="PATH", help="also write the results page (e.g. docs/results.md)")
    parser.add_argument("--update-metadata", action="store_true",
                        help="copy the main CMER row into configs/metadata.json's eval_metrics")
    parser.add_argument("--report-only", action="store_true",
                        help="train and evaluate nothing: rewrite tables.md (and --write-docs) from results.json")
    return parser


def main(argv=None) -> int:
    """Command line: run the plan, then write results.json, tables.md, figures and the optional docs."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out_dir = Path(args.out).resolve()
    if not args.report_only:
        seeds = tuple(dict.fromkeys(args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)))
        plan = quick_plan(seeds) if args.quick else full_plan(seeds)
        plan.dataset_dir = str(Path(args.dataset_dir).resolve()) if args.dataset_dir else None
        plan.device = args.device
        common = {"bundle_root": str(BUNDLE_ROOT)}
        if args.device:
            common["device"] = f"$torch.device('{args.device}')"
        for item in args.set:
            key, _, value = item.partition("=")
            if key in SEEDED_KEYS:
                parser.error(f"--set {key} is set per seed: use --seeds / --dataset-dir")
            try:
                plan.overrides[key] = json.loads(value)
            except json.JSONDecodeError:
                plan.overrides[key] = value
        start = time.time()
        command = command_line(argv if argv is not None else sys.argv[1:])
        # tables after every run, so an interrupted experiment still leaves what it measured
        partial = lambda outcome: write_report(outcome, plan, out_dir, common, command, figures=False)  # noqa: E731
        outcome = run_plan(plan, out_dir, common, only=set(args.runs or []), after_each=partial)
        tables = write_report(outcome, plan, out_dir, common, command)
        print(f"\n{tables.read_text()}\nwrote {tables} in {time.time() - start:.0f} s", flush=True)
    elif not (out_dir / "results.json").is_file():
        parser.error(f"--report-only: no {out_dir / 'results.json'}")
    else:
        print(f"wrote {render_tables(out_dir)}", flush=True)
    if args.write_docs:
        print(f"wrote {report.write_docs(out_dir / 'results.json', args.write_docs)}", flush=True)
    if args.update_metadata:
        data = json.loads((out_dir / "results.json").read_text())
        metrics = report.update_metadata(data, BUNDLE_ROOT / "configs" / "metadata.json")
        print(f"configs/metadata.json eval_metrics: {metrics}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
