"""Data layer: find subjects, write datalists, preprocess volumes once, serve 2D slices.

Pipeline: `discover_subjects` turns a folder (BraTS 2018-2021, BraTS 2023+, MSD Task01) or
a datalist JSON into subject records; `write_datalist` splits them into a MONAI
decathlon-style JSON; `VolumeCache` runs the MONAI preprocessing once per subject and keeps
the result on disk as memory-mapped `.npy` files; `SliceDataset` / `VolumeDataset` serve
axial slices / whole volumes from that cache.

Every problem with the input data raises `DataError` naming the subject, the file, what is
wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from scripts.common import MODALITIES, atomic_path, atomic_write_json, canonical_modalities, canonical_modality

logger = logging.getLogger(__name__)

SECTIONS: tuple[str, ...] = ("training", "validation", "testing")
# Other spellings of the section names found in decathlon-style files (MSD uses "test").
SECTION_ALIASES: dict[str, tuple[str, ...]] = {
    "training": ("training", "train"),
    "validation": ("validation", "val", "valid"),
    "testing": ("testing", "test"),
}
# The paper's split of BraTS 2019 (335 subjects); read as proportions for other sizes.
PAPER_SPLIT: tuple[int, int, int] = (271, 32, 32)
# Channel order of MSD Task01 4D images (FLAIR, T1w, t1gd, T2w) in canonical names.
MSD_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1c", "t2")
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
IMAGE_SUFFIXES: tuple[str, ...] = NIFTI_SUFFIXES + (".nrrd", ".nhdr", ".mha", ".mhd")
SEG_TOKENS: frozenset[str] = frozenset({"seg", "label", "labels"})
# Raw modality spellings that only BraTS 2023+ uses (its enhancing tumour label is 3).
BRATS2023_TOKENS: frozenset[str] = frozenset({"t1n", "t2w", "t2f"})
ENHANCING_LABEL: dict[str, int] = {"brats2018-2021": 4, "brats2023": 3, "msd": 3}
LAYOUTS_LOOKED_FOR = (
    "BraTS 2018-2021: <id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz, optionally under HGG/ and LGG/",
    "BraTS 2023+: <id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz",
    "MSD Task01_BrainTumour: imagesTr/*.nii.gz (4D) + labelsTr/ + dataset.json",
    "a MONAI decathlon-style datalist .json file",
    f"(image formats: {', '.join(IMAGE_SUFFIXES)})",
)
# Subject folders sit at most this deep below the root (root/HGG/<id> is depth 2).
MAX_SEARCH_DEPTH = 3
AFFINE_TOLERANCE = 1e-3
CACHE_VERSION = 2  # 2: the shared preprocessing (Spacingd, brain after preprocessing)
NORMALIZATIONS = ("volume", "none")
SLICE_NORMALIZATIONS = ("none", "zscore")


class DataError(ValueError):
    """Bad input data; the message names the subject, the file and the fix."""


# --------------------------------------------------------------------------- discovery


def _split_suffix(name: str) -> tuple[str, str] | None:
    """('BraTS19_X_t1', '.nii.gz') for a supported image file name, else None."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def _volume_role(token: str) -> str | None:
    """'seg', a canonical modality, or None for a file name token that is neither."""
    token = token.lower()
    if token in SEG_TOKENS:
        return "seg"
    try:
        return canonical_modality(token)
    except ValueError:
        return None


def _parse_volume_name(name: str) -> tuple[str, str, str] | None:
    """(subject prefix, raw token, role) of e.g. 'BraTS19_X_t1ce.nii.gz', else None."""
    if name.startswith("."):  # hidden files, e.g. macOS '._BRATS_001.nii.gz' in MSD tarballs
        return None
    parts = _split_suffix(name)
    if parts is None:
        return None
    match = re.match(r"^(?:(?P<prefix>.*)[_-])?(?P<token>[^_-]+)$", parts[0])
    if match is None:
        return None
    role = _volume_role(match["token"])
    if role is None:
        return None
    return match["prefix"] or "", match["token"].lower(), role


def _grade_from_parts(parts: Iterable[str]) -> str | None:
    """HGG / LGG when one of the folder names says so (BraTS 2018-2019 layout)."""
    for part in parts:
        if part.upper() in ("HGG", "LGG"):
            return part.upper()
    return None


def _volume_files(folder: Path) -> dict[str, list[tuple[Path, str, str]]]:
    """Volume files directly in `folder`, grouped by subject prefix: prefix -> [(path, token, role)]."""
    groups: dict[str, list[tuple[Path, str, str]]] = {}
    for entry in sorted(folder.iterdir()):
        parsed = _parse_volume_name(entry.name) if entry.is_file() else None
        if parsed is not None:
            prefix, token, role = parsed
            groups.setdefault(prefix, []).append((entry, token, role))
    return groups


def _expected_name(subject: str, modality: str, layout: str) -> str:
    """The file name a missing modality would have in the subject's layout (for messages)."""
    if layout == "brats2023":
        raw = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}[modality]
        return f"{subject}-{raw}.nii.gz"
    raw = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}[modality]
    return f"{subject}_{raw}.nii.gz"


