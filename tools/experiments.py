"""The paper's experiments in one command: train every method, evaluate, write the tables.

    python -m tools.experiments --out runs/paper --records results/paper --dataset-dir data/phantom \
        --seeds 1337 7 42 --device cpu --set precision=fp32                        # the committed plan
    python -m tools.experiments --out results/quick --quick                        # a few minutes (CI), seed 0
    python -m tools.experiments --out runs/paper --records results/paper --dataset-dir data/phantom \
        --seeds 1337 7 42 --report-only --write-docs docs/results.md --update-metadata

Each run is the bundle's own training and evaluation (`tools.experiment_runs`), so the numbers
are the ones a user gets from the documented commands. Every finished run leaves a small record
(`tools.experiment_records`: per-volume rows, settings, recipe, precision, machine, commit; no
weights) under --records (default <out>/records); a run with a record is done and is not run
again, so a plan longer than one session continues on a fresh machine where the last one stopped
(commit the records as runs finish). A run cut off leaves no record; a model already trained in
<out>/runs is reused. The runner refuses to add runs whose precision or recipe differ from the
records', and a table that mixes them, unless --allow-mixed (the page then lists the variants).

Seeds: a seed s sets the training seed (`seed`, which also seeds the datalist split) and, without
--dataset-dir, the phantom (`phantom#seed`, generated into <out>/data/seed<s>). With --dataset-dir
the data are fixed and only the training seed and the split vary (<out>/splits/seed<s>/). Which
runs each seed gets: `tools.experiment_plan`.

Writes under --out: runs/seed<s>/<run>/{models,train,eval} (weights: never committed),
results.json (every per-volume row of the records, pooled summaries, paired tests of the paper's
claims: tools/experiment_report.py, tools/experiment_stats.py), tables.md (the paper's Tables I-V
with intervals and the paper's numbers), transforms.png (Fig. 3), sweep_<map>.png (Fig. 4),
overlays.png (Fig. 5). --write-docs PATH renders the same page into PATH (figures copied next to
it); --update-metadata copies the main CMER row into configs/metadata.json's eval_metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from scripts.common import MODALITIES, atomic_write_json, atomic_write_text
from tools import experiment_figures as figs
from tools import experiment_records as rec
from tools import experiment_report as report
from tools import experiment_tables as tables
from tools.experiment_claims import Registration
from tools.experiment_plan import (DEFAULT_SEEDS, QUICK_SEEDS, SEEDED_KEYS, Plan, Run, full_plan, quick_plan,
                                   run_overrides, selected)
from tools.experiment_report import BUNDLE_ROOT, seed_key
from tools.experiment_runs import Context, _config_files, stage1_record, stage2_record

logger = logging.getLogger(__name__)


def _device(plan: Plan) -> str:
    import torch

    return plan.device or ("cuda:0" if torch.cuda.is_available() else "cpu")


def expected_variant(plan: Plan, common: dict) -> dict:
    """The {precision, recipe} this call would record: the precision resolved on this device and the
    RECIPE_KEYS of train.yaml + presets + --set."""
    from monai.bundle import ConfigParser

    from scripts.precision import resolve_precision

    files = _config_files("configs/train.yaml", *plan.presets)
    parser = ConfigParser()
    parser.read_config(files)
    configured = str(plan.overrides.get("precision", parser.get("precision")))
    return {"precision": resolve_precision(configured, _device(plan)),
            "recipe": rec.recipe_of(files, {**common, **plan.overrides})}


def _plan_names(plan: Plan) -> set:
    return {r.name for r in plan.runs}


def run_plan(plan: Plan, out_dir: Path, common: dict, records_dir: Path, only=None, after_each=None,
             command: str = "", allow_mixed: bool = False) -> list[str]:
    """Run every selected run that has no record yet, writing its record when it is done; returns the
    keys of the runs this call recorded. `after_each()` after every recorded run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = expected_variant(plan, common)
    existing = rec.load_records(records_dir, _plan_names(plan), set(plan.seeds))
    rec.check_uniform(existing, allow_mixed, expected)  # before hours of training, not after
    ctx = Context(plan, out_dir, common, command)
    done = []
    for run in selected(plan, only):
        path = rec.record_path(records_dir, run.seed, run.name)
        if path.is_file():
            logger.info("%s: recorded in %s, done", run.key, path)
            continue
        if run.stage1:
            stage1 = rec.read_record(rec.record_path(records_dir, run.seed, run.stage1))
            body = stage2_record(run, ctx, stage1)
        else:
            body = stage1_record(run, ctx)
        record = {"run": run.name, "seed": run.seed, "plan_seeds": list(plan.seeds), "method": run.method,
                  "modalities": list(run.modalities), "overrides": dict(run.overrides), "stage1": run.stage1,
                  "plan": plan.kind, "presets": list(plan.presets), "set": plan.overrides,
                  "dataset_dir": _portable(plan.dataset_dir), **body, "recipe": expected["recipe"],
                  **rec.provenance(_device(plan), expected["precision"], command)}
        rec.write_record(path, record)
        print(f"recorded {run.key}: {path}", flush=True)
        done.append(run.key)
        if after_each is not None:
            after_each()
    return done


