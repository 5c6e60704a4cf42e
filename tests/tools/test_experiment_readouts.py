"""tools.experiment_readouts and Fig. 4 on a small results document whose DSC-versus-threshold curves are made here."""

import math

import numpy as np
import pytest

from scripts.workflows.metrics import DEFAULT_SWEEP
from tools import experiment_figures as figs
from tools import experiment_readouts as ro
from tools import experiment_tables as tab

T = DEFAULT_SWEEP.tolist()


def tent(peak: float, height: float) -> list:
    return np.clip(height - 2 * np.abs(np.asarray(T) - peak), 0, 1).tolist()


def _record(peak: float, height: float, with_max: bool) -> dict:
    sweep = {n: {"thresholds": T, "dsc_mean": tent(peak, height)} for n in ("t1", "flair", "fused")}
    if with_max:
        sweep["fused_max"] = {"thresholds": T, "dsc_mean": tent(peak + 0.1, height - 0.1)}
    return {"rows": [], "sweep": sweep}


def _document(new_records: bool = True) -> dict:
    seeds = (1, 2, 3)
    levels = {"cam": (0.3, 0.5), "cmer": (0.5, 0.7)}  # peak threshold, peak DSC
    runs = {r: {f"seed{s}": _record(p, h + 0.01 * s, new_records) for s in seeds} for r, (p, h) in levels.items()}
    points = {}
    if new_records:  # validation chose a threshold 0.05 off the test peak
        for r, (p, h) in levels.items():
            points[r] = {f"seed{s}": {"validation": {"fusion": "mean", "threshold": round(p + 0.05, 2)},
                                      "test": {"chosen": h + 0.01 * s - 0.1}} for s in seeds}
    return {"runs": runs, "seeds": list(seeds), "operating_points": points}


def test_each_read_out_is_read_off_the_curves():
    data = _document()
    cam = ro.seed_readouts(data, "cam", "seed1")
    assert cam["reported"][0] == pytest.approx(0.51 - 2 * 0.2)  # at 0.5 on a curve that peaks at 0.3
    assert cam["oracle"][:2] == (pytest.approx(0.51), pytest.approx(0.3))
    assert cam["paper"][0] == pytest.approx(0.41 - 2 * 0.1) and cam["paper"][2] == "max"
    assert cam["validation"] == (pytest.approx(0.41), 0.35, "mean")
    assert cam["area"] == pytest.approx(np.trapezoid(tent(0.3, 0.51), T) / 0.9)
    old = ro.seed_readouts(_document(new_records=False), "cam", "seed1")  # records from before the operating point
    assert math.isnan(old["paper"][0]) and math.isnan(old["validation"][0]) and math.isfinite(old["oracle"][0])


def test_gaps_are_paired_by_seed_with_a_t_interval():
    data = _document()
    reported = ro.gap(data, "cmer", "cam", "reported")
    assert reported["seeds"] == 3 and reported["mean"] == pytest.approx(0.7 - (0.5 - 0.4))
    oracle = ro.gap(data, "cmer", "cam", "oracle")
    assert oracle["mean"] == pytest.approx(0.2) and oracle["ci_low"] == pytest.approx(0.2)  # the same gap each seed
    table = ro.gap_table(data)
    assert "| cmer - cam | 60.0 [60.0, 60.0] |" in table


def test_the_tables_and_fig4_render(tmp_path):
    data = _document()
    table = ro.readout_table(data)
    assert "| **cam** | mean of 3 |" in table and "(at 0.3: 51.0 / 52.0 / 53.0)" in table
    assert "| cam | 1 | 11.0 | 21.0 | 41.0 (mean, 0.35) | 51.0 (0.3) |" in table
    assert "| cam |" in ro.area_table(data)
    target = figs.fig4_figure(data, tmp_path)
    assert target.name == figs.FIG4 and target.stat().st_size > 0
    assert figs.FIG4 in figs.figure_names(tmp_path)
    assert figs.fig4_figure({"runs": {"cam": {"seed1": {"rows": []}}}, "seeds": [1]}, tmp_path / "none") is None
    assert "fig4" not in tab.READOUT_NOTE and "CMER runs only" in tab.READOUT_NOTE
