"""Stage 2 (configs/stage2.yaml, configs/stage2_inference.yaml): a tiny end-to-end run, the proof
that the pseudo-masks read no ground truth, export (with configs/stage2_metadata.json) and
inference of the stage-2 network (`serve: both` loads each subject once), and the small pieces
(refinement, ignore label, recorded settings)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.data.volumes import VolumeCache
from scripts.data.subjects import load_datalist
from scripts.runtime import BundleError, MissingCheckpoint, project_error
from scripts.stage2.model import IgnoreDiceCELoss, Stage2Net, build_from_checkpoint, recorded_setting
from scripts.stage2.pseudo_labels import IGNORE_LABEL, PseudoMaskCache, Stage2VolumeDataset, refine_labels

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
META = str(REPO / "configs/metadata.json")
STAGE2_META = "configs/stage2_metadata.json"
INFER = [str(REPO / "configs/inference.yaml"), str(REPO / "configs/stage2_inference.yaml")]
# a tiny phantom at coarse spacing, base 4, one epoch: stage 1 then stage 2 in well under a minute
TINY = {"make_phantom": True, "phantom#subjects": 6, "phantom#spacing": 6.0, "spatial_size": [40, 40],
        "split": [2, 2, 2], "batch_size": 8}


def _workflow(files, run_id, **settings) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=[str(REPO / f) for f in files], run_id=run_id, meta_file=META,
                          logging_file=False, bundle_root=str(REPO), device="$torch.device('cpu')", **settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny phantom, a one-epoch CMER model and a one-epoch stage-2 model (the documented commands)."""
    root = tmp_path_factory.mktemp("stage2")
    common = {"dataset_dir": str(root / "data"), "cache_dir": str(root / "cache"), "ckpt_dir": str(root / "models"),
              **TINY}
    stage1 = _workflow(["configs/train.yaml"], "training", output_dir=str(root / "runs"), epochs=1, base_channels=4,
                       **common)
    stage1.initialize()
    stage1.run()
    stage1.finalize()
    stage2 = _workflow(["configs/train.yaml", "configs/stage2.yaml"], "training", output_dir=str(root / "stage2"),
                       stage2_epochs=1, stage2_base_channels=4, stage2_batch_size=8, **common)
    stage2.initialize()
    stage2.run()
    stage2.finalize()
    return {"root": root, "workflow": stage2, **common}


