"""Where the subjects are: layout discovery and datalist reading, with actionable errors.

`discover_subjects` turns a folder (BraTS 2018-2021, BraTS 2023+, MSD Task01) or a datalist
JSON into subject records; `load_datalist` reads one section of a decathlon-style datalist
(written by `scripts.data.datalist`). Every problem with the input data raises `DataError`
naming the subject, the file, what is wrong and how to fix it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable

from scripts.common import MODALITIES, OUTPUT_MANIFEST, canonical_modalities, canonical_modality

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
# Subject folders sit at most this deep below the root (root/HGG/<id> is depth 2); a folder
# with scans below that is named in a warning (site/scanner/batch/<id> trees are depth 4).
MAX_SEARCH_DEPTH = 6


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
    """Entries directly in `folder` named like volume files, grouped by subject prefix:
    prefix -> [(path, token, role)]. Entries that are not regular files (a dangling link, a
    folder with a file's name) are kept, so that `_record_from_files` names them in an error
    instead of the modality silently counting as missing."""
    groups: dict[str, list[tuple[Path, str, str]]] = {}
    for entry in sorted(folder.iterdir()):
        parsed = _parse_volume_name(entry.name)
        if parsed is not None and (entry.is_file() or entry.is_symlink() or entry.is_dir()):
            prefix, token, role = parsed
            groups.setdefault(prefix, []).append((entry, token, role))
    return groups


def _unnamed_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` whose names give no modality (e.g. `Sub02.flair.nii.gz`)."""
    return [entry for entry in sorted(folder.iterdir())
            if not entry.name.startswith(".") and _split_suffix(entry.name) and _parse_volume_name(entry.name) is None
            and entry.is_file()]


NAMING = "<id>_{t1,t1ce,t2,flair,seg}.nii.gz (BraTS 2023+: <id>-{t1n,t1c,t2w,t2f,seg}.nii.gz)"


def _unusable_file(path: Path, subject: str, role: str) -> DataError | None:
    """A DataError naming why a volume entry cannot be read (None for a regular file)."""
    if path.is_file():
        return None
    where = f"subject {subject}: {role} file {path}"
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return DataError(f"{where} is a link that points back to itself (a symlink loop). Fix: replace it by "
                                 f"the scan file, or remove it.")
            return DataError(f"{where} is a link to a file that does not exist ({os.readlink(path)}; an unfetched "
                             f"DataLad / git-annex file?). Fix: fetch it (`datalad get` / `git annex get`) or restore "
                             f"its target, or remove the link to go on without this {role}.")
    if path.is_dir():
        return DataError(f"{where} is a folder, not a file. Fix: put the scan file there (an archive unpacked into a "
                         f"folder of the file's name?), or rename the folder.")
    return DataError(f"{where} is not a regular file. Fix: replace it by the scan file, or remove it.")


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
        unusable = _unusable_file(path, subject, role)
        if unusable is not None:
            raise unusable
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
            f"Fix: add the missing file(s), remove the subject folder, or pass --allow_missing true to "
            f"zero-fill missing modalities (the datalist command: --allow-missing)."
        )
    if not found:
        raise DataError(f"subject {subject}: folder {folder} has a segmentation but no image file.")
    images = {m: str(found[m]) for m in MODALITIES if m in found}
    return {"subject": subject, "grade": grade, "images": images, "seg": str(seg) if seg else None, "layout": layout}


def _records_in_folder(folder: Path, grade_parts: list[str], allow_missing: bool) -> list[dict]:
    """Records of the subject(s) whose volume files lie directly in `folder` (none if it has none)."""
    groups = _volume_files(folder)
    grade = _grade_from_parts(grade_parts)
    for path in _unnamed_images(folder):
        owner = folder.name if len(groups) == 1 else f"in {folder}"
        logger.warning(f"subject {owner}: file {path} is not used: its name gives no modality (expected {NAMING}). "
                       f"Fix: rename it to include it.")
    if len(groups) == 1:  # the usual case: one subject per folder, named like the folder
        (files,) = groups.values()
        return [_record_from_files(folder.name, folder, files, grade, allow_missing)]
    # Several subjects' files side by side in one folder: the file prefix names the subject.
    return [_record_from_files(prefix or folder.name, folder, files, grade, allow_missing)
            for prefix, files in sorted(groups.items())]


