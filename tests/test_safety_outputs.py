"""Finding 3: output paths from subject ids.

Subject id `..` wrote outside --output_dir, ids that sanitised to one name (`a b`, `a_b`)
overwrote each other, and a rerun deleted any `<id>_cam_*.nii.gz` (a user's
`..._cam_manualedit.nii.gz`) and overwrote earlier results without a word. Now names come
from `scripts.workflows.output_files.file_name` (reversible, collision-free, never outside the folder),
a manifest lists what a run wrote (only those files are ever removed) and a rerun into a
folder with results needs --overwrite true.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.data.subjects import DataError
from scripts.workflows.inference import find_inputs
from scripts.workflows.output_files import MANIFEST_NAME, check_distinct_names, file_name, subject_id
from scripts.runtime import BundleError, project_error
from tests.safety_data import INFERENCE, META, REPO, write_subject

torch.set_num_threads(1)


def infer(data: Path, out: Path, checkpoint: str, **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(config_file=INFERENCE, meta_file=META, workflow_type="infer", bundle_root=str(REPO),
                              base_channels=4, spatial_size=[16, 16], device="$torch.device('cpu')",
                              dataset_dir=str(data), output_dir=str(out), ckpt_path=checkpoint, **override)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.mark.parametrize("subject", ["..", ".", "", "a/b", "/abs", "..\\x"])
def test_ids_that_could_leave_the_output_folder_are_refused(subject):
    with pytest.raises(DataError, match="Fix: rename the subject"):
        file_name(subject)


def test_names_are_reversible_and_distinct_where_sanitising_merged_them():
    ids = ["a b", "a_b", "a%20b", "BraTS19_X", "Über", ".hidden", "x~y", "a:b"]
    names = [file_name(s) for s in ids]
    assert names[:4] == ["a%20b", "a_b", "a%2520b", "BraTS19_X"] and names[5] == "%2Ehidden"
    assert len(set(names)) == len(ids) and [subject_id(n) for n in names] == ids
    assert not any(n.startswith(".") or "/" in n for n in names)
    check_distinct_names(ids)
    with pytest.raises(DataError, match="'Case1' and 'case1' would write the same output files"):
        check_distinct_names(["Case1", "case1"])  # one file on case-insensitive file systems


def test_a_subject_named_dotdot_writes_nothing_outside(tmp_path, checkpoint):
    folder = write_subject(tmp_path / "in", "Case01")
    files = {"t1": str(folder / "Case01_t1.nii.gz")}
    with pytest.raises(DataError, match="'..' cannot be used as an output name"):
        find_inputs(None, files, subject="..")
    out = tmp_path / "out" / "inner"
    with pytest.raises(Exception) as caught:
        infer(tmp_path / "in", out, checkpoint, files=files, subject="..")
    assert isinstance(project_error(caught.value), DataError)
    assert not list((tmp_path / "out").glob("*.nii.gz")) and not list(out.rglob("*.nii.gz"))


def test_ids_a_space_b_and_a_underscore_b_keep_their_own_outputs(tmp_path, checkpoint):
    data = tmp_path / "in"
    write_subject(data, "a b")
    write_subject(data, "a_b")
    out = tmp_path / "out"
    infer(data, out, checkpoint)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "a%20b", "a_b"]
    assert (out / "a%20b" / "a%20b_mask.nii.gz").is_file() and (out / "a_b" / "a_b_mask.nii.gz").is_file()
    manifest = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert sorted(manifest) == ["a b", "a_b"] and len(manifest["a b"]) == 6


def test_a_rerun_is_refused_without_overwrite_and_never_deletes_the_users_files(tmp_path, checkpoint):
    data = tmp_path / "in"
    folder = write_subject(data, "Case02")
    out = tmp_path / "out"
    infer(data, out, checkpoint)
    results = out / "Case02"
    mask_before = (results / "Case02_mask.nii.gz").read_bytes()
    manual = results / "Case02_cam_manualedit.nii.gz"
    manual.write_bytes(b"the user's own edit")
    with pytest.raises(Exception) as caught:
        infer(data, out, checkpoint)
    error = project_error(caught.value)
    assert isinstance(error, BundleError)
    assert str(error).startswith(f"--output_dir {out} already holds results of an earlier run (6 files")
    assert str(error).endswith("Fix: pass --overwrite true to replace them, or choose another --output_dir.")
    assert (results / "Case02_mask.nii.gz").read_bytes() == mask_before
    for token in ("t1ce", "t2"):  # with overwrite: the maps of modalities that did not run go, the edit stays
        (folder / f"Case02_{token}.nii.gz").unlink()
    infer(data, out, checkpoint, overwrite="true")
    assert sorted(p.name for p in results.iterdir()) == ["Case02_cam_flair.nii.gz", "Case02_cam_fused.nii.gz",
                                                        "Case02_cam_manualedit.nii.gz", "Case02_cam_t1.nii.gz",
                                                        "Case02_mask.nii.gz"]
    assert manual.read_bytes() == b"the user's own edit"
    assert not (out / ".cmer.lock").exists()  # released in finalize
