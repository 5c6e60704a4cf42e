"""The real-scan check (tools/real_scan_check.py) on tiny scans the test writes."""

import json

import torch
from torch import nn

import tools.real_scan_check as check
from tests.safety_data import write_subject
from tests.stand_ins import CopyNet

SETTINGS = {"modalities": ["t1", "t1c", "t2", "flair"], "backbone": "unet", "base_channels": 4, "spacing": 2.0,
            "spatial_size": [16, 16], "normalization": "volume", "slice_normalization": "none", "pooling": "gap"}


class CopyModel(nn.Module):
    """Four CopyNets: each modality's tumour map is its (z-scored) slice."""

    def __init__(self):
        super().__init__()
        self.modalities = list(SETTINGS["modalities"])
        self.nets = nn.ModuleList([CopyNet() for _ in self.modalities])


def test_scores_a_case_with_reference_and_describes_one_without(tmp_path, monkeypatch):
    data = tmp_path / "real"
    write_subject(data, "Labelled")
    (write_subject(data, "Unlabelled") / "Unlabelled_seg.nii.gz").unlink()
    monkeypatch.setattr(check, "load_model", lambda path, device: (CopyModel().eval(), dict(SETTINGS)))
    results = check.run_check("unused.pt", str(data), str(tmp_path / "out"))
    labelled, unlabelled = results["Labelled"], results["Unlabelled"]
    assert set(labelled) == {"t1", "t1c", "t2", "flair", "fused"}
    # the bright cube is the tumour: the copy maps find it, open the gate on its slices only
    assert labelled["fused"]["dsc"] > 0.5 and labelled["fused"]["best_dsc"] >= labelled["fused"]["dsc"]
    assert labelled["flair"]["recall"] == 1.0 and labelled["flair"]["healthy_fire"] == 0.0
    assert labelled["flair"]["oracle_dsc"] >= labelled["flair"]["dsc"] - 1e-6
    assert labelled["flair"]["tumour_z"] > labelled["flair"]["brain_p99"]
    assert labelled["flair"]["p_tumour"] > 0.5 > labelled["flair"]["p_healthy"]
    assert labelled["flair"]["hf_ratio"] is not None and labelled["flair"]["hf_ratio"] >= 0
    assert unlabelled["fused"]["dsc"] is None and unlabelled["fused"]["healthy_fire"] is not None
    written = json.loads((tmp_path / "out" / "real_check.json").read_text())
    assert written["cases"]["Labelled"]["fused"]["dsc"] == labelled["fused"]["dsc"]
    assert (tmp_path / "out" / "overlay_Labelled.png").stat().st_size > 0
    # where the networks fire on slices without reference tumour: none on the labelled case; on the
    # unlabelled one every slice counts as healthy, so the cube's slices are shown
    assert not (tmp_path / "out" / "false_firing_Labelled.png").exists()
    assert (tmp_path / "out" / "false_firing_Unlabelled.png").stat().st_size > 0
    assert "| Labelled | fused |" in (tmp_path / "out" / "real_check.md").read_text()


def test_a_silent_network_scores_zero(tmp_path, monkeypatch):
    data = tmp_path / "real"
    write_subject(data, "Labelled")
    model = CopyModel()
    for net in model.nets:  # tumour logit always below healthy: the gate never opens
        with torch.no_grad():
            net.classifier.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    monkeypatch.setattr(check, "load_model", lambda path, device: (model.eval(), dict(SETTINGS)))
    rows = check.run_check("unused.pt", str(data), None)["Labelled"]
    assert rows["fused"]["dsc"] == 0.0 and rows["t1"]["recall"] == 0.0


def test_fine_texture_ratio_tells_speckle_from_smooth():
    import numpy as np

    rng = np.random.default_rng(0)
    brain = np.zeros((40, 40, 3), bool)
    brain[4:36, 4:36] = True
    truth = np.zeros_like(brain)
    truth[14:26, 14:26] = True
    smooth = np.where(brain, 1.0 + 0.1 * rng.standard_normal(brain.shape), 0.0) + 2.0 * truth
    speckled = smooth + 1.0 * rng.standard_normal(brain.shape) * truth
    smooth_ratio, speckled_ratio = (check.fine_texture_ratio(x, truth, brain) for x in (smooth, speckled))
    assert speckled_ratio > 2.0 * smooth_ratio and speckled_ratio > 3.0


def test_without_a_threshold_the_models_recorded_operating_point_is_used_as_inference_does(tmp_path, monkeypatch):
    from scripts.workflows.operating_point import write_operating_point

    data = tmp_path / "real"
    write_subject(data, "Labelled")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")  # load_model is replaced; the record is tied to these bytes
    write_operating_point(ckpt, {"split": "validation", "fusions": {"mean": {"threshold": 0.3}}})
    monkeypatch.setattr(check, "load_model", lambda path, device: (CopyModel().eval(), dict(SETTINGS)))
    check.run_check(str(ckpt), str(data), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "real_check.json").read_text())["settings"]["threshold"] == 0.3
    check.run_check(str(ckpt), str(data), str(tmp_path / "out2"), threshold=0.5)  # a given threshold wins
    assert json.loads((tmp_path / "out2" / "real_check.json").read_text())["settings"]["threshold"] == 0.5


def test_zoom_enlarges_the_head_and_its_reference_together(tmp_path):
    from scripts.data.subjects import discover_subjects

    write_subject(tmp_path / "real", "Labelled")
    record = discover_subjects(str(tmp_path / "real"))[0]
    plain = check.prepare_case(record, SETTINGS)
    zoomed = check.prepare_case(record, SETTINGS, zoom=1.5)
    brain = lambda case: int((case["image"].abs().sum(0) > 0).sum())  # noqa: E731
    assert zoomed["truth"].sum() > 1.5 * plain["truth"].sum() and brain(zoomed) > 1.5 * brain(plain)
    inside = zoomed["truth"] & (zoomed["image"].abs().sum(0) > 0)
    assert inside.sum() == zoomed["truth"].sum()  # the reference stays on the head
