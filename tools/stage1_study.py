"""The stage-1 recipe study: named candidate recipes x seeds, each one README training run.

    python -m tools.stage1_study --candidates default psum --seeds 1337 7 42
    python -m tools.stage1_study --candidates default --seeds 1337 7 42 --precision fp32 bf16
    python -m tools.stage1_study --report                       # the table of every record

Each run is the README's main command (`monai.bundle run training --config_file
configs/train.yaml`) with the candidate's overrides, a training seed (which also draws the
datalist split: each seed has its own) and a precision, on one shared dataset (default: the
bundle's phantom) and cache. A finished run leaves a small JSON record under --out
(`<candidate>/<precision>/seed<s>.json`: the settings, the machine, versions and commit, wall
time, every epoch's validation metrics, the gradient shares of the loss terms); weights stay
under --work (not committed). A run whose record exists is skipped, so the study continues in
a later session from the committed records; a run that fails or is cut off leaves none.

`--report` prints (and `--write` saves) one row per candidate and precision: per-modality and
fused validation DSC at the best fused epoch (mean +- std over seeds), slice accuracy, the
spread of the fused DSC over the last three epochs, the gradient shares at lambda_E = 1, and
the wall time. Comparing precisions side by side is the precision-parity check of the recipe.

`--jobs N` runs N trainings at once (each with `--threads` CPU threads): for a machine with
an accelerator and many cores, where one small training leaves the GPU mostly idle. On a CUDA
machine the runs train on the GPU; records name the device, and fp32 there is plain fp32
(TF32 off). Keep such records under their own --out: the table does not mix devices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts.common import MODALITIES, atomic_write_json, atomic_write_text

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
MAPS = (*MODALITIES, "fused")

# The lesion step of domain randomisation alone (probability 0.5), every other randomisation off (issue 31).
_LESION_ONLY = ["--domain_randomisation#enabled", "true"] + [
    item for name in ("anatomy", "contrast", "bias", "lowres", "blur", "noise")
    for item in (f"--domain_randomisation#{name}_prob", "0.0")] + ["--domain_randomisation#lesion_prob", "0.5"]

# name -> (what it changes, overrides of configs/train.yaml as command-line pairs). The
# overrides are applied to the current configs/train.yaml: records keep them and the commit.
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "default": ("configs/train.yaml as committed", []),
    "mean_reduction": ("the equivariance terms reduced over N*H*W (the authors' code; numerically ~0)",
                       ["--objective#reduction", "mean", "--lambda_e#value", "1.0"]),
    "psum_l1": ("squared L2 norm per sample (Eqs. 2 and 4), lambda_E plateau 1",
                ["--objective#reduction", "per_sample_sum", "--lambda_e#value", "1.0"]),
    "psum_l01": ("squared L2 norm per sample, lambda_E plateau 0.1",
                 ["--objective#reduction", "per_sample_sum", "--lambda_e#value", "0.1"]),
    "psum_l01_no_er": ("as psum_l01 without L_ER (L_C + L_KD + L_CMER)",
                       ["--objective#reduction", "per_sample_sum", "--lambda_e#value", "0.1",
                        "--objective#use_er", "false"]),
    "balanced": ("each equivariance term at its maps' scale (reduction balanced), lambda_E plateau 1",
                 ["--objective#reduction", "balanced"]),
    "balanced_cosine": ("reduction balanced + one warm-up epoch and cosine decay of lr 1e-3",
                        ["--objective#reduction", "balanced", "--lr_schedule#warmup_epochs", "1",
                         "--lr_schedule#decay", "cosine"]),
    "gap": ("the paper's global average pooling of the maps (the default until top-k pooling)",
            ["--cam_pooling", "gap"]),
    "cam": ("L_C only with global average pooling (the paper's CAM baseline)",
            ["--objective#use_er", "false", "--objective#use_kd", "false", "--objective#use_cmer", "false",
             "--cam_pooling", "gap"]),
    "cam_lr1e-4": ("L_C only, constant lr 1e-4", ["--objective#use_er", "false", "--objective#use_kd", "false",
                                                  "--objective#use_cmer", "false", "--lr", "1e-4"]),
    "cam_lr1e-4_long": ("L_C only, constant lr 1e-4, every training slice each epoch (a cap of 3840 is above the "
                        "~3000 slices: 191 steps per epoch at K = 1, 1910 in all, 3.2x the default): a learning curve",
                             ["--objective#use_er", "false", "--objective#use_kd", "false",
                              "--objective#use_cmer", "false", "--lr", "1e-4", "--max_slices_per_epoch", "3840"]),
    "lr1e-4": ("constant lr 1e-4 (terms as committed)", ["--lr", "1e-4"]),
    "lr2e-4_cosine": ("lr 2e-4, one warm-up epoch, cosine decay (terms as committed)",
                      ["--lr", "2e-4", "--lr_schedule#warmup_epochs", "1", "--lr_schedule#decay", "cosine"]),
    "balanced_lr2e-4_cosine": ("reduction balanced + lr 2e-4, one warm-up epoch, cosine decay",
                               ["--objective#reduction", "balanced", "--lr", "2e-4",
                                "--lr_schedule#warmup_epochs", "1", "--lr_schedule#decay", "cosine"]),
    "lr3e-4_cosine": ("lr 3e-4, one warm-up epoch, cosine decay",
                      ["--lr", "3e-4", "--lr_schedule#warmup_epochs", "1", "--lr_schedule#decay", "cosine"]),
    "trust_balanced_lr1e-4": ("only more accurate partners teach (partner_trust more_accurate), reduction balanced, "
                              "constant lr 1e-4",
                              ["--objective#partner_trust", "more_accurate", "--objective#reduction", "balanced",
                               "--lr", "1e-4"]),
    "topk01_ema": ("top-k pooling of the maps (1 % of the pixels) and validation / model.pt on an EMA of the weights "
                   "(decay 0.99); terms as committed",
                   ["--cam_pooling", "topk", "--topk_fraction", "0.01", "--ema_decay", "0.99"]),
    "cam_topk01": ("L_C only, top-k pooling (1 % of the pixels)",
                   ["--objective#use_er", "false", "--objective#use_kd", "false", "--objective#use_cmer", "false",
                    "--cam_pooling", "topk", "--topk_fraction", "0.01"]),
    "cam_topk05": ("L_C only, top-k pooling (5 % of the pixels)",
                   ["--objective#use_er", "false", "--objective#use_kd", "false", "--objective#use_cmer", "false",
                    "--cam_pooling", "topk", "--topk_fraction", "0.05"]),
    "topk01": ("top-k pooling of the maps (1 % of the pixels); terms as committed",
               ["--cam_pooling", "topk", "--topk_fraction", "0.01"]),
    "topk01_balanced": ("top-k pooling (1 %) + each equivariance term at its maps' scale (reduction balanced)",
                        ["--cam_pooling", "topk", "--topk_fraction", "0.01", "--objective#reduction", "balanced"]),
    "topk01_balanced_trust": ("top-k pooling (1 %) + reduction balanced + only more accurate partners teach",
                              ["--cam_pooling", "topk", "--topk_fraction", "0.01", "--objective#reduction", "balanced",
                               "--objective#partner_trust", "more_accurate"]),
    "topk01_balanced_trust_mean": ("topk01_balanced_trust + mean fusion of the four maps (validation, model selection)",
                                   ["--cam_pooling", "topk", "--topk_fraction", "0.01", "--objective#reduction",
                                    "balanced", "--objective#partner_trust", "more_accurate", "--fusion", "mean"]),
    "topk01_balanced_trust_mean_cosine": ("topk01_balanced_trust_mean + 1 warm-up epoch and cosine decay of lr to 0",
                                          ["--cam_pooling", "topk", "--topk_fraction", "0.01", "--objective#reduction",
                                           "balanced", "--objective#partner_trust", "more_accurate", "--fusion", "mean",
                                           "--lr_schedule#warmup_epochs", "1", "--lr_schedule#decay", "cosine"]),
    "domain_random": ("the default + domain randomisation of the training slices (anatomy, contrast curve and gamma, "
                      "bias, resolution and blur, noise; scripts/data/randomisation.py)",
                      ["--domain_randomisation#enabled", "true"]),
    "base8": ("the default with UNetCAM at base 8 channels instead of 16 (a cheaper step: issue 32)",
              ["--base_channels", "8"]),
    "cam_preset": ("configs/methods/cam.yaml: L_C only, one view (no transforms), the default's pooling",
                   ["--objective#use_er", "false", "--objective#use_kd", "false", "--objective#use_cmer", "false",
                    "--transforms#kinds", "[]", "--method_preset", "cam"]),
    "canvas72": ("a 72 x 72 in-plane canvas instead of 80 x 80 (19 % fewer FLOPs per slice; the phantom's brains "
                 "span at most 69 pixels at 3 mm): issue 32; the default since 2026-12-08 (a no-op on it)",
                 ["--spatial_size", "[72, 72]"]),
    "canvas72_half": ("canvas72 + 480 slices per epoch (30 steps, half the default's) + validation every second "
                      "epoch: the cheaper recipe sized for 10 min of training on a 2-core AVX2 CPU (issue 32)",
                      ["--spatial_size", "[72, 72]", "--max_slices_per_epoch", "480", "--val_interval", "2"]),
    "lesion_random": ("the default + the lesion step of domain randomisation alone: per tumour slice and modality "
                      "(probability 0.5) the tumour's contrast (log-gain sd 0.4) and fine texture (x 0-1) redrawn "
                      "apart from the tissues'; every other randomisation off (issue 31)",
                      _LESION_ONLY),
    "lesion_texture": ("as lesion_random with the tumour's contrast kept (lesion_contrast_log_std 0): only its fine "
                       "texture redrawn (x 0-1), per tumour slice and modality with probability 0.5 (issue 31)",
                       _LESION_ONLY + ["--domain_randomisation#lesion_contrast_log_std", "0.0"]),
    "topk01_mean": ("top-k pooling (1 %) + mean fusion (validation, model selection)",
                    ["--cam_pooling", "topk", "--topk_fraction", "0.01", "--fusion", "mean"]),
}
_SHARE = re.compile(r"(\w+)/grad_share_(L_\w+): ([-+0-9.eE]+)")
_EPOCH = re.compile(r"Epoch: (\d+)/\d+, Iter")
_LAMBDA = re.compile(r"lambda_e: ([-+0-9.eE]+)")


def machine() -> dict:
    """CPU model, core count, and the versions a result depends on."""
    import monai
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BUNDLE_ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BUNDLE_ROOT,
                                    capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        commit, dirty = "", False
    # the training device is train.yaml's: the first CUDA GPU when there is one
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    from scripts.precision import cpu_kind

    return {"cpu": cpu, "cpu_kind": cpu_kind(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "monai": monai.__version__,
            "commit": commit + ("+uncommitted" if dirty else ""), "python": platform.python_version()}


def resolved_precision(precision: str) -> str:
    """What `precision` means on the training device (CPU: auto -> bf16 or fp32; CUDA: fp16)."""
    import torch

    from scripts.precision import resolve_precision

    return resolve_precision(precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def grad_shares(log: str) -> list[dict]:
    """Every gradient-share line of a training log: [{epoch, lambda_e, "<net>/<term>": share}]."""
    rows = []
    for line in log.splitlines():
        found = _SHARE.findall(line)
        if not found:
            continue
        epoch = _EPOCH.search(line)
        lam = _LAMBDA.search(line)
        row = {"epoch": int(epoch.group(1)) if epoch else None, "lambda_e": float(lam.group(1)) if lam else None}
        row.update({f"{net}/{term}": float(value) for net, term, value in found})
        rows.append(row)
    return rows


def summarise(history: list[dict]) -> dict:
    """Best fused epoch (the one model.pt keeps), last epoch and the last three epochs' spread."""
    if not history:
        return {}
    key = "val_dsc_fused" if "val_dsc_fused" in history[0] else next(k for k in history[0] if k.startswith("val_dsc_"))
    best = max(history, key=lambda r: r.get(key, -1.0))
    last3 = [r.get(key, 0.0) for r in history[-3:]]
    return {"best": best, "last": history[-1], "last3_spread": max(last3) - min(last3)}