def _warn_hidden_subject_folder(folder: Path) -> None:
    """A warning for a hidden folder (skipped) that holds image files, e.g. a subject named `..x`."""
    images = sorted(p.name for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith("._") and _parse_volume_name(p.name.lstrip(".")))
    if images:
        logger.warning(f"skipped folder {folder}: its name starts with '.' (a hidden folder) but it holds "
                       f"{len(images)} image files (e.g. {images[0]}); its subject is not used. Fix: rename it "
                       f"without the leading '.' to include it, or move it out of the dataset folder.")


def _warn_unnamed_folder(folder: Path) -> None:
    """A warning for a folder that holds image files none of which is named like a modality file."""
    unnamed = _unnamed_images(folder)
    if unnamed:
        logger.warning(f"skipped folder {folder}: it holds {len(unnamed)} image files but none is named like a modality "
                       f"file (e.g. {unnamed[0].name}). Fix: name them {NAMING} to include them.")


def _warn_too_deep(folder: Path, root: Path, depth: int) -> None:
    """Warnings for the folders below `folder` (at `depth` levels, the limit) that hold image files."""
    for current, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        images = [n for n in names if not n.startswith(".") and _split_suffix(n)]
        if images and Path(current) != folder:  # `folder` itself: _warn_unnamed_folder
            levels = depth + len(Path(current).relative_to(folder).parts)
            logger.warning(f"skipped folder {current}: it is {levels} folder levels below {root} (subjects are looked "
                           f"for at most {MAX_SEARCH_DEPTH} levels down) but holds {len(images)} image files (e.g. "
                           f"{sorted(images)[0]}). Fix: pass a folder closer to it as --dataset_dir, or move it up.")


def _is_output_folder(folder: Path) -> bool:
    return (folder / OUTPUT_MANIFEST).is_file()


def _discover_folders(root: Path, allow_missing: bool) -> list[dict]:
    """BraTS-style discovery: walk down to the folders that hold modality files. Every folder
    holding scans that is not taken is named in a warning with the reason: hidden, this bundle's
    output folder, too deep, or no file named like a modality."""
    if _is_output_folder(root):
        raise DataError(f"{root} is an output folder of this bundle (it holds {OUTPUT_MANIFEST}), not input data. Fix: "
                        f"pass the folder of the scans as --dataset_dir (outputs are never read as subjects).")
    if _volume_files(root):  # `root` is one subject's folder; HGG/LGG may be its parent
        return _records_in_folder(root, [root.parent.name, root.name], allow_missing)
    _warn_unnamed_folder(root)
    records: list[dict] = []
    pending = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        for hidden in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(".")):
            _warn_hidden_subject_folder(hidden)
        subfolders = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
        for sub in subfolders:
            if _is_output_folder(sub):  # e.g. an --output_dir inside the dataset: its maps are no subject
                logger.warning(f"skipped folder {sub}: it holds this bundle's outputs ({OUTPUT_MANIFEST}); outputs "
                               f"are never read as subjects. Fix: move it out of the dataset folder.")
            elif _volume_files(sub):
                relative_parts = [root.name, *sub.relative_to(root).parts]
                records.extend(_records_in_folder(sub, relative_parts, allow_missing))
            elif depth + 1 < MAX_SEARCH_DEPTH:
                _warn_unnamed_folder(sub)
                pending.append((sub, depth + 1))
            else:
                _warn_unnamed_folder(sub)
                _warn_too_deep(sub, root, depth + 1)
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
                        f"`python -m scripts.data.datalist datalist --data DIR --out {path}`.") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{what} file {path} is not readable JSON ({err}). Fix: rewrite it with "
                        f"`python -m scripts.data.datalist datalist --data DIR --out {path}`.") from err
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
                        f"'image'). Fix: regenerate the datalist with `python -m scripts.data.datalist datalist`.")
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
                        f"Fix: regenerate it with `python -m scripts.data.datalist datalist --data DIR --out {json_path}`.")
    return [_record_from_entry(entry, datalist, json_path) for entry in datalist[key]]