def test_tiny_stage2_run_trains_saves_the_best_model_and_reports(trained):
    root = trained["root"]
    model = root / "models" / "stage2_model.pt"
    assert model.is_file() and (root / "models" / "model.pt").is_file()
    net = build_from_checkpoint(model)
    assert net.settings.modalities == ["t1", "t1c", "t2", "flair"] and net.settings.spatial_size == [40, 40]
    assert net.settings.spacing == [6.0, 6.0, 6.0]
    report = (root / "stage2" / "stage2_report.md").read_text()
    # the default `pseudo_modalities: auto` keeps one network of this 1-epoch model (none reaches 90 %), so
    # the test rows are stage 1 (every network, the paper's fusion), stage 1 of that network, and stage 2
    for row in ("| pseudo_raw |", "| pseudo_refined |", "| largest_component_volume |", "| confidence_filter |",
                "| stage1 |", "| stage1_pseudo |", "| stage2 |"):
        assert row in report
    rows = (root / "stage2" / "stage2_per_subject.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 + 2 * 3 + 2 * 3  # header; 2 training x (2 pseudo + 3 switch) rows; 2 test x 3
    pseudo = list((Path(trained["cache_dir"]) / "stage2_pseudo").glob("*.fused.npy"))
    assert len(pseudo) == 4  # training + validation subjects; never the test split
    test_subjects = {r["subject"] for r in load_datalist(Path(trained["dataset_dir"]) / "datalist.json", "testing")}
    assert not any(p.name.startswith(tuple(test_subjects)) for p in pseudo)


def test_pseudo_masks_read_no_ground_truth(trained, tmp_path):
    """Scrambled training segmentations give identical pseudo-masks (and the same cache key)."""
    data = tmp_path / "data"
    shutil.copytree(trained["dataset_dir"], data)
    records = load_datalist(data / "datalist.json", "training")
    model = Path(trained["ckpt_dir"]) / "model.pt"

    def pseudo_masks(tag):
        volumes = VolumeCache(tmp_path / f"cache_{tag}", spatial_size=[40, 40], spacing=6.0)
        cache = PseudoMaskCache(tmp_path / f"pseudo_{tag}", model, volumes, gate=False)  # ungated: non-trivial maps
        return [cache.fused(r) for r in records], [cache.key(r) for r in records], volumes, cache

    before, keys_before, volumes_before, _ = pseudo_masks("before")
    truth_before = volumes_before.get(records[0])["mask"].clone()
    rng = np.random.default_rng(0)
    for record in records:  # scramble: random labels, same grid and file format
        seg = nib.load(record["seg"])
        scrambled = rng.integers(0, 5, size=seg.shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(scrambled, seg.affine), record["seg"])
    after, keys_after, volumes_after, cache = pseudo_masks("after")
    assert cache.computed == len(records)  # computed again from scratch, not read back
    assert keys_before == keys_after
    for a, b in zip(before, after):
        assert a.max() > 0 and np.array_equal(a, b)
    truth_after = volumes_after.get(records[0])["mask"]
    assert not torch.equal(truth_before, truth_after)  # the scramble did change the ground truth


def test_pseudo_modalities_fuse_only_the_chosen_networks(trained, tmp_path):
    """`pseudo_modalities: [flair]` makes pseudo-masks from the FLAIR network's map alone, under a
    key of its own; the report's stage-1 row stays the fusion of every network."""
    from scripts.workflows.map_engine import MapEngine

    records = load_datalist(Path(trained["dataset_dir"]) / "datalist.json", "training")
    model = Path(trained["ckpt_dir"]) / "model.pt"
    volumes = VolumeCache(trained["cache_dir"], spatial_size=[40, 40], spacing=6.0)
    every = PseudoMaskCache(tmp_path / "every", model, volumes, gate=False)
    flair = PseudoMaskCache(tmp_path / "flair", model, volumes, gate=False, map_modalities=["flair"])
    volume = volumes.get(records[0])
    maps = MapEngine(gate=False)(every.model, volume["image"], brain=volume["brain"])
    expected = maps.maps[maps.names.index("flair")].numpy()
    assert np.allclose(flair.fused(records[0]), expected, atol=1e-6)
    assert np.allclose(every.fused(records[0]), maps.fused.numpy(), atol=1e-6)
    assert not np.allclose(expected, maps.fused.numpy())  # the subset is not the fusion of all
    assert np.allclose(flair.compute(records[0], flair.modalities), maps.fused.numpy(), atol=1e-6)
    before = flair.computed
    both = flair.compute_groups(records[0], [flair.modalities, ["flair"]])  # the report's two stage-1 rows
    assert flair.computed == before + 1  # one engine pass
    assert np.array_equal(both[0], flair.compute(records[0], flair.modalities))
    assert np.array_equal(both[1], flair.compute(records[0]))
    assert flair.key(records[0]) != every.key(records[0])
    for word in ("null", "None", "all"):  # as the command line passes `--pseudo_modalities null`
        same = PseudoMaskCache(tmp_path / "every", model, volumes, gate=False, map_modalities=word)
        assert same.fused_modalities == every.modalities and same.key(records[0]) == every.key(records[0])
    with pytest.raises(ValueError):
        PseudoMaskCache(tmp_path / "x", model, volumes, map_modalities=["t1", "pd"])  # not a modality
    two = PseudoMaskCache(tmp_path / "y", model, volumes, map_modalities=["flair"])
    two._model = SimpleNamespace(modalities=["t1", "t2"], nets=[])  # a CMER model without a FLAIR network
    with pytest.raises(ValueError, match="no network"):
        two.fused(records[0])


def test_choose_modalities_keeps_the_accurate_networks_or_the_best_one(caplog):
    from scripts.stage2.selection import choose_modalities

    accuracies = {"t1": 0.71, "t1c": 0.77, "t2": 0.68, "flair": 0.945}
    assert choose_modalities(accuracies, 0.9) == ["flair"]
    assert choose_modalities(accuracies, 0.7) == ["t1", "t1c", "flair"]
    assert choose_modalities(accuracies, 0.99) == ["flair"] and "no network reaches" in caplog.text
    assert choose_modalities({"t1": float("nan"), "t2": float("nan")}, 0.9) == ["t1", "t2"]


def test_auto_pseudo_modalities_score_the_networks_on_slice_labels(trained, tmp_path, capsys):
    """`auto` scores every network's slice classification on the validation subjects (the slice
    labels weak training uses) and keeps those above the bar; the choice is part of the key."""
    from scripts.model.cams import tumour_probability
    from scripts.stage2.selection import slice_accuracies

    datalist = Path(trained["dataset_dir"]) / "datalist.json"
    records, validation = load_datalist(datalist, "training"), load_datalist(datalist, "validation")
    model = Path(trained["ckpt_dir"]) / "model.pt"
    volumes = VolumeCache(trained["cache_dir"], spatial_size=[40, 40], spacing=6.0)
    every = PseudoMaskCache(tmp_path / "a", model, volumes, map_modalities="auto", selection_records=validation,
                            min_slice_accuracy=0.0)
    assert every.fused_modalities == every.modalities
    best = PseudoMaskCache(tmp_path / "b", model, volumes, map_modalities="auto", selection_records=validation,
                           min_slice_accuracy=1.01)
    accuracy = slice_accuracies(best.model, volumes, validation)
    assert best.fused_modalities == [max(accuracy, key=accuracy.get)]
    assert "[stage2] pseudo-mask maps (auto" in capsys.readouterr().out
    assert best.key(records[0]) != every.key(records[0])
    # the same figure computed by hand: tumour probability > 0.5 against "any tumour voxel", brain slices
    correct = counted = 0
    with torch.no_grad():
        for record in validation:
            volume = volumes.get(record)
            net = best.model.nets[best.modalities.index("flair")]
            probability = tumour_probability(net(volume["image"][3].permute(2, 0, 1)[:, None]).float())
            label = volume["mask"][0].reshape(-1, volume["mask"].shape[-1]).any(0)
            brain = volume["brain"].bool()
            correct += int(((probability > 0.5) == label)[brain].sum())
            counted += int(brain.sum())
    assert accuracy["flair"] == pytest.approx(correct / counted)


def test_stage2_model_exports_to_torchscript_and_runs_through_inference(trained, tmp_path):
    from monai.bundle.scripts import ckpt_export
    from monai.data import load_net_with_metadata

    model = Path(trained["ckpt_dir"]) / "stage2_model.pt"
    files = INFER
    # the documented command: python -m monai.bundle ckpt_export stage2_network_def ... --meta_file configs/stage2_metadata.json
    ckpt_export(net_id="stage2_network_def", filepath=str(tmp_path / "stage2.ts"), ckpt_file=str(model),
                meta_file=str(REPO / STAGE2_META), config_file=files, bundle_root=str(REPO),
                stage2_ckpt_path=str(model), ckpt_path=str(tmp_path / "absent.pt"))
    scripted, meta, extra = load_net_with_metadata(str(tmp_path / "stage2.ts"),
                                                   more_extra_files=("inference.json", "stage2_inference.json"))
    assert meta == json.loads((REPO / STAGE2_META).read_text())  # the stage-2 metadata travels inside the .ts
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 2 and pred["format"] == "labels"
    assert b"stage2_network_def" in extra["stage2_inference.json"] and b"network_def" in extra["inference.json"]
    eager = build_from_checkpoint(model)
    x = torch.randn(2, 4, 40, 40)
    assert torch.allclose(scripted(x), eager(x), atol=1e-5)
    assert scripted(x).shape == (2, pred["num_channels"], 40, 40) and scripted(x).dtype == torch.float32

    subject = next(Path(trained["dataset_dir"]).glob("*/Phantom_*"))
    out = tmp_path / "out"
    workflow = ConfigWorkflow(config_file=files, meta_file=META, workflow_type="infer", logging_file=False,
                              bundle_root=str(REPO), device="$torch.device('cpu')", dataset_dir=str(subject),
                              output_dir=str(out), ckpt_path=str(Path(trained["ckpt_dir"]) / "model.pt"),
                              stage2_ckpt_path=str(model))
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    folder = out / subject.name
    written = nib.load(folder / f"{subject.name}_stage2_mask.nii.gz")
    source = nib.load(next(subject.glob("*_t1.nii.gz")))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)  # the input's exact grid
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    assert (folder / f"{subject.name}_mask.nii.gz").is_file()  # beside the CAM mask
    assert (folder / f"{subject.name}_stage2_prob.nii.gz").is_file()


