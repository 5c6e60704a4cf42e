"""tools.experiment_stats on small synthetic samples with known answers."""

import math

import numpy as np
import pytest
from scipy import stats

from tools import experiment_stats as st


def test_t_interval_matches_the_formula():
    low, high = st.t_interval([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd (ddof=1) of 1, 2, 3 is 1
    assert low == pytest.approx(2.0 - half) and high == pytest.approx(2.0 + half)
    assert all(math.isnan(v) for v in st.t_interval([5.0]))
    assert all(math.isnan(v) for v in st.t_interval([None, float("nan")]))


def test_bootstrap_interval_is_seeded_and_holds_the_true_mean():
    sample = np.random.default_rng(7).permutation(np.linspace(0.3, 0.7, 41))  # true mean 0.5
    first, second = st.bootstrap_interval(sample), st.bootstrap_interval(sample)
    assert first == second  # the same seed, the same interval
    assert 0.45 < first[0] < 0.5 < first[1] < 0.55
    assert st.bootstrap_interval(sample, seed=1) != first
    assert st.bootstrap_interval([0.3]) == (0.3, 0.3)
    assert all(math.isnan(v) for v in st.bootstrap_interval([]))


def test_cell_pools_volumes_and_takes_the_interval_over_seeds():
    one = st.cell_stats({"seed0": [0.2, 0.4, None, float("nan")]})
    assert one["n"] == 2 and one["seeds"] == 1
    assert one["mean"] == pytest.approx(0.3) and one["std"] == pytest.approx(0.1)  # ddof 0
    assert one["ci_kind"] == st.CI_BOOTSTRAP and 0.2 <= one["ci_low"] <= one["ci_high"] <= 0.4

    three = st.cell_stats({"seed0": [0.1, 0.3], "seed1": [0.4, 0.4], "seed2": [0.5, 0.7]})
    assert three["n"] == 6 and three["seeds"] == 3 and three["ci_kind"] == st.CI_SEEDS
    assert three["mean"] == pytest.approx(0.4)
    assert three["seed_means"] == pytest.approx({"seed0": 0.2, "seed1": 0.4, "seed2": 0.6})
    assert (three["ci_low"], three["ci_high"]) == pytest.approx(st.t_interval([0.2, 0.4, 0.6]))

    wide = st.cell_stats({"seed0": [0.0, 0.02], "seed1": [0.9, 1.0]}, bounds=(0.0, 1.0))
    assert wide["ci_low"] == 0.0 and wide["ci_high"] == 1.0  # the t interval is wider than DSC's range
    assert st.cell_stats({"seed0": [0.0, 0.02], "seed1": [0.9, 1.0]})["ci_low"] < 0

    empty = st.cell_stats({"seed0": [], "seed1": [None]})
    assert empty["n"] == 0 and empty["seeds"] == 0 and math.isnan(empty["mean"]) and empty["ci_kind"] == st.CI_NONE


def _keyed(values, seed="seed0"):
    return {(seed, f"s{i}"): v for i, v in enumerate(values)}


def test_a_clear_shift_in_the_papers_direction_is_reproduced():
    worse = np.linspace(0.1, 0.5, 10)
    better = worse + 0.1 + np.linspace(-0.02, 0.02, 10)
    result = st.paired_comparison(_keyed(better), _keyed(worse))
    assert result["verdict"] == st.REPRODUCED and result["p_value"] < 0.05
    assert result["n"] == 10 and result["mean_difference"] == pytest.approx(0.1)
    assert result["ci_low"] < 0.1 < result["ci_high"]


def test_a_clear_shift_the_other_way_is_not_reproduced():
    worse = np.linspace(0.3, 0.6, 8)
    result = st.paired_comparison(_keyed(worse - 0.2), _keyed(worse))
    assert result["verdict"] == st.NOT_REPRODUCED and result["p_value"] < 0.05
    assert result["ci_high"] < 0


def test_no_difference_or_no_evidence_is_inconclusive():
    same = _keyed(np.linspace(0.1, 0.9, 10))
    zero = st.paired_comparison(same, same)
    assert zero["verdict"] == st.INCONCLUSIVE and "zero" in zero["reason"] and zero["ci_low"] == zero["ci_high"] == 0
    symmetric = st.paired_comparison(_keyed([0.5 + d for d in (0.1, -0.1) * 5]), _keyed([0.5] * 10))
    assert symmetric["verdict"] == st.INCONCLUSIVE and symmetric["p_value"] >= 0.05


def test_degenerate_inputs_are_inconclusive_with_a_reason():
    few = st.paired_comparison(_keyed([0.9, 0.8, 0.9, 0.8]), _keyed([0.1, 0.2, 0.1, 0.2]))
    assert few["verdict"] == st.INCONCLUSIVE and "fewer than 6" in few["reason"] and math.isnan(few["p_value"])
    none = st.paired_comparison({}, _keyed([0.1] * 8))
    assert none["verdict"] == st.INCONCLUSIVE and none["n"] == 0 and "missing" in none["reason"]
    # only keys both hold, with finite values, are paired: another seed's volumes are not
    mixed = st.paired_comparison({**_keyed([0.9] * 3), ("seed0", "s3"): None}, _keyed([0.1] * 8, seed="seed1"))
    assert mixed["n"] == 0


def test_verdict_rules():
    assert st.verdict(0.1, 0.01) == st.REPRODUCED
    assert st.verdict(-0.1, 0.01) == st.NOT_REPRODUCED
    assert st.verdict(0.1, 0.2) == st.INCONCLUSIVE
    assert st.verdict(0.1, float("nan")) == st.INCONCLUSIVE


# ----------------------------------------------------------------------------- seed level, Holm


def _by_seed(levels: dict, n: int = 5, noise: float = 0.0) -> dict:
    """{(seed, subject): value}: each seed's level plus a per-subject spread."""
    spread = np.linspace(-noise, noise, n)
    return {(seed, f"s{i}"): level + spread[i] for seed, level in levels.items() for i in range(n)}


def test_seed_level_test_pairs_seed_means_and_needs_three_seeds():
    better = _by_seed({"seed1": 0.60, "seed2": 0.70, "seed3": 0.65}, noise=0.1)
    worse = _by_seed({"seed1": 0.40, "seed2": 0.45, "seed3": 0.50}, noise=0.1)
    result = st.seed_comparison(better, worse)
    assert result["seeds"] == 3 and result["seed_differences"] == pytest.approx(
        {"seed1": 0.2, "seed2": 0.25, "seed3": 0.15})
    expected = stats.ttest_1samp([0.2, 0.25, 0.15], 0.0)
    assert result["p_value"] == pytest.approx(expected.pvalue) and result["verdict"] == st.REPRODUCED
    low, high = st.t_interval([0.2, 0.25, 0.15])
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # many volumes of two seeds: still no seed-level test
    two = st.seed_comparison(_by_seed({"a": 0.9, "b": 0.8}, n=40), _by_seed({"a": 0.1, "b": 0.2}, n=40))
    assert two["verdict"] == st.INCONCLUSIVE and "2 seeds" in two["reason"] and math.isnan(two["p_value"])
    # one seed reversed: the volumes would agree, the seeds do not
    mixed = st.seed_comparison(_by_seed({"a": 0.6, "b": 0.7, "c": 0.3}), _by_seed({"a": 0.4, "b": 0.5, "c": 0.4}))
    assert mixed["verdict"] == st.INCONCLUSIVE and mixed["p_value"] > 0.05


def test_holm_adjusts_step_down_and_skips_untested_claims():
    assert st.holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, math.nan, 0.02], nan_ok=True)
    assert st.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # monotone, capped at 1
    results = [{"mean_difference": 0.1, "p_value": 0.02}, {"mean_difference": -0.1, "p_value": 0.001},
               {"mean_difference": 0.1, "p_value": 0.06}, {"mean_difference": 0.1, "p_value": math.nan,
                                                             "verdict": st.INCONCLUSIVE, "reason": "1 seed"}]
    st.apply_holm(results)
    assert [r["verdict"] for r in results] == [st.REPRODUCED, st.NOT_REPRODUCED, st.INCONCLUSIVE, st.INCONCLUSIVE]
    assert results[0]["p_holm"] == pytest.approx(0.04) and "family of 3" in results[0]["reason"]
    assert results[3]["reason"] == "1 seed"  # untested: left as it was