def _record_from_files(subject: str, folder: Path, files, grade, allow_missing: bool) -> dict:
    """One subject record from its (path, token, role) files; checks for missing/duplicate modalities."""
    layout = "brats2023" if any(token in BRATS2023_TOKENS for _, token, _ in files) else "brats2018-2021"
    found: dict[str, Path] = {}
    for path, _token, role in files:
        if role in found:
            raise DataError(
                f"subject {subject}: two files give the same {role!r} volume: {found[role]} and {path}. "
                f"Fix: keep one of them (e.g. remove the duplicate copy or the other file format)."
            )
        found[role] = path
    seg = found.pop("seg", None)
    missing = [m for m in MODALITIES if m not in found]
    if missing and not allow_missing:
        expected = ", ".join(str(folder / _expected_name(subject, m, layout)) for m in missing)
        raise DataError(
            f"subject {subject}: missing modality file(s) {missing} in {folder} (expected e.g. {expected}). "
            f"Fix: add the missing file(s), remove the subject folder, or pass allow_missing=True to "
            f"zero-fill missing modalities."
        )
    if not found:
        raise DataError(f"subject {subject}: folder {folder} has a segmentation but no image file.")
    images = {m: str(found[m]) for m in MODALITIES if m in found}
    return {"subject": subject, "grade": grade, "images": images, "seg": str(seg) if seg else None, "layout": layout}


def _records_in_folder(folder: Path, grade_parts: list[str], allow_missing: bool) -> list[dict]:
    """Records of the subject(s) whose volume files lie directly in `folder` (none if it has none)."""
    groups = _volume_files(folder)
    grade = _grade_from_parts(grade_parts)
    if len(groups) == 1:  # the usual case: one subject per folder, named like the folder
        (files,) = groups.values()
        return [_record_from_files(folder.name, folder, files, grade, allow_missing)]
    # Several subjects' files side by side in one folder: the file prefix names the subject.
    return [_record_from_files(prefix or folder.name, folder, files, grade, allow_missing)
            for prefix, files in sorted(groups.items())]


def _discover_folders(root: Path, allow_missing: bool) -> list[dict]:
    """BraTS-style discovery: walk down to the folders that hold modality files."""
    if _volume_files(root):  # `root` is one subject's folder; HGG/LGG may be its parent
        return _records_in_folder(root, [root.parent.name, root.name], allow_missing)
    records: list[dict] = []
    pending = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        subfolders = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
        for sub in subfolders:
            if _volume_files(sub):
                relative_parts = [root.name, *sub.relative_to(root).parts]
                records.extend(_records_in_folder(sub, relative_parts, allow_missing))
            elif depth + 1 < MAX_SEARCH_DEPTH:
                pending.append((sub, depth + 1))
    return records


def _msd_channels(root: Path) -> list[str]:
    """Channel names of MSD 4D images from dataset.json's 'modality', else the Task01 order."""
    meta_file = root / "dataset.json"
    if not meta_file.is_file():
        return list(MSD_CHANNELS)
    meta = _read_json(meta_file, what="MSD dataset.json")
    modality = meta.get("modality")
    if not isinstance(modality, dict):
        return list(MSD_CHANNELS)
    return _channels_from_modality_dict(modality, meta_file)


def _channels_from_modality_dict(modality: dict, source: Path) -> list[str]:
    """{'0': 'FLAIR', '1': 'T1w', ...} -> ['flair', 't1', ...] in channel-index order."""
    try:
        ordered = [modality[k] for k in sorted(modality, key=int)]
        return canonical_modalities(ordered)
    except (ValueError, TypeError) as err:
        raise DataError(f"{source}: cannot read the channel names in 'modality' {modality}: {err}. "
                        f"Fix: name each channel t1, t1c, t2 or flair (or a known alias).") from err


def _discover_msd(root: Path) -> list[dict]:
    """MSD Task01: 4D images in imagesTr/ (and imagesTs/), labels of the same name in labelsTr/."""
    channels = _msd_channels(root)
    records = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if not (root / images_dir).is_dir():
            continue
        for path in sorted((root / images_dir).iterdir()):
            parts = _split_suffix(path.name)
            if path.name.startswith(".") or parts is None or not path.is_file():
                continue
            label = root / labels_dir / path.name
            records.append({"subject": parts[0], "grade": None, "image4d": str(path), "channels": list(channels),
                            "seg": str(label) if label.is_file() else None, "layout": "msd"})
    return records


