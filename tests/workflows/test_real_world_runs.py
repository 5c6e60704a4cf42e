"""Issue #33, the workflows: real-world folders and options that evaluation and inference handled wrongly.

Tiny subjects (tests/safety_data.py) and an untrained MultiModalCAM (base 4, 16 x 16 slices at
2 mm, the inputs' own grid) reproduce each finding; each test checks what a user now sees:

- case 1: an --output_dir that is, lies inside or contains the input folder is refused;
- case 2: evaluation and inference skip a missing modality's network by one rule (the map engine's);
- case 7: a single-slice input gets single-slice (3D) outputs;
- case 8: --overwrite never replaces a file at an output name that the manifest does not list;
- cases 9, 10: option values outside their choices or range are one line naming the allowed ones;
- case 12: training's last.pt or a stage-2 model given as the CAM model is named as such.

`BAD_OPTIONS` is the table for the next such case: overrides and the start of the last line.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.data.preprocessing import volume_preprocessing
from scripts.data.slices import VolumeDataset
from scripts.data.subjects import discover_subjects
from scripts.data.volumes import VolumeCache
from scripts.model.networks import MultiModalCAM
from scripts.runtime import one_line, project_error, release_locks
from scripts.stage2.model import Stage2Net
from scripts.workflows.inference import CAMMapEvaluator, LoadSubjectd
from scripts.workflows.output_files import MANIFEST_NAME
from tests.safety_data import EVALUATE, INFERENCE, META, REPO, TRAIN, bundle_command, last_line, write_dataset, write_subject

torch.set_num_threads(1)
MODALITIES = ["t1", "t1c", "t2", "flair"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """An untrained CAM model recording the test volumes' own grid (2 mm, 16 x 16): no resampling."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(MultiModalCAM(MODALITIES, base_channels=4, spacing=2.0, spatial_size=[16, 16]).state_dict(), path)
    return path


def _inference(data, out, model, **override) -> ConfigWorkflow:
    settings = {"device": "$torch.device('cpu')", **override}
    return ConfigWorkflow(config_file=INFERENCE, meta_file=META, workflow_type="infer", bundle_root=str(REPO),
                          logging_file=False, dataset_dir=str(data), output_dir=str(out), ckpt_path=str(model),
                          **settings)


def infer(data, out, model, **override) -> None:
    workflow = _inference(data, out, model, **override)
    try:
        workflow.initialize()
        workflow.run()
    finally:
        workflow.finalize()


def refusal(run, *args, **kwargs) -> str:
    """The last line a user sees when `run` stops (the error hook prints `one_line` of the project's error)."""
    with pytest.raises(Exception) as caught:
        run(*args, **kwargs)
    release_locks()
    error = project_error(caught.value)
    assert error is not None, caught.value
    return one_line(error)


# --------------------------------------------------------------------------- case 1


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_an_output_folder_among_the_inputs_is_refused(tmp_path, model, where):
    data = tmp_path / "scans"
    write_subject(data, "Case01")
    out = {"same": data, "inside": data / "results", "contains": tmp_path}[where]
    relation = {"same": "is the input folder", "inside": f"lies inside the input folder --dataset_dir {data}",
                "contains": f"contains the input folder --dataset_dir {data}"}[where]
    line = refusal(infer, data, out, model)
    assert line.startswith(f"BundleError: --output_dir {out} {relation}: outputs (<id>/<id>_cam_<modality>.nii.gz, ...) "
                           f"would sit among the scans"), line
    assert line.endswith(f"Fix: choose an --output_dir outside {data} (e.g. {tmp_path / 'scans_cmer'}).")
    assert not list(out.rglob("*_cam_*")) and [r["subject"] for r in discover_subjects(data)] == ["Case01"]


# --------------------------------------------------------------------------- case 2


