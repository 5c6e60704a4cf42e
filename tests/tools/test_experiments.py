"""The paper's experiments in one command, in its quick form on a tiny phantom."""

import json

from scripts.precision import resolve_precision
from tools import experiments

TINY = ["--set", "epochs=1", "base_channels=4", "phantom#spacing=6.0", "spatial_size=[40,40]", "batch_size=8"]


def test_quick_experiments_write_every_table_and_figure(tmp_path):
    out = tmp_path / "results"
    code = experiments.main(["--out", str(out), "--quick", "--seeds", "0", "1", *TINY])
    assert code == 0
    tables = (out / "tables.md").read_text()
    for heading in ("Table II analogue", "Table I analogue", "Table III analogue", "Table V analogue",
                    "tested over seeds"):
        assert heading in tables
    for run in ("| CAM |", "| SEAM (all) |", "| CMER (proposed) |", "| stage 2, `auto` pseudo-masks |",
                "CMER trained on the pair", "CMER (proposed) (GradCAM++)"):
        assert run in tables
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1]
    summary = data["summary"]
    assert {"cam", "seam_all", "cmer", "stage2", "cmer_t1_t2", "cam@t1_t2", "cmer.gradcampp"} <= set(summary)
    for name in ("cam", "cmer", "stage2"):
        assert 0.0 <= summary[name]["fused"]["dsc_mean"] <= 1.0
    # every seed: its own phantom, split and runs; the pair run for the first seed only
    assert set(data["runs"]["cmer"]) == set(data["runs"]["stage2"]) == {"seed0", "seed1"}
    assert set(data["runs"]["cmer_t1_t2"]) == set(data["runs"]["cam@t1_t2"]) == {"seed0"}
    assert summary["cmer"]["fused"]["dsc_seeds"] == 2 and summary["cmer"]["fused"]["dsc_ci_kind"] == "t over seeds"
    for seed in (0, 1):
        datalist = json.loads((out / "data" / f"seed{seed}" / "datalist.json").read_text())
        assert datalist["seed"] == data["settings"][f"seed{seed}"]["split_seed"] == seed
        assert data["settings"][f"seed{seed}"]["phantom"]["seed"] == seed
        assert (out / "runs" / f"seed{seed}" / "cmer" / "models" / "model.pt").is_file()
        assert (out / "cache" / f"seed{seed}").is_dir()
    claims = {c["claim"]: c for c in data["comparisons"]}
    assert claims["CMER > CAM"]["n"] == summary["cmer"]["fused"]["dsc_n"] == 4  # 2 test volumes a seed
    assert claims["CMER > CAM"]["verdict"] == "inconclusive"  # too few pairs
    # one record per finished run, with the provenance a table needs and no weights
    record = json.loads((out / "records" / "seed1" / "cmer.json").read_text())
    assert record["precision"] == resolve_precision("auto", "cpu") and record["machine"]["torch"] and record["commit"]
    # extra read-outs on seed 0; every seed: each network at its own best validation epoch (model_per_modality.pt)
    assert record["recipe"]["epochs"] == 1 and set(record["evaluations"]) == {"cmer", "cmer.per_modality"}
    assert record["operating_point_per_modality"]["validation"]["split"] == "validation"
    assert "cmer.gradcampp" in json.loads((out / "records" / "seed0" / "cmer.json").read_text())["evaluations"]
    assert not list((out / "records").rglob("*.pt"))
    assert [e["epoch"] for e in record["curves"]["epochs"]] == [1]  # the training curves travel with the record
    assert record["curves"]["key_metric"] == "val_dsc_fused" and "val_acc_t1" in record["curves"]["epochs"][0]
    assert "| CMER (proposed) | 1, 1 |" in tables and (out / "curves.png").stat().st_size > 0
    assert (out / "sweep_fused.png").stat().st_size > 0
    # the operating point: chosen on validation (threshold per fusion), recorded beside model.pt and in the record,
    # read back on the test split; the paper's max fusion swept beside the default's
    point = record["operating_point"]
    assert point["validation"]["split"] == "validation" and set(point["validation"]["fusions"]) == {"mean", "max"}
    assert "chosen" in point["test"] and "fused" in point["validation_sweep"]
    assert (out / "runs" / "seed1" / "cmer" / "models" / "model.operating_point.json").is_file()
    assert "fused_max" in record["evaluations"]["cmer"]["sweep"]
    assert (out / "fig4_threshold.png").stat().st_size > 0 and "Read-outs" in tables
    assert (out / "overlays.png").stat().st_size > 0
    # a second call reuses the trained models, keeps the other runs' rows and writes the docs page
    model = out / "runs" / "seed0" / "cmer" / "models" / "model.pt"
    before = model.stat().st_mtime
    docs = tmp_path / "docs" / "results.md"
    experiments.main(["--out", str(out), "--quick", "--seeds", "0", "1", "--runs", "cmer", "--write-docs", str(docs),
                      *TINY])
    assert model.stat().st_mtime == before
    page = docs.read_text()
    assert "| CMER (proposed) |" in page and "| CAM |" in page and (docs.parent / "figures" / "results_sweep_fused.png").is_file()
    assert json.loads((out / "results.json").read_text())["commit"] in page
    # the tables again from the records alone (the plan, seeds and --set read back from them)
    (out / "tables.md").unlink()
    assert experiments.main(["--out", str(out), "--report-only"]) == 0
    assert "| stage 2, `auto` pseudo-masks |" in (out / "tables.md").read_text()
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1]


def test_fixed_data_keep_the_data_and_vary_the_split(tmp_path):
    out, data = tmp_path / "results", tmp_path / "data"
    assert experiments.main(["--out", str(out), "--quick", "--dataset-dir", str(data), "--seeds", "3",
                             "--runs", "cam", *TINY]) == 0
    assert not (data / "datalist.json").exists()  # the data folder is left as it is
    assert json.loads((out / "splits" / "seed3" / "datalist.json").read_text())["seed"] == 3
    assert set(json.loads((out / "results.json").read_text())["runs"]) == {"cam", "cam@t1_t2", "cam.per_modality"}
    assert json.loads((out / "records" / "seed3" / "cam.json").read_text())["dataset_dir"] == "data"


def test_jobs_run_at_once_in_their_own_processes_and_stage2_waits_for_its_stage1(tmp_path):
    out = tmp_path / "results"
    argv = ["--out", str(out), "--quick", "--seeds", "0", "--runs", "cam", "cmer", "stage2", "--jobs", "2",
            "--threads", "1", *TINY]
    assert experiments.main(argv) == 0
    records = {p.stem: json.loads(p.read_text()) for p in (out / "records" / "seed0").glob("*.json")}
    assert set(records) == {"cam", "cmer", "stage2"}
    # every child records the parent's command, not its own
    assert {r["command"] for r in records.values()} == {experiments.command_line(argv)}
    assert records["stage2"]["stage1_is_recorded_model"] is True  # it learnt from the recorded CMER weights
    assert (out / "logs" / "seed0_stage2.log").is_file() and (out / "tables.md").is_file()
    assert experiments.main(argv) == 0  # everything recorded: nothing runs again
    assert json.loads((out / "records" / "seed0" / "cmer.json").read_text())["date"] == records["cmer"]["date"]
