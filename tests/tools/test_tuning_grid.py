"""tools/tuning_grid.py: the grid's points and names, the report from records, and one tiny point end to end."""

import json

import pytest

from tools import tuning_grid as grid

TINY = ["phantom#subjects=6", "phantom#spacing=6.0", "split=[2,2,2]", "spatial_size=[40,40]", "base_channels=4",
        "batch_size=8"]


def test_axes_make_every_combination_with_readable_names():
    axes = [grid.parse_axis("lr=3e-4,1e-3"), grid.parse_axis("epochs=10,20"), grid.parse_axis("objective#reduction=mean")]
    points = grid.grid_points(axes)
    assert len(points) == 4 and points[0] == {"lr": 3e-4, "epochs": 10, "objective#reduction": "mean"}
    assert points[1]["epochs"] == 20 and points[2]["lr"] == 1e-3  # the first axis varies slowest
    assert grid.point_name(points[0]) == "lr=0.0003_epochs=10_objective.reduction=mean"
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        grid.parse_axis("lr")


def _record(run, own, default, paper, fusion="mean", threshold=0.3):
    thresholds = [0.3, 0.5, 0.7]
    return {"run": run, "seed": 1337, "operating_point": {
        "validation": {"dsc": own, "fusion": fusion, "threshold": threshold, "configured_fusion": "mean",
                       "fusions": {"mean": {"threshold": 0.3, "dsc": own, "auc": 0.4}}},
        "validation_sweep": {"fused": {"thresholds": thresholds, "dsc_mean": [own, default, 0.1]},
                             "fused_max": {"thresholds": thresholds, "dsc_mean": [0.2, paper, 0.1]}}}}


def test_the_report_judges_each_point_at_the_methods_own_operating_point(tmp_path):
    for point, own in (("lr=0.001", 0.50), ("lr=0.003", 0.60)):
        folder = tmp_path / point / "seed1337"
        folder.mkdir(parents=True)
        (folder / "cam.json").write_text(json.dumps(_record("cam", own, default=own - 0.2, paper=0.15)))
    (tmp_path / "lr=0.001" / "seed1337" / "cmer.json").write_text(json.dumps(_record("cmer", 0.7, 0.7, 0.65)))
    table = grid.collect(tmp_path, seed=1337)
    assert [name for name, _ in table["cam"]] == ["lr=0.001", "lr=0.003"]
    scores = table["cam"][1][1]
    assert scores["own"] == 0.60 and scores["default"] == pytest.approx(0.40) and scores["paper"] == pytest.approx(0.15)
    text = grid.report(table)
    assert "| cam | lr=0.003 | **60.0 (mean, 0.3)** | 40.0 | 15.0 | 40.0 | - |" in text
    assert "| cam | lr=0.001 | 50.0 (mean, 0.3) |" in text and "| cmer | lr=0.001 | **70.0" in text
    assert grid.collect(tmp_path, seed=7) == {}


def test_one_tiny_point_end_to_end(tmp_path):
    records = tmp_path / "records"
    code = grid.main(["--methods", "cam", "--axis", "epochs=1", "--seed", "0", "--out", str(tmp_path / "out"),
                      "--records", str(records), "--set", *TINY, "--write", str(tmp_path / "grid.md")])
    assert code == 0
    record = json.loads((records / "epochs=1" / "seed0" / "cam.json").read_text())
    assert record["recipe"]["epochs"] == 1 and set(record["evaluations"]) == {"cam", "cam.per_modality"}
    row = next(line for line in (tmp_path / "grid.md").read_text().splitlines() if line.startswith("| cam | epochs=1 |"))
    assert "**" in row and not row.endswith("| - |")  # the per-modality model judged too
    assert not (tmp_path / "out" / "epochs=1" / "runs" / "seed0" / "cam" / "eval_t1_t2").exists()  # --main-only