def discover_subjects(root: str | os.PathLike, allow_missing: bool = False) -> list[dict]:
    """Subject records found under `root` (a dataset folder, one subject's folder or a datalist JSON).

    Record: {"subject", "grade": "HGG"|"LGG"|None, "images": {"t1": path, ...} or
    "image4d": path + "channels": [...], "seg": path|None, "layout": str}. Sorted by subject.
    """
    root = Path(root).expanduser().absolute()
    if root.is_file() and root.suffix.lower() == ".json":
        records = [r for section in _sections_present(_read_json(root, "datalist"))
                   for r in load_datalist(root, section)]
    elif root.is_file():
        raise DataError(f"data folder {root} is a file, not a folder. Fix: pass the folder holding the subjects "
                        f"(or a datalist .json file; at inference, single files go to --files \"{{'t1': PATH}}\").")
    elif not root.is_dir():
        raise DataError(f"data folder {root} does not exist. Fix: pass the folder holding the subjects "
                        f"(or a datalist .json file).")
    elif (root / "imagesTr").is_dir():
        records = _discover_msd(root)
    else:
        records = _discover_folders(root, allow_missing)
    if not records:
        raise DataError(f"no subjects found under {root}. Looked for:\n  " + "\n  ".join(LAYOUTS_LOOKED_FOR)
                        + "\nFix: point to the folder that holds the subject folders (or to a datalist .json).")
    _check_unique_subjects(records, root)
    return sorted(records, key=lambda r: r["subject"])


def _check_unique_subjects(records: list[dict], root: Path) -> None:
    seen: dict[str, dict] = {}
    for record in records:
        other = seen.setdefault(record["subject"], record)
        if other is not record:
            raise DataError(f"subject {record['subject']} appears twice under {root} "
                            f"({_first_file(other)} and {_first_file(record)}). Fix: remove one copy.")


def _first_file(record: dict) -> str:
    return record.get("image4d") or next(iter(record.get("images", {}).values()), "?")


# --------------------------------------------------------------------------- datalists


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise DataError(f"{what} file {path} does not exist. Fix: write it with "
                        f"`python -m scripts.datasets datalist --data DIR --out {path}`.") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{what} file {path} is not readable JSON ({err}). Fix: rewrite it with "
                        f"`python -m scripts.datasets datalist --data DIR --out {path}`.") from err
    if not isinstance(data, dict):
        raise DataError(f"{what} file {path} must hold a JSON object with 'training'/'validation'/'testing' lists.")
    return data


def _sections_present(datalist: dict) -> list[str]:
    """Canonical names of the sections a decathlon-style file holds (e.g. MSD's 'test' -> 'testing')."""
    return [section for section, names in SECTION_ALIASES.items()
            if any(isinstance(datalist.get(key), list) for key in names)]


def _absolute(path: str, base_dir: Path) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _entry_channels(entry: dict, datalist: dict, json_path: Path, subject: str) -> list[str]:
    """Channel names for an entry whose 'image' is one 4D file or a list of files."""
    names = entry.get("channels", datalist.get("channels"))
    if isinstance(names, list):
        try:
            return canonical_modalities(names)
        except ValueError as err:
            raise DataError(f"subject {subject} in {json_path}: bad channel names {names}: {err}") from err
    if isinstance(datalist.get("modality"), dict):
        return _channels_from_modality_dict(datalist["modality"], json_path)
    raise DataError(f"subject {subject} in {json_path}: 'image' gives no channel names. Fix: add "
                    f"\"channels\": [\"flair\", \"t1\", \"t1c\", \"t2\"] (in file order) to the entry or the file.")


_ENTRY_KEYS = ("image", "label", "seg", "subject", "grade", "channels")


def _subject_from_file(path: str) -> str:
    """Subject id implied by a file name: 'BraTS19_X' for 'BraTS19_X_t1.nii.gz', 'BRATS_001' for 4D MSD."""
    name = Path(path).name
    parsed = _parse_volume_name(name)
    if parsed is not None and parsed[0]:
        return parsed[0]
    parts = _split_suffix(name)
    return parts[0] if parts else name


def _record_from_entry(entry, datalist: dict, json_path: Path) -> dict:
    """A record with absolute paths from one datalist entry (ours, or a plain decathlon one)."""
    base_dir = json_path.parent
    if isinstance(entry, str):  # MSD "test": ["./imagesTs/BRATS_485.nii.gz", ...]
        entry = {"image": entry}
    if not isinstance(entry, dict):
        raise DataError(f"{json_path}: datalist entry {entry!r} is neither an object nor a path.")
    seg = entry.get("seg", entry.get("label"))
    images = {}
    for key, value in entry.items():
        if value and key not in _ENTRY_KEYS and _volume_role(key) not in (None, "seg"):
            images[canonical_modality(key)] = _absolute(value, base_dir)
    image = entry.get("image")
    first = next(iter(images.values()), image if isinstance(image, str) else (image or ["?"])[0])
    subject = str(entry.get("subject") or _subject_from_file(first))
    record = {"subject": subject, "grade": entry.get("grade"), "seg": _absolute(seg, base_dir) if seg else None,
              "layout": datalist.get("layout", "datalist")}
    if images:
        record["images"] = images
    elif isinstance(image, str):
        record["image4d"] = _absolute(image, base_dir)
        record["channels"] = _entry_channels(entry, datalist, json_path, subject)
    elif isinstance(image, list):
        channels = _entry_channels(entry, datalist, json_path, subject)
        if len(channels) != len(image):
            raise DataError(f"subject {subject} in {json_path}: {len(image)} image files but {len(channels)} "
                            f"channel names {channels}. Fix: give one name per file.")
        record["images"] = {m: _absolute(p, base_dir) for m, p in zip(channels, image)}
    else:
        raise DataError(f"subject {subject} in {json_path}: the entry has no image (keys t1/t1c/t2/flair or "
                        f"'image'). Fix: regenerate the datalist with `python -m scripts.datasets datalist`.")
    return record


