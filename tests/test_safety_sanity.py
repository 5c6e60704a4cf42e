"""Finding 5: confident answers to nonsense.

Random noise at inference gave 39.8 % of voxels "tumour" with exit 0, an all-zero modality
trained as if real, a subject with tumour but no brain was dropped without a word, and a
50-degree oblique header was resliced along the nearest axis silently. These stay warnings
(not errors), now with the numbers (scripts/data/sanity.py).
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor

from scripts.data.slices import SliceDataset
from scripts.data.volumes import VolumeCache
from scripts.data.subjects import discover_subjects
from scripts.model.networks import MultiModalCAM
from scripts.data.sanity import mask_warning, oblique_degrees, volume_warnings
from tests.safety_data import INFERENCE, META, REPO, SHAPE, write_subject

torch.set_num_threads(1)


def rotation_z(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return affine @ np.diag([2.0, 2.0, 2.0, 1.0])


def volume(array, affine=None) -> MetaTensor:
    return MetaTensor(torch.as_tensor(np.asarray(array, np.float32))[None], affine=torch.as_tensor(
        np.eye(4) if affine is None else affine))


def brain() -> np.ndarray:
    array = np.zeros(SHAPE, np.float32)
    array[2:14, 2:14, 1:7] = 100.0
    return array


def test_a_constant_modality_is_named_with_its_value(caplog):
    with caplog.at_level(logging.WARNING):
        messages = volume_warnings({"t1": volume(brain()), "t2": volume(np.zeros(SHAPE))},
                                   {"t1": "s_t1.nii.gz", "t2": "s_t2.nii.gz"}, "S1")
    assert messages == ["subject S1: t2 file s_t2.nii.gz is constant (every voxel = 0); its network gets no "
                        "information from it. Check the file (a failed conversion or an empty export?)."]
    assert messages[0] in caplog.text


def test_an_oblique_header_gives_the_angle_to_the_nearest_axis():
    assert oblique_degrees(rotation_z(30)) == pytest.approx(30.0)
    assert oblique_degrees(rotation_z(50)) == pytest.approx(40.0)  # 50 degrees from x is 40 from y
    assert oblique_degrees(np.diag([-1.0, 2.0, 3.0, 1.0])[[1, 0, 2, 3]]) == pytest.approx(0.0)  # permuted: fine
    (message,) = volume_warnings({"t1": volume(brain(), rotation_z(30))}, {"t1": "a.nii.gz"}, "S2", log=False)
    assert "has an oblique affine (voxel axes 30.0 degrees from the nearest world axes)" in message


def test_training_data_with_an_all_zero_modality_or_no_brain_is_reported(tmp_path, caplog):
    write_subject(tmp_path / "data", "ZeroT2", images={"t2": np.zeros(SHAPE)})
    write_subject(tmp_path / "data", "NoBrain", images={t: np.zeros(SHAPE) for t in ("t1", "t1ce", "t2", "flair")})
    records = discover_subjects(tmp_path / "data")
    cache = VolumeCache(tmp_path / "cache", spatial_size=(16, 16))
    with caplog.at_level(logging.WARNING):
        dataset = SliceDataset(records, cache)
    assert "subject ZeroT2: t2 file" in caplog.text and "is constant (every voxel = 0)" in caplog.text
    assert ("subject NoBrain: no brain-like foreground: 0.00 % of the voxels are non-zero (a skull-stripped brain "
            "fills about 10-30 %); the seg marks 48 tumour voxels, but these slices are left out of training") \
        in caplog.text
    assert "subject NoBrain: no slice has a brain fraction above 0 (48 tumour voxels in its seg)" in caplog.text
    assert set(dataset.subjects) == {"ZeroT2"}
    caplog.clear()  # a second run reads the cache: the dropped subject is still reported
    with caplog.at_level(logging.WARNING):
        SliceDataset(records, VolumeCache(tmp_path / "cache", spatial_size=(16, 16)))
    assert "subject NoBrain: no slice has a brain fraction" in caplog.text


def test_a_mask_covering_most_of_the_brain_is_flagged():
    foreground = torch.ones(10, 10, 4, dtype=torch.bool)
    mask = torch.zeros(10, 10, 4, dtype=torch.bool)
    mask[:4] = True
    (message,) = mask_warning(mask, foreground, "N1", log=False)
    assert message.startswith("subject N1: the mask covers 40.0 % of the brain (whole tumours cover less than 30 %)")
    mask[:] = False
    mask[:2] = True
    assert mask_warning(mask, foreground, "N1", log=False) == []


def test_noise_at_inference_is_not_answered_silently(tmp_path, capsys):
    rng = np.random.default_rng(0)
    noise = {t: rng.normal(100, 30, SHAPE) for t in ("t1", "t1ce", "t2", "flair")}
    write_subject(tmp_path / "in", "Noise", images=noise)
    checkpoint = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(MultiModalCAM(["t1", "t1c", "t2", "flair"], base_channels=4).state_dict(), checkpoint)
    workflow = ConfigWorkflow(config_file=INFERENCE, meta_file=META, workflow_type="infer", bundle_root=str(REPO),
                              base_channels=4, spatial_size=[16, 16], spacing=0,  # the input's grid
                              device="$torch.device('cpu')", fusion="max",  # random nets: their maps' mean stays low
                              dataset_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
                              ckpt_path=str(checkpoint))
    workflow.initialize()  # applies configs/logging.conf: the warnings go to stdout
    workflow.run()
    workflow.finalize()
    printed = capsys.readouterr().out
    assert ("WARNING - subject Noise: 100.0 % of the voxels are non-zero (no zero background); the model was "
            "trained on skull-stripped volumes") in printed
    mask = np.asarray(nib.load(tmp_path / "out" / "Noise" / "Noise_mask.nii.gz").dataobj)
    brain_fraction = mask.mean()  # the whole volume is foreground here
    assert brain_fraction > 0.3 and f"the mask covers {100 * brain_fraction:.1f} % of the brain" in printed
