"""A run is what it says it is: a rerun on a --ckpt_dir of another run is refused.

Issue #23, finding 1: training CMER and then SEAM with --lr 0.01 on the same --ckpt_dir
exited 0, said "resumed at epoch 3", made no step and printed the CMER run's validation
table as its own. last.pt now records the settings that define a run (RunSettings) and a
rerun with others stops naming each difference; `epochs` may differ (extending a run);
`--resume false` starts over. The method presets write to their own folders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.runtime import one_line, project_error
from scripts.workflows.checkpoints import CheckpointError, RunSettings, data_fingerprint
from tests.safety_data import META, REPO, TINY_TRAIN, TRAIN, write_dataset

torch.set_num_threads(1)
METHODS = sorted(p.stem for p in (REPO / "configs" / "methods").glob("*.yaml"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("identity") / "data")


def _train(data, ckpt_dir: Path, method: str | None = None, **override):
    files = [TRAIN] + ([str(REPO / "configs" / "methods" / f"{method}.yaml")] if method else [])
    workflow = ConfigWorkflow(config_file=files, meta_file=META, logging_file=False, run_id="training",
                              bundle_root=str(REPO), dataset_dir=str(data), cache_dir=str(data.parent / "cache"),
                              ckpt_dir=str(ckpt_dir), output_dir=str(ckpt_dir.parent / "runs"),
                              **{**TINY_TRAIN, "precision": "fp32", **override})
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return torch.load(ckpt_dir / "last.pt", weights_only=True)


def test_another_methods_rerun_on_the_same_ckpt_dir_stops_naming_each_difference(data, tmp_path):
    models = tmp_path / "models"
    first = _train(data, models)
    assert first["run_settings"]["method_preset"] == "cmer" and "epochs" not in first["run_settings"]
    best = (models / "model.pt").read_bytes()
    with pytest.raises(Exception) as caught:
        _train(data, models, method="seam_all", lr=0.01)
    error = project_error(caught.value)
    assert isinstance(error, CheckpointError), caught.value
    line = one_line(error)
    print(line)
    assert line.startswith(f"CheckpointError: checkpoint {models / 'last.pt'} was written by another run: ")
    for difference in ("method_preset 'cmer' -> 'seam_all'", "objective#use_kd True -> False",
                       "objective#use_cmer True -> False", "lr 0.001 -> 0.01"):
        assert difference in line, line
    assert "Fix: pass another --ckpt_dir" in line and "--resume false to start over" in line
    assert (models / "model.pt").read_bytes() == best  # nothing written
    assert torch.load(models / "last.pt", weights_only=True)["trainer"] == first["trainer"]


def test_more_epochs_extend_the_run_and_resume_false_starts_over(data, tmp_path):
    models = tmp_path / "models"
    _train(data, models)
    extended = _train(data, models, epochs=2)  # same run, one more epoch
    assert extended["trainer"]["iteration"] == 2 * extended["trainer"]["epoch_length"]
    fresh = _train(data, models, method="seam_all", resume="false")  # the string the command line gives
    assert fresh["run_settings"]["method_preset"] == "seam_all"
    assert fresh["trainer"]["iteration"] == fresh["trainer"]["epoch_length"]  # one epoch from scratch


def test_other_data_is_another_run(data, tmp_path):
    _train(data, tmp_path / "first")
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / "datalist.json").unlink()
    _train(copy, tmp_path / "models")  # writes the copy's datalist again
    same = data_fingerprint(copy / "datalist.json")
    assert same == data_fingerprint(data / "datalist.json")  # a copied dataset keeps its fingerprint
    seg = next(copy.glob("*/*_seg.nii.gz"))
    seg.write_bytes(seg.read_bytes() + b"\0")  # another file
    changed = data_fingerprint(copy / "datalist.json")
    assert changed["subjects_and_split"] == same["subjects_and_split"] and changed["file_sizes"] != same["file_sizes"]
    stored = {"data": same, "lr": 0.001}
    assert RunSettings(data=changed, lr=0.001).differences(stored) == [
        f"data#file_sizes {same['file_sizes']!r} -> {changed['file_sizes']!r}"]


def test_every_method_preset_trains_into_its_own_folders():
    folders = {}
    for method in [None, *METHODS]:
        parser = ConfigParser()
        parser.read_config([TRAIN] + ([str(REPO / "configs" / "methods" / f"{method}.yaml")] if method else []))
        parser["bundle_root"] = "B"
        ckpt_dir, output_dir = parser.get_parsed_content("ckpt_dir"), parser.get_parsed_content("output_dir")
        assert parser.get_parsed_content("method_preset") == (method or "cmer")
        folders[method] = (ckpt_dir, output_dir)
    assert folders[None] == ("B/models", "B/runs/train")  # the main command: models/model.pt
    for method in METHODS:
        assert folders[method] == (f"B/models/{method}", f"B/runs/{method}")
    assert len({f[0] for f in folders.values()}) == len(folders)
