"""Issue #23, finding 4: raw tracebacks where one line with the fix is promised.

A truncated model.pt at inference ended in MONAI's "Failed to evaluate ConfigExpression", a
training --output_dir that cannot be written in a PermissionError from the TensorBoard
writer after the data were prepared, a read-only dataset folder in a PermissionError on the
datalist's temporary file, and a missing modality suggested `allow_missing=True`, which the
command line rejected as unknown. Each now ends in one line naming the file and the fix,
and `--allow_missing true` is a real setting. (Tests run as root, where chmod does not bite:
unwritable places are a path below a file, or an OSError injected where the write happens.)
"""

from __future__ import annotations

import errno

import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.data import datalist as datalist_module
from scripts.data.datalist import ensure_dataset
from scripts.data.subjects import DataError
from scripts.model.networks import MultiModalCAM
from scripts.runtime import StorageError, check_overrides, one_line, project_error, release_locks
from tests.safety_data import META, REPO, TINY_TRAIN, TRAIN, bundle_command, last_line, write_dataset, write_subject

torch.set_num_threads(1)


def _training(tmp_path, data, **override) -> ConfigWorkflow:
    settings = {"dataset_dir": str(data), "cache_dir": str(tmp_path / "cache"), "ckpt_dir": str(tmp_path / "models"),
                "output_dir": str(tmp_path / "runs"), **TINY_TRAIN, **override}
    return ConfigWorkflow(config_file=TRAIN, meta_file=META, logging_file=False, run_id="training",
                          bundle_root=str(REPO), **settings)


def test_a_truncated_model_pt_at_inference_is_one_line_naming_it(tmp_path):
    write_subject(tmp_path / "in", "Case01")
    model = tmp_path / "model.pt"
    torch.save(MultiModalCAM(["t1", "t1c", "t2", "flair"], base_channels=4).state_dict(), model)
    model.write_bytes(model.read_bytes()[:300])
    result = bundle_command("inference", "--config_file", "configs/inference.yaml", "--dataset_dir",
                            str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(model))
    assert result.returncode != 0
    line = last_line(result)
    assert line.startswith(f"UnreadableCheckpoint: checkpoint {model} is unreadable (RuntimeError: "), line
    assert "truncated or corrupt" in line and "Fix: copy or export it again" in line
    assert "Failed to evaluate" not in result.stderr and "Traceback" not in result.stderr


def test_an_unwritable_training_output_dir_stops_in_initialize(tmp_path):
    data = write_dataset(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    workflow = _training(tmp_path, data, output_dir=str(blocker / "runs"))
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    error = project_error(caught.value)
    release_locks()
    assert isinstance(error, StorageError), caught.value
    assert one_line(error).startswith(f"StorageError: --output_dir {blocker / 'runs'} is not writable (")
    assert "Fix: free space or fix the permissions, or pass another --output_dir DIR." in str(error)
    assert not (tmp_path / "cache").exists()  # nothing prepared before the check


def test_a_read_only_dataset_folder_suggests_another_datalist_path(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data")

    def read_only(target, obj):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(datalist_module, "atomic_write_json", read_only)
    with pytest.raises(DataError) as caught:
        ensure_dataset(data, split=[2, 1, 1], make_phantom=False)
    line = one_line(caught.value)
    assert line.startswith(f"DataError: cannot write the datalist {data / 'datalist.json'} (Permission denied)")
    assert "Fix: pass --datalist_path to a writable place" in line
    monkeypatch.undo()
    elsewhere = tmp_path / "lists" / "data.json"
    assert ensure_dataset(data, datalist=str(elsewhere), split=[2, 1, 1], make_phantom=False) == str(elsewhere)


def test_a_missing_modality_names_a_setting_the_command_line_accepts(tmp_path):
    data = write_dataset(tmp_path / "data")
    next(data.glob("Sub_000/*_flair.nii.gz")).unlink()
    workflow = _training(tmp_path, data)
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    release_locks()
    error = project_error(caught.value)
    assert isinstance(error, DataError) and "missing modality file(s) ['flair']" in str(error)
    assert "pass --allow_missing true to zero-fill missing modalities" in one_line(error)
    check_overrides([TRAIN], ["allow_missing"])  # a known setting: no "unknown setting" error
    workflow = _training(tmp_path, data, allow_missing="true")  # as the command line passes it
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert (tmp_path / "models" / "model.pt").is_file()