def recorded_path(path) -> str:
    """A dataset folder as a record may hold it: relative to the bundle when inside it, else its
    last two components (no machine paths in committed records)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(BUNDLE_ROOT))
    except ValueError:
        return str(Path(*resolved.parts[-2:]))


def run_one(name: str, overrides: list[str], seed: int, precision: str, args) -> dict | None:
    """Train one candidate for one seed and precision; return its record (None if it failed)."""
    work = Path(args.work) / name / precision / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    splits = Path(args.work) / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml",
               *overrides, "--seed", str(seed), "--precision", precision,
               "--dataset_dir", str(Path(args.dataset_dir).resolve()), "--cache_dir", str(Path(args.cache_dir).resolve()),
               "--datalist_path", str((splits / f"seed{seed}.json").resolve()),
               "--ckpt_dir", str((work / "models").resolve()), "--output_dir", str((work / "train").resolve()),
               *args.extra]
    if args.modalities:
        command += ["--modalities", repr(list(args.modalities))]
    print(f"[{name} / {precision} / seed {seed}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    log_path = work / "train.log"
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0"}  # fp32 on a GPU means fp32, not TF32 convolutions
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with open(log_path, "w") as log:
        rc = subprocess.run(command, cwd=BUNDLE_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False,
                            env=env).returncode
    wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    history_file = work / "train" / "validation_history.json"
    if rc != 0 or not history_file.is_file():
        print(f"  failed (exit {rc}); last lines of {log_path}:\n" + "\n".join(text.splitlines()[-5:]), flush=True)
        return None
    history = json.loads(history_file.read_text())["epochs"]
    record = {"candidate": name, "description": CANDIDATES.get(name, ("", []))[0], "overrides": overrides,
              "extra": list(args.extra), "modalities": list(args.modalities or MODALITIES), "seed": seed,
              "precision": precision, "precision_resolved": resolved_precision(precision),
              "dataset_dir": recorded_path(args.dataset_dir),
              "machine": machine(), "wall_s": round(wall, 1), "epochs": history,
              "grad_shares": grad_shares(text), **summarise(history)}
    selection = work / "models" / "model_per_modality.selection.json"  # each network at its own best epoch
    if selection.is_file():
        record["per_modality_selection"] = json.loads(selection.read_text())["networks"]
    summary = record["best"]
    print(f"  {wall / 60:.1f} min; best epoch {summary['epoch']}: "
          + ", ".join(f"{m} {100 * summary.get(f'val_dsc_{m}', float('nan')):.1f}" for m in MAPS), flush=True)
    return record


def record_path(out: Path, name: str, precision: str, seed: int) -> Path:
    return out / name / precision / f"seed{seed}.json"


def load_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/*/seed*.json"))]


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _final_shares(record: dict) -> dict:
    """Mean share per term over networks, from the measurements at the largest lambda_E."""
    rows = [r for r in record.get("grad_shares", []) if r.get("lambda_e") is not None]
    if not rows:
        return {}
    top = max(r["lambda_e"] for r in rows)
    rows = [r for r in rows if r["lambda_e"] == top]
    out: dict = {}
    for term in ("L_KD", "L_ER", "L_CMER"):
        values = [v for r in rows for k, v in r.items() if k.endswith(f"/{term}")]
        if values:
            out[term] = statistics.mean(values)
    return out


def report(records: list[dict]) -> str:
    """Markdown: one row per (candidate, precision), mean +- std over seeds."""
    groups: dict = {}
    for record in records:
        record = {**record, **summarise(record["epochs"])}  # records of any version, one definition
        groups.setdefault((record["candidate"], record["precision_resolved"]), []).append(record)
    lines = ["| candidate | precision | seeds | best epoch | " + " | ".join(f"DSC {m}" for m in MAPS)
             + " | slice acc " + "/".join(MODALITIES) + " | fused, last 3 epochs: spread | grad share KD / ER / CMER "
             "(at max lambda_E) | wall min |",
             "|---|---|---|---|" + "---|" * len(MAPS) + "---|---|---|---|"]
    for (name, precision), rows in sorted(groups.items()):
        seeds = ",".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
        cells = [_mean_std([100 * r["best"].get(f"val_dsc_{m}", float("nan")) for r in rows]) for m in MAPS]
        acc = "/".join(f"{100 * statistics.mean(r['best'].get(f'val_acc_{m}', float('nan')) for r in rows):.0f}"
                       for m in MODALITIES if f"val_acc_{m}" in rows[0]["best"])
        epochs = ",".join(str(r["best"]["epoch"]) for r in rows)
        spread = _mean_std([100 * r["last3_spread"] for r in rows])
        shares = [_final_shares(r) for r in rows]
        share_text = " / ".join(
            f"{statistics.mean(s[t] for s in shares if t in s):.2f}" if any(t in s for s in shares) else "-"
            for t in ("L_KD", "L_ER", "L_CMER"))
        wall = statistics.mean(r["wall_s"] for r in rows) / 60
        lines.append(f"| {name} | {precision} | {seeds} | {epochs} | " + " | ".join(cells)
                     + f" | {acc} | {spread} | {share_text} | {wall:.1f} |")
    return "\n".join(lines) + "\n\n" + own_best_report(groups)


def own_best(record: dict, name: str) -> tuple[int, float] | None:
    """(epoch, validation DSC) of `name`'s map at its own best epoch (ties: the earlier), the epoch
    models/model_per_modality.pt keeps that network at; None when the map was not validated."""
    rows = [e for e in record["epochs"] if f"val_dsc_{name}" in e]
    if not rows:
        return None
    best = max(rows, key=lambda e: (e[f"val_dsc_{name}"], -e["epoch"]))
    return int(best["epoch"]), float(best[f"val_dsc_{name}"])


def own_best_report(groups: dict) -> str:
    """Markdown: per (candidate, precision), each network's validation DSC at the fused-best epoch (model.pt)
    and at its own best epoch (model_per_modality.pt), mean over seeds, with those epochs. Both are chosen on
    the validation split they are read on (optimistic alike); the fused map of the per-modality model needs an
    evaluation of that file (tools/experiments does it)."""
    lines = ["Each network at its own best validation epoch (models/model_per_modality.pt) against the best fused "
             "epoch (models/model.pt): validation DSC, mean over seeds (own epochs per seed)", "",
             "| candidate | precision | " + " | ".join(f"{m}: fused-best -> own best (epochs)" for m in MODALITIES) + " |",
             "|---|---|" + "---|" * len(MODALITIES)]
    for (name, precision), rows in sorted(groups.items()):
        cells = []
        for m in MODALITIES:
            picks = [own_best(r, m) for r in rows]
            if any(p is None for p in picks):
                cells.append("-")
                continue
            kept = statistics.mean(100 * r["best"][f"val_dsc_{m}"] for r in rows)
            own = statistics.mean(100 * p[1] for p in picks)
            cells.append(f"{kept:.1f} -> {own:.1f} ({','.join(str(p[0]) for p in picks)})")
        lines.append(f"| {name} | {precision} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.stage1_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="*", default=["default"], help=f"names: {', '.join(CANDIDATES)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1337, 7, 42])
    parser.add_argument("--precision", nargs="*", default=["auto"], help="auto | fp32 | bf16 (several: side by side)")
    parser.add_argument("--modalities", nargs="*", help="train only these networks (default: all four)")
    parser.add_argument("--out", default=str(BUNDLE_ROOT / "results" / "stage1"), help="records (small JSON)")
    parser.add_argument("--work", default=str(BUNDLE_ROOT / "runs" / "stage1_study"), help="weights and logs")
    parser.add_argument("--dataset_dir", default=str(BUNDLE_ROOT / "data" / "phantom"))
    parser.add_argument("--cache_dir", default=str(BUNDLE_ROOT / "data" / "cache"))
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (a GPU machine; 1 on a small CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per training (0: torch's default)")
    parser.add_argument("--report", action="store_true", help="only print the table of the records")
    parser.add_argument("--write", help="also write the table here (markdown)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more overrides for every run")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    out = Path(args.out)
    if not args.report:
        unknown = [c for c in args.candidates if c not in CANDIDATES]
        if unknown:
            parser.error(f"unknown candidate(s) {unknown}; known: {list(CANDIDATES)}")
        suffix = "_" + "-".join(args.modalities) if args.modalities else ""
        planned = []
        for name in args.candidates:
            for precision in args.precision:
                for seed in args.seeds:
                    # filed under what the precision means here: an auto run on a bf16 CPU is a bf16 record
                    target = record_path(out, name + suffix, resolved_precision(precision), seed)
                    if target.is_file():
                        print(f"[{name} / {precision} / seed {seed}] recorded: {target}", flush=True)
                        continue
                    planned.append((name, precision, seed, target))
        if planned:
            (Path(args.work) / "splits").mkdir(parents=True, exist_ok=True)

        def run_and_record(plan) -> None:
            name, precision, seed, target = plan
            record = run_one(name, CANDIDATES[name][1], seed, precision, args)
            if record is not None:
                record["candidate"] = name + suffix
                atomic_write_json(target, record)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(run_and_record, planned))
    table = report(load_records(out))
    print(table)
    if args.write:
        atomic_write_text(args.write, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
