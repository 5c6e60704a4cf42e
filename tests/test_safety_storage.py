"""Finding 4: storage checked late, cleaned badly.

A read-only or full --ckpt_dir failed only after the first epoch, a full disk left a 1 MB
temp file, a truncated last.pt gave a torch zip error naming neither file nor fix, and a
resume with other network settings printed a 1578-line size mismatch. Now the folder is
checked in `initialize`, failed writes leave nothing, and both checkpoint problems are one
line with the file and the fix (model.pt untouched).
"""

from __future__ import annotations

import errno
from collections import namedtuple

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigWorkflow

from scripts import runtime
from scripts.workflows.checkpoints import AtomicCheckpointSaver, CheckpointError, ResumeFromCheckpoint, RunSettings
from scripts.runtime import StorageError, check_free_space, check_writable, project_error
from tests.safety_data import META, REPO, TINY_TRAIN, TRAIN, write_dataset

torch.set_num_threads(1)
Usage = namedtuple("Usage", "total used free")


def training(tmp_path, **override) -> ConfigWorkflow:
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data)
    return ConfigWorkflow(config_file=TRAIN, meta_file=META, logging_file=False, run_id="training",
                          bundle_root=str(REPO), dataset_dir=str(data), cache_dir=str(tmp_path / "cache"),
                          ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"),
                          **{**TINY_TRAIN, **override})


def test_an_unwritable_folder_is_named_before_anything_runs(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(runtime.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(StorageError, match=r"--ckpt_dir .* is not writable \(Permission denied\)\. Fix: "):
        check_writable(tmp_path / "models", flag="--ckpt_dir")


def test_a_full_ckpt_dir_stops_training_in_initialize_before_epoch_one(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 2**19, 2**19))
    with pytest.raises(StorageError, match=r"has 0\.5 MiB free, but a checkpoint needs"):
        check_free_space(tmp_path, 2**20)
    workflow = training(tmp_path)
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    error = project_error(caught.value)
    assert isinstance(error, StorageError) and "--ckpt_dir" in str(error) and "Fix: free space" in str(error)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".cmer.lock"]  # no epoch ran, nothing saved
    runtime.release_locks()


def test_a_failed_checkpoint_write_leaves_no_temp_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    net = torch.nn.Linear(4, 2)
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"network": net}, save_interval=1,
                                  interval_filename="last.pt")
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    good = (tmp_path / "last.pt").read_bytes()

    def disk_full(obj, target, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"\0" * 2**20)  # 1 MB written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        engine.run([0], max_epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert (tmp_path / "last.pt").read_bytes() == good


def _checkpoint(path, base_channels: int, with_settings: bool = True) -> dict:
    objects = {"network": torch.nn.Conv2d(1, base_channels, 3)}
    if with_settings:
        objects = {"run_settings": RunSettings(modalities=["t1"], base_channels=base_channels), **objects}
    torch.save({k: v.state_dict() for k, v in objects.items()}, path)
    return objects


def test_a_truncated_last_pt_is_named_with_the_fix_and_model_pt_is_untouched(tmp_path):
    last, model = tmp_path / "last.pt", tmp_path / "model.pt"
    objects = _checkpoint(last, 4)
    last.write_bytes(last.read_bytes()[:200])
    model.write_bytes(b"best model")
    loader = ResumeFromCheckpoint(load_path=str(last), load_dict=objects)
    with pytest.raises(CheckpointError) as caught:
        loader(Engine(lambda e, b: None))
    message = str(caught.value)
    assert message.startswith(f"checkpoint {last} is unreadable (") and "truncated or corrupt" in message
    assert "Fix: delete it or use another --ckpt_dir" in message and "\n" not in message
    assert model.read_bytes() == b"best model"


def test_resuming_with_other_network_settings_is_one_line_naming_the_keys(tmp_path):
    last = tmp_path / "last.pt"
    _checkpoint(last, 16)
    now = _checkpoint(tmp_path / "other.pt", 4)
    with pytest.raises(CheckpointError) as caught:
        ResumeFromCheckpoint(load_path=str(last), load_dict=now)(Engine(lambda e, b: None))
    message = str(caught.value)
    assert "was written by another run: base_channels 16 -> 4." in message and "\n" not in message
    _checkpoint(last, 16, with_settings=False)  # a checkpoint without stored settings: the tensors are named
    with pytest.raises(CheckpointError, match=r"2 tensors of 'network' differ, e\.g\. bias, weight"):
        ResumeFromCheckpoint(load_path=str(last), load_dict=now)(Engine(lambda e, b: None))


def test_training_with_a_corrupt_last_pt_stops_at_start_naming_it(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "last.pt").write_bytes(b"PK\x03\x04 truncated zip")
    (models / "model.pt").write_bytes(b"best model")
    workflow = training(tmp_path)
    workflow.initialize()
    with pytest.raises(Exception) as caught:
        workflow.run()
    error = project_error(caught.value)
    assert isinstance(error, CheckpointError) and str(models / "last.pt") in str(error)
    assert (models / "model.pt").read_bytes() == b"best model"
    workflow.finalize()