def _portable(path: str | None) -> str | None:
    """A data folder as a record keeps it: relative to the bundle when inside it, else only its name."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(BUNDLE_ROOT))
    except ValueError:
        return Path(path).name


# ----------------------------------------------------------------------------- runs at once


def _child_command(run: Run, args) -> list[str]:
    """This command line for one run (`--runs seed<s>/<name>`), without a report: a child of `run_parallel`."""
    command = [sys.executable, "-m", "tools.experiments", "--out", str(Path(args.out).resolve()), "--records",
               str(Path(args.records).resolve()) if args.records else str(Path(args.out).resolve() / "records"),
               "--runs", run.key, "--no-report", "--command", args.command or command_line(args.argv)]
    if args.seeds:
        command += ["--seeds", *map(str, args.seeds)]
    if args.quick:
        command.append("--quick")
    if args.dataset_dir:
        command += ["--dataset-dir", str(Path(args.dataset_dir).resolve())]
    if args.device:
        command += ["--device", args.device]
    if args.allow_mixed:
        command.append("--allow-mixed")
    return command + (["--set", *args.set] if args.set else [])


def run_parallel(plan: Plan, out_dir: Path, common: dict, records_dir: Path, args) -> list[str]:
    """`--jobs N`: the runs without a record, N at once, each in its own process (`_child_command`, log in
    <out>/logs/); a stage-2 run starts once its stage-1 run of the same seed is recorded. For a machine with
    an accelerator and many cores, where one small training leaves it mostly idle. Returns the failed runs."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    rec.check_uniform(rec.load_records(records_dir, _plan_names(plan), set(plan.seeds)), args.allow_mixed,
                      expected_variant(plan, common))
    for seed in plan.seeds:  # each seed's split written once, before its runs race to write it
        figs.seed_parser(_config_files("configs/train.yaml", *plan.presets),
                         run_overrides(Run("cam", "cam", seed=seed), plan, out_dir, common))
    pending = [r for r in selected(plan, set(args.runs or []))
               if not rec.record_path(records_dir, r.seed, r.name).is_file()]
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0"}  # fp32 on a GPU means fp32, not TF32 convolutions
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)

    def launch(run: Run) -> int:
        with open(out_dir / "logs" / f"{seed_key(run.seed)}_{run.name}.log", "w") as log:
            print(f"[start] {run.key}", flush=True)
            return subprocess.run(_child_command(run, args), cwd=BUNDLE_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=env, check=False).returncode

    def ready(run: Run) -> bool:
        return not run.stage1 or rec.record_path(records_dir, run.seed, run.stage1).is_file()

    failed, running = [], {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while pending or running:
            for run in [r for r in pending if ready(r)][: args.jobs - len(running)]:
                pending.remove(run)
                running[pool.submit(launch, run)] = run
            if not running:  # what is left waits for a stage-1 run that failed
                failed += [r.key for r in pending]
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                code = future.result()
                print(f"[{'done' if code == 0 else f'failed ({code})'}] {run.key}", flush=True)
                if code != 0:
                    failed.append(run.key)
    return failed


# ----------------------------------------------------------------------------- report


def _machines(records: dict) -> list[dict]:
    """The distinct machines (CPU / GPU, precision, software) of the records, each with its runs and commits."""
    groups: dict[str, dict] = {}
    for (seed, name), record in sorted(records.items()):
        m = record.get("machine", {})
        entry = {k: m.get(k) for k in ("cpu", "cores", "gpu", "device", "torch", "monai", "python")}
        entry["precision"] = record.get("precision")
        group = groups.setdefault(json.dumps(entry, sort_keys=True), {**entry, "runs": [], "commits": []})
        group["runs"].append(f"{seed_key(seed)}/{name}")
        if record.get("commit") not in group["commits"]:
            group["commits"].append(record.get("commit"))
    return list(groups.values())


def results_document(plan: Plan, records_dir: Path, allow_mixed: bool = False) -> dict:
    """The results.json object built from the plan's records (every seed of the plan)."""
    records = rec.load_records(records_dir, _plan_names(plan), set(plan.seeds))
    variants = rec.check_uniform(records, allow_mixed)
    runs, wall, settings, overlays, curves, points, provenance = {}, {}, {}, {}, {}, {}, {}
    for (seed, name), record in sorted(records.items(), key=lambda item: (plan.seeds.index(item[0][0]), item[0][1])):
        for evaluation, rows in record["evaluations"].items():
            runs.setdefault(evaluation, {})[seed_key(seed)] = rows
        provenance[f"{seed_key(seed)}/{name}"] = {"commit": record.get("commit"), "date": record.get("date")}
        if record.get("operating_point"):
            points.setdefault(name, {})[seed_key(seed)] = record["operating_point"]
        wall[f"{seed_key(seed)}/{name}"] = (record.get("wall_seconds") or {}).get("train")
        if record.get("modalities") == list(MODALITIES) and not record.get("overrides") and record.get("settings"):
            settings.setdefault(seed_key(seed), record["settings"])
        if seed == plan.seeds[0] and record.get("overlay"):
            overlays[name] = record["overlay"]
        if record.get("curves"):
            curves.setdefault(name, {})[seed_key(seed)] = record["curves"]
    dataset = ("phantom generated per seed (phantom seed = seed) into data/seed<s>" if plan.dataset_dir is None
               else f"{Path(plan.dataset_dir).name}, the same data for every seed (split seed = seed)")
    commands = list(dict.fromkeys(r.get("command", "") for r in records.values() if r.get("command")))
    machines = _machines(records)
    data = report.build_document(
        command=commands[-1] if commands else "", seeds=plan.seeds, pairs=plan.pairs, runs=runs, wall=wall,
        settings=settings, machine=machines[0] if machines else {}, figures=[], dataset=dataset, commands=commands,
        provenance=provenance, registration=Registration(report.CLAIMS))
    pending = [r.key for r in plan.runs if (r.seed, r.name) not in records]
    data.update(machines=machines, variants=variants if len(variants) > 1 else [], overlays=overlays, curves=curves,
                operating_points=points,
                planned_runs=len(plan.runs), pending_runs=pending,
                recipe=variants[0]["recipe"] if variants else {}, records=str(records_dir))
    return report.jsonable(data)


def write_report(plan: Plan, out_dir: Path, common: dict, records_dir: Path, figures: bool = True,
                 allow_mixed: bool = False, overlays: bool = True) -> Path:
    """results.json from the records, the figures from it (when `figures`), then tables.md; returns tables.md.

    `overlays` False leaves Fig. 5 alone: it is the one figure that needs the data (the images under the
    recorded masks), which --report-only neither makes nor reads."""
    data = results_document(plan, records_dir, allow_mixed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures:
        figs.fig4_figure(data, out_dir)
        figs.sweep_figures(data, out_dir)
        figs.transform_figure(data, out_dir, report.transform_runs())
        figs.curves_figure(data, out_dir)
        if data["overlays"] and overlays:
            first = Run("cam", "cam", seed=plan.seeds[0])
            try:
                figs.overlay_figure(data["overlays"], _config_files("configs/train.yaml", *plan.presets),
                                    run_overrides(first, plan, out_dir, common), out_dir / figs.OVERLAYS)
            except (OSError, KeyError, ValueError, RuntimeError) as err:  # the data of the first seed are not here
                logger.warning("overlays.png not redrawn (%s): run with the plan's --dataset-dir / --seeds", err)
    data["figures"] = figs.figure_names(out_dir)
    atomic_write_json(out_dir / "results.json", data)
    return render_tables(out_dir)


def render_tables(out_dir: Path) -> Path:
    """tables.md from <out>/results.json."""
    data = json.loads((out_dir / "results.json").read_text())
    target = out_dir / "tables.md"
    atomic_write_text(target, tables.render_page(data, title=f"Experiments ({data['date']})"))
    return target


def command_line(argv) -> str:
    """The command as the records keep it: shell-quoted, paths under the working folder relative."""
    here = str(Path.cwd()) + os.sep
    return shlex.join(["python", "-m", "tools.experiments", *(a.replace(here, "") for a in argv)])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="working folder: run folders with weights, results.json, tables")
    parser.add_argument("--records", help="run records, one JSON per finished run (default <out>/records); "
                        "commit them: a run with a record is done")
    parser.add_argument("--quick", action="store_true", help="a few-minute version (small phantom, seed 0)")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default {' '.join(map(str, DEFAULT_SEEDS))}; "
                        f"--quick: {' '.join(map(str, QUICK_SEEDS))}); each sets the training seed, phantom and split")
    parser.add_argument("--dataset-dir", help="fixed data for every seed (default: a phantom per seed under --out)")
    parser.add_argument("--runs", nargs="*", help="only these runs (names as in tables.md, or seed<s>/NAME)")
    parser.add_argument("--device", help="e.g. cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--set", nargs="*", default=[], metavar="ID=VALUE",
                        help="config overrides for every run, e.g. epochs=4 (values parsed as JSON when they can be)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each in its own process (a GPU machine; 1 on a small CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per run with --jobs (0: torch's default)")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a --jobs child ...
    parser.add_argument("--command", help=argparse.SUPPRESS)  # ... records its parent's command
    parser.add_argument("--allow-mixed", action="store_true",
                        help="accept records of other precisions or recipes in one table (the page lists them)")
    parser.add_argument("--write-docs", metavar="PATH", help="also write the results page (e.g. docs/results.md)")
    parser.add_argument("--update-metadata", action="store_true",
                        help="copy the main CMER row into configs/metadata.json's eval_metrics")
    parser.add_argument("--main-only", action="store_true",
                        help="evaluate each run's own maps only: no pair or GradCAM++ read-outs, no overlay (a grid)")
    parser.add_argument("--report-only", action="store_true",
                        help="train and evaluate nothing: rebuild results.json, figures and tables from the records")
    return parser


