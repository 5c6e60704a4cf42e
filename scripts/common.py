"""Small shared pieces: modality names and atomic file writes (seeding is MONAI's set_determinism).

Every module that writes a file goes through `atomic_path` so that a crash never leaves a
half-written output next to a good one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

# Canonical modality names used everywhere in the project, in the paper's order.
MODALITIES: tuple[str, ...] = ("t1", "t1c", "t2", "flair")

# Names found in the wild -> canonical name (BraTS 2018-2021, BraTS 2023+, MSD Task01).
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1", "t1n": "t1", "t1w": "t1", "t1native": "t1",
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1post": "t1c",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "t2flair": "flair",
}

# The list of files a run of this bundle wrote into an output folder (scripts.workflows.output_files);
# here so that discovery (scripts.data.subjects) never reads such a folder as input data.
OUTPUT_MANIFEST = ".manifest.json"

# Index of the tumour channel in a network's 2-channel output (0 = healthy / background).
TUMOUR_CHANNEL = 1


def canonical_modality(name: str) -> str:
    """Map any known spelling of a modality to t1 / t1c / t2 / flair."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in MODALITY_ALIASES:
        raise ValueError(
            f"unknown modality {name!r}: expected one of {sorted(MODALITY_ALIASES)} "
            f"(canonical names: {list(MODALITIES)})"
        )
    return MODALITY_ALIASES[key]


def canonical_modalities(names) -> list[str]:
    """Normalise a list of modality names, rejecting duplicates."""
    if isinstance(names, str):
        names = [names]
    out = [canonical_modality(n) for n in names]
    if len(set(out)) != len(out):
        raise ValueError(f"modalities {list(names)} name the same modality twice")
    if not out:
        raise ValueError("at least one modality must be selected")
    return out


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` on success.

    The temporary file keeps the target's suffixes (writers such as nibabel choose the
    format from the extension) and lives in the same folder, so the final `os.replace`
    is atomic. On error the temporary file is removed and `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes owner-only files; outputs are meant to be shared
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def atomic_write_json(target: str | os.PathLike, obj) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, target: str | os.PathLike) -> None:
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
