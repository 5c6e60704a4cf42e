"""Evaluation (configs/evaluate.yaml over train.yaml, scripts/workflows/evaluate.py) on a tiny dataset.

Subjects are 16x16x8 volumes written here: a constant brain on slices 1-6 (slices 0 and 7
hold no brain) and a bright tumour box on slices 3-5. A stand-in network whose tumour map
is its input then gives perfect masks, so DSC 1 checks that slices go back into volumes in
order and that the whole chain (cache, maps, metrics) lines up.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigWorkflow

from scripts.workflows.evaluate import assemble
from scripts.workflows.metrics import evaluate_volumes
from scripts.workflows.inference import CAMMapEvaluator
from scripts.model.networks import MultiModalCAM
from tests.stand_ins import CopyNet

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
CONFIGS = [str(REPO / "configs" / "train.yaml"), str(REPO / "configs" / "evaluate.yaml")]
META = str(REPO / "configs" / "metadata.json")
MODALITIES = ["t1", "t1c", "t2", "flair"]
SHAPE = (16, 16, 8)
OUTPUT_FILES = ["operating_point.json", "overlay_Sub_000.png", "overlay_Sub_001.png", "per_subject.csv", "resolved_config.json",
                "summary.csv", "summary.md", "threshold_sweep.csv", "threshold_sweep.png"]

class RampNet(CopyNet):
    """Stand-in whose tumour map is a positive ramp whatever the input (non-zero everywhere)."""

    def features(self, x):
        ramp = torch.linspace(0.1, 1.0, x.shape[-1], dtype=x.dtype).expand_as(x)
        return ramp.contiguous()


class StandIn(nn.Module):
    def __init__(self, net_class=CopyNet, modalities=MODALITIES):
        super().__init__()
        self.modalities = list(modalities)
        self.nets = nn.ModuleList([net_class() for _ in self.modalities])


def tumour_mask() -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    seg[5:9, 6:10, 3:6] = 1
    return seg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    brain = np.zeros(SHAPE, bool)
    brain[2:14, 2:14, 1:7] = True
    for index in range(4):
        subject = f"Sub_{index:03d}"
        folder = root / subject
        folder.mkdir()
        seg = tumour_mask() * (2 if index % 2 else 1)
        for token in ("t1", "t1ce", "t2", "flair"):
            volume = np.where(brain, 100.0, 0.0).astype(np.float32)
            volume[seg > 0] = 300.0
            nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), folder / f"{subject}_{token}.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.diag([2.0, 2.0, 2.0, 1.0])), folder / f"{subject}_seg.nii.gz")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(MultiModalCAM(MODALITIES, base_channels=4).state_dict(), path)
    return str(path)


def run_evaluation(dataset: Path, out: Path, **override) -> ConfigWorkflow:
    settings = {
        "bundle_root": str(REPO), "dataset_dir": str(dataset), "cache_dir": str(out.parent / "cache"),
        "split": [1, 1, 2], "output_dir": str(out), "base_channels": 4, "spatial_size": [16, 16],
        "spacing": 0, "device": "$torch.device('cpu')", "num_workers": 0, **override,
    }
    wf = ConfigWorkflow(config_file=CONFIGS, meta_file=META, workflow_type=None, run_id="evaluating", **settings)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_evaluate_workflow_writes_tables_plots_and_resolved_config(tmp_path, dataset, checkpoint, capsys):
    out = tmp_path / "eval"
    run_evaluation(dataset, out, ckpt_path=checkpoint)
    assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES  # nothing else: no temp files
    summary = read_csv(out / "summary.csv")
    assert [row["map"] for row in summary] == MODALITIES + ["fused"]
    rows = read_csv(out / "per_subject.csv")
    assert sorted({row["subject"] for row in rows}) == ["Sub_000", "Sub_001"] and len(rows) == 10
    assert all(0.0 <= float(row["dsc"]) <= 1.0 for row in rows)
    sweep = read_csv(out / "threshold_sweep.csv")
    assert len(sweep) == 6 * 19  # four modalities, fused (mean) and fused_max (the other fusion, for the operating point)
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert resolved["settings"]["eval_split"] == "testing" and resolved["settings"]["method"] == "cam"
    assert resolved["settings"]["ckpt_path"] == checkpoint
    printed = capsys.readouterr().out
    assert "| fused |" in printed and "s/volume" in printed


@pytest.mark.parametrize("method, tta", [("cam", None), ("gradcampp", "flips")])
def test_perfect_maps_give_dsc_one_with_slices_in_order(tmp_path, dataset, method, tta):
    out = tmp_path / "eval"
    run_evaluation(dataset, out, network=StandIn(), gate=False, method=method, tta=tta,
                   **{"evaluate#handlers": ["@evaluate#report"],
                      "evaluating": ["$scripts.workflows.inference.run_engine(@evaluate#evaluator)"]})
    for row in read_csv(out / "summary.csv"):
        assert float(row["dsc_mean"]) == pytest.approx(1.0), row
        assert float(row["assd_mean"]) == pytest.approx(0.0), row
        assert float(row["r_u_pooled"]) == 0.0 and float(row["r_o_pooled"]) == 0.0
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert resolved["settings"]["method"] == method and resolved["settings"]["tta"] == tta


def test_slices_without_brain_get_empty_maps_and_only_present_channels_run():
    image = torch.zeros(2, 8, 8, 5)
    image[:, 2:6, 2:6, 1:4] = 1.0  # brain on slices 1-3 only
    item = {"image": image, "modalities": ["t2", "t1"], "subject": "mem"}
    evaluator = CAMMapEvaluator(torch.device("cpu"), [[item]], StandIn(RampNet), gate=False, epoch_length=1)
    evaluator.run()
    (output,) = evaluator.state.output
    assert output["map_names"] == ["t1", "t2", "fused"]
    assert output["modalities_missing"] == ["t1c", "flair"]
    pred = output["pred"]
    assert pred.shape == (3, 8, 8, 5)
    per_slice = pred.abs().sum(dim=(0, 1, 2))
    assert per_slice[0] == 0 and per_slice[4] == 0 and (per_slice[1:4] > 0).all()
    assert torch.equal(output["mask"][0], pred[2] > 0.5)


def test_per_volume_assembly_equals_evaluating_all_volumes_at_once():
    rng = np.random.default_rng(0)
    records = []
    for index in range(3):
        truth = np.zeros(SHAPE, bool)
        truth[4:9, 4:9, 2:5] = index > 0  # one volume without tumour: empty-case rule
        maps = {m: rng.random(SHAPE).astype(np.float32) * (truth + 0.3) for m in ("t1", "flair")}
        records.append({"subject": f"s{index}", "spacing": [1.0, 1.0, 2.0], "truth": truth, "maps": maps})
    whole = evaluate_volumes(records)
    rows, curves = [], {}
    for record in records:
        part = evaluate_volumes([record])
        rows += part.rows
        for name, curve in part.sweep.items():
            curves.setdefault(name, []).append(curve["dsc_mean"])
    pieced = assemble(rows, curves, whole.threshold, next(iter(whole.sweep.values()))["thresholds"])
    assert pieced.summary.keys() == whole.summary.keys()
    for name in whole.summary:
        for key, value in whole.summary[name].items():
            assert pieced.summary[name][key] == pytest.approx(value, nan_ok=True), (name, key)
        np.testing.assert_allclose(pieced.sweep[name]["dsc_mean"], whole.sweep[name]["dsc_mean"])