def test_stage2_only_serving_needs_no_cam_checkpoint(trained, tmp_path):
    model = Path(trained["ckpt_dir"]) / "stage2_model.pt"
    subject = next(Path(trained["dataset_dir"]).glob("*/Phantom_*"))
    workflow = ConfigWorkflow(config_file=[str(REPO / "configs/inference.yaml"), str(REPO / "configs/stage2_inference.yaml")],
                              meta_file=META, workflow_type="infer", logging_file=False, bundle_root=str(REPO),
                              device="$torch.device('cpu')", dataset_dir=str(subject), output_dir=str(tmp_path / "o"),
                              ckpt_path=str(tmp_path / "absent.pt"), stage2_ckpt_path=str(model), serve="stage2")
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    written = sorted(p.name for p in (tmp_path / "o" / subject.name).iterdir())
    assert written == [f"{subject.name}_stage2_mask.nii.gz", f"{subject.name}_stage2_prob.nii.gz"]


def _serve(serve: str, dataset_dir, output_dir, ckpt_dir, **settings) -> None:
    """One run of the documented stage-2 inference command."""
    settings = {"ckpt_path": str(Path(ckpt_dir) / "model.pt"),
                "stage2_ckpt_path": str(Path(ckpt_dir) / "stage2_model.pt"), **settings}
    workflow = ConfigWorkflow(config_file=INFER, meta_file=META, workflow_type="infer", logging_file=False,
                              bundle_root=str(REPO), device="$torch.device('cpu')", dataset_dir=str(dataset_dir),
                              output_dir=str(output_dir), serve=serve, **settings)
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()


