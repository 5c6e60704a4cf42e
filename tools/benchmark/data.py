"""The benchmark's `data` part: slices/s the training DataLoader delivers from the cache, and
the time to decode + cache one BraTS-size subject.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scripts.common import MODALITIES
from tools.benchmark.core import MIN_LOADER_MARGIN, Row, Settings, now, train_config_value, verdict


def write_synthetic_subject(folder: Path, subject: str, shape: tuple[int, int, int], seed: int = 0) -> dict:
    """BraTS-layout NIfTI files (int16 images, uint8 seg) of an ellipsoid brain with a tumour."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2 < 1.0
    tumour = (x - 0.3) ** 2 + (y - 0.2) ** 2 + (z - 0.1) ** 2 < 0.2**2
    contrasts = {"t1": (400, -120), "t1ce": (420, 250), "t2": (300, 350), "flair": (350, 300)}
    files = {}
    for name, (tissue, lesion) in contrasts.items():
        volume = brain * (tissue + 20.0 * x + rng.normal(0.0, 15.0, shape)) + tumour * lesion
        path = folder / f"{subject}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(volume, 0, 32000).astype(np.int16), np.eye(4)), str(path))
        files[name] = str(path)
    seg_path = folder / f"{subject}_seg.nii.gz"
    nib.save(nib.Nifti1Image((tumour * 2).astype(np.uint8), np.eye(4)), str(seg_path))
    images = {"t1": files["t1"], "t1c": files["t1ce"], "t2": files["t2"], "flair": files["flair"]}
    return {"subject": subject, "grade": None, "images": images, "seg": str(seg_path)}


def loader_slices_per_second(record: dict, cache, s: Settings) -> tuple[float, int, int]:
    """Slices/s of train.yaml's DataLoader over the cached subject, two full passes."""
    from scripts.data.slices import SliceDataset

    batch_size, workers = train_config_value("batch_size"), train_config_value("num_workers")
    dataset = SliceDataset([record], cache, modalities=MODALITIES)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    delivered, start = 0, now()
    for _ in range(2):
        for batch in loader:
            delivered += batch["image"].shape[0]
    return delivered / (now() - start), batch_size, workers


def data_rows(s: Settings, work: Path, consumed: dict) -> tuple[list[Row], dict]:
    from scripts.data.volumes import VolumeCache

    size, shape = s.largest, (s.largest, s.largest, s.volume_depth)
    record = write_synthetic_subject(work / "data" / "Bench_000", "Bench_000", shape)
    cache = VolumeCache(work / "cache", spatial_size=(size, size))
    start = now()
    cache.info(record)  # decode the five NIfTI files, MONAI preprocessing, write the memory-mapped cache
    build_s = now() - start
    rows = [Row("data", f"decode + cache one subject {'x'.join(map(str, shape))}, 4 modalities + seg",
                f"{build_s:.2f} s", verdict=verdict(None))]
    delivered, batch_size, workers = loader_slices_per_second(record, cache, s)
    k = max(s.ks)
    need = consumed.get((k, size))
    if need is None:
        rows.append(Row("data", "loader from cache", f"{delivered:.1f} slices/s", "training figure missing",
                        verdict="n/a"))
    else:
        margin = delivered / need
        rows.append(Row("data", f"loader from cache ({size}x{size}, batch {batch_size}, {workers} workers)",
                        f"{delivered:.1f} slices/s", f"training K={k} {size}x{size} consumes {need:.2f} slices/s",
                        f"{margin:.1f}x", f">= {MIN_LOADER_MARGIN:g}x", verdict(margin >= MIN_LOADER_MARGIN)))
    return rows, record
