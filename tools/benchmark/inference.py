"""The benchmark's `inference` part: seconds per four-modality volume end to end through
configs/inference.yaml, against the bare networks' forward over the same slices.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import torch

from scripts.common import MODALITIES
from tools.benchmark.core import BUNDLE_ROOT, MAX_INFERENCE_RATIO, Row, Settings, build_network, now, timed, verdict


def save_checkpoint(network, path: Path) -> Path:
    torch.save(network.state_dict(), path)
    return path


def subject_dataset(record: dict, root: Path, copies: int) -> Path:
    """A dataset folder with `copies` subjects (hard links or copies of one subject's files)."""
    import shutil

    for i in range(copies):
        subject = f"Bench_{i:03d}"
        folder = root / subject
        folder.mkdir(parents=True, exist_ok=True)
        sources = {**{("t1ce" if m == "t1c" else m): p for m, p in record["images"].items()}, "seg": record["seg"]}
        for name, source in sources.items():
            target = folder / f"{subject}_{name}.nii.gz"
            if not target.exists():
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy(source, target)
    return root


def inference_through_config(s: Settings, dataset_dir: Path, ckpt: Path, out_dir: Path) -> tuple[list[float], object]:
    """configs/inference.yaml run through MONAI's ConfigParser; seconds per volume and its network."""
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    import scripts.workflows.inference as inference

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["dataset_dir"] = str(dataset_dir)
    parser["output_dir"] = str(out_dir)
    parser["ckpt_path"] = str(ckpt)
    parser["base_channels"] = s.base_channels
    parser["spatial_size"] = [s.largest, s.largest]
    parser["device"] = f"$torch.device('{s.device}')"
    parser["num_workers"] = 0
    evaluator = parser.get_parsed_content("evaluator")
    seconds, started = [], [0.0]
    # Per subject: from fetching it (read + preprocess in the loader) to its files written.
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, lambda e: started.__setitem__(0, now()))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seconds.append(now() - started[0]))
    with contextlib.redirect_stdout(io.StringIO()):  # its per-subject lines would break the table
        inference.run_engine(evaluator)
    return seconds, parser.get_parsed_content("network")


def inference_from_pieces(s: Settings, record: dict, network, out_dir: Path) -> list[float]:
    """Fallback without the bundle config: preprocessing + scripts.model.cams + fusion + NIfTI write."""
    import nibabel as nib

    from scripts.data.volumes import preprocess_subject
    from scripts.workflows.map_engine import volume_maps
    from scripts.model.cams import binarise, fuse_maps

    seconds = []
    for i in range(s.inference_volumes):
        start = now()
        volume = preprocess_subject(record, (s.largest, s.largest))["image"]
        maps = volume_maps(network, torch.from_numpy(volume), "cam", s.slice_batch_size)
        fused = fuse_maps(torch.stack(list(maps.values()))[None], "max")[0].numpy()
        nib.save(nib.Nifti1Image(fused.astype(np.float32), np.eye(4)), str(out_dir / f"fused_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(binarise(fused).astype(np.uint8), np.eye(4)), str(out_dir / f"mask_{i}.nii.gz"))
        seconds.append(now() - start)
    return seconds


def bare_forward_seconds(network, record: dict, s: Settings) -> float:
    """The K networks' forward alone over the same slices, already on the device."""
    from scripts.data.volumes import preprocess_subject

    volume = torch.from_numpy(preprocess_subject(record, (s.largest, s.largest))["image"])
    slices = volume.permute(3, 0, 1, 2).contiguous().to(s.device)  # (D, K, H, W)
    network.eval()

    def forward_all() -> None:
        with torch.no_grad():
            for start in range(0, slices.shape[0], s.slice_batch_size):
                chunk = slices[start:start + s.slice_batch_size]
                for k, net in enumerate(network.nets):
                    net(chunk[:, k:k + 1])

    forward_all()  # warm-up
    return timed(forward_all, s.device)


def inference_rows(s: Settings, work: Path, record: dict) -> list[Row]:
    network = build_network(len(MODALITIES), s)
    ckpt = save_checkpoint(network, work / "model.pt")
    out_dir = work / "inference_out"
    out_dir.mkdir(exist_ok=True)
    how = "configs/inference.yaml"
    # the bundle config needs PyYAML (and the bundle's inference workflow): else the same pieces by hand
    if importlib.util.find_spec("yaml") is None or importlib.util.find_spec("scripts.workflows.inference") is None:
        how = "pieces (no PyYAML or scripts.workflows.inference)"
    if how == "configs/inference.yaml":
        dataset_dir = subject_dataset(record, work / "inference_in", s.inference_volumes)
        seconds, network = inference_through_config(s, dataset_dir, ckpt, out_dir)
    else:
        seconds = inference_from_pieces(s, record, network, out_dir)
    per_volume = seconds[-1]
    bare = bare_forward_seconds(network, record, s)
    ratio = per_volume / bare
    shape = f"{s.largest}x{s.largest}x{s.volume_depth}"
    return [Row("inference", f"end to end, {shape}, 4 modalities ({how})", f"{per_volume:.2f} s/volume",
                f"bare forward of the 4 nets: {bare:.2f} s", f"{ratio:.2f}", f"<= {MAX_INFERENCE_RATIO}",
                verdict(ratio <= MAX_INFERENCE_RATIO))]
