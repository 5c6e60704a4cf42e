"""Run records of `tools.experiments`: one small JSON per finished run, committed, so a plan outlives sessions.

A record (`<records>/seed<s>/<run>.json`) holds what the tables need and no weights: the
per-volume rows of every evaluation of the run (its CAMs, its pair and GradCAM++ read-outs),
the run's settings and split, the shared recipe (`RECIPE_KEYS`), the resolved precision, the
machine, torch / monai versions, the commit, wall times and, for Fig. 5, the binarised maps of
one test slice. It is written atomically once every evaluation of the run is done, so a run cut
off at any point leaves no record, and the runner treats an existing record as done: the next
session, on a fresh machine, continues where the last one stopped.

`check_uniform` refuses a table that mixes precisions or recipes unless told to
(`--allow-mixed`), and then names the variants.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from scripts.common import atomic_write_json
from tools.experiment_report import BUNDLE_ROOT, git_commit, jsonable, machine_info, seed_key

FORMAT = 1
# The shared recipe a table must not mix: train.yaml (+ presets + --set) before the method preset
# and the run's own overrides. Raw config values, so an expression counts as written.
RECIPE_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "backbone", "base_channels", "spatial_size", "spacing",
               "split", "phantom", "cam_pooling", "topk_fraction", "objective", "lr_schedule", "lambda_e",
               "transforms", "height_bins", "max_slices_per_epoch", "balanced_sampling", "normalization",
               "slice_normalization", "brain_threshold", "gate_threshold", "threshold", "fusion", "ema_decay",
               "full_supervision")
NOT_RECIPE = ("seed",)  # phantom#seed: the seed, not the recipe


class MixedRecords(ValueError):
    """Records of one table differ in precision or recipe."""


def record_path(records_dir: Path, seed: int, name: str) -> Path:
    """<records>/seed<s>/<run>.json."""
    return Path(records_dir) / seed_key(seed) / f"{name}.json"


def read_record(path: Path) -> dict | None:
    """The record at `path`, or None when there is none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(path: Path, record: dict) -> Path:
    """Write a finished run's record atomically (a cut-off write leaves the old state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, jsonable({"format": FORMAT, **record}))
    return path


def load_records(records_dir: Path, names=None, seeds=None) -> dict:
    """{(seed, run name): record} of every record under `records_dir` (only `names` / `seeds` when given)."""
    out = {}
    for path in sorted(Path(records_dir).glob("seed*/*.json")):
        record = json.loads(path.read_text())
        if (names is None or record["run"] in names) and (seeds is None or int(record["seed"]) in seeds):
            out[(int(record["seed"]), record["run"])] = record
    return out


# ----------------------------------------------------------------------------- provenance


def recipe_of(config_files, overrides: dict) -> dict:
    """The RECIPE_KEYS of train.yaml + presets + `overrides` (--set), as raw config values."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(overrides)
    recipe = {key: parser.get(key) for key in RECIPE_KEYS}
    if isinstance(recipe.get("phantom"), dict):
        recipe["phantom"] = {k: v for k, v in recipe["phantom"].items() if k not in NOT_RECIPE}
    return jsonable(recipe)


def code_changed(root: Path = BUNDLE_ROOT) -> bool | None:
    """Whether scripts/ or configs/ differ from the commit (None without git)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "scripts", "configs"], cwd=root,
                             capture_output=True, text=True, timeout=10, check=True)
        return bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: str, precision: str, command: str) -> dict:
    """Machine, software, commit and date of a record."""
    return {"machine": machine_info(device, precision), "precision": precision, "commit": git_commit(),
            "code_changed": code_changed(), "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def file_sha256(path: Path) -> str | None:
    """sha256 of a file (None when absent): ties a stage-2 record to the stage-1 weights it learnt from."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


# ----------------------------------------------------------------------------- one table, one recipe


def variant(record: dict) -> str:
    """The precision and recipe of a record as one comparable string."""
    return json.dumps({"precision": record.get("precision"), "recipe": record.get("recipe")}, sort_keys=True)


def differences(a: dict, b: dict) -> list[str]:
    """The keys whose precision or recipe value differ between two records, 'key: a != b'."""
    left = {"precision": a.get("precision"), **(a.get("recipe") or {})}
    right = {"precision": b.get("precision"), **(b.get("recipe") or {})}
    return [f"{k}: {json.dumps(left.get(k))} != {json.dumps(right.get(k))}"
            for k in sorted(set(left) | set(right)) if left.get(k) != right.get(k)]


def check_uniform(records: dict, allow_mixed: bool = False, expected: dict | None = None) -> list[dict]:
    """The distinct (precision, recipe) variants of `records` and their runs; raise MixedRecords on more than
    one (or on one that differs from `expected`, the record-like {precision, recipe} about to be run)
    unless `allow_mixed`."""
    groups: dict[str, list] = {}
    for (seed, name), record in sorted(records.items()):
        groups.setdefault(variant(record), []).append((seed, name, record))
    variants = [{"precision": members[0][2].get("precision"), "recipe": members[0][2].get("recipe"),
                 "runs": [f"{seed_key(s)}/{n}" for s, n, _ in members]} for members in groups.values()]
    if allow_mixed:
        return variants
    if len(groups) > 1:
        first, other = (members[0] for members in list(groups.values())[:2])
        raise MixedRecords(f"the records mix precisions or recipes ({seed_key(first[0])}/{first[1]} against "
                           f"{seed_key(other[0])}/{other[1]}: {'; '.join(differences(first[2], other[2]))}); "
                           "fix: rerun the odd runs (delete their records) or pass --allow-mixed")
    if expected is not None and groups:
        seed, name, record = next(iter(groups.values()))[0]
        diff = differences(record, expected)
        if diff:
            raise MixedRecords(f"this call's settings differ from the records ({seed_key(seed)}/{name}: "
                               f"{'; '.join(diff)}); fix: use the records' settings (--set / --device), another "
                               "--records folder, or --allow-mixed")
    return variants


# ----------------------------------------------------------------------------- Fig. 5 masks


def pack_mask(mask) -> str:
    """A 2D boolean mask as base64 of its packed bits (a few hundred bytes for one slice)."""
    return base64.b64encode(np.packbits(np.asarray(mask, dtype=bool).ravel()).tobytes()).decode("ascii")


def unpack_mask(text: str, shape) -> np.ndarray:
    """The inverse of `pack_mask`."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    return bits[: int(np.prod(shape))].reshape(shape).astype(bool)