def test_evaluation_and_inference_skip_a_missing_modality_alike(tmp_path, model):
    folder = write_subject(tmp_path / "data", "Sub_000")
    (folder / "Sub_000_t1ce.nii.gz").unlink()
    (record,) = discover_subjects(tmp_path / "data", allow_missing=True)
    network = MultiModalCAM(MODALITIES, base_channels=4, spacing=2.0, spatial_size=[16, 16])
    network.load_state_dict(torch.load(model, weights_only=True))
    evaluator = CAMMapEvaluator("cpu", [[record]], network, gate=False, fusion="max", threshold=0.2)

    cache = VolumeCache(tmp_path / "cache", spatial_size=(16, 16), spacing=2.0, allow_missing=True)
    evaluated = evaluator.subject_maps(VolumeDataset([record], cache)[0])  # evaluation: the cached, zero-filled volume
    loaded = LoadSubjectd(MODALITIES)(record)
    item = volume_preprocessing(2.0, (16, 16), "volume", image_keys=["image"], label_keys=[])(loaded)
    inferred = evaluator.subject_maps(item)  # inference: the files present, preprocessed alike

    assert evaluated["modalities_used"] == inferred["modalities_used"] == ["t1", "t2", "flair"]
    assert evaluated["modalities_missing"] == inferred["modalities_missing"] == ["t1c"]
    assert torch.allclose(torch.as_tensor(evaluated["pred"]), torch.as_tensor(inferred["pred"]), atol=1e-5)
    assert torch.equal(torch.as_tensor(evaluated["mask"]), torch.as_tensor(inferred["mask"]))


# --------------------------------------------------------------------------- case 7


def test_a_single_slice_input_keeps_three_dimensional_outputs(tmp_path, model):
    folder = tmp_path / "in" / "Slice01"
    folder.mkdir(parents=True)
    volume = np.zeros((16, 16, 1), np.float32)
    volume[3:13, 3:13] = 100.0
    volume[6:9, 6:9] = 300.0
    for token in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), folder / f"Slice01_{token}.nii.gz")
    infer(tmp_path / "in", tmp_path / "out", model)
    for path in sorted((tmp_path / "out" / "Slice01").glob("*.nii.gz")):
        assert nib.load(path).shape == (16, 16, 1), path.name


# --------------------------------------------------------------------------- case 8


def test_overwrite_never_replaces_a_file_the_bundle_did_not_write(tmp_path, model):
    write_subject(tmp_path / "in", "Case01")
    out = tmp_path / "out"
    (out / "Case01").mkdir(parents=True)
    users = out / "Case01" / "Case01_mask.nii.gz"
    users.write_bytes(b"the user's own mask")
    for overwrite in ("false", "true"):
        line = refusal(infer, tmp_path / "in", out, model, overwrite=overwrite)
        assert line.startswith(f"BundleError: --output_dir {out} holds 1 file(s) where this run writes its outputs that "
                               f"no run of this bundle wrote (not in its {MANIFEST_NAME}; e.g. Case01/Case01_mask.nii.gz)"
                               ), line
        assert "results of an earlier run" not in line and "Fix: move them out of" in line
    assert users.read_bytes() == b"the user's own mask" and not (out / MANIFEST_NAME).exists()


def test_the_writer_itself_refuses_a_file_it_did_not_write(tmp_path):
    from scripts.runtime import BundleError
    from scripts.workflows.output_files import OutputManifest

    manifest = OutputManifest(tmp_path)
    (tmp_path / "a").mkdir()
    ours, theirs = tmp_path / "a" / "a_mask.nii.gz", tmp_path / "a" / "a_cam_t1.nii.gz"
    ours.write_bytes(b"1")
    manifest.record("a", [ours])
    theirs.write_bytes(b"2")
    manifest.check_ours("a", [ours])
    with pytest.raises(BundleError, match="a_cam_t1.nii.gz exists but no run of this bundle wrote it"):
        manifest.check_ours("a", [ours, theirs])


# --------------------------------------------------------------------------- cases 9, 10 (a probe table)

