"""Inference (configs/inference.yaml, scripts/workflows/inference.py) on tiny NIfTI volumes written here.

Geometry is checked with a stand-in network whose tumour map is its input, so a region
painted bright in the input must come back as the mask on exactly the same voxels, on
non-RAS grids whose in-plane size is both padded and cropped by the preprocessing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigWorkflow

from scripts.data.subjects import DataError
from scripts.workflows.inference import LoadSubjectd, find_inputs, record_from_files, require_checkpoint, subject_from_files
from tests.stand_ins import CopyNet

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "inference.yaml")
META = str(REPO / "configs" / "metadata.json")
FILE_TOKENS = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}
SHAPE = (20, 12, 10)  # after RAS reorientation one in-plane axis is cropped to 16, one padded
# i -> posterior, j -> superior, k -> left: axis codes PSL (permuted and flipped)
PERMUTED = np.array([[0.0, 0.0, -2.0, 30.0], [-1.5, 0.0, 0.0, 20.0], [0.0, 1.0, 0.0, -10.0], [0.0, 0.0, 0.0, 1.0]])
LPS = np.diag([-1.5, -1.0, 2.0, 1.0]) + np.array([[0, 0, 0, 12.0], [0, 0, 0, 8.0], [0, 0, 0, -5.0], [0, 0, 0, 0]])
PAINT = (slice(8, 12), slice(4, 7), slice(3, 6))

class CopyCAM(nn.Module):
    """MultiModalCAM-shaped stand-in (`modalities`, `nets`)."""

    def __init__(self, modalities=("t1", "t1c", "t2", "flair")):
        super().__init__()
        self.modalities = list(modalities)
        self.nets = nn.ModuleList([CopyNet() for _ in self.modalities])


def write_subject(root: Path, subject: str, modalities=("t1", "t1c", "t2", "flair"), affine=PERMUTED,
                  shape=SHAPE, dtype=np.float32, painted=("flair",)) -> Path:
    """A subject folder in BraTS 2020 naming: a constant 'brain' box, `painted` modalities
    with a bright region at PAINT."""
    folder = root / subject
    folder.mkdir(parents=True, exist_ok=True)
    for modality in modalities:
        volume = np.zeros(shape, dtype=dtype)
        volume[3:17, 2:10, 2:8] = 100
        if modality in painted:
            volume[PAINT] = 400
        nib.save(nib.Nifti1Image(volume, affine), folder / f"{subject}_{FILE_TOKENS[modality]}.nii.gz")
    return folder


def painted_mask(shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[PAINT] = 1
    return mask


def workflow(**override) -> ConfigWorkflow:
    # spacing 0: every input keeps its own spacing (these tests check the exact voxel geometry)
    settings = {"bundle_root": str(REPO), "base_channels": 4, "spatial_size": [16, 16], "spacing": 0,
                "device": "$torch.device('cpu')", **override}
    return ConfigWorkflow(config_file=CONFIG, meta_file=META, workflow_type="infer", **settings)


def run_inference(**override) -> ConfigWorkflow:
    wf = workflow(**override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def no_temp_files(root: Path) -> bool:
    """No temporary files (the run's manifest and, while its process lives, its lock aside)."""
    kept = {".manifest.json", ".cmer.lock"}
    return not [p for p in root.rglob("*") if (p.name.startswith(".") and p.name not in kept) or ".tmp" in p.name]


# ---------------------------------------------------------------------------------------


def test_config_has_the_inference_properties(tmp_path, checkpoint):
    write_subject(tmp_path / "in", "Case00", affine=np.eye(4), shape=(16, 16, 8))
    wf = workflow(dataset_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), ckpt_path=checkpoint)
    wf.initialize()
    assert wf.check_properties() == []
    for key in ("bundle_root", "device", "dataset_dir", "dataset", "evaluator", "network_def", "inferer",
                "modalities", "base_channels", "backbone", "spatial_size", "ckpt_path", "output_dir",
                "threshold", "fusion", "method", "gate", "tta"):
        assert key in wf.parser, key


