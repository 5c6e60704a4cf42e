"""Tiny hand-made data and runners shared by the safety tests (tests/test_safety_*.py).

Subjects are 16 x 16 x 8 NIfTI volumes in BraTS 2020 naming: a constant brain box with a
bright tumour cube, written in well under a second, so every workflow test stays at seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
META = str(REPO / "configs" / "metadata.json")
TRAIN = str(REPO / "configs" / "train.yaml")
EVALUATE = str(REPO / "configs" / "evaluate.yaml")
INFERENCE = str(REPO / "configs" / "inference.yaml")
SHAPE = (16, 16, 8)
TOKENS = ("t1", "t1ce", "t2", "flair")
# The smallest training settings the configs accept (network and slices).
TINY_TRAIN = {"base_channels": 4, "spatial_size": [16, 16], "batch_size": 4, "epochs": 1, "split": [2, 1, 1],
              "device": "$torch.device('cpu')", "num_workers": 0}


def write_subject(root: Path, subject: str, affine=None, tumour: bool = True, images=None) -> Path:
    """One subject folder; `images` maps a file token to an array that replaces the default."""
    folder = root / subject
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    brain = np.zeros(SHAPE, bool)
    brain[2:14, 2:14, 1:7] = True
    seg = np.zeros(SHAPE, np.uint8)
    if tumour:
        seg[6:10, 6:10, 3:6] = 1
    for index, token in enumerate(TOKENS):
        volume = np.where(brain, 100.0 * (index + 1), 0.0).astype(np.float32)
        volume[seg > 0] = 300.0 * (index + 1)
        if images and token in images:
            volume = np.asarray(images[token], np.float32)
        nib.save(nib.Nifti1Image(volume, affine), folder / f"{subject}_{token}.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), folder / f"{subject}_seg.nii.gz")
    return folder


def write_dataset(root: Path, subjects: int = 4) -> Path:
    for index in range(subjects):
        write_subject(root, f"Sub_{index:03d}")
    return root


def bundle_command(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m monai.bundle run ...` from the repository root, as a user types it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("CMER_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""
