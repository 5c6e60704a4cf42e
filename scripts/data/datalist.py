"""Datalists: the stratified split, writing and checking the JSON, the dataset bootstrap, the CLI.

`write_datalist` splits discovered subjects into a MONAI decathlon-style JSON (paths relative
to it); `ensure_dataset` (an explicit `initialize:` step of the configs) makes sure a dataset
and its datalist exist and agree, generating the phantom only when asked to.

    python -m scripts.data.datalist datalist --data DIR --out JSON [--seed S] [--split A B C]
    python -m scripts.data.datalist summary --datalist JSON [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from scripts.common import MODALITIES, atomic_write_json
from scripts.data.subjects import (ENHANCING_LABEL, PAPER_SPLIT, SECTIONS, DataError, _read_json, discover_subjects,
                                   load_datalist)
from scripts.data.leakage import check_datalist_sections
from scripts.data.volumes import NORMALIZATIONS, VolumeCache

logger = logging.getLogger(__name__)


def split_counts(n_subjects: int, split: Sequence[float] = PAPER_SPLIT) -> tuple[int, int, int]:
    """Subjects per (training, validation, testing).

    Three integers that add up to `n_subjects` are used as they are; any other triple
    (fractions, or counts of another dataset such as the paper's 271/32/32 of 335) is read as
    proportions. Every section with a non-zero share gets at least one subject when n >= 3.
    """
    values = [float(v) for v in split]
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"split {list(split)} must be three non-negative numbers (fractions or counts) "
                        f"for training, validation, testing, e.g. 0.8 0.1 0.1.")
    if all(v.is_integer() for v in values) and sum(values) == n_subjects:
        return tuple(int(v) for v in values)
    if all(v.is_integer() for v in values) and sum(values) > 3:
        logger.info("split counts %s do not add up to %d subjects: used as proportions", list(split), n_subjects)
    shares = np.asarray(values) / sum(values)
    exact = shares * n_subjects
    counts = np.floor(exact).astype(int)
    # Largest remainder: hand the leftover subjects to the largest fractional parts.
    for index in np.argsort(-(exact - counts), kind="stable")[: n_subjects - counts.sum()]:
        counts[index] += 1
    if n_subjects >= 3:
        for index in np.flatnonzero((counts == 0) & (shares > 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[index] += 1
    return tuple(int(c) for c in counts)


def stratified_split(records: list[dict], counts: Sequence[int], seed: int = 0) -> dict[str, list[dict]]:
    """Split records into SECTIONS with the given counts, keeping the grade mix in every section.

    Each grade is shuffled and its members spread evenly over [0, 1); cutting the merged
    order at the section counts then gives every section its share of every grade.
    """
    rng = np.random.default_rng(seed)
    strata: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["subject"]):
        strata.setdefault(str(record.get("grade")), []).append(record)
    keyed = []
    for grade in sorted(strata):
        members = [strata[grade][i] for i in rng.permutation(len(strata[grade]))]
        tie_breaks = rng.random(len(members))
        keyed += [((i + 0.5) / len(members), tie, r["subject"], r) for i, (r, tie) in enumerate(zip(members, tie_breaks))]
    ordered = [item[3] for item in sorted(keyed, key=lambda item: item[:3])]
    bounds = np.cumsum([0, *counts])
    return {name: sorted(ordered[bounds[i]:bounds[i + 1]], key=lambda r: r["subject"])
            for i, name in enumerate(SECTIONS)}


def _relative(path: str | None, json_dir: Path) -> str | None:
    return None if path is None else Path(os.path.relpath(path, json_dir)).as_posix()


def _entry_from_record(record: dict, json_dir: Path) -> dict:
    """Datalist entry: subject, grade, per-modality keys (or image + channels), seg; relative paths."""
    entry = {"subject": record["subject"], "grade": record.get("grade")}
    if "image4d" in record:
        entry["image"] = _relative(record["image4d"], json_dir)
        entry["channels"] = list(record["channels"])
    else:
        entry.update({m: _relative(p, json_dir) for m, p in record["images"].items()})
    entry["seg"] = _relative(record.get("seg"), json_dir)
    return entry


def _dataset_layout(records: list[dict]) -> tuple[str, int | None]:
    """(layout, enhancing tumour label) shared by all records; 'mixed' / None otherwise."""
    layouts = {r.get("layout", "datalist") for r in records}
    layout = layouts.pop() if len(layouts) == 1 else "mixed"
    return layout, ENHANCING_LABEL.get(layout)


def write_datalist(root, out_json: str | os.PathLike, split: Sequence[float] = PAPER_SPLIT, seed: int = 0,
                   allow_missing: bool = False) -> dict:
    """Discover subjects under `root` (or take a list of records) and write a split datalist JSON.

    Returns the written object. Paths are relative to the JSON's folder, so both
    `load_datalist` and `monai.data.load_decathlon_datalist` read it.
    """
    records = list(root) if isinstance(root, (list, tuple)) else discover_subjects(root, allow_missing)
    if not records:
        raise DataError(f"no subject records given for datalist {out_json}. Fix: pass a data folder or records.")
    out_json = Path(out_json).expanduser().absolute()
    counts = split_counts(len(records), split)
    sections = stratified_split(records, counts, seed)
    layout, enhancing = _dataset_layout(records)
    present = [m for m in MODALITIES if any(m in r.get("images", {}) or m in r.get("channels", []) for r in records)]
    datalist = {
        "name": "brain tumour MRI, weakly supervised slice labels",
        "layout": layout,
        "modalities": present,
        "enhancing_label": enhancing,
        "seed": seed,
        "split": dict(zip(SECTIONS, counts)),
        "split_requested": [float(v) for v in split],  # counts, seed and subjects are checked on reuse
        "grades": {s: _grade_counts(sections[s]) for s in SECTIONS},
        **{s: [_entry_from_record(r, out_json.parent) for r in sections[s]] for s in SECTIONS},
    }
    atomic_write_json(out_json, datalist)
    return datalist


def _grade_counts(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        key = str(record.get("grade"))
        counts[key] = counts.get(key, 0) + 1
    return counts


# Used for keys the caller's `phantom` dict leaves out (a small CPU-friendly default set).
_PHANTOM_DEFAULTS = {"subjects": 20, "seed": 0, "spacing": 1.0, "hgg_fraction": 0.5, "misregistration_mm": 0.0,
                     "misregistration_deg": 0.0}
# Passed on only when the caller sets them; otherwise the generator's own defaults (render.py) hold.
_PHANTOM_OPTIONAL = ("tumour_texture_mm", "tumour_texture_weights", "cisterns_and_sinuses")


def same_path(a, b) -> bool:
    """True when two paths name the same location (used by the configs: `make_phantom`)."""
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def datalist_file(dataset_dir: str | os.PathLike, datalist: str | os.PathLike | None = None) -> str:
    """The datalist a run uses: `datalist`, a datalist .json given as `dataset_dir`, or
    `<dataset_dir>/datalist.json`. No side effects (ensure_dataset writes it)."""
    if datalist:
        return str(Path(datalist).expanduser().absolute())
    dataset_dir = Path(dataset_dir).expanduser().absolute()
    if dataset_dir.suffix.lower() == ".json" and dataset_dir.is_file():
        return str(dataset_dir)
    return str(dataset_dir / "datalist.json")


def ensure_dataset(dataset_dir: str | os.PathLike, datalist: str | os.PathLike | None = None,
                   phantom: dict | None = None, split: Sequence[float] = PAPER_SPLIT, seed: int = 0,
                   make_phantom: bool = True, allow_missing: bool = False) -> str:
    """Make sure a dataset and its datalist exist and agree; return the datalist path.

    Args:
        dataset_dir: a data folder in any supported layout, or a datalist .json file.
        datalist: where the datalist is (default `<dataset_dir>/datalist.json`); written when missing.
        phantom: settings of scripts.data.phantom.generate_dataset for `make_phantom`.
        split: training/validation/testing fractions or counts.
        seed: the seed of the split.
        make_phantom: generate the phantom into an absent or empty `dataset_dir`; when False such
            a folder is an error (a mistyped path must not train on synthetic data).
        allow_missing: keep subjects without some modality files (the `allow_missing` setting;
            the volume cache zero-fills them); False makes such a subject an error.

    An existing datalist written by this bundle is checked against the data and the split: new
    or removed subjects, another split or seed are an error naming the difference (never a
    silent reuse); a datalist written elsewhere is used as it is. Either must list each subject
    and file once (`scripts.data.leakage.check_datalist_sections`).
    """
    from scripts.runtime import as_flag  # lazy: runtime's error types import this module

    allow_missing = as_flag(allow_missing, "allow_missing")
    given = Path(dataset_dir).expanduser().absolute()
    datalist_path = Path(datalist_file(given, datalist))
    if given.is_file():
        if given.suffix.lower() == ".json":
            check_datalist_sections(datalist_path)  # a datalist given as the data: used as it is, once checked
            return str(datalist_path)
        raise DataError(f"--dataset_dir {given} is a file, not a folder. Fix: pass the folder holding the subject "
                        f"folders, or a datalist .json file.")
    if not given.exists() or not any(p for p in given.iterdir() if not p.name.startswith(".")):
        if not as_flag(make_phantom, "make_phantom"):
            state = "does not exist" if not given.exists() else "is empty"
            raise DataError(f"--dataset_dir {given} {state}. Fix: check the path (the folder holding the subject "
                            f"folders), or pass --make_phantom true to generate the synthetic phantom there.")
        _generate_phantom(given, {**_PHANTOM_DEFAULTS, **(phantom or {})})
    if not datalist_path.is_file():
        try:
            write_datalist(given, datalist_path, split=split, seed=seed, allow_missing=allow_missing)
        except OSError as err:  # a read-only dataset folder (the datalist goes beside the data by default)
            raise DataError(f"cannot write the datalist {datalist_path} ({err.strerror or err}): its folder is not "
                            f"writable (a read-only dataset?). Fix: pass --datalist_path to a writable place, e.g. "
                            f"--datalist_path {Path.home() / 'datalists' / (given.name + '.json')}.") from err
    else:
        check_datalist_current(datalist_path, given, split, seed, allow_missing)
    check_datalist_sections(datalist_path)  # a hand-written one too: the checks folder discovery makes
    return str(datalist_path)


def check_datalist_current(datalist_path: Path, dataset_dir: Path, split: Sequence[float], seed: int,
                           allow_missing: bool = False) -> None:
    """Raise DataError when a datalist this bundle wrote no longer matches the data or the split."""
    stored = _read_json(datalist_path, "datalist")
    if "seed" not in stored or not isinstance(stored.get("split"), dict):
        return  # not written by write_datalist: the user's own split
    listed = {str(e.get("subject")) for s in SECTIONS for e in stored.get(s, []) if isinstance(e, dict)}
    found = {r["subject"] for r in discover_subjects(dataset_dir, allow_missing)}
    problems = []
    if found != listed:
        new, gone = sorted(found - listed), sorted(listed - found)
        problems.append(f"the data changed ({len(new)} new subject(s) {new[:3]}, {len(gone)} removed {gone[:3]})")
    counts = dict(zip(SECTIONS, split_counts(len(found), split)))  # same counts + seed + subjects = same split
    if counts != stored["split"]:
        problems.append(f"--split {list(split)} gives {counts}, the datalist has {stored['split']}")
    if int(stored["seed"]) != int(seed):
        problems.append(f"--seed {seed} differs from the datalist's seed {stored['seed']}")
    if problems:
        raise DataError(f"datalist {datalist_path} no longer matches this run: {'; '.join(problems)}. Fix: delete it "
                        f"to write a new split (a model trained on the old split must then be retrained before "
                        f"evaluating), or pass --datalist_path NEW.json.")


def _generate_phantom(dataset_dir: Path, options: dict) -> None:
    """Generate the phantom in a sibling temp folder and move it in, so a failure leaves no half dataset."""
    from scripts.data.phantom import generate_dataset  # lazy: the phantom is only needed when no data is given

    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, whose 0700 mode the dataset would keep) under a name unique to this call.
    staging = dataset_dir.parent / f".{dataset_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        logger.info("no data in %s: generating the phantom dataset %s", dataset_dir, options)
        generate_dataset(staging, options["subjects"], options["seed"], options["spacing"], options["hgg_fraction"],
                         misregistration_mm=options["misregistration_mm"],
                         misregistration_deg=options["misregistration_deg"],
                         **{key: options[key] for key in _PHANTOM_OPTIONAL if key in options})
        if not dataset_dir.exists():
            os.replace(staging, dataset_dir)
            return
        for child in sorted(staging.iterdir()):  # an existing empty folder (maybe a mount point): move contents
            os.replace(child, dataset_dir / child.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- summary + CLI


def summarize_datalist(json_path: str | os.PathLike, cache: VolumeCache, brain_threshold: float = 0.0) -> dict:
    """{section: {subjects, grades, slices, positive_slices, positive_fraction}} over brain slices."""
    summary = {}
    for section in SECTIONS:
        try:
            records = load_datalist(json_path, section)
        except DataError:
            continue
        slices = positives = 0
        for record in records:
            meta = cache.info(record)
            kept = [t for f, t in zip(meta["brain_fraction"], meta["tumour_pixels"]) if f > brain_threshold]
            slices += len(kept)
            positives += sum(1 for t in kept if t > 0)
        summary[section] = {"subjects": len(records), "grades": _grade_counts(records), "slices": slices,
                            "positive_slices": positives, "positive_fraction": positives / slices if slices else 0.0}
    return summary


def _format_summary(summary: dict) -> str:
    lines = [f"{'section':<12}{'subjects':>9}{'slices':>9}{'positive':>10}{'fraction':>10}  grades"]
    for section, row in summary.items():
        lines.append(f"{section:<12}{row['subjects']:>9}{row['slices']:>9}{row['positive_slices']:>10}"
                     f"{row['positive_fraction']:>10.3f}  {row['grades']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.data.datalist", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    datalist = commands.add_parser("datalist", help="discover subjects and write a split datalist JSON")
    datalist.add_argument("--data", required=True, help="dataset folder, one subject's folder, or a datalist JSON")
    datalist.add_argument("--out", required=True, help="datalist JSON to write")
    datalist.add_argument("--seed", type=int, default=0)
    datalist.add_argument("--split", type=float, nargs=3, default=list(PAPER_SPLIT), metavar=("TRAIN", "VAL", "TEST"),
                          help="fractions or counts (default: the paper's 271 32 32, as proportions)")
    datalist.add_argument("--allow-missing", action="store_true", help="accept subjects with missing modalities")
    summary = commands.add_parser("summary", help="subjects, slices and positive-slice fraction per split")
    summary.add_argument("--datalist", required=True)
    summary.add_argument("--cache-dir", default=None, help="volume cache to use/fill (default: a temporary one)")
    summary.add_argument("--spatial-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    summary.add_argument("--normalization", choices=NORMALIZATIONS, default="volume")
    summary.add_argument("--brain-threshold", type=float, default=0.0)
    summary.add_argument("--allow-missing", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "datalist":
            written = write_datalist(args.data, args.out, split=args.split, seed=args.seed, allow_missing=args.allow_missing)
            print(f"wrote {args.out}: " + ", ".join(f"{s} {len(written[s])}" for s in SECTIONS))
        else:
            with tempfile.TemporaryDirectory() as scratch:
                cache = VolumeCache(args.cache_dir or scratch, args.spatial_size, args.normalization, args.allow_missing)
                print(_format_summary(summarize_datalist(args.datalist, cache, args.brain_threshold)))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