def load_datalist(json_path: str | os.PathLike, section: str = "training") -> list[dict]:
    """Records (absolute paths) of one section of a datalist JSON ('training', 'validation', 'testing')."""
    json_path = Path(json_path).expanduser().absolute()
    datalist = _read_json(json_path, "datalist")
    if section not in SECTION_ALIASES:
        raise DataError(f"unknown datalist section {section!r}; expected one of {list(SECTIONS)}.")
    key = next((k for k in SECTION_ALIASES[section] if isinstance(datalist.get(k), list)), None)
    if key is None:
        raise DataError(f"datalist {json_path} has no {section!r} list (it has {sorted(datalist)}). "
                        f"Fix: regenerate it with `python -m scripts.datasets datalist --data DIR --out {json_path}`.")
    return [_record_from_entry(entry, datalist, json_path) for entry in datalist[key]]


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
_PHANTOM_DEFAULTS = {"subjects": 20, "seed": 0, "spacing": 1.0, "hgg_fraction": 0.5}


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
                   make_phantom: bool = True) -> str:
    """Make sure a dataset and its datalist exist and agree; return the datalist path.

    Args:
        dataset_dir: a data folder in any supported layout, or a datalist .json file.
        datalist: where the datalist is (default `<dataset_dir>/datalist.json`); written when missing.
        phantom: settings of scripts.phantom.generate_dataset for `make_phantom`.
        split: training/validation/testing fractions or counts.
        seed: the seed of the split.
        make_phantom: generate the phantom into an absent or empty `dataset_dir`; when False such
            a folder is an error (a mistyped path must not train on synthetic data).

    An existing datalist written by this bundle is checked against the data and the split: new
    or removed subjects, another split or seed are an error naming the difference (never a
    silent reuse); a datalist written elsewhere is used as it is.
    """
    given = Path(dataset_dir).expanduser().absolute()
    datalist_path = Path(datalist_file(given, datalist))
    if given.is_file():
        if given.suffix.lower() == ".json":
            return str(datalist_path)  # a datalist given as the data: used as it is
        raise DataError(f"--dataset_dir {given} is a file, not a folder. Fix: pass the folder holding the subject "
                        f"folders, or a datalist .json file.")
    if not given.exists() or not any(p for p in given.iterdir() if not p.name.startswith(".")):
        from scripts.runtime import as_flag  # lazy: runtime's error types import this module

        if not as_flag(make_phantom, "make_phantom"):
            state = "does not exist" if not given.exists() else "is empty"
            raise DataError(f"--dataset_dir {given} {state}. Fix: check the path (the folder holding the subject "
                            f"folders), or pass --make_phantom true to generate the synthetic phantom there.")
        _generate_phantom(given, {**_PHANTOM_DEFAULTS, **(phantom or {})})
    if not datalist_path.is_file():
        write_datalist(given, datalist_path, split=split, seed=seed)
    else:
        check_datalist_current(datalist_path, given, split, seed)
    return str(datalist_path)


