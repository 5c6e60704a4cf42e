"""Where a run's output files go, and what it may replace or delete.

- `file_name` maps a subject id to a folder / file name stem: reversible (`subject_id`
  undoes it), collision-free (percent-encoding, so `a b` and `a_b` stay apart) and unable to
  leave the output folder (`.`, `..`, absolute ids and path separators are refused).
- `check_distinct_names` refuses two subjects whose names differ only in case (one file on
  case-insensitive file systems).
- `OutputManifest` lists every file a run wrote (`<output_dir>/.manifest.json`) and which
  checkpoint wrote it (a hash of the file, `checkpoint_digest`); a rerun removes a subject's
  earlier files only when the manifest says a run of this bundle wrote them, so a user's own
  files in the folder are never deleted.
- `claim_output_dir` refuses to write into a folder that already holds results unless the
  user passes `--overwrite true`, and keeps a folder to one model's outputs. The exact rule:
  with `--overwrite true`, a run may replace earlier results only when every subject whose
  files another checkpoint wrote (per the manifest) is among the subjects this run writes;
  otherwise (e.g. `--subject a_b` with a new model.pt in a folder holding the old model's
  other subjects) it is refused before anything is written: rerun all of the folder's
  subjects with --overwrite true, or choose another --output_dir. Files of a manifest from
  an older bundle (no checkpoint recorded) are not counted. A file at a name this run writes
  that the manifest does not list (a user's own `<id>_mask.nii.gz`) is never replaced: the
  run is refused, with or without --overwrite (`foreign_outputs`; the writers check again).
- `check_output_outside_input` refuses an output folder that is, lies inside or contains the
  input folder: outputs among the scans were read back as a subject (`<id>_cam`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote, unquote

from scripts.common import MODALITIES, OUTPUT_MANIFEST, atomic_write_json
from scripts.data.subjects import DataError
from scripts.runtime import BundleError, as_flag

MANIFEST_NAME = OUTPUT_MANIFEST
MAX_NAME_BYTES = 200  # leaves room for '_cam_flair.nii.gz' and temp-file affixes under 255
# What the writers add to a subject's name (SaveSubjectMapsd, scripts.stage2.inference.SaveStage2Maskd).
OUTPUT_SUFFIXES = tuple(f"_cam_{m}.nii.gz" for m in (*MODALITIES, "fused")) + (
    "_mask.nii.gz", "_stage2_mask.nii.gz", "_stage2_prob.nii.gz")


def file_name(subject) -> str:
    """A file-name stem for `subject`: letters, digits and `_.-~` kept, anything else %XX.

    Raises DataError for ids that would point outside the folder or cannot be made a name.
    """
    subject = str(subject)
    fix = "Fix: rename the subject (its folder or file prefix), or pass --subject NAME with --files."
    if subject in ("", ".", ".."):
        raise DataError(f"subject id {subject!r} cannot be used as an output name (it would point at the output "
                        f"folder itself or its parent). {fix}")
    if "/" in subject or "\\" in subject or os.path.isabs(subject):
        raise DataError(f"subject id {subject!r} contains a path separator, so its outputs could land outside "
                        f"the output folder. {fix}")
    name = quote(subject, safe="")
    if name.startswith("."):  # a hidden name could be taken for a temporary file or the manifest
        name = "%2E" + name[1:]
    if len(name.encode()) > MAX_NAME_BYTES:
        raise DataError(f"subject id {subject[:60]!r}... is too long for a file name ({len(name.encode())} bytes "
                        f"encoded, at most {MAX_NAME_BYTES}). {fix}")
    return name


def subject_id(name: str) -> str:
    """The subject id a `file_name` came from."""
    return unquote(name)


def check_distinct_names(subjects: Iterable) -> None:
    """Raise DataError when two subject ids map to one file name (also case-insensitively)."""
    seen: dict[str, str] = {}
    for subject in subjects:
        key = file_name(subject).casefold()
        other = seen.setdefault(key, str(subject))
        if other != str(subject):
            raise DataError(f"subjects {other!r} and {str(subject)!r} would write the same output files "
                            f"({file_name(other)}/, case-insensitively). Fix: rename one of them.")


def checkpoint_digest(path) -> str | None:
    """The first 16 hex digits of the SHA-256 of a checkpoint file (None when there is none)."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class OutputManifest:
    """The files a run of this bundle wrote into `output_dir` (relative paths per entry) and,
    per entry, the subject and the checkpoint (`checkpoint_digest`) that wrote them.

    Each record reads the manifest on disk again and rewrites it atomically, so an interrupted
    run still lists everything it wrote, and several writers of one run (the CAM and the
    stage-2 outputs of `serve: both`, one subject after the other) keep each other's entries.

    Args:
        output_dir: the run's output folder.
        checkpoint: the checkpoint file whose outputs this writer records (None: not recorded).
    """

    def __init__(self, output_dir, checkpoint=None):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / MANIFEST_NAME
        self.checkpoint = checkpoint
        self._digest: str | None = None
        self._files: dict[str, list[str]] | None = None

    def _load(self) -> dict[str, list[str]]:
        if self._files is None:
            self._files = read_manifest(self.output_dir)
        return self._files

    def earlier_files(self, subject) -> list[Path]:
        """Files an earlier run wrote for `subject` (that still exist)."""
        return [self.output_dir / p for p in self._load().get(str(subject), []) if (self.output_dir / p).is_file()]

    def record(self, subject, files: Sequence[os.PathLike], subject_id: str | None = None) -> None:
        """List `files` under entry `subject` (written by this writer's checkpoint).

        Args:
            subject: the manifest entry (the subject id, or e.g. `stage2:<id>` for a second writer).
            files: the files written.
            subject_id: the subject the entry belongs to (default: `subject`).
        """
        entries = read_manifest(self.output_dir)  # another writer's entries since our last read stay
        written_by = read_written_by(self.output_dir)
        entries[str(subject)] = [Path(os.path.relpath(f, self.output_dir)).as_posix() for f in files]
        if self.checkpoint is not None and self._digest is None:
            self._digest = checkpoint_digest(self.checkpoint)
        written_by[str(subject)] = {"subject": str(subject if subject_id is None else subject_id),
                                    "checkpoint": self._digest}
        atomic_write_json(self.path, {"version": 2, "files": entries, "written_by": written_by})
        self._files = entries

    def foreign(self, files: Sequence[os.PathLike]) -> list[Path]:
        """Those of `files` that exist but that no run of this bundle wrote (no manifest entry lists them)."""
        listed = {(self.output_dir / p).absolute() for entry in read_manifest(self.output_dir).values() for p in entry}
        return [Path(f) for f in files if Path(f).exists() and Path(f).absolute() not in listed]

    def check_ours(self, subject, files: Sequence[os.PathLike]) -> None:
        """Raise BundleError when one of `files` (about to be written) is a file this bundle did not write.

        Args:
            subject: the subject id, for the message.
            files: the files a writer is about to write.
        """
        foreign = self.foreign(files)
        if foreign:
            raise BundleError(f"subject {subject}: {foreign[0]} exists but no run of this bundle wrote it (not in "
                              f"{self.path}); it is never replaced. Fix: move it out of {self.output_dir}, or choose "
                              f"another --output_dir.")

    def replace(self, subject, files: Sequence[os.PathLike], subject_id: str | None = None) -> list[Path]:
        """Record `files` for `subject`; delete the subject's earlier files not among them
        (e.g. a modality's map from a run with other inputs). Returns the deleted files."""
        kept = {Path(f).absolute() for f in files}
        stale = [p for p in self.earlier_files(subject) if p.absolute() not in kept]
        self.record(subject, files, subject_id)
        for path in stale:
            path.unlink(missing_ok=True)
        return stale


