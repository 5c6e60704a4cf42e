"""Tests of scripts.workflows.metrics (metrics, empty cases, sweep, writers) and scripts.workflows.figures."""

from __future__ import annotations

import csv
import math

import matplotlib.image
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from scripts.workflows.metrics import (
    EvaluationResult,
    assd_mm,
    compare_methods,
    dice_curve,
    dice_score,
    evaluate_volumes,
    format_table,
    voxel_counts,
    write_results,
)
from scripts.workflows.figures import cam_overlay, cam_overlay_grid, plot_overlays, plot_threshold_sweep


def cube(shape=(6, 6, 6), start=(1, 1, 1), size=3) -> np.ndarray:
    volume = np.zeros(shape, dtype=bool)
    volume[tuple(slice(s, s + size) for s in start)] = True
    return volume


def record(subject, truth, maps, spacing=(1.0, 1.0, 1.0)):
    return {"subject": subject, "spacing": spacing, "truth": truth, "maps": maps}


# ---------------------------------------------------------------------------------------
# Per-volume metrics


def test_cubes_offset_by_one_voxel_dsc_and_assd_by_hand():
    # A = x in 1..3, B = x in 2..4 (3x3x3 cubes). Overlap 18 voxels -> DSC = 36/54.
    a, b = cube(start=(1, 1, 1)), cube(start=(2, 1, 1))
    assert dice_score(a, b) == pytest.approx(2 / 3, abs=1e-6)
    # Surfaces = all 26 voxels but the centre. From A: the 9 voxels of the x=1 face lie one
    # step (spacing[0]) from B's x=2 face; A's voxel (3,2,2) is B's centre, not on B's
    # surface, and its nearest B-surface voxel is one step along y or z (or x); the other
    # 16 lie on B's surface. B -> A is the mirror image. ASSD = 2 (9 s0 + min(s)) / 52.
    assert assd_mm(a, b, (2.0, 1.0, 1.0)) == pytest.approx(2 * (9 * 2 + 1) / 52, abs=1e-5)
    assert assd_mm(a, b, (1.0, 2.0, 1.0)) == pytest.approx(2 * (9 * 1 + 1) / 52, abs=1e-5)
    assert voxel_counts(a, b) == {"tp": 18, "fp": 9, "fn": 9}


def test_empty_cases_follow_the_documented_rule_and_are_counted():
    full, empty = cube(), np.zeros((6, 6, 6), dtype=bool)
    maps = lambda mask: {"t2": mask.astype(np.float32)}  # noqa: E731
    records = [
        record("both", empty, maps(empty)),
        record("no_pred", full, maps(empty)),
        record("no_truth", empty, maps(full)),
        record("good", full, maps(full)),
    ]
    result = evaluate_volumes(records, thresholds_sweep=None)
    rows = {r["subject"]: r for r in result.rows}
    assert (rows["both"]["dsc"], rows["both"]["assd"], rows["both"]["empty_case"]) == (1.0, 0.0, "both_empty")
    assert rows["no_pred"]["dsc"] == 0.0 and math.isnan(rows["no_pred"]["assd"])
    assert rows["no_pred"]["empty_case"] == "empty_pred"
    assert rows["no_truth"]["dsc"] == 0.0 and math.isnan(rows["no_truth"]["assd"])
    assert rows["no_truth"]["empty_case"] == "empty_truth"
    assert (rows["good"]["dsc"], rows["good"]["assd"], rows["good"]["empty_case"]) == (1.0, 0.0, "")
    s = result.summary["t2"]
    assert (s["both_empty"], s["empty_pred"], s["empty_truth"]) == (1, 1, 1)
    assert s["n"] == 4 and s["dsc_mean"] == pytest.approx(0.5)
    assert s["assd_n"] == 2 and s["assd_mean"] == 0.0  # NaNs excluded, not zero-filled


def test_false_positives_on_tumour_free_volume_are_not_ignored():
    # MONAI's default ignore_empty=True would return NaN here and drop the case.
    empty, blob = np.zeros((5, 5, 5), dtype=bool), cube((5, 5, 5), (0, 0, 0), 2)
    default = compute_dice(torch.from_numpy(blob)[None, None].float(), torch.from_numpy(empty)[None, None].float())
    assert torch.isnan(default).all()
    assert dice_score(blob, empty) == 0.0