CUDA = f"cuda:{torch.cuda.device_count()}"  # never there: no GPU here, or one index past the last
# overrides -> the start of the last line (inference). Add a row for the next option found unchecked.
BAD_OPTIONS = {
    "fusion": ({"fusion": "median"}, "OptionError: --fusion must be one of max, mean, got 'median'. Fix: pass e.g. --fusion max."),
    "tta": ({"tta": "flipz"}, "OptionError: --tta must be one of None, flips, flips_rot90, got 'flipz'."),
    "method": ({"method": "gradcam"}, "OptionError: --method must be one of cam, gradcampp, softmax, got 'gradcam'."),
    "threshold_word": ({"threshold": "high"}, "OptionError: --threshold must be a number in [0, 1), got 'high' (a mask is "
                       "fused map > threshold"),
    "threshold_above": ({"threshold": 1.5}, "OptionError: --threshold must be a number in [0, 1), got 1.5"),
    "gate_threshold": ({"gate_threshold": 2}, "OptionError: --gate_threshold must be a number in [0, 1), got 2"),
    "precision": ({"precision": "fp8"}, "OptionError: --precision must be one of auto, bf16, fp16, fp32, got 'fp8'."),
    "gate": ({"gate": "maybe"}, "BundleError: --gate must be true or false, got 'maybe'."),
    "device": ({"device": f"$torch.device('{CUDA}')"}, f"OptionError: --device {CUDA} is not available here"),
    "device_name": ({"device": "gpu"}, "OptionError: --device 'gpu' is not a device name"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_a_bad_option_value_is_one_line_with_the_allowed_values(tmp_path, model, case):
    overrides, expected = BAD_OPTIONS[case]
    write_subject(tmp_path / "in", "Case01")
    line = refusal(infer, tmp_path / "in", tmp_path / "out", model, **overrides)
    assert line.startswith(expected), line
    assert "Fix: " in line
    assert not (tmp_path / "out").exists()  # refused before the lock, the outputs or the network


def _evaluation(tmp_path, **override) -> ConfigWorkflow:
    settings = {"device": "$torch.device('cpu')", **override}
    return ConfigWorkflow(config_file=[TRAIN, EVALUATE], meta_file=META, run_id="evaluating", logging_file=False,
                          bundle_root=str(REPO), dataset_dir=str(write_dataset(tmp_path / "data")),
                          cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "eval"),
                          ckpt_path=str(tmp_path / "absent.pt"), **settings)


@pytest.mark.parametrize("override", [{"threshold": 2}, {"gate_threshold": -0.1}, {"fusion": "median"}])
def test_evaluation_checks_the_same_option_values(tmp_path, override):
    (name, value), = override.items()
    line = refusal(lambda: _evaluation(tmp_path, **override).initialize())
    assert line.startswith(f"OptionError: --{name} must be "), line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "data" / "datalist.json").exists()


@pytest.mark.parametrize("configs", ["train", "stage2"])  # multi_gpu_train.yaml has train.yaml's line
def test_training_checks_option_values_before_anything(tmp_path, configs):
    files = {"train": [TRAIN], "stage2": [TRAIN, str(REPO / "configs" / "stage2.yaml")]}[configs]
    workflow = ConfigWorkflow(config_file=files, meta_file=META, run_id="training", logging_file=False,
                              bundle_root=str(REPO), dataset_dir=str(tmp_path / "absent"), ckpt_dir=str(tmp_path / "m"),
                              output_dir=str(tmp_path / "runs"), fusion="median", device="$torch.device('cpu')")
    line = refusal(workflow.initialize)
    assert line == "OptionError: --fusion must be one of max, mean, got 'median'. Fix: pass e.g. --fusion max."
    assert not (tmp_path / "m").exists()


def test_a_bad_option_on_the_real_command_line_ends_in_one_line(tmp_path):
    result = bundle_command("inference", "--config_file", "configs/inference.yaml", "--fusion", "median",
                            "--dataset_dir", str(write_subject(tmp_path / "in", "Case01")),
                            "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(tmp_path / "absent.pt"))
    assert result.returncode != 0
    assert last_line(result) == ("OptionError: --fusion must be one of max, mean, got 'median'. Fix: pass e.g. "
                                 "--fusion max.")
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- case 12: the wrong checkpoint


def test_training_state_or_a_stage2_model_is_named_as_such(tmp_path, model):
    write_subject(tmp_path / "in", "Case01")
    network = torch.load(model, weights_only=True)
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    torch.save({"run_settings": {"seed": 0}, "network": network, "optimizers": {}, "trainer": {"epoch": 1}}, last)
    line = refusal(infer, tmp_path / "in", tmp_path / "out", last)
    assert line == (f"WrongCheckpoint: {last} is training's last.pt (the network with its optimisers and random states, "
                    f"to resume training), not a model. Fix: pass the model training keeps beside it, "
                    f"{last.with_name('model.pt')} (the best validation epoch), as --ckpt_path."), line
    stage2 = tmp_path / "stage2_model.pt"
    torch.save(Stage2Net(MODALITIES, "unet", 4, spacing=2.0, spatial_size=[16, 16]).state_dict(), stage2)
    line = refusal(infer, tmp_path / "in", tmp_path / "out", stage2)
    assert line.startswith(f"WrongCheckpoint: {stage2} is a stage2_segmentation model (stage 2), not the CAM model "
                           f"this inference runs."), line
    assert "the checkpoint does not fit the network" not in line
