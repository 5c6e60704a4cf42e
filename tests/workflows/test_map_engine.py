"""One preprocessing and one map engine: validation, evaluation and inference agree, at any
input spacing (scripts/data/preprocessing.py, scripts/workflows/map_engine.py).

- three routes, one answer: the validator, the evaluator (cached test volumes) and the
  inference workflow (NIfTI files, configs/inference.yaml) give identical masks for one volume;
- resolution: the same phantom subject written at 3 mm and at 1 mm, resampled by the
  preprocessing to the model's 3 mm, lands on the same model grid (its segmentation agrees)
  and gives per-volume DSC within 5 points of the 3 mm result; a 240 x 240 x 155 volume at
  1 mm (BraTS geometry) loses no brain to the crop.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader, MetaTensor
from monai.data.utils import no_collation

from scripts.data.volumes import VolumeCache
from scripts.data.slices import VolumeDataset
from scripts.data.subjects import discover_subjects
from scripts.workflows.inference import CAMMapEvaluator
from scripts.model.networks import MultiModalCAM, SettingsMismatch, model_settings
from scripts.data.preprocessing import in_plane_size, volume_preprocessing
from tests.stand_ins import CopyNet

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
INFER = str(REPO / "configs" / "inference.yaml")
META = str(REPO / "configs" / "metadata.json")
MODALITIES = ["t1", "t1c", "t2", "flair"]
TOKENS = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}
SPACING, SIZE = 3.0, [16, 16]


def write_subject(root: Path, subject: str = "Case_000", shape=(20, 22, 12), spacing=(2.0, 2.0, 2.5)) -> Path:
    """A subject at 2 mm (not the model's 3 mm): a brain box with a bright blob per modality."""
    folder = root / subject
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    affine = np.diag([*spacing, 1.0])
    seg = np.zeros(shape, np.uint8)
    seg[8:13, 9:14, 4:8] = 2
    for k, modality in enumerate(MODALITIES):
        volume = np.zeros(shape, np.float32)
        volume[3:17, 3:19, 2:10] = 100 + 10 * rng.standard_normal((14, 16, 8))
        volume[seg > 0] += 80 + 20 * k
        nib.save(nib.Nifti1Image(volume, affine), folder / f"{subject}_{TOKENS[modality]}.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), folder / f"{subject}_seg.nii.gz")
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    network = MultiModalCAM(MODALITIES, base_channels=4, spacing=SPACING, spatial_size=SIZE, normalization="volume",
                            slice_normalization="none")
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(network.state_dict(), path)
    return path


def load_model(path: Path) -> MultiModalCAM:
    network = MultiModalCAM(MODALITIES, base_channels=4)
    network.load_state_dict(torch.load(path, weights_only=True))
    return network.eval()


def outputs_of(engine) -> list:
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output))
    return seen


