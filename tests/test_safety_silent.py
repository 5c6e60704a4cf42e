"""Issue #23, finding 5: things that happened without a word.

A subject folder named `..x` was skipped silently (hidden), segmentation labels outside the
layout's set (3, 7, 255 in BraTS 2018-2021 files) were taken as tumour silently, and
`--overwrite true --subject a_b` with another checkpoint left a folder mixing two models'
outputs. Now the skipped folder and the unexpected labels are warnings with the numbers, and
the manifest records which checkpoint wrote each subject's files: a run that would leave
another model's outputs beside its own is refused (scripts/workflows/output_files.py).
"""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.data.subjects import discover_subjects
from scripts.data.volumes import preprocess_subject
from scripts.model.networks import MultiModalCAM
from scripts.runtime import BundleError, project_error
from scripts.workflows.output_files import MANIFEST_NAME, checkpoint_digest
from tests.safety_data import INFERENCE, META, REPO, SHAPE, write_subject

torch.set_num_threads(1)


def test_a_skipped_hidden_subject_folder_is_named(tmp_path, caplog):
    write_subject(tmp_path, "Sub_000")
    write_subject(tmp_path, "..x")  # files ..x_t1.nii.gz, ... in a folder named ..x
    (tmp_path / ".git").mkdir()  # hidden and holding no scans: not worth a word
    with caplog.at_level(logging.WARNING, logger="scripts.data.subjects"):
        records = discover_subjects(tmp_path)
    assert [r["subject"] for r in records] == ["Sub_000"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"skipped folder {tmp_path / '..x'}: its name starts with '.' (a hidden folder) "
                                  f"but it holds 5 image files")
    assert "Fix: rename it" in warnings[0]


def test_segmentation_labels_outside_the_layouts_set_are_counted(tmp_path, caplog):
    seg = np.zeros(SHAPE, np.uint8)
    seg[6:10, 6:10, 3:6] = 1
    seg[0, 0, :3] = 3
    seg[1, 1, :2] = 7
    seg[2, 2, 0] = 255
    folder = write_subject(tmp_path, "Sub_000")
    nib.save(nib.Nifti1Image(seg, np.diag([2.0, 2.0, 2.0, 1.0])), folder / "Sub_000_seg.nii.gz")
    (record,) = discover_subjects(tmp_path)
    with caplog.at_level(logging.WARNING):
        volume = preprocess_subject(record, spatial_size=[16, 16])
    expected = (f"subject Sub_000: seg file {folder / 'Sub_000_seg.nii.gz'} holds labels outside {{0, 1, 2, 4}} "
                f"(BraTS 2018-2021): 3 (3 voxels), 7 (2 voxels), 255 (1 voxel)")
    assert any(w.startswith(expected) for w in volume["warnings"]), volume["warnings"]
    assert any(r.getMessage().startswith(expected) for r in caplog.records)
    write_subject(tmp_path / "clean", "Sub_001")
    (clean,) = discover_subjects(tmp_path / "clean")
    assert not [w for w in preprocess_subject(clean, spatial_size=[16, 16])["warnings"] if "labels" in w]


def _infer(data, out, checkpoint, **override):
    workflow = ConfigWorkflow(config_file=INFERENCE, meta_file=META, workflow_type="infer", bundle_root=str(REPO),
                              device="$torch.device('cpu')", dataset_dir=str(data), output_dir=str(out),
                              ckpt_path=str(checkpoint), **override)
    try:
        workflow.initialize()
        workflow.run()
    finally:
        workflow.finalize()


def _model(path, seed):
    torch.manual_seed(seed)
    torch.save(MultiModalCAM(["t1", "t1c", "t2", "flair"], base_channels=4, spatial_size=[16, 16]).state_dict(), path)
    return path


def test_a_folder_never_mixes_two_models_outputs(tmp_path):
    data = tmp_path / "in"
    for subject in ("a_b", "c_d"):
        write_subject(data, subject)
    old, new = _model(tmp_path / "old.pt", 0), _model(tmp_path / "new.pt", 1)
    out = tmp_path / "out"
    _infer(data, out, old)
    written_by = json.loads((out / MANIFEST_NAME).read_text())["written_by"]
    assert written_by == {s: {"subject": s, "checkpoint": checkpoint_digest(old)} for s in ("a_b", "c_d")}
    before = (out / "c_d" / "c_d_mask.nii.gz").read_bytes()

    with pytest.raises(Exception) as caught:  # one subject with another model: c_d would stay the old model's
        _infer(data, out, new, overwrite="true", subject="a_b")
    error = project_error(caught.value)
    assert isinstance(error, BundleError), caught.value
    assert str(error).startswith(f"--output_dir {out} holds outputs of another checkpoint ({checkpoint_digest(old)}; "
                                 f"this run's: {checkpoint_digest(new)}) for 1 subject(s) this run does not write "
                                 f"(e.g. c_d): the folder would mix two models' outputs.")
    assert str(error).endswith("Fix: rerun every subject of that folder with --overwrite true (no --subject), or "
                               "choose another --output_dir.")
    assert (out / "c_d" / "c_d_mask.nii.gz").read_bytes() == before

    _infer(data, out, old, overwrite="true", subject="a_b")  # the same model: one subject may be redone
    _infer(data, out, new, overwrite="true")  # the whole folder with the new model
    written_by = json.loads((out / MANIFEST_NAME).read_text())["written_by"]
    assert {w["checkpoint"] for w in written_by.values()} == {checkpoint_digest(new)}