def _nifti_contents(folder: Path) -> dict[str, bytes]:
    """Relative path -> uncompressed NIfTI bytes (header and voxels; gzip's time stamp left out)."""
    return {p.relative_to(folder).as_posix(): gzip.decompress(p.read_bytes()) for p in sorted(folder.rglob("*.nii.gz"))}


def test_serve_both_loads_each_subject_once_and_equals_the_separate_runs(trained, tmp_path, monkeypatch):
    import scripts.workflows.inference as cam_inference
    from monai.transforms import Compose
    from scripts.data.preprocessing import volume_preprocessing

    subjects = sorted(Path(trained["dataset_dir"]).glob("*/Phantom_*"))[:2]
    data = tmp_path / "in"
    for subject in subjects:
        shutil.copytree(subject, data / subject.name)
    ckpt_dir = trained["ckpt_dir"]
    _serve("cam", data, tmp_path / "cam", ckpt_dir)
    _serve("stage2", data, tmp_path / "stage2", ckpt_dir)

    loads, reads, preprocessed = [], [], []
    load_subject, load_volume, compose_call = cam_inference.LoadSubjectd.__call__, cam_inference.load_volume, Compose.__call__
    preprocessing_ids = set()

    def counting_volume_preprocessing(*args, **kwargs):  # the Compose inference.yaml builds
        compose = volume_preprocessing(*args, **kwargs)
        preprocessing_ids.add(id(compose))
        return compose

    def counting_compose(self, data, *args, **kwargs):
        if id(self) in preprocessing_ids:
            preprocessed.append(data["subject"])
        return compose_call(self, data, *args, **kwargs)

    monkeypatch.setattr(cam_inference.LoadSubjectd, "__call__",
                        lambda self, record: loads.append(record["subject"]) or load_subject(self, record))
    monkeypatch.setattr(cam_inference, "load_volume", lambda path, *a: reads.append(str(path)) or load_volume(path, *a))
    monkeypatch.setattr(Compose, "__call__", counting_compose)
    monkeypatch.setattr("scripts.data.preprocessing.volume_preprocessing", counting_volume_preprocessing)
    _serve("both", data, tmp_path / "both", ckpt_dir)

    names = [s.name for s in subjects]
    assert sorted(loads) == sorted(preprocessed) == names  # one load and one preprocessing per subject
    assert len(reads) == len(set(reads)) == 4 * len(names)  # every modality file read once
    both = _nifti_contents(tmp_path / "both")
    separate = {**_nifti_contents(tmp_path / "cam"), **_nifti_contents(tmp_path / "stage2")}
    assert set(both) == set(separate) and len(both) == len(names) * (5 + 1 + 2)  # 4 CAMs + fused, mask, stage-2 x 2
    for name, content in separate.items():
        assert both[name] == content, name  # byte-identical NIfTI (header and voxels)
    manifest = json.loads((tmp_path / "both" / ".manifest.json").read_text())["files"]
    assert set(manifest) == set(names) | {f"stage2:{n}" for n in names}  # both writers' entries kept
    written_by = json.loads((tmp_path / "both" / ".manifest.json").read_text())["written_by"]
    assert {written_by[f"stage2:{n}"]["subject"] for n in names} == set(names)  # each writer's own checkpoint
    assert len({written_by[n]["checkpoint"] for n in names} | {written_by[f"stage2:{n}"]["checkpoint"] for n in names}) == 2


