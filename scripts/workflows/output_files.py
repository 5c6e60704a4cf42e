"""Where a run's output files go, and what it may replace or delete.

- `file_name` maps a subject id to a folder / file name stem: reversible (`subject_id`
  undoes it), collision-free (percent-encoding, so `a b` and `a_b` stay apart) and unable to
  leave the output folder (`.`, `..`, absolute ids and path separators are refused).
- `check_distinct_names` refuses two subjects whose names differ only in case (one file on
  case-insensitive file systems).
- `OutputManifest` lists every file a run wrote (`<output_dir>/.manifest.json`); a rerun
  removes a subject's earlier files only when the manifest says a run of this bundle wrote
  them, so a user's own files in the folder are never deleted.
- `claim_output_dir` refuses to write into a folder that already holds results unless the
  user passes `--overwrite true`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote, unquote

from scripts.common import atomic_write_json
from scripts.data.subjects import DataError
from scripts.runtime import BundleError, as_flag

MANIFEST_NAME = ".manifest.json"
MAX_NAME_BYTES = 200  # leaves room for '_cam_flair.nii.gz' and temp-file affixes under 255


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


class OutputManifest:
    """The files a run of this bundle wrote into `output_dir` (relative paths per subject).

    Each record reads the manifest on disk again and rewrites it atomically, so an interrupted
    run still lists everything it wrote, and several writers of one run (the CAM and the
    stage-2 outputs of `serve: both`, one subject after the other) keep each other's entries.
    """

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / MANIFEST_NAME
        self._files: dict[str, list[str]] | None = None

    def _load(self) -> dict[str, list[str]]:
        if self._files is None:
            self._files = read_manifest(self.output_dir)
        return self._files

    def earlier_files(self, subject) -> list[Path]:
        """Files an earlier run wrote for `subject` (that still exist)."""
        return [self.output_dir / p for p in self._load().get(str(subject), []) if (self.output_dir / p).is_file()]

    def record(self, subject, files: Sequence[os.PathLike]) -> None:
        entries = read_manifest(self.output_dir)  # another writer's entries since our last read stay
        entries[str(subject)] = [Path(os.path.relpath(f, self.output_dir)).as_posix() for f in files]
        atomic_write_json(self.path, {"version": 1, "files": entries})
        self._files = entries

    def replace(self, subject, files: Sequence[os.PathLike]) -> list[Path]:
        """Record `files` for `subject`; delete the subject's earlier files not among them
        (e.g. a modality's map from a run with other inputs). Returns the deleted files."""
        kept = {Path(f).absolute() for f in files}
        stale = [p for p in self.earlier_files(subject) if p.absolute() not in kept]
        self.record(subject, files)
        for path in stale:
            path.unlink(missing_ok=True)
        return stale


def read_manifest(output_dir) -> dict[str, list[str]]:
    path = Path(output_dir) / MANIFEST_NAME
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise DataError(f"output manifest {path} is unreadable ({err}). Fix: delete it (the results it lists are "
                        f"then treated as your own files and never deleted), or pass another --output_dir.") from err
    return {str(k): [str(p) for p in v] for k, v in dict(content.get("files", {})).items()}


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


def claim_output_dir(output_dir, overwrite: bool = False, patterns: Sequence[str] = ("*/*_mask.nii.gz",)) -> Path:
    """Refuse a folder that already holds results, unless `overwrite`.

    Args:
        output_dir: the run's output folder.
        overwrite: True replaces earlier results (files the bundle did not write are kept).
        patterns: glob patterns of result files (relative to output_dir).
    """
    found = earlier_results(output_dir, patterns)
    if found and not as_flag(overwrite, "overwrite"):
        shown = ", ".join(str(p.relative_to(output_dir)) for p in found[:3])
        raise BundleError(f"--output_dir {output_dir} already holds results of an earlier run ({len(found)} files, e.g. "
                        f"{shown}). Fix: pass --overwrite true to replace them, or choose another --output_dir.")
    return Path(output_dir)
