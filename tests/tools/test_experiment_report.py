"""tools.experiment_report on a synthetic results document: tables, claims, docs page, model card."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tools import experiment_report as rep
from tools import experiment_stats as st
from tools import experiment_tables as tab

ROOT = Path(__file__).resolve().parents[2]
MAPS = ("t1", "t1c", "t2", "flair", "fused")


def _rows(level: float, seed: int, n: int = 8) -> dict:
    """Per-volume rows whose fused DSC is `level` plus a small per-subject spread (the same in every run)."""
    spread = np.linspace(-0.05, 0.05, n)
    rows = []
    for i in range(n):
        for name in MAPS:
            dsc = level + spread[i] + 0.01 * seed
            rows.append({"subject": f"s{i}", "map": name, "dsc": dsc, "assd": None if i == 0 else 10 * (1 - dsc),
                         "tp": 100, "fp": 50, "fn": 20, "empty_case": "empty_pred" if i == 0 else ""})
    return rep.run_record(rows)


def _document(seeds=(0, 1, 2)) -> dict:
    levels = {"cam": 0.1, "seam_scale": 0.2, "seam_all": 0.2, "cmer": 0.3, "kd_only": 0.3, "kd_er": 0.2,
              "er_cmer": 0.25, "cmer_deeplab": 0.28, "cmer_t1_t2": 0.3, "cam@t1_t2": 0.1}
    first_only = {"kd_only", "kd_er", "er_cmer", "cmer_deeplab", "cmer_t1_t2", "cam@t1_t2"}
    runs = {name: {rep.seed_key(s): _rows(level, s) for s in (seeds[:1] if name in first_only else seeds)}
            for name, level in levels.items()}
    settings = {rep.seed_key(s): {"phantom": {"subjects": 30, "seed": s, "spacing": 3.0}, "spacing": 3.0,
                                  "split_counts": {"training": 18, "validation": 6, "testing": 8}} for s in seeds}
    return rep.build_document(command="python -m tools.experiments --out X", seeds=seeds, pairs=[("t1", "t2")],
                              runs=runs, wall={"seed0/cam": 12.0}, settings=settings,
                              machine=rep.machine_info("cpu", "auto (fp32)"), figures=["sweep_fused.png"],
                              dataset="phantom generated per seed")


def test_the_document_is_plain_json_with_pooled_summaries():
    data = _document()
    text = json.dumps(data, allow_nan=False)  # NaN became null
    assert json.loads(text) == data
    cmer = data["summary"]["cmer"]["fused"]
    assert cmer["dsc_n"] == 24 and cmer["dsc_seeds"] == 3 and cmer["dsc_ci_kind"] == st.CI_SEEDS
    assert cmer["dsc_mean"] == pytest.approx(0.31)  # 0.3 + the mean of the seed offsets 0, 0.01, 0.02
    assert cmer["assd_n"] == 21 and cmer["empty_pred"] == 3
    assert cmer["r_u_pooled"] == pytest.approx(0.2) and cmer["r_o_pooled"] == pytest.approx(0.5)
    assert data["summary"]["kd_only"]["fused"]["dsc_ci_kind"] == st.CI_BOOTSTRAP  # one seed
    assert data["commit"] and data["machine"]["cores"] and data["machine"]["torch"]


def test_claims_are_paired_by_seed_and_subject():
    verdicts = {c["claim"]: c for c in _document()["comparisons"]}
    assert len(verdicts) == len(rep.CLAIMS)
    assert verdicts["CMER > CAM"]["verdict"] == st.REPRODUCED and verdicts["CMER > CAM"]["n"] == 24
    assert verdicts["CMER > CAM"]["mean_difference"] == pytest.approx(0.2)
    assert verdicts["CMER > CAM"]["seeds"] == 3 and verdicts["CMER > CAM"]["p_holm"] == 0.0  # the same gap every seed
    # the same per-subject spread in both runs: a constant shift, every pair agrees; one seed: no seed-level test,
    # so the verdict is inconclusive and the per-volume test is the secondary analysis
    assert verdicts["Table III: KD + ER > KD"]["verdict"] == st.INCONCLUSIVE
    assert "1 seed" in verdicts["Table III: KD + ER > KD"]["reason"]
    assert verdicts["Table III: KD + ER > KD"]["volume_verdict"] == st.NOT_REPRODUCED
    assert verdicts["Table III: KD + ER > KD"]["n"] == 8  # ablations: the first seed only
    assert verdicts["Table III: ER + CMER > KD + ER"]["volume_verdict"] == st.REPRODUCED
    one_seed = {c["claim"]: c for c in _document((0,))["comparisons"]}
    assert one_seed["CMER > SEAM (all)"]["n"] == 8


def test_missing_runs_give_pending_claims_and_empty_tables():
    data = _document()
    del data["runs"]["er_cmer"]
    claims = {c["claim"]: c for c in rep.compare_claims(data)}
    assert claims["Table III: ER + CMER > KD + ER"]["verdict"] == rep.PENDING
    assert "er_cmer" not in tab.table_iii(data)


def test_the_page_shows_the_numbers_of_the_document():
    data = _document()
    page = tab.render_page(data, title="Experiments")
    for heading in ("Table II analogue", "Table I analogue", "Table III analogue", "Table IV analogue",
                    "Table V analogue", "Improvement switches", "tested over seeds", "Read-outs", "Training wall time"):
        assert heading in page
    cmer = data["summary"]["cmer"]["fused"]
    low, high = cmer["dsc_ci"]
    assert f"{100 * cmer['dsc_mean']:.1f} ± {100 * cmer['dsc_std']:.1f} [{100 * low:.1f}, {100 * high:.1f}]" in page
    assert "| CMER trained on the pair |" in page and "| cmer_deeplab |" in page and "**reproduced**" in page
    assert "![sweep_fused](sweep_fused.png)" in page
    assert data["commit"] in page and data["command"] in page


def test_write_docs_renders_results_json_and_copies_the_figures(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(_document()))
    (out / "sweep_fused.png").write_bytes(b"png")
    page = tab.write_docs(out / "results.json", tmp_path / "docs" / "results.md")
    text = page.read_text()
    assert text.startswith("# Results on the embedded phantom") and "Do not edit by hand" in text
    assert "![results_sweep_fused](figures/results_sweep_fused.png)" in text
    assert (tmp_path / "docs" / "figures" / "results_sweep_fused.png").read_bytes() == b"png"


def test_update_metadata_copies_the_main_cmer_row(tmp_path):
    meta = tmp_path / "metadata.json"
    shutil.copyfile(ROOT / "configs" / "metadata.json", meta)
    before = json.loads(meta.read_text())
    data = _document()
    metrics = rep.update_metadata(data, meta)
    after = json.loads(meta.read_text())
    assert after["eval_metrics"] == metrics
    assert metrics["mean_dice_fused"] == round(data["summary"]["cmer"]["fused"]["dsc_mean"], 3)
    assert set(metrics) == set(before["eval_metrics"])  # the same keys as before
    assert "seeds [0, 1, 2]" in metrics["dataset"] and "24 test volumes" in metrics["dataset"]
    assert {k: v for k, v in after.items() if k != "eval_metrics"} == {k: v for k, v in before.items()
                                                                       if k != "eval_metrics"}
    with pytest.raises(ValueError):
        rep.update_metadata({**data, "summary": {}}, meta)


def test_sweep_curves_are_kept_in_the_record_and_averaged_over_seeds():
    from tools.experiment_figures import mean_curves

    thresholds = np.array([0.25, 0.5, 0.75])

    def record(level):
        return rep.run_record([], {"fused": {"thresholds": thresholds, "dsc_mean": np.full(3, level),
                                             "dsc_std": np.zeros(3)}})

    assert record(0.2)["sweep"]["fused"] == {"thresholds": [0.25, 0.5, 0.75], "dsc_mean": [0.2, 0.2, 0.2]}
    data = {"runs": {"cmer": {"seed0": record(0.2), "seed1": record(0.4)}, "cam@t1_t2": {"seed0": record(0.1)},
                     "stage2": {"seed0": rep.run_record([])}}}
    curves = mean_curves(data, "fused")
    assert set(curves) == {"cmer"}
    assert curves["cmer"][0].tolist() == [0.25, 0.5, 0.75] and curves["cmer"][1] == pytest.approx([0.3] * 3)


def test_training_curves_give_the_kept_epoch_table_and_figure(tmp_path):
    from tools.experiment_figures import CURVES, curves_figure

    def curves(peak_epoch, acc):
        epochs = [{"epoch": e, "val_dsc_fused": 0.5 - 0.1 * abs(e - peak_epoch), "val_dsc_t1": 0.1 * e,
                   "val_acc_t1": acc} for e in (1, 2, 3)]
        return {"key_metric": "val_dsc_fused", "epochs": epochs}

    data = {**_document(), "curves": {"cam": {"seed0": curves(2, 0.6), "seed1": curves(3, 0.8)}}}
    kept = rep.best_epochs(data, "cam")
    assert {seed: e["epoch"] for seed, e in kept.items()} == {"seed0": 2, "seed1": 3}
    assert rep.best_epochs(data, "cmer") == {} and rep.best_epochs(_document(), "cam") == {}
    table = tab.table_learning(data)
    # t1: accuracy (60 + 80) / 2, DSC at the kept epochs (20 + 30) / 2; t2 has no curve values
    assert "| CAM | 2, 3 | 70.0 / 25.0 | - / - |" in table and len(table.strip().splitlines()) == 3
    assert "No run recorded" in tab.table_learning(_document())
    assert "Training: slice accuracy" in tab.render_page(data)
    target = curves_figure(data, tmp_path)
    assert target == tmp_path / CURVES and target.stat().st_size > 0
    assert curves_figure(_document(), tmp_path / "none") is None


def test_dsc_by_grade_needs_graded_subject_ids():
    data = _document()
    assert "do not name the tumour grade" in tab.table_by_grade(data)
    for by_seed in data["runs"].values():
        for record in by_seed.values():
            for row in record["rows"]:
                row["subject"] = ("Phantom_HGG_" if int(row["subject"][1:]) < 4 else "Phantom_LGG_") + row["subject"]
    table = tab.table_by_grade(data)
    hgg = [r["dsc"] for rec in data["runs"]["cam"].values() for r in rec["rows"]
           if r["map"] == "t1" and "HGG" in r["subject"]]
    assert f"| CAM | {100 * sum(hgg) / len(hgg):.1f} / " in table and "| 12 / 12 |" in table  # 4 + 4 a seed, 3 seeds
    assert tab.grade_of("BraTS19_CBICA_AAB_1") is None


def test_the_page_lists_the_runs_not_recorded_yet():
    data = _document()
    assert "**Pending.**" not in tab.render_page(data) and "**Incomplete.**" in tab.render_page(data)
    page = tab.render_page({**data, "planned_runs": 35, "pending_runs": ["seed0/kd_only", "seed0/cmer_flip"]})
    assert "> **Pending.** 2 of the plan's 35 runs are not recorded yet" in page and "seed0/cmer_flip." in page


def test_one_seed_runs_get_r_u_and_r_o_on_the_first_seed():
    data = _document()
    for row in data["runs"]["kd_only"]["seed0"]["rows"]:
        row["fp"] = 300  # r_o 3.00
    for row in data["runs"]["cmer"]["seed1"]["rows"]:
        row["fp"] = 1000  # another seed: left out of the first-seed table
    assert tab.first_seed_runs(data) == ["cmer", "kd_only", "kd_er", "er_cmer", "cmer_t1_t2", "cmer_deeplab"]
    table = tab.table_v_first(data)
    assert "| cmer | " + " | ".join(["0.20 / 0.50"] * 5) + " |" in table
    assert "| kd_only | " + " | ".join(["0.20 / 3.00"] * 5) + " |" in table
    assert "r_u / r_o of the one-seed runs" in tab.render_page(data)
    assert "No one-seed run" in tab.table_v_first({**data, "runs": {"cmer": data["runs"]["cmer"]}})


def test_fig3_claims_follow_the_papers_text():
    fig3 = {c[4]: c for c in rep.CLAIMS if c[4].startswith("Fig. 3")}
    assert len(fig3) == 12
    assert fig3["Fig. 3: CAM > scale alone, flair"][:4] == ("cam", "flair", "cmer_scale", "flair")
    assert fig3["Fig. 3: CAM > translation alone, t1"][:4] == ("cam", "t1", "cmer_translation", "t1")
    assert fig3["Fig. 3: rotation alone > CAM, t1c"][:4] == ("cmer_rotation", "t1c", "cam", "t1c")