@pytest.mark.parametrize("affine", [PERMUTED, LPS], ids=["permuted_PSL", "LPS"])
def test_outputs_keep_the_input_geometry_and_the_mask_lands_on_the_painted_voxels(tmp_path, affine, capsys):
    data = tmp_path / "in"
    write_subject(data, "Case01", modalities=("t1", "flair"), affine=affine, dtype=np.int16)
    out = tmp_path / "out"
    run_inference(dataset_dir=str(data), output_dir=str(out), ckpt_path=str(tmp_path / "unused.pt"),
                  network=CopyCAM(), handlers=["@progress"], gate=False, fusion="max",  # the painted voxels: one map
                  inference=["$scripts.workflows.inference.run_engine(@evaluator)"])
    folder = out / "Case01"
    assert outputs(folder) == ["Case01_cam_flair.nii.gz", "Case01_cam_fused.nii.gz", "Case01_cam_t1.nii.gz",
                               "Case01_mask.nii.gz"]
    source = nib.load(data / "Case01" / "Case01_flair.nii.gz")
    for path in folder.iterdir():
        image = nib.load(path)
        assert image.shape == SHAPE
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-6)
        assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(source.affine)
    mask = nib.load(folder / "Case01_mask.nii.gz")
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask.dataobj), painted_mask())
    fused = nib.load(folder / "Case01_cam_fused.nii.gz")
    assert fused.get_data_dtype() == np.float32
    assert "s/volume" in capsys.readouterr().out


def test_missing_modalities_run_the_present_networks_only(tmp_path, checkpoint, capsys):
    data = tmp_path / "in"
    folder = write_subject(data, "Case02", affine=np.eye(4), shape=(16, 16, 8))
    out = tmp_path / "out"
    run_inference(dataset_dir=str(folder), output_dir=str(out), ckpt_path=checkpoint)
    assert len(outputs(out / "Case02")) == 6
    for token in ("t1ce", "t2"):  # rerun into the same folder without two modalities
        (folder / f"Case02_{token}.nii.gz").unlink()
    run_inference(dataset_dir=str(folder), output_dir=str(out), ckpt_path=checkpoint, overwrite=True)
    assert outputs(out / "Case02") == ["Case02_cam_flair.nii.gz", "Case02_cam_fused.nii.gz",
                                       "Case02_cam_t1.nii.gz", "Case02_mask.nii.gz"]
    printed = capsys.readouterr().out
    assert "networks t1, flair (no input for t1c, t2)" in printed
    maps = [np.asarray(nib.load(out / "Case02" / f"Case02_cam_{m}.nii.gz").dataobj) for m in ("t1", "flair", "fused")]
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps)
    np.testing.assert_allclose(maps[2], np.maximum(maps[0], maps[1]), atol=1e-6)
    assert no_temp_files(out)


def test_an_unreadable_file_stops_with_subject_and_file_and_leaves_no_partial_output(tmp_path, checkpoint):
    data = tmp_path / "in"
    write_subject(data, "A_good", affine=np.eye(4), shape=(16, 16, 8))
    bad = write_subject(data, "B_bad", affine=np.eye(4), shape=(16, 16, 8)) / "B_bad_t2.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a gzip stream")
    out = tmp_path / "out"
    with pytest.raises(Exception) as caught:
        run_inference(dataset_dir=str(data), output_dir=str(out), ckpt_path=checkpoint)
    # MONAI's config parser wraps the error of a `$` expression; run_engine makes the DataError
    # its direct cause (not buried under MONAI's transform wrappers).
    error = caught.value if isinstance(caught.value, DataError) else caught.value.__cause__
    assert isinstance(error, DataError)
    message = str(error)
    assert "B_bad" in message and str(bad) in message and "Fix" in message
    assert len(outputs(out / "A_good")) == 6  # 4 CAMs, fused, mask: the subject before is complete
    assert not (out / "B_bad").exists()
    assert no_temp_files(out)


