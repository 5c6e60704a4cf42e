"""Run records of tools.experiments: a finished run leaves one, a recorded run is done, a cut-off run leaves
none, and one table holds one precision and one recipe (runs stubbed: no training)."""

import json

import numpy as np
import pytest

from scripts.precision import resolve_precision
from tools import experiment_records as rec
from tools import experiment_report as rep
from tools import experiments as ex


def _body(run, level=0.5):
    rows = [{"subject": f"s{i}", "map": m, "dsc": level + 0.01 * i, "assd": 3.0, "tp": 10, "fp": 2, "fn": 3,
             "empty_case": ""} for i in range(6) for m in ("t1", "t1c", "t2", "flair", "fused")]
    return {"evaluations": {run.name: rep.run_record(rows)}, "settings": {"seed": run.seed},
            "wall_seconds": {"train": 1.0, "evaluate": 0.5}}


@pytest.fixture
def stubbed(monkeypatch):
    """Replace training + evaluation by a stub that counts its calls; `fail` names a run that is cut off."""
    calls, fail = [], set()

    def stage1(run, ctx):
        calls.append(run.key)
        if run.key in fail:
            raise KeyboardInterrupt  # the session ends mid-run
        return _body(run)

    monkeypatch.setattr(ex, "stage1_record", stage1)
    monkeypatch.setattr(ex, "stage2_record", lambda run, ctx, stage1: stage1(run, ctx))
    return calls, fail


def _main(tmp_path, *extra):
    return ex.main(["--out", str(tmp_path / "out"), "--records", str(tmp_path / "records"), "--device", "cpu",
                    "--seeds", "4", "5", "--runs", "cam", "cmer", *extra])


def test_a_recorded_run_is_done_and_a_cut_off_run_leaves_no_record(tmp_path, stubbed):
    calls, fail = stubbed
    fail.add("seed5/cam")
    with pytest.raises(KeyboardInterrupt):
        _main(tmp_path)
    assert calls == ["seed4/cmer", "seed4/cam", "seed5/cmer", "seed5/cam"]
    written = sorted(p.relative_to(tmp_path / "records").as_posix() for p in (tmp_path / "records").rglob("*.json"))
    assert written == ["seed4/cam.json", "seed4/cmer.json", "seed5/cmer.json"]  # not the cut-off seed5/cam
    record = json.loads((tmp_path / "records" / "seed4" / "cmer.json").read_text())
    for key in ("precision", "recipe", "machine", "commit", "command", "date", "evaluations", "plan_seeds"):
        assert record[key], key
    assert record["machine"]["torch"] and record["machine"]["monai"] and record["machine"]["cpu"]
    # the next session, on a fresh working folder: only the run without a record runs
    fail.clear()
    calls.clear()
    (tmp_path / "out").rename(tmp_path / "old_out")
    assert _main(tmp_path) == 0
    assert calls == ["seed5/cam"]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data["runs"]["cmer"]) == {"seed4", "seed5"} and set(data["runs"]["cam"]) == {"seed4", "seed5"}


def test_another_recipe_or_precision_is_refused_unless_allowed(tmp_path, stubbed, capsys):
    calls, _ = stubbed
    assert _main(tmp_path) == 0
    calls.clear()
    (tmp_path / "records" / "seed5" / "cam.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        _main(tmp_path, "--set", "epochs=3")
    assert exit_info.value.code == 2 and calls == []  # refused before training anything
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "epochs: 10 != 3" in err and "--allow-mixed" in err
    other = "fp32" if resolve_precision("auto", "cpu") == "bf16" else "bf16"  # not what the records hold here
    with pytest.raises(SystemExit):
        _main(tmp_path, "--set", f"precision={other}")
    assert _main(tmp_path, "--set", "epochs=3", "--allow-mixed") == 0
    assert calls == ["seed5/cam"]
    page = (tmp_path / "out" / "tables.md").read_text()
    assert "Mixed (--allow-mixed)" in page
    with pytest.raises(rec.MixedRecords):  # the table itself, without --allow-mixed
        ex.results_document(ex.full_plan((4, 5)), tmp_path / "records")


def test_report_only_rebuilds_the_tables_from_the_records_alone(tmp_path, stubbed):
    assert _main(tmp_path) == 0
    (tmp_path / "out" / "results.json").unlink()
    assert ex.main(["--out", str(tmp_path / "out"), "--records", str(tmp_path / "records"), "--report-only"]) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["seeds"] == [4, 5] and data["machines"][0]["runs"]
    assert "Incomplete" in (tmp_path / "out" / "tables.md").read_text()  # stage 2, SEAM, ... not recorded


def test_masks_survive_packing():
    mask = np.random.default_rng(0).random((7, 9)) > 0.5
    assert (rec.unpack_mask(rec.pack_mask(mask), mask.shape) == mask).all()