@pytest.mark.parametrize("gate_source", ["own", "mean"])
def test_validation_evaluation_and_inference_give_identical_masks(tmp_path, model_file, gate_source):
    data = write_subject(tmp_path / "data")
    records = discover_subjects(data)
    network = load_model(model_file)
    assert network.settings.spacing == [SPACING] * 3 and network.settings.spatial_size == SIZE
    cache = VolumeCache(tmp_path / "cache", spatial_size=SIZE, spacing=SPACING)
    dataset = VolumeDataset(records, cache, MODALITIES)

    from scripts.workflows.map_engine import MapEngine
    from scripts.workflows.validation import CAMValidator

    gate_threshold = 0.5
    if gate_source == "mean":  # random weights: a gate threshold that opens some slices and closes others
        image = torch.as_tensor(cache.get(records[0])["image"])
        gate_threshold = float(MapEngine(gate=False)(network, image).probabilities.mean(0).median())
    # max fusion: these random weights' maps rarely agree, and the test is that the three paths agree
    validator = CAMValidator("cpu", DataLoader(dataset, batch_size=1), network, fusion="max", gate_source=gate_source,
                             gate_threshold=gate_threshold)
    validated = outputs_of(validator)
    validator.run()
    evaluator = CAMMapEvaluator("cpu", DataLoader(dataset, batch_size=1, collate_fn=no_collation), network, fusion="max",
                                gate_source=gate_source, gate_threshold=gate_threshold)
    evaluated = outputs_of(evaluator)
    evaluator.run()
    # inference from the files, through configs/inference.yaml with nothing but the checkpoint:
    # the mask before Invertd is on the model's grid, the one the cache holds
    wf = ConfigWorkflow(config_file=INFER, meta_file=META, workflow_type="infer", bundle_root=str(REPO),
                        dataset_dir=str(data), output_dir=str(tmp_path / "out"), ckpt_path=str(model_file),
                        device="$torch.device('cpu')", precision="fp32", fusion="max", gate_source=gate_source,
                        gate_threshold=gate_threshold, postprocessing="$None", handlers=["@checkpoint_loader"],
                        inference=["$scripts.workflows.inference.run_engine(@evaluator)"])
    wf.initialize()
    inferred = outputs_of(wf.evaluator)
    wf.run()
    wf.finalize()

    mask_validation = validated[0]["mask"][0]
    mask_evaluation = evaluated[0][0]["mask"][0].bool()
    mask_inference = inferred[0][0]["mask"][0].bool()
    assert mask_validation.shape == (*SIZE, cache.get(records[0])["image"].shape[-1])
    assert mask_validation.any() and not mask_validation.all()
    assert torch.equal(mask_validation, mask_evaluation)
    assert torch.equal(mask_validation, mask_inference), (int(mask_validation.sum()), int(mask_inference.sum()), int(mask_evaluation.sum()))
    torch.testing.assert_close(validated[0]["pred"], torch.as_tensor(inferred[0][0]["pred"]), atol=1e-6, rtol=0)


def test_settings_come_from_the_checkpoint_and_a_mismatch_is_one_line(model_file):
    settings = model_settings(model_file)
    assert settings["base_channels"] == 4 and settings["spacing"] == [3.0] * 3 and settings["spatial_size"] == SIZE
    with pytest.raises(SettingsMismatch) as caught:
        model_settings(model_file, base_channels=8)
    message = str(caught.value)
    assert "\n" not in message and "--base_channels 8" in message and "base_channels 4" in message
    with pytest.raises(SettingsMismatch, match="spatial_size"):  # building the network another way
        MultiModalCAM(MODALITIES, base_channels=4, spatial_size=[32, 32]).load_state_dict(
            torch.load(model_file, weights_only=True))


# --------------------------------------------------------------------------- resolution


class FlairCopy(nn.Module):
    """A model whose FLAIR map is the preprocessed FLAIR itself: the map moves with the anatomy."""

    def __init__(self):
        super().__init__()
        self.modalities = ["flair"]
        self.nets = nn.ModuleList([CopyNet()])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict:
    from scripts.data.phantom import generate_dataset

    root = tmp_path_factory.mktemp("phantom")
    for spacing in (3.0, 1.0):
        generate_dataset(root / f"{spacing:g}mm", 1, seed=0, spacing=spacing)
    return {spacing: root / f"{spacing:g}mm" for spacing in (3.0, 1.0)}


def _run(folder: Path, out: Path):
    """Inference at the model's 3 mm: the written mask (input grid) and the mask on the model grid."""
    wf = ConfigWorkflow(config_file=INFER, meta_file=META, workflow_type="infer", bundle_root=str(REPO),
                        dataset_dir=str(folder), output_dir=str(out), ckpt_path=str(out / "none.pt"),
                        device="$torch.device('cpu')", network=FlairCopy(), modalities=["flair"], spacing=3.0,
                        spatial_size=in_plane_size(3.0), gate=False, handlers=[],
                        inference=["$scripts.workflows.inference.run_engine(@evaluator)"])
    wf.initialize()
    record = discover_subjects(folder)[0]
    wf.run()
    wf.finalize()
    written = out / record["subject"] / f"{record['subject']}_mask.nii.gz"
    return np.asarray(nib.load(written).dataobj) > 0, record