def test_mismatched_shapes_name_the_subject_and_both_files(tmp_path):
    data = tmp_path / "in"
    folder = write_subject(data, "Case03", modalities=("t1", "flair"), affine=np.eye(4), shape=(16, 16, 8))
    nib.save(nib.Nifti1Image(np.ones((16, 16, 9), np.float32), np.eye(4)), folder / "Case03_t2.nii.gz")
    (record,) = find_inputs(data)
    with pytest.raises(DataError) as caught:
        LoadSubjectd()(record)
    message = str(caught.value)
    assert "Case03" in message and "Case03_t2.nii.gz" in message and "Case03_t1.nii.gz" in message
    assert "(16, 16, 9)" in message and "Fix" in message


def test_a_4d_image_record_in_monai_label_style(tmp_path):
    volume = np.zeros((16, 16, 8, 2), np.float32)
    volume[2:14, 2:14, 1:7] = 100
    nib.save(nib.Nifti1Image(volume, LPS), tmp_path / "case_4d.nii.gz")
    loaded = LoadSubjectd(["t2", "flair", "t1"])({"image": str(tmp_path / "case_4d.nii.gz"), "channels": ["flair", "t2"]})
    assert loaded["subject"] == "case_4d" and loaded["modalities"] == ["t2", "flair"] and loaded["missing"] == ["t1"]
    assert loaded["image"].shape == (2, 16, 16, 8) and loaded["input_shape"] == (16, 16, 8)
    np.testing.assert_allclose(loaded["input_affine"], LPS)


def test_files_override_and_subject_names(tmp_path):
    folder = write_subject(tmp_path, "BraTS19_X", modalities=("t1", "flair"), affine=np.eye(4), shape=(16, 16, 8))
    files = {"T1": str(folder / "BraTS19_X_t1.nii.gz"), "t2f": str(folder / "BraTS19_X_flair.nii.gz")}
    record = record_from_files(str(files))  # the literal string a command line passes
    assert record["subject"] == "BraTS19_X" and sorted(record["images"]) == ["flair", "t1"]
    assert find_inputs(None, files, subject="mine")[0]["subject"] == "mine"
    assert subject_from_files(["/x/scan.nii.gz"]) == "scan"
    with pytest.raises(DataError, match="unknown modality"):
        record_from_files({"pd": "a.nii.gz"})
    with pytest.raises(DataError, match="does not exist"):
        LoadSubjectd()(record_from_files({"t1": str(tmp_path / "missing.nii.gz")}))
    with pytest.raises(FileNotFoundError, match="--ckpt_path"):
        require_checkpoint(tmp_path / "none.pt")


def test_command_line_with_files(tmp_path, checkpoint):
    folder = write_subject(tmp_path / "in", "Case04", modalities=("t1", "t2"), affine=LPS, shape=(16, 16, 8),
                           painted=("t2",))
    files = {"t1": str(folder / "Case04_t1.nii.gz"), "t2": str(folder / "Case04_t2.nii.gz")}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", CONFIG,
               "--meta_file", META, "--files", str(files), "--subject", "cli_case", "--output_dir", str(out),
               "--ckpt_path", checkpoint, "--base_channels", "4", "--spatial_size", "[16,16]", "--spacing", "0",
               "--device", "$torch.device('cpu')"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert outputs(out / "cli_case") == ["cli_case_cam_fused.nii.gz", "cli_case_cam_t1.nii.gz",
                                         "cli_case_cam_t2.nii.gz", "cli_case_mask.nii.gz"]
    assert "cli_case: networks t1, t2 (no input for t1c, flair)" in done.stdout
    np.testing.assert_allclose(nib.load(out / "cli_case" / "cli_case_mask.nii.gz").affine, LPS, atol=1e-6)