def _manifest(output_dir) -> dict:
    path = Path(output_dir) / MANIFEST_NAME
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"output manifest {path} is unreadable ({err}). Fix: delete it (the results it lists are "
                        f"then treated as your own files and never deleted), or pass another --output_dir.") from err


def read_manifest(output_dir) -> dict[str, list[str]]:
    """{entry: [relative paths]} of the files runs of this bundle wrote into `output_dir`."""
    return {str(k): [str(p) for p in v] for k, v in dict(_manifest(output_dir).get("files", {})).items()}


def read_written_by(output_dir) -> dict[str, dict]:
    """{entry: {"subject", "checkpoint"}}: who wrote each entry's files (empty for older manifests)."""
    return {str(k): dict(v) for k, v in dict(_manifest(output_dir).get("written_by", {})).items()}


def earlier_results(output_dir, patterns: Sequence[str] = ("*/*_mask.nii.gz",)) -> list[Path]:
    """Result files already in `output_dir`: those a manifest lists, and any matching `patterns`."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    listed = [folder / p for files in read_manifest(folder).values() for p in files]
    found = {p for p in listed if p.is_file()}
    for pattern in patterns:
        found.update(folder.glob(pattern))
    return sorted(found)


def foreign_outputs(output_dir, subjects: Iterable) -> list[Path]:
    """Files at the names a run for `subjects` writes (`OUTPUT_SUFFIXES`) that no run of this bundle wrote.

    Args:
        output_dir: the run's output folder.
        subjects: the subject ids the run writes.
    """
    folder = Path(output_dir)
    targets = [folder / file_name(s) / f"{file_name(s)}{suffix}" for s in subjects for suffix in OUTPUT_SUFFIXES]
    return OutputManifest(folder).foreign(targets) if folder.is_dir() else []


def check_output_outside_input(output_dir, dataset_dir=None, files=None) -> None:
    """Refuse an --output_dir that is, lies inside or contains the input folder (a datalist: its folder).

    Outputs written among the scans were taken for a subject on the next run (`<id>_cam_t1.nii.gz`
    ... read as subject `<id>_cam`); discovery also skips folders holding a manifest.

    Args:
        output_dir: the run's output folder.
        dataset_dir: the input folder, a subject's folder or a datalist JSON.
        files: files named one by one (then `dataset_dir` is not read: nothing to check).
    """
    if files or dataset_dir is None:
        return
    data = Path(dataset_dir).expanduser().resolve()
    if data.is_file():
        data = data.parent
    out = Path(output_dir).expanduser().resolve()
    if out == data:
        relation = "is the input folder"
    elif data in out.parents:
        relation = f"lies inside the input folder --dataset_dir {data}"
    elif out in data.parents:
        relation = f"contains the input folder --dataset_dir {data}"
    else:
        return
    raise BundleError(f"--output_dir {out} {relation}: outputs (<id>/<id>_cam_<modality>.nii.gz, ...) would sit among "
                      f"the scans, where a later run takes them for a subject or writes into a subject's folder. Fix: "
                      f"choose an --output_dir outside {data} (e.g. {data.parent / (data.name + '_cmer')}).")


def claim_output_dir(output_dir, overwrite: bool = False, patterns: Sequence[str] = ("*/*_mask.nii.gz",),
                     checkpoints: Sequence | None = None, subjects: Sequence | None = None) -> Path:
    """Refuse a folder that already holds results, unless `overwrite`; refuse a run that would
    leave the folder with two models' outputs (the rule in the module docstring).

    Args:
        output_dir: the run's output folder.
        overwrite: True replaces earlier results (files the bundle did not write are kept).
        patterns: glob patterns of result files (relative to output_dir).
        checkpoints: the checkpoint files whose outputs this run writes (None: not checked).
        subjects: the subject ids this run writes (None: not checked; given: files at the names it writes
            that no run of this bundle wrote are refused, with or without `overwrite`).
    """
    found = earlier_results(output_dir, patterns)
    if subjects is not None:
        foreign = foreign_outputs(output_dir, subjects)
        if foreign:
            shown = ", ".join(str(p.relative_to(output_dir)) for p in foreign[:3])
            raise BundleError(f"--output_dir {output_dir} holds {len(foreign)} file(s) where this run writes its outputs "
                              f"that no run of this bundle wrote (not in its {MANIFEST_NAME}; e.g. {shown}); they are "
                              f"never replaced, even with --overwrite true. Fix: move them out of {output_dir}, or choose "
                              f"another --output_dir.")
        listed = set(earlier_results(output_dir, ()))
        if found and not listed and not as_flag(overwrite, "overwrite"):
            shown = ", ".join(str(p.relative_to(output_dir)) for p in found[:3])
            raise BundleError(f"--output_dir {output_dir} holds {len(found)} file(s) named like results that no run of "
                              f"this bundle wrote (not in its {MANIFEST_NAME}; e.g. {shown}). Fix: choose another "
                              f"--output_dir, or pass --overwrite true to write beside them (they are kept).")
    if found and not as_flag(overwrite, "overwrite"):
        shown = ", ".join(str(p.relative_to(output_dir)) for p in found[:3])
        raise BundleError(f"--output_dir {output_dir} already holds results of an earlier run ({len(found)} files, e.g. "
                        f"{shown}). Fix: pass --overwrite true to replace them, or choose another --output_dir.")
    if found and checkpoints is not None and subjects is not None:
        _check_one_model(Path(output_dir), [checkpoint_digest(p) for p in checkpoints], {str(s) for s in subjects})
    return Path(output_dir)


def _check_one_model(folder: Path, ours: list, subjects: set) -> None:
    if None in ours:
        return  # a checkpoint is missing: the run stops on it with its own message
    files = read_manifest(folder)
    left: dict[str, set] = {}
    for entry, writer in read_written_by(folder).items():
        digest, subject = writer.get("checkpoint"), str(writer.get("subject"))
        if digest is None or digest in ours or subject in subjects:
            continue
        if any((folder / p).is_file() for p in files.get(entry, [])):
            left.setdefault(digest, set()).add(subject)
    if left:
        others = sorted({s for group in left.values() for s in group})
        raise BundleError(f"--output_dir {folder} holds outputs of another checkpoint ({', '.join(sorted(left))}; this "
                          f"run's: {', '.join(ours)}) for {len(others)} subject(s) this run does not write (e.g. "
                          f"{', '.join(others[:3])}): the folder would mix two models' outputs. Fix: rerun every "
                          f"subject of that folder with --overwrite true (no --subject), or choose another --output_dir.")