def test_a_3mm_model_on_1mm_input_gives_the_3mm_result(phantoms, tmp_path):
    per_volume, on_model_grid = {}, {}
    for spacing, folder in phantoms.items():
        mask, record = _run(folder, tmp_path / f"out{spacing:g}")
        truth = np.asarray(nib.load(record["seg"]).dataobj) > 0
        assert mask.shape == truth.shape  # written on the input's own grid
        per_volume[spacing] = _dice(mask, truth)
        # the segmentation through the preprocessing alone: the 1 mm anatomy lands where the 3 mm one is
        seg = nib.load(record["seg"])
        label = MetaTensor(torch.as_tensor(np.asarray(seg.dataobj)[None] > 0).float(), affine=torch.as_tensor(seg.affine))
        pre = volume_preprocessing(3.0, in_plane_size(3.0), normalization="none", image_keys=[], label_keys=["seg"])
        on_model_grid[spacing] = pre({"seg": label})["seg"][0].numpy() > 0
    assert abs(per_volume[3.0] - per_volume[1.0]) <= 0.05, per_volume
    assert on_model_grid[3.0].shape == on_model_grid[1.0].shape
    assert _dice(on_model_grid[3.0], on_model_grid[1.0]) >= 0.85  # the 1 mm grid is 1 mm off (one third of a voxel)


def test_brats_geometry_at_1mm_keeps_the_whole_brain(phantoms):
    record = discover_subjects(phantoms[1.0])[0]
    source = nib.load(record["images"]["flair"])
    assert source.shape == (240, 240, 155)
    image = MetaTensor(torch.as_tensor(source.get_fdata()[None]).float(), affine=torch.as_tensor(source.affine))
    out = volume_preprocessing(3.0, in_plane_size(3.0))({"image": image})["image"]
    assert tuple(out.shape[1:3]) == (80, 80)
    brain = (out[0] != 0).numpy()
    assert not brain[[0, -1], :, :].any() and not brain[:, [0, -1], :].any()  # nothing touches the crop
    kept_mm3 = brain.sum() * 27.0
    source_mm3 = float((np.asarray(source.dataobj) != 0).sum())
    assert abs(kept_mm3 - source_mm3) / source_mm3 < 0.05


def test_mean_gate_source_gates_every_map_on_the_mean_probability(tmp_path, model_file):
    """The engine's `gate_source: mean` keeps a slice's maps where the networks' mean probability is above
    the gate threshold (each network's own probability is still what it reports), and a wrong value is one line."""
    from scripts.workflows.map_engine import MapEngine
    from scripts.workflows.options import OptionError

    network = load_model(model_file)
    volume = torch.randn(4, *SIZE, 6)
    raw = MapEngine(gate=False, fusion="max")(network, volume, brain=torch.ones(6, dtype=torch.bool))
    threshold = float(raw.probabilities.mean(0).median())
    mean = MapEngine(gate_source="mean", gate_threshold=threshold, fusion="max")(network, volume,
                                                                                 brain=torch.ones(6, dtype=torch.bool))
    opens = raw.probabilities.mean(0) > threshold
    assert 0 < int(opens.sum()) < 6
    torch.testing.assert_close(mean.maps, raw.maps * opens.to(raw.maps.dtype))
    torch.testing.assert_close(mean.probabilities, raw.probabilities)
    with pytest.raises(OptionError, match="--gate_source must be one of own, mean"):
        MapEngine(gate_source="vote")


def test_gate_from_the_command_line_is_read_as_a_flag():
    """`--gate false` reaches the config as the string 'false' (fire), which bool() reads as True."""
    from scripts.runtime import BundleError
    from scripts.workflows.map_engine import MapEngine

    assert MapEngine(method="softmax", gate="false").gate is False
    assert MapEngine(method="cam", gate="True").gate is True
    with pytest.raises(BundleError, match="--gate must be true or false"):
        MapEngine(gate="maybe")
