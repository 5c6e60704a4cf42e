"""The operating point chosen on validation (scripts/workflows/operating_point.py), its record beside the
checkpoint, the evaluation that writes and reads it (configs/evaluate.yaml) and inference's default threshold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.workflows import operating_point as op
from scripts.workflows.evaluate import EvaluationReport
from scripts.workflows.metrics import DEFAULT_SWEEP

REPO = Path(__file__).resolve().parents[2]
T = DEFAULT_SWEEP.tolist()


def curve(peak: float, height: float = 0.8) -> dict:
    """A tent-shaped mean DSC curve over the default sweep, highest at `peak`."""
    t = np.asarray(T)
    return {"thresholds": T, "dsc_mean": np.clip(height - 2 * np.abs(t - peak), 0, 1).tolist()}


def test_auc_of_a_flat_curve_is_its_height_and_best_threshold_breaks_ties_towards_half():
    assert op.dsc_auc(T, [0.6] * len(T)) == pytest.approx(0.6)
    assert op.dsc_auc([0.1, 0.9], [0.0, 1.0]) == pytest.approx(0.5)
    assert math.isnan(op.dsc_auc([0.5], [0.3]))
    assert op.best_threshold(T, [0.6] * len(T)) == (0.5, 0.6)  # a tie: the fixed read-out
    assert op.best_threshold(T, curve(0.3)["dsc_mean"])[0] == pytest.approx(0.3)
    assert op.value_at(T, curve(0.3)["dsc_mean"], 0.3) == pytest.approx(0.8)
    assert math.isnan(op.value_at(T, curve(0.3)["dsc_mean"], 0.33))


def test_choose_keeps_the_configured_fusion_unless_asked_to_choose_it():
    sweep = {"t1": curve(0.2), "flair": curve(0.4), "fused": curve(0.3, 0.7), "fused_max": curve(0.6, 0.75)}
    fixed = op.choose_operating_point(sweep, "mean")
    assert (fixed["fusion"], fixed["threshold"]) == ("mean", pytest.approx(0.3))
    assert fixed["fusions"]["max"]["threshold"] == pytest.approx(0.6)
    assert fixed["maps"]["t1"]["threshold"] == pytest.approx(0.2) and "fused" not in fixed["maps"]
    chosen = op.choose_operating_point(sweep, "mean", choose_fusion=True)
    assert (chosen["fusion"], chosen["threshold"], chosen["dsc"]) == ("max", pytest.approx(0.6), pytest.approx(0.75))
    # the test split read at the validation choice
    test = {"t1": curve(0.5), "flair": curve(0.4), "fused": curve(0.5, 0.6), "fused_max": curve(0.6, 0.9)}
    at = op.evaluate_at(test, chosen, "mean")
    assert at["chosen"] == pytest.approx(0.9) and at["fused"]["mean"] == pytest.approx(0.6 - 2 * 0.2)
    assert at["maps"]["t1"] == pytest.approx(0.8 - 2 * 0.3)


def test_the_record_lives_beside_the_weights_and_is_ignored_for_other_weights(tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, ckpt)
    assert op.recorded_threshold(ckpt, "mean") == 0.5  # nothing recorded yet
    point = op.choose_operating_point({"fused": curve(0.3), "fused_max": curve(0.65)}, "mean")
    path = op.write_operating_point(ckpt, point)
    assert path == tmp_path / "model.operating_point.json"
    assert op.recorded_threshold(ckpt, "mean") == pytest.approx(0.3)
    assert op.recorded_threshold(ckpt, "max") == pytest.approx(0.65)
    torch.save({"w": torch.zeros(2)}, ckpt)  # retrained: the record belongs to the old weights
    assert op.read_operating_point(ckpt) is None and op.recorded_threshold(ckpt, "mean", 0.5) == 0.5


def test_a_record_chosen_under_another_gate_source_is_not_used(tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, ckpt)
    point = op.choose_operating_point({"fused": curve(0.3)}, "mean")
    op.write_operating_point(ckpt, point)  # a record without gate_source: chosen under "own"
    assert op.recorded_threshold(ckpt, "mean", 0.5, "own") == pytest.approx(0.3)
    assert op.recorded_threshold(ckpt, "mean", 0.5, "mean") == 0.5
    op.write_operating_point(ckpt, {**point, "gate_source": "mean"})
    assert op.recorded_threshold(ckpt, "mean", 0.5, "mean") == pytest.approx(0.3)
    assert op.recorded_threshold(ckpt, "mean", 0.5, "own") == 0.5


def test_inference_threshold_defaults_to_the_record_and_the_command_line_wins(tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, ckpt)
    op.write_operating_point(ckpt, op.choose_operating_point({"fused": curve(0.35), "fused_max": curve(0.55)}, "mean"))

    def threshold(*files, **override):
        parser = ConfigParser()
        parser.read_config([str(REPO / f) for f in ("configs/inference.yaml", *files)])
        parser.update({"ckpt_path": str(ckpt), **override})
        return parser.get_parsed_content("threshold")

    assert threshold() == pytest.approx(0.35)
    assert threshold(fusion="max") == pytest.approx(0.55)
    assert threshold(threshold=0.45) == 0.45
    assert threshold("configs/presets/paper_readout.yaml") == 0.5  # the paper's fixed read-out


def _volume(rng, shape=(12, 12, 6)):
    truth = np.zeros(shape, bool)
    truth[3:8, 3:8, 1:4] = True
    maps = {m: np.clip(truth * 0.35 + rng.random(shape) * 0.3, 0, 1).astype(np.float32) for m in ("t1", "flair")}
    maps["fused"] = np.mean([maps["t1"], maps["flair"]], axis=0)
    return truth, maps


def test_evaluating_validation_records_the_point_and_evaluating_test_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    torch.save({"w": torch.ones(1)}, ckpt)

    def evaluate(split: str, record: bool) -> EvaluationReport:
        report = EvaluationReport(tmp_path / split, threshold=0.5, overlay_count=0, fusion="mean",
                                  fusions=["mean", "max"], ckpt_path=str(ckpt), split=split,
                                  record_operating_point=record, choose_fusion="true")
        for index in range(3):
            truth, maps = _volume(rng)
            item = {"subject": f"s{index}", "spacing": [1.0, 1.0, 1.0], "mask": truth[None], "image": None}
            report.add(item, {"map_names": list(maps), "pred": np.stack(list(maps.values()))})
        report.report()
        return report

    validation = evaluate("validation", True)
    assert set(validation.result.sweep) == {"t1", "flair", "fused", "fused_max"}
    point = json.loads(op.record_path(ckpt).read_text())
    assert point["split"] == "validation" and point["threshold"] < 0.5  # maps of ~0.35-0.65 in the tumour
    test = evaluate("testing", False)
    written = json.loads((tmp_path / "testing" / "operating_point.json").read_text())
    assert written["recorded"]["split"] == "validation" and written["this_split"]["split"] == "testing"
    assert written["at_recorded"]["chosen"] == pytest.approx(op.evaluate_at(test.result.sweep, point, "mean")["chosen"])
    assert (tmp_path / "testing" / "threshold_sweep.csv").read_text().count("fused_max") == len(T)
