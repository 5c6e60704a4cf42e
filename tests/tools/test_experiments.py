"""The paper's experiments in one command, in its quick form on a tiny phantom."""

import json

from tools import experiments


def test_quick_experiments_write_every_table_and_figure(tmp_path):
    out = tmp_path / "results"
    code = experiments.main([
        "--out", str(out), "--quick", "--dataset-dir", str(tmp_path / "data"),
        "--set", "epochs=1", "base_channels=4", "phantom#spacing=6.0", "spatial_size=[40,40]", "batch_size=8",
    ])
    assert code == 0
    tables = (out / "tables.md").read_text()
    for heading in ("Table II analogue", "Table I analogue", "Table III analogue", "Table V analogue"):
        assert heading in tables
    for run in ("| cam |", "| seam_all |", "| cmer |", "cmer (pair)"):
        assert run in tables
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert {"cam", "seam_all", "cmer", "cmer_t1_t2", "cam@t1_t2"} <= set(summary)
    for name in ("cam", "cmer"):
        assert 0.0 <= summary[name]["fused"]["dsc_mean"] <= 1.0
    assert (out / "sweep_fused.png").stat().st_size > 0
    assert (out / "overlays.png").stat().st_size > 0
    # a second call reuses the trained models instead of training again
    before = (out / "runs" / "cmer" / "models" / "model.pt").stat().st_mtime
    experiments.main(["--out", str(out), "--quick", "--dataset-dir", str(tmp_path / "data"), "--runs", "cmer",
                      "--set", "epochs=1", "base_channels=4", "phantom#spacing=6.0", "spatial_size=[40,40]",
                      "batch_size=8"])
    assert (out / "runs" / "cmer" / "models" / "model.pt").stat().st_mtime == before