def check_datalist_current(datalist_path: Path, dataset_dir: Path, split: Sequence[float], seed: int) -> None:
    """Raise DataError when a datalist this bundle wrote no longer matches the data or the split."""
    stored = _read_json(datalist_path, "datalist")
    if "seed" not in stored or not isinstance(stored.get("split"), dict):
        return  # not written by write_datalist: the user's own split
    listed = {str(e.get("subject")) for s in SECTIONS for e in stored.get(s, []) if isinstance(e, dict)}
    found = {r["subject"] for r in discover_subjects(dataset_dir)}
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
    from scripts.phantom import generate_dataset  # lazy: the phantom is only needed when no data is given

    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, whose 0700 mode the dataset would keep) under a name unique to this call.
    staging = dataset_dir.parent / f".{dataset_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        logger.info("no data in %s: generating the phantom dataset %s", dataset_dir, options)
        generate_dataset(staging, options["subjects"], options["seed"], options["spacing"], options["hgg_fraction"])
        if not dataset_dir.exists():
            os.replace(staging, dataset_dir)
            return
        for child in sorted(staging.iterdir()):  # an existing empty folder (maybe a mount point): move contents
            os.replace(child, dataset_dir / child.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- loading + checks


def _reader_for(path: str):
    """NibabelReader for NIfTI, ITKReader for everything else (nrrd, nhdr, mha, mhd)."""
    from monai.data import ITKReader, NibabelReader

    return NibabelReader() if path.lower().endswith(NIFTI_SUFFIXES) else ITKReader()


def load_volume(path: str, subject: str, role: str):
    """One volume as a channel-first MetaTensor; every failure becomes a DataError naming the file."""
    from monai.transforms import LoadImaged

    if not os.path.isfile(path):
        raise DataError(f"subject {subject}: {role} file {path} does not exist. Fix: restore the file, or "
                        f"rewrite the datalist (`python -m scripts.datasets datalist`) if the data moved.")
    loader = LoadImaged(keys="volume", reader=_reader_for(path), image_only=True, ensure_channel_first=True)
    try:
        volume = loader({"volume": path})["volume"]
    except Exception as err:  # nibabel/ITK raise many types (EOFError, zlib.error, RuntimeError, ...)
        raise DataError(f"subject {subject}: cannot read {role} file {path} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). The file is unreadable or truncated "
                        f"(e.g. an interrupted download or copy). Fix: re-extract or re-download it.") from err
    bad_voxels = int((~torch.isfinite(volume)).sum())
    if bad_voxels:
        raise DataError(f"subject {subject}: {role} file {path} has {bad_voxels} NaN/inf voxels. Fix: repair the "
                        f"volume (e.g. replace non-finite values by 0) or remove the subject from the datalist.")
    if volume.ndim != 4:
        raise DataError(f"subject {subject}: {role} file {path} has shape {tuple(volume.shape[1:])}, "
                        f"not a 3D volume. Fix: give a 3D (or, for 'image', a 4D) volume.")
    return volume


def _load_channels(record: dict, subject: str, allow_missing: bool):
    """{modality: (1, X, Y, Z) MetaTensor} from per-modality files or one 4D file, plus their files."""
    if "image4d" in record:
        path = record["image4d"]
        channels = canonical_modalities(record["channels"])
        volume = load_volume(path, subject, "4D image")
        if volume.shape[0] != len(channels):
            raise DataError(f"subject {subject}: 4D image {path} has {volume.shape[0]} channels, expected "
                            f"{len(channels)} ({', '.join(channels)}). Fix: use the 4-channel MSD Task01 image, or "
                            f"set 'channels' in the datalist to the names of its channels in order.")
        loaded = {m: volume[i:i + 1] for i, m in enumerate(channels)}
        files = {m: path for m in channels}
    else:
        files = {canonical_modality(m): p for m, p in record["images"].items()}
        loaded = {m: load_volume(p, subject, m) for m, p in files.items()}
        for modality, volume in loaded.items():
            if volume.shape[0] != 1:
                raise DataError(f"subject {subject}: {modality} file {files[modality]} holds {volume.shape[0]} "
                                f"volumes (a 4D image); one 3D volume per modality file was expected. Fix: split it.")
    missing = [m for m in MODALITIES if m not in loaded]
    if missing and not allow_missing:
        raise DataError(f"subject {subject}: no {missing} volume (files: {sorted(set(files.values()))}). Fix: add "
                        f"the missing modality file(s), or use VolumeCache(allow_missing=True) to zero-fill them.")
    return loaded, files


def check_same_grid(volumes: dict, files: dict, subject: str) -> None:
    """Every volume must share the first one's shape and affine (compared before reorientation)."""
    reference_name = next(iter(volumes))
    reference = volumes[reference_name]
    for name, volume in volumes.items():
        if tuple(volume.shape[1:]) != tuple(reference.shape[1:]):
            raise DataError(f"subject {subject}: {name} file {files[name]} has shape {tuple(volume.shape[1:])} but "
                            f"{reference_name} file {files[reference_name]} has {tuple(reference.shape[1:])}; all "
                            f"modalities and the seg must share one voxel grid. Fix: resample it onto the "
                            f"{reference_name} grid or remove the subject.")
        if not np.allclose(np.asarray(volume.affine), np.asarray(reference.affine), atol=AFFINE_TOLERANCE):
            raise DataError(f"subject {subject}: {name} file {files[name]} has affine\n"
                            f"{np.asarray(volume.affine).round(4)}\nbut {reference_name} file {files[reference_name]} "
                            f"has\n{np.asarray(reference.affine).round(4)}\n(tolerance {AFFINE_TOLERANCE}). Fix: "
                            f"register/resample it onto the {reference_name} grid, or fix its header.")


def preprocess_subject(record: dict, spatial_size: Sequence[int] | None = None, normalization: str = "volume",
                       allow_missing: bool = False, spacing=None) -> dict:
    """Load one subject and run the one preprocessing (`scripts.preprocessing`) on it.

    Returns image float32 (4, H, W, D) in MODALITIES order, mask uint8 (H, W, D) whole tumour,
    brain bool (H, W, D) (non-zero in any modality after preprocessing, the test the map
    engine applies to any input), spacing (3,), present [modalities with data].
    """
    from monai.transforms import ConcatItemsd

    from scripts.preprocessing import volume_preprocessing

    subject = str(record["subject"])
    loaded, files = _load_channels(record, subject, allow_missing)
    if record.get("seg"):
        loaded["seg"] = load_volume(record["seg"], subject, "seg")
        files["seg"] = record["seg"]
        if loaded["seg"].shape[0] != 1:
            raise DataError(f"subject {subject}: seg file {record['seg']} holds {loaded['seg'].shape[0]} volumes; "
                            f"one 3D label map was expected.")
    check_same_grid(loaded, files, subject)
    from scripts.sanity import volume_warnings

    images = {m: v for m, v in loaded.items() if m != "seg"}
    warnings = volume_warnings(images, files, subject, seg=loaded.get("seg"))
    reference = next(iter(loaded.values()))
    data = {m: loaded.get(m, torch.zeros_like(reference)) for m in MODALITIES}  # zero-fill (allow_missing)
    data["seg"] = loaded.get("seg", torch.zeros_like(reference))
    data = ConcatItemsd(keys=list(MODALITIES), name="image", dim=0)(data)
    preprocessing = volume_preprocessing(spacing, spatial_size, normalization, image_keys=["image"],
                                         label_keys=["seg"])
    data = preprocessing({"image": data["image"], "seg": data["seg"]})
    return {
        "image": np.ascontiguousarray(data["image"].numpy(), dtype=np.float32),
        "mask": (data["seg"][0].numpy() > 0).astype(np.uint8),
        "brain": (data["image"] != 0).any(dim=0).numpy(),
        "spacing": [float(s) for s in data["image"].pixdim],
        "present": [m for m in MODALITIES if m in loaded],
        "has_mask": "seg" in loaded,
        "warnings": warnings,
    }


# --------------------------------------------------------------------------- cache


def _source_files(record: dict) -> list[str]:
    files = [record["image4d"]] if "image4d" in record else [record["images"][m] for m in sorted(record["images"])]
    return files + ([record["seg"]] if record.get("seg") else [])


def _file_signature(path: str) -> list:
    """Path, size and mtime: enough to notice a replaced or edited source file."""
    try:
        stat = os.stat(path)
        return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [os.path.abspath(path), None, None]


def _safe_name(subject: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", subject)[:80]


class VolumeCache:
    """Preprocessed subjects on disk: `(D, 4, H, W)` float32 + `(D, H, W)` uint8 `.npy` files.

    Slice-major storage makes one axial slice a contiguous read from the memory map, so a
    BraTS-size dataset never has to fit in RAM; the few most recent subjects' maps stay open
    (`memory_items`), which together with the OS page cache keeps a small phantom in memory.
    `.builds` counts preprocessing runs and `.disk_loads` cache file opens (used by the tests).
    The preprocessing is `scripts.preprocessing.volume_preprocessing`, the one inference runs.

    Args:
        cache_dir: folder of the cache files (created on first use).
        spatial_size: in-plane (H, W) the volumes are padded / cropped to; None derives it
            from `spacing` (240 mm field of view), or keeps the size without a spacing.
        normalization: "volume" (z-score over brain voxels per modality) or "none".
        allow_missing: zero-fill a missing modality instead of raising.
        memory_items: subjects whose memory maps stay open.
        spacing: voxel spacing (mm, one value or three) volumes are resampled to; None keeps
            each input's grid.
    """

    def __init__(self, cache_dir: str | os.PathLike, spatial_size: Sequence[int] | None = None,
                 normalization: str = "volume", allow_missing: bool = False, memory_items: int = 8, spacing=None):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if spatial_size is not None and len(spatial_size) != 2:
            raise ValueError(f"spatial_size is the in-plane (H, W), got {spatial_size}")
        from scripts.preprocessing import target_pixdim

        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        self.spacing = target_pixdim(spacing)
        self.normalization = normalization
        self.allow_missing = allow_missing
        self.memory_items = memory_items
        self._memory: OrderedDict[str, dict] = OrderedDict()
        self.builds = 0
        self.disk_loads = 0

    def __getstate__(self):  # DataLoader workers: reopen the memory maps instead of pickling them
        state = dict(self.__dict__)
        state["_memory"] = OrderedDict()
        return state

    def key(self, record: dict) -> str:
        """Hash of the source files (path, size, mtime) and the preprocessing parameters."""
        recipe = {"version": CACHE_VERSION, "spatial_size": self.spatial_size, "normalization": self.normalization,
                  "spacing": self.spacing,
                  "channels": record.get("channels"), "images": sorted(record.get("images", {})),
                  "sources": [_file_signature(p) for p in _source_files(record)]}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        return f"{_safe_name(str(record['subject']))}-{digest}"

    def _files(self, key: str) -> tuple[Path, Path, Path]:
        return (self.cache_dir / f"{key}.image.npy", self.cache_dir / f"{key}.mask.npy",
                self.cache_dir / f"{key}.json")

    def info(self, record: dict) -> dict:
        """Per-subject metadata (shape, spacing, brain_fraction and tumour_pixels per slice) without mapping images."""
        key = self.key(record)
        if key in self._memory:
            return self._memory[key]["meta"]
        return self._checked(self._read_meta(key) or self._build(record, key), record)

    def _checked(self, meta: dict, record: dict) -> dict:
        """A zero-filled entry (written by an allow_missing cache) is an error for a strict cache."""
        missing = [m for m in MODALITIES if m not in meta["present"]]
        if missing and not self.allow_missing:
            raise DataError(f"subject {record['subject']}: no {missing} volume (files: {_source_files(record)}). "
                            f"Fix: add the missing modality file(s), or use VolumeCache(allow_missing=True).")
        return meta

    def _read_meta(self, key: str) -> dict | None:
        image_file, mask_file, meta_file = self._files(key)
        if not (meta_file.is_file() and image_file.is_file() and mask_file.is_file()):
            return None
        try:
            return json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _build(self, record: dict, key: str) -> dict:
        """Preprocess one subject and write its files; the meta JSON goes last and marks completion."""
        volume = preprocess_subject(record, self.spatial_size, self.normalization, self.allow_missing, self.spacing)
        self.builds += 1
        image_file, mask_file, meta_file = self._files(key)
        image = np.ascontiguousarray(np.moveaxis(volume["image"], -1, 0))  # (D, 4, H, W)
        mask = np.ascontiguousarray(np.moveaxis(volume["mask"], -1, 0))  # (D, H, W)
        brain = volume["brain"]
        meta = {
            "subject": str(record["subject"]), "key": key, "version": CACHE_VERSION,
            "shape": list(volume["image"].shape), "spacing": volume["spacing"], "present": volume["present"],
            "has_mask": volume["has_mask"], "grade": record.get("grade"),
            "brain_fraction": [round(float(f), 6) for f in brain.mean(axis=(0, 1))],
            "tumour_pixels": [int(n) for n in volume["mask"].sum(axis=(0, 1))],
            "sources": [_file_signature(p) for p in _source_files(record)],
            "warnings": volume.get("warnings", []),
        }
        for target, array in ((image_file, image), (mask_file, mask)):
            with atomic_path(target) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array)
        atomic_write_json(meta_file, meta)
        return meta

    def _arrays(self, record: dict) -> dict:
        """{'image': (D,4,H,W) memmap, 'mask': (D,H,W) memmap, 'meta'} from memory, disk, or a fresh build."""
        key = self.key(record)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        meta = self._checked(self._read_meta(key) or self._build(record, key), record)
        image_file, mask_file, _ = self._files(key)
        try:
            # Copy-on-write maps: writable for torch, and a stray in-place edit never reaches the file.
            entry = {"image": np.load(image_file, mmap_mode="c"), "mask": np.load(mask_file, mmap_mode="c"), "meta": meta}
        except (OSError, ValueError) as err:  # a damaged cache file: rebuild it rather than fail
            logger.warning("cache file for %s unreadable (%s): rebuilding", record["subject"], err)
            meta = self._build(record, key)
            entry = {"image": np.load(image_file, mmap_mode="c"), "mask": np.load(mask_file, mmap_mode="c"), "meta": meta}
        self.disk_loads += 1
        self._memory[key] = entry
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return entry

    def get(self, record: dict) -> dict:
        """image float32 (4,H,W,D), mask uint8 (1,H,W,D), brain bool (D,), brain_fraction (D,),
        tumour_pixels (D,), spacing (3,), subject, present, has_mask. Tensors are views of the cache."""
        entry = self._arrays(record)
        meta = entry["meta"]
        brain_fraction = torch.tensor(meta["brain_fraction"], dtype=torch.float32)
        return {
            "image": torch.from_numpy(entry["image"]).permute(1, 2, 3, 0),
            "mask": torch.from_numpy(entry["mask"]).permute(1, 2, 0).unsqueeze(0),
            "brain": brain_fraction > 0,
            "brain_fraction": brain_fraction,
            "tumour_pixels": torch.tensor(meta["tumour_pixels"], dtype=torch.int64),
            "spacing": torch.tensor(meta["spacing"], dtype=torch.float64),
            "subject": meta["subject"],
            "present": list(meta["present"]),
            "has_mask": bool(meta["has_mask"]),
        }

    def get_slice(self, record: dict, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of axial slice z: image (4, H, W) float32 and mask (H, W) uint8 (one contiguous read each)."""
        entry = self._arrays(record)
        return np.array(entry["image"][z]), np.array(entry["mask"][z])


# --------------------------------------------------------------------------- datasets


def _require_segmentations(records: list[dict]) -> None:
    unlabelled = [r["subject"] for r in records if not r.get("seg")]
    if unlabelled:
        raise DataError(f"subjects {unlabelled[:5]}{' ...' if len(unlabelled) > 5 else ''} have no seg file, so "
                        f"their slices cannot be labelled. Fix: add <id>_seg files, or keep unlabelled subjects "
                        f"out of training/validation (they can go to VolumeDataset for inference).")


class SliceDataset(torch.utils.data.Dataset):
    """Axial slices that hold brain, labelled 1 when they hold any tumour voxel.

    Map-style over (subject, z) so a sampler can shuffle globally or balance classes
    (`.labels`). The index comes from the cache's per-slice metadata, never from images.
    MONAI's GridPatchDataset/PatchIterd is iterable-only (no global shuffle), hence this class.

    Args:
        records: subject records (with segmentations).
        cache: the VolumeCache holding the preprocessed volumes.
        modalities: channels served, in this order.
        brain_threshold: a slice is kept when its brain fraction is above this.
        slice_normalization: "none" or "zscore" (the paper's per-slice z-score).
        require_positive: raise when no kept slice holds tumour.
    """

    def __init__(self, records: Sequence[dict], cache: VolumeCache, modalities: Sequence[str] = MODALITIES,
                 brain_threshold: float = 0.0, slice_normalization: str = "none", require_positive: bool = True):
        if slice_normalization not in SLICE_NORMALIZATIONS:
            raise ValueError(f"slice_normalization must be one of {SLICE_NORMALIZATIONS}, got {slice_normalization!r}")
        self.records = list(records)
        self.cache = cache
        self.modalities = canonical_modalities(modalities)
        self.channel_indices = [MODALITIES.index(m) for m in self.modalities]
        self.brain_threshold = float(brain_threshold)
        self.slice_normalization = slice_normalization
        _require_segmentations(self.records)
        self.index, labels = self._build_index()
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._check_not_degenerate(require_positive)

    def _build_index(self) -> tuple[list[tuple[int, int]], list[int]]:
        index, labels = [], []
        for record_index, record in enumerate(self.records):
            meta = self.cache.info(record)
            kept = 0
            for z, (fraction, tumour) in enumerate(zip(meta["brain_fraction"], meta["tumour_pixels"])):
                if fraction > self.brain_threshold:
                    index.append((record_index, z))
                    labels.append(int(tumour > 0))
                    kept += 1
            if kept == 0:  # said here too, as the cache may have been built by an earlier run
                logger.warning("subject %s: no slice has a brain fraction above %g (%d tumour voxels in its seg): "
                               "the subject is left out of this dataset. Check its images.", record["subject"],
                               self.brain_threshold, sum(meta["tumour_pixels"]))
        return index, labels

    def _check_not_degenerate(self, require_positive: bool) -> None:
        subjects = [r["subject"] for r in self.records]
        if not self.index:
            raise DataError(f"no slice of subjects {subjects[:5]} has a brain fraction above {self.brain_threshold}. "
                            f"Fix: lower brain_threshold or check that the images are not all zero.")
        if require_positive and int(self.labels.sum()) == 0:
            segs = [r["seg"] for r in self.records[:3]]
            raise DataError(f"no positive (tumour) slice among the {len(self.records)} subjects {subjects[:5]} "
                            f"(seg files e.g. {segs}): every seg is empty on the brain slices, so a classifier "
                            f"cannot learn. Fix: check the seg files, or re-split so this split holds tumour cases.")

    @property
    def positive_fraction(self) -> float:
        return float(self.labels.float().mean()) if len(self.labels) else 0.0

    @property
    def subjects(self) -> list[str]:
        return [self.records[i]["subject"] for i, _ in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict:
        record_index, z = self.index[item]
        record = self.records[record_index]
        image, mask = self.cache.get_slice(record, z)
        image = torch.from_numpy(image[self.channel_indices])
        if self.slice_normalization == "zscore":
            image = slice_zscore(image)
        return {"image": image, "label": self.labels[item].clone(), "mask": torch.from_numpy(mask[None].astype(np.float32)),
                "subject": str(record["subject"]), "z": z}


def slice_zscore(image: torch.Tensor) -> torch.Tensor:
    """The paper's per-slice, per-modality z-score over the whole slice (background included)."""
    from monai.transforms import NormalizeIntensity

    normalised = NormalizeIntensity(nonzero=False, channel_wise=True)(image)
    return torch.as_tensor(normalised, dtype=torch.float32).as_subclass(torch.Tensor)


class VolumeDataset(torch.utils.data.Dataset):
    """One item per subject for per-volume evaluation: image (K,H,W,D), mask (1,H,W,D) float32,
    brain (D,), subject, spacing, has_mask.

    Args:
        records: subject records.
        cache: the VolumeCache holding the preprocessed volumes.
        modalities: channels served, in this order.
    """

    def __init__(self, records: Sequence[dict], cache: VolumeCache, modalities: Sequence[str] = MODALITIES):
        self.records = list(records)
        self.cache = cache
        self.modalities = canonical_modalities(modalities)
        self.channel_indices = [MODALITIES.index(m) for m in self.modalities]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> dict:
        cached = self.cache.get(self.records[item])
        return {"image": cached["image"][self.channel_indices].contiguous(), "mask": cached["mask"].float(),
                "brain": cached["brain"], "subject": cached["subject"], "spacing": cached["spacing"],
                "has_mask": cached["has_mask"]}


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
    parser = argparse.ArgumentParser(prog="python -m scripts.datasets", description=__doc__.splitlines()[0])
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
