"""tools/stage1_study.py: log parsing, summaries, the report table and the skip-if-recorded rule
(no training here: the runner is replaced by a stand-in that writes what a run would)."""

import json

import pytest

from tools import stage1_study as study

LOG = ("Epoch [1/2]: [59/60] 2026-12-04 06:00:00,000 - INFO - Epoch: 1/2, Iter: 60/60 -- flair/L_C: 0.66 "
       "flair/grad_share_L_ER: 0.0300 flair/grad_share_L_CMER: 0.2000 lambda_e: 0.0183 loss: 1.0 "
       "t2/grad_share_L_ER: 0.0100 t2/grad_share_L_CMER: 0.4000\n"
       "no shares on this line\n"
       "2026-12-04 - INFO - Epoch: 2/2, Iter: 60/60 -- flair/grad_share_L_ER: 0.5 lambda_e: 1.0000 "
       "t2/grad_share_L_ER: 0.1 flair/grad_share_L_CMER: 1.0 t2/grad_share_L_CMER: 2.0\n")


def _epoch(epoch, fused, flair):
    return {"epoch": epoch, "val_dsc_fused": fused, "val_dsc_flair": flair, "val_acc_flair": 0.9}


def _record(name, seed, fused_by_epoch):
    epochs = [_epoch(e + 1, f, f) for e, f in enumerate(fused_by_epoch)]
    return {"candidate": name, "seed": seed, "precision_resolved": "fp32", "wall_s": 600.0,
            "epochs": epochs, "grad_shares": study.grad_shares(LOG)}


def test_grad_shares_are_read_per_line_with_epoch_and_lambda():
    rows = study.grad_shares(LOG)
    assert len(rows) == 2
    assert rows[0]["epoch"] == 1 and rows[0]["lambda_e"] == pytest.approx(0.0183)
    assert rows[0]["t2/L_CMER"] == pytest.approx(0.4) and rows[1]["flair/L_ER"] == pytest.approx(0.5)


def test_summary_keeps_the_best_fused_epoch_and_the_last_three_spread():
    summary = study.summarise([_epoch(1, 0.1, 0.1), _epoch(2, 0.4, 0.4), _epoch(3, 0.3, 0.3), _epoch(4, 0.35, 0.3)])
    assert summary["best"]["epoch"] == 2 and summary["last"]["epoch"] == 4
    assert summary["last3_spread"] == pytest.approx(0.1)
    # a single-network run has no fused map: its own DSC ranks the epochs
    single = study.summarise([{"epoch": 1, "val_dsc_t2": 0.2}, {"epoch": 2, "val_dsc_t2": 0.1}])
    assert single["best"]["epoch"] == 1


def test_report_gives_mean_and_std_over_seeds_and_shares_at_the_largest_lambda():
    table = study.report([_record("a", 1, [0.2, 0.4]), _record("a", 2, [0.6, 0.2])])
    row = next(line for line in table.splitlines() if line.startswith("| a |"))
    assert "| 1,2 |" in row and "50.0 ± 14.1" in row  # best fused 40 and 60
    assert "0.30 / 1.50" in row  # ER (0.5 + 0.1) / 2, CMER (1 + 2) / 2 at lambda_E = 1


def test_a_recorded_run_is_skipped_and_a_failed_one_leaves_no_record(tmp_path, monkeypatch, capsys):
    out = tmp_path / "records"
    calls = []

    def fake_run(name, overrides, seed, precision, args):
        calls.append((name, seed))
        return None if seed == 2 else _record(name, seed, [0.3])

    monkeypatch.setattr(study, "run_one", fake_run)
    monkeypatch.setattr(study, "resolved_precision", lambda precision: "fp32")
    argv = ["--candidates", "default", "--seeds", "1", "2", "--out", str(out), "--work", str(tmp_path / "w")]
    assert study.main(argv) == 0
    assert calls == [("default", 1), ("default", 2)]
    assert (out / "default" / "fp32" / "seed1.json").is_file() and not (out / "default" / "fp32" / "seed2.json").exists()
    calls.clear()
    assert study.main(argv) == 0
    assert calls == [("default", 2)]  # seed 1 is recorded: not run again
    assert json.loads((out / "default" / "fp32" / "seed1.json").read_text())["seed"] == 1


def test_unknown_candidate_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        study.main(["--candidates", "nope", "--out", str(tmp_path)])


def test_each_network_is_also_reported_at_its_own_best_epoch():
    record = _record("a", 1, [0.2, 0.4])
    record["epochs"][0]["val_dsc_t1"], record["epochs"][1]["val_dsc_t1"] = 0.5, 0.1  # T1 peaks at epoch 1
    assert study.own_best(record, "t1") == (1, 0.5) and study.own_best(record, "t2") is None
    assert study.own_best({"epochs": [_epoch(1, 0.3, 0.3), _epoch(2, 0.3, 0.3)]}, "flair")[0] == 1  # a tie: the earlier
    table = study.report([record])
    row = next(line for line in table.splitlines() if line.startswith("| a | fp32 |") and "->" in line)
    assert "10.0 -> 50.0 (1)" in row  # at the fused-best epoch 2 T1 had 10 %, at its own epoch 1 50 %


def test_every_candidate_overrides_settings_that_train_yaml_has():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(study.BUNDLE_ROOT / "configs" / "train.yaml"))
    for name, (_, overrides) in study.CANDIDATES.items():
        keys = overrides[0::2]
        assert all(key.startswith("--") for key in keys), f"{name}: overrides are --key value pairs: {overrides}"
        for key in keys:
            path = key[2:]
            assert path in parser, f"candidate {name}: configs/train.yaml has no {path!r}"