def test_serve_both_checks_both_checkpoints_and_modalities_before_writing(trained, tmp_path):
    subject = sorted(Path(trained["dataset_dir"]).glob("*/Phantom_*"))[0]
    with pytest.raises(Exception) as raised:
        _serve("both", subject, tmp_path / "o1", trained["ckpt_dir"], stage2_ckpt_path=str(tmp_path / "absent.pt"))
    error = project_error(raised.value)
    assert isinstance(error, MissingCheckpoint) and "no stage2 checkpoint" in str(error)
    partial = tmp_path / subject.name
    shutil.copytree(subject, partial)
    next(partial.glob("*_t2.nii.gz")).unlink()
    with pytest.raises(Exception) as raised:
        _serve("both", partial, tmp_path / "o2", trained["ckpt_dir"])
    error = project_error(raised.value)
    assert "the stage-2 network takes" in str(error) and "['t2'] has no input file" in str(error)
    for out in (tmp_path / "o1", tmp_path / "o2"):
        assert not list(out.rglob("*.nii.gz"))  # nothing written, CAM outputs included


def test_stage2_metadata_verifies_offline_and_describes_the_stage2_network(monkeypatch):
    import monai.apps.utils
    from monai.bundle import verify_net_in_out

    from bundle import SCHEMA_PATH, verify

    def refuse(*args, **kwargs):
        raise AssertionError("verification tried to download something")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", refuse)
    assert SCHEMA_PATH.is_file()
    meta = verify.verify_metadata(REPO, meta_file=STAGE2_META)  # the shipped schema, as for metadata.json
    cam_meta = json.loads(Path(META).read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version"):
        assert meta[key] == cam_meta[key], key
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["channel_def"] == cam_meta["network_data_format"]["inputs"]["image"]["channel_def"]
    assert image["num_channels"] == 4 and image["format"] == "magnitude" and image["dtype"] == "float32"
    # logits: argmax over the channels (MONAI's "labels" format), no bounded range
    assert pred["num_channels"] == 2 and pred["channel_def"] == {"0": "background", "1": "whole tumour"}
    assert pred["format"] == "labels" and pred["value_range"] == [] and pred["dtype"] == "float32"
    # MONAI's own check: (1, 4, 40, 40) random input -> 2 float32 channels
    verify_net_in_out(net_id="stage2_network_def", meta_file=str(REPO / STAGE2_META), config_file=INFER,
                      device="cpu", n=5, bundle_root=str(REPO), ckpt_path="absent.pt", stage2_ckpt_path="absent.pt")


def test_stage2_without_a_cmer_model_stops_with_the_fix(tmp_path):
    workflow = _workflow(["configs/train.yaml", "configs/stage2.yaml"], "training", dataset_dir=str(tmp_path / "d"),
                         cache_dir=str(tmp_path / "c"), ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "o"),
                         **TINY)
    with pytest.raises(Exception) as raised:
        workflow.initialize()
    error = project_error(raised.value)  # the one line the error hook prints
    assert isinstance(error, MissingCheckpoint) and "train stage 1 first" in str(error)