def test_ru_ro_pooled_and_per_volume():
    truth = np.zeros((4, 4, 4), dtype=bool)
    truth[0, :, :] = True  # 16 voxels
    pred_a = np.zeros_like(truth)
    pred_a[0, :2, :] = True  # TP 8, FN 8
    pred_a[3, :1, :] = True  # FP 4
    pred_b = np.zeros_like(truth)
    pred_b[0, :, :] = True  # TP 16
    pred_b[2, :, :] = True  # FP 16
    records = [
        record("a", truth, {"t1": pred_a.astype(np.float32)}),
        record("b", truth, {"t1": pred_b.astype(np.float32)}),
    ]
    result = evaluate_volumes(records, thresholds_sweep=None)
    a, b = result.rows
    assert (a["tp"], a["fp"], a["fn"]) == (8, 4, 8) and (b["tp"], b["fp"], b["fn"]) == (16, 16, 0)
    assert a["r_u"] == 1.0 and a["r_o"] == 0.5 and b["r_u"] == 0.0 and b["r_o"] == 1.0
    s = result.summary["t1"]
    assert s["r_u_pooled"] == pytest.approx(8 / 24) and s["r_o_pooled"] == pytest.approx(20 / 24)
    assert s["r_u_mean"] == pytest.approx(0.5) and s["r_o_mean"] == pytest.approx(0.75)


def test_fused_is_pixelwise_max_and_names_are_ordered():
    truth = cube()
    left = np.zeros((6, 6, 6), dtype=np.float32)
    right = np.zeros_like(left)
    left[1:4, 1:4, 1:2] = 0.9
    right[1:4, 1:4, 2:4] = 0.8
    result = evaluate_volumes([record("s", truth, {"flair": right, "t1": left})], thresholds_sweep=None)
    assert result.map_names == ["t1", "flair", "fused"]
    assert result.summary["fused"]["dsc_mean"] == pytest.approx(1.0)
    assert result.summary["t1"]["dsc_mean"] == pytest.approx(2 * 9 / (9 + 27))
    off = evaluate_volumes([record("s", truth, {"flair": right, "t1": left})], thresholds_sweep=None, fuse=None)
    assert off.map_names == ["t1", "flair"]


# ---------------------------------------------------------------------------------------
# Threshold sweep