def _plan_of(args, parser, recorded: dict | None = None) -> Plan:
    """The plan of the command line; for --report-only, what the command line leaves out (plan kind, seeds,
    presets, --set, --dataset-dir) comes from a `recorded` run's record."""
    recorded = recorded or {}
    quick = args.quick or recorded.get("plan") == "quick"
    seeds = args.seeds or recorded.get("plan_seeds") or (QUICK_SEEDS if quick else DEFAULT_SEEDS)
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))
    plan = quick_plan(seeds) if quick else full_plan(seeds)
    dataset_dir = args.dataset_dir
    if dataset_dir is None and recorded.get("dataset_dir"):
        dataset_dir = str(BUNDLE_ROOT / recorded["dataset_dir"])
    plan.dataset_dir = str(Path(dataset_dir).resolve()) if dataset_dir else None
    plan.device = args.device
    plan.extras = not getattr(args, "main_only", False)
    if "presets" in recorded:
        plan.presets = tuple(recorded["presets"])
    plan.overrides = dict(recorded.get("set") or {}) if not args.set else {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key in SEEDED_KEYS:
            parser.error(f"--set {key} is set per seed: use --seeds / --dataset-dir")
        try:
            plan.overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            plan.overrides[key] = value
    return plan


def main(argv=None) -> int:
    """Command line: run the plan (runs without a record), then results.json, figures and tables from the records."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out_dir = Path(args.out).resolve()
    records_dir = Path(args.records).resolve() if args.records else out_dir / "records"
    recorded = None
    if args.report_only:
        found = rec.load_records(records_dir)
        if not found:
            parser.error(f"--report-only: no run records under {records_dir}")
        recorded = found[max(found, key=lambda k: found[k].get("date", ""))]  # the latest call's plan
    plan = _plan_of(args, parser, recorded)
    common = {"bundle_root": str(BUNDLE_ROOT)}
    if args.device:
        common["device"] = f"$torch.device('{args.device}')"
    start, failed = time.time(), []
    try:
        if not args.report_only:
            command = args.command or command_line(args.argv)
            # tables after every recorded run, so an interrupted experiment still shows what it measured
            partial = lambda: write_report(plan, out_dir, common, records_dir, False, args.allow_mixed)  # noqa: E731
            if args.jobs > 1:
                failed = run_parallel(plan, out_dir, common, records_dir, args)
                if failed:
                    print(f"failed runs (logs in {out_dir / 'logs'}): {' '.join(failed)}", flush=True)
            else:
                run_plan(plan, out_dir, common, records_dir, set(args.runs or []),
                         None if args.no_report else partial, command, args.allow_mixed)
            if args.no_report:
                return 0
        page = write_report(plan, out_dir, common, records_dir, allow_mixed=args.allow_mixed,
                            overlays=not args.report_only)
    except rec.MixedRecords as err:
        parser.exit(2, f"error: {err}\n")
    print(f"\n{page.read_text()}\nwrote {page} in {time.time() - start:.0f} s", flush=True)
    if args.write_docs:
        print(f"wrote {tables.write_docs(out_dir / 'results.json', args.write_docs)}", flush=True)
    if args.update_metadata:
        data = json.loads((out_dir / "results.json").read_text())
        metrics = report.update_metadata(data, BUNDLE_ROOT / "configs" / "metadata.json")
        print(f"configs/metadata.json eval_metrics: {metrics}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