def test_validation_against_ground_truth_is_a_named_choice(trained):
    workflow = trained["workflow"]
    records = workflow.parser.get_parsed_content("validate#records")
    cache = workflow.parser.get_parsed_content("volume_cache")
    labels = workflow.parser.get_parsed_content("stage2#labels")
    truth = Stage2VolumeDataset(records, cache, ["t1", "flair"], "ground_truth")[0]
    pseudo = Stage2VolumeDataset(records, cache, ["t1", "flair"], "pseudo", labels)[0]
    assert truth["image"].shape[0] == 2 and truth["label"].shape == pseudo["label"].shape
    assert torch.equal(truth["label"], cache.get(records[0])["mask"].float())
    with pytest.raises(BundleError, match="stage2_validate_against"):
        Stage2VolumeDataset(records, cache, ["t1"], "labels")


# --------------------------------------------------------------------------- small pieces


def test_refinement_switches():
    fused = np.zeros((10, 10, 3), dtype=np.float32)
    fused[1:4, 1:4, 0] = 0.9  # large component
    fused[7, 7, 0] = 0.8  # speck
    fused[1:3, 1:3, 2] = 0.6  # another slice, undecided values
    plain = refine_labels(fused)
    assert plain.sum() == 9 + 1 + 4
    volume = refine_labels(fused, largest_component=True)
    assert volume[7, 7, 0] == 0 and volume[:, :, 2].sum() == 0 and volume.sum() == 9
    per_slice = refine_labels(fused, largest_component=True, component_scope="slice")
    assert per_slice[7, 7, 0] == 0 and per_slice[:, :, 2].sum() == 4
    filtered = refine_labels(fused, confidence_filter=True, ignore_low=0.3, ignore_high=0.7)
    assert (filtered[:, :, 2] == IGNORE_LABEL).sum() == 4 and filtered[2, 2, 0] == 1
    with pytest.raises(BundleError, match="ignore_low < ignore_high"):
        refine_labels(fused, confidence_filter=True, ignore_low=0.7, ignore_high=0.3)


def test_switches_from_the_command_line_are_read_as_flags(checkpoint, tmp_path):
    """fire passes `--stage2_refine#confidence_filter false` as the string 'false': it must mean off."""
    from scripts.stage2.pseudo_labels import PseudoLabels

    volumes = VolumeCache(tmp_path / "cache", spatial_size=[40, 40])
    cache = PseudoMaskCache(tmp_path / "pseudo", checkpoint, volumes, gate="false")
    assert cache.engine_settings["gate"] is False
    labels = PseudoLabels(cache, refine={"confidence_filter": "false", "largest_component": "true"})
    assert labels.refine["confidence_filter"] is False and labels.refine["largest_component"] is True


def test_ignored_pixels_count_in_neither_term():
    loss = IgnoreDiceCELoss(ignore_index=IGNORE_LABEL, to_onehot_y=True, softmax=True, batch=True)
    logits = torch.randn(2, 2, 8, 8)
    label = torch.randint(0, 2, (2, 1, 8, 8))
    label[:, :, :4] = IGNORE_LABEL
    changed = logits.clone()
    changed[:, :, :4] = torch.randn(2, 2, 4, 8) * 10  # only ignored pixels change
    assert torch.allclose(loss(logits, label), loss(changed, label), atol=1e-6)


def test_stage2_net_carries_its_settings_and_refuses_a_cam_checkpoint(tmp_path, checkpoint):
    net = Stage2Net(["t1", "t2"], "segresnet", 4, spacing=2.0, spatial_size=[32, 32], normalization="volume")
    assert net(torch.randn(1, 2, 32, 32)).shape == (1, 2, 32, 32)
    torch.save(net.state_dict(), tmp_path / "s2.pt")
    assert recorded_setting(tmp_path / "s2.pt", "network") == "segresnet"
    assert recorded_setting(tmp_path / "s2.pt", "spacing") == [2.0, 2.0, 2.0]
    assert recorded_setting(tmp_path / "absent.pt", "network", "unet") == "unet"
    with pytest.raises(BundleError, match="not a stage-2 model"):
        Stage2Net(["t1", "t1c", "t2", "flair"], "unet", 4).load_state_dict(torch.load(checkpoint, weights_only=True))
    with pytest.raises(BundleError, match="multiples of 8"):
        Stage2Net(["t1"], "unet", 4, spatial_size=[30, 30])