def radial_map(shape=(9, 9, 9)) -> np.ndarray:
    """1 at the centre, decreasing linearly with the distance."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij"))
    distance = np.sqrt((grid**2).sum(0))
    return np.clip(1.0 - distance / distance.max(), 0, 1).astype(np.float32)


def test_sweep_peaks_at_the_threshold_that_reproduces_the_truth():
    values = radial_map()
    truth = values > 0.5
    thresholds = np.round(np.arange(0.05, 0.96, 0.05), 2)
    curve = dice_curve(values, truth, thresholds)
    at_half = int(np.argmin(np.abs(thresholds - 0.5)))
    assert curve[at_half] == pytest.approx(1.0)
    assert np.all(np.diff(curve[: at_half + 1]) >= 0)  # fewer false positives as t rises
    assert np.all(np.diff(curve[at_half:]) <= 0)  # more false negatives after the peak
    assert curve[0] < 0.5 and curve[-1] < 0.5


def test_sweep_agrees_with_compute_dice_at_every_threshold():
    rng = np.random.default_rng(0)
    values = rng.random((6, 7, 5)).astype(np.float32)
    truth = rng.random((6, 7, 5)) > 0.6
    thresholds = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    values[::2] = rng.choice(thresholds, size=values[::2].shape)  # ties: strictly greater only
    curve = dice_curve(values, truth, thresholds)
    for t, dsc in zip(thresholds, curve):
        assert dsc == pytest.approx(dice_score(values > np.float32(t), truth), abs=1e-6)
    empty = np.zeros_like(truth)
    assert np.all(dice_curve(np.zeros_like(values), empty, thresholds) == 1.0)  # both empty


def test_evaluate_volumes_curve_is_mean_over_subjects():
    values = radial_map()
    records = [record("a", values > 0.5, {"t1": values}), record("b", values > 0.3, {"t1": values})]
    result = evaluate_volumes(records, thresholds_sweep=[0.3, 0.5])
    curve = result.sweep["t1"]
    assert curve["dsc_mean"][0] == pytest.approx((dice_score(values > 0.3, values > 0.5) + 1.0) / 2)
    assert curve["dsc_mean"][1] == pytest.approx(result.summary["t1"]["dsc_mean"])
    thresholds, dsc = result.curves()["t1"]
    assert list(thresholds) == [0.3, 0.5] and len(dsc) == 2


# ---------------------------------------------------------------------------------------
# Writers and tables


def small_result() -> EvaluationResult:
    truth = cube()
    maps = {"t1": cube(start=(2, 1, 1)).astype(np.float32), "t2": np.zeros((6, 6, 6), np.float32)}
    return evaluate_volumes([record("s1", truth, maps, (1.0, 1.0, 2.0)), record("s2", truth, maps)])


def test_writers_produce_parsable_files_and_no_temp_files(tmp_path):
    result = small_result()
    paths = write_results(result, tmp_path / "eval")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "per_subject.csv", "summary.csv", "summary.md", "threshold_sweep.csv",
    ]
    with open(paths["per_subject"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["map"] for r in rows} == {"t1", "t2", "fused"}
    assert float(rows[0]["dsc"]) == pytest.approx(2 / 3, abs=1e-6)
    with open(paths["summary"]) as f:
        summary = {r["map"]: r for r in csv.DictReader(f)}
    assert int(summary["t2"]["empty_pred"]) == 2 and math.isnan(float(summary["t2"]["assd_mean"]))
    with open(paths["threshold_sweep"]) as f:
        sweep = list(csv.DictReader(f))
    assert len(sweep) == 3 * 19 and float(sweep[0]["threshold"]) == pytest.approx(0.05)
    markdown = paths["summary_md"].read_text()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and all(line.count("|") == 11 for line in table)
    assert "| t1 | 66.67 ± 0.00 |" in markdown and "pooled" in markdown


def test_format_table_and_compare_methods():
    result = small_result()
    table = format_table(result.summary)
    assert table.splitlines()[2].startswith("| t1 | 66.67 ± 0.00 | ")
    assert "| t2 | 0.00 ± 0.00 | - |" in table  # no ASSD for an always-empty prediction
    comparison = compare_methods({"CAM": result, "CMER": result})
    lines = comparison.splitlines()
    assert lines[0] == "| method (DSC %) | t1 | t2 | fused |"
    assert lines[2] == "| CAM | 66.67 ± 0.00 | 0.00 ± 0.00 | 66.67 ± 0.00 |"
    assert compare_methods({"CAM": result}, metric="assd").splitlines()[2].split(" | ")[2] == "-"
    with pytest.raises(ValueError):
        compare_methods({"CAM": result}, metric="hd95")


# ---------------------------------------------------------------------------------------
# Figures


def test_figures_are_written_atomically(tmp_path):
    result = small_result()
    sweep_png = plot_threshold_sweep(result.curves(), tmp_path / "fig" / "sweep.png", "test")
    rng = np.random.default_rng(1)
    images = {m: rng.normal(size=(24, 20)) for m in ("t1", "t2", "flair")}
    truth = np.zeros((24, 20), dtype=bool)
    truth[8:16, 6:14] = True
    masks = {"t1": np.roll(truth, 2, axis=0), "flair": truth, "fused": truth | np.roll(truth, 2, axis=0)}
    flat_png = plot_overlays(images, masks, truth, tmp_path / "fig" / "overlay.png", title="s1")
    rows_png = plot_overlays(images, {"CAM": masks, "CMER": {"t1": truth}}, truth, tmp_path / "fig" / "rows.png")
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["overlay.png", "rows.png", "sweep.png"]
    for png in (sweep_png, flat_png, rows_png):
        assert matplotlib.image.imread(png).shape[0] > 50


def test_cam_overlay_grid():
    image = np.linspace(0, 1, 8 * 6).reshape(8, 6)
    cam = np.zeros((8, 6))
    cam[2:5, 2:4] = 1.0
    truth = np.zeros((8, 6), dtype=bool)
    truth[1:7, 1:5] = True
    tile = cam_overlay(image, cam, truth)
    assert tile.shape == (8, 6, 3) and tile.dtype == np.uint8
    plain = cam_overlay(image, np.zeros((8, 6)))
    assert np.all(plain[..., 0] == plain[..., 1])  # zero CAM: grey image untouched
    assert np.all(tile[1, 1] == 255)  # truth contour in white
    assert not np.all(tile[3, 2] == tile[3, 2, 0])  # CAM region coloured
    grid = cam_overlay_grid(torch.from_numpy(np.stack([image] * 3)), [cam] * 3, [truth] * 3, ncols=2, pad=1)
    assert grid.shape == (2 * 9 + 1, 2 * 7 + 1, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid[1:9, 1:7], tile)
    with pytest.raises(ValueError):
        cam_overlay_grid([image], [cam, cam])
