"""Statistics of the experiment tables: intervals per cell, paired tests of the paper's claims.

Per table cell (one run, one map, one metric) the values are the per-volume metrics of the
test split of every seed that ran it:

- **mean ± std** over all those volumes pooled over seeds (population std, ddof = 0, as
  `scripts.workflows.metrics` reports one evaluation);
- a **95 % interval of the mean**: with two or more seeds, the Student t interval on the
  per-seed means (mean of the k per-seed means ± t(0.975, k - 1) · sd / sqrt(k), sd with
  ddof = 1), which measures how much the result moves when the training seed, the phantom and
  the split change; with one seed only, a seeded percentile bootstrap of the mean over that
  seed's volumes (`BOOTSTRAP_SAMPLES` resamples, `BOOTSTRAP_SEED`), which measures the spread
  over test volumes only. The cell records which of the two it is (`ci_kind`). An interval
  is clipped to the metric's range when one is given (`bounds`: DSC in [0, 1], ASSD >= 0).

Claims are tested at the level of runs first (`seed_comparison`, the primary verdict): each seed
gives one number per side, the mean over the test volumes both runs evaluated in that seed, and the
claim is a paired Student t test over those seed means (two-sided, df = seeds - 1) with the t
interval of the mean difference. A seed is one draw of everything that varies between runs
(training seed, phantom, split), so this is what "the method is better" means; volumes of one run
share its weights and are not independent draws of it. With fewer than `MIN_SEEDS` paired seeds
there is no seed-level test and the claim is inconclusive ("one seed"). The p-values of the claim
list are corrected for multiplicity with Holm's step-down method (`holm`), and the verdict reads
the adjusted p.

Per volume, as the secondary analysis: paired comparisons (`paired_comparison`) take two runs' values keyed by (seed, subject), so
only volumes both runs evaluated, with the same training seed and data, are paired. The
difference is `better - worse` in the paper's direction. Reported: the number of pairs, the
mean difference, a seeded paired percentile bootstrap interval of the mean difference and the
two-sided Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, zero differences dropped).
Verdict:

- "reproduced": mean difference in the paper's direction and p < `ALPHA`;
- "not reproduced": mean difference in the opposite direction and p < `ALPHA`;
- "inconclusive": otherwise, with a reason. Degenerate inputs are inconclusive, never an
  error: fewer than `MIN_PAIRS` non-zero differences (the exact two-sided test cannot reach
  p < 0.05 below 6: its smallest p is 2 / 2^n), all differences zero, no pairs.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping

import numpy as np
from scipy import stats

ALPHA = 0.05
CONFIDENCE = 0.95
MIN_PAIRS = 6
MIN_SEEDS = 3  # a t test over fewer seed means has at most one degree of freedom
BOOTSTRAP_SAMPLES = 10000
BOOTSTRAP_SEED = 0

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
CI_SEEDS, CI_BOOTSTRAP, CI_NONE = "t over seeds", "bootstrap over volumes", "none"


def finite(values: Iterable) -> np.ndarray:
    """The finite values as a float array (None, NaN and inf dropped)."""
    out = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return np.asarray(out, dtype=float)


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student t interval of the mean of `values` (NaN, NaN with fewer than two finite values)."""
    x = finite(values)
    if x.size < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def bootstrap_interval(values: Iterable[float], confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling `values` with a seeded generator.

    NaN, NaN without finite values; a single value gives a zero-width interval.
    """
    x = finite(values)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def cell_stats(per_seed: Mapping, confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED,
               bounds: tuple[float, float] | None = None) -> dict:
    """Mean ± std over volumes pooled over seeds and the 95 % interval of one table cell.

    Args:
        per_seed: {seed: per-volume values of that seed} (None / NaN entries are left out).
        confidence: the interval's level.
        seed: the bootstrap's seed (one-seed cells).
        bounds: (low, high) range of the metric the interval is clipped to; None: not clipped.

    Returns {mean, std, n (volumes), seeds (with at least one value), seed_means, ci_low,
    ci_high, ci_kind} (module docstring); NaN statistics when there is no value.
    """
    by_seed = {str(s): finite(v) for s, v in per_seed.items()}
    by_seed = {s: v for s, v in by_seed.items() if v.size}
    pooled = np.concatenate(list(by_seed.values())) if by_seed else np.zeros(0)
    out = {"mean": math.nan, "std": math.nan, "n": int(pooled.size), "seeds": len(by_seed),
           "seed_means": {s: float(v.mean()) for s, v in by_seed.items()},
           "ci_low": math.nan, "ci_high": math.nan, "ci_kind": CI_NONE}
    if pooled.size == 0:
        return out
    out.update(mean=float(pooled.mean()), std=float(pooled.std()))
    if len(by_seed) >= 2:
        low, high = t_interval(out["seed_means"].values(), confidence)
        kind = CI_SEEDS
    else:
        low, high = bootstrap_interval(pooled, confidence, seed=seed)
        kind = CI_BOOTSTRAP
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    out.update(ci_low=low, ci_high=high, ci_kind=kind)
    return out


def paired_values(better: Mapping, worse: Mapping) -> tuple[list, np.ndarray, np.ndarray]:
    """The keys both mappings hold with finite values (sorted), and their two value arrays."""
    keys = sorted(k for k in better.keys() & worse.keys() if finite([better[k], worse[k]]).size == 2)
    return keys, np.asarray([float(better[k]) for k in keys]), np.asarray([float(worse[k]) for k in keys])


def verdict(mean_difference: float, p_value: float, alpha: float = ALPHA) -> str:
    """'reproduced' / 'not reproduced' / 'inconclusive' from a difference in the paper's direction."""
    if not (math.isfinite(mean_difference) and math.isfinite(p_value)) or p_value >= alpha or mean_difference == 0:
        return INCONCLUSIVE
    return REPRODUCED if mean_difference > 0 else NOT_REPRODUCED


def paired_comparison(better: Mapping, worse: Mapping, confidence: float = CONFIDENCE, alpha: float = ALPHA,
                      min_pairs: int = MIN_PAIRS, seed: int = BOOTSTRAP_SEED) -> dict:
    """Paired test of the claim `better > worse` on values keyed by (seed, subject).

    Returns {n, n_nonzero, mean_better, mean_worse, mean_difference, ci_low, ci_high,
    statistic, p_value, verdict, reason}; see the module docstring for the rules.
    """
    keys, a, b = paired_values(better, worse)
    d = a - b
    out = {"n": len(keys), "n_nonzero": int(np.count_nonzero(d)),
           "mean_better": float(a.mean()) if keys else math.nan, "mean_worse": float(b.mean()) if keys else math.nan,
           "mean_difference": float(d.mean()) if keys else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "statistic": math.nan, "p_value": math.nan, "verdict": INCONCLUSIVE, "reason": ""}
    if not keys:
        out["reason"] = "no paired volumes (a run is missing)"
        return out
    out["ci_low"], out["ci_high"] = bootstrap_interval(d, confidence, seed=seed)
    if out["n_nonzero"] == 0:
        out["reason"] = "all paired differences are zero"
        return out
    if out["n_nonzero"] < min_pairs:
        out["reason"] = f"{out['n_nonzero']} non-zero paired differences, fewer than {min_pairs}"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    out["statistic"], out["p_value"] = float(test.statistic), float(test.pvalue)
    out["verdict"] = verdict(out["mean_difference"], out["p_value"], alpha)
    if out["verdict"] == REPRODUCED:
        out["reason"] = f"p < {alpha:g}, in the paper's direction"
    elif out["verdict"] == NOT_REPRODUCED:
        out["reason"] = f"p < {alpha:g}, opposite to the paper"
    else:
        out["reason"] = f"p >= {alpha:g}" if math.isfinite(out["p_value"]) else "the test gave no p-value"
    return out


# ----------------------------------------------------------------------------- runs, not volumes


def seed_means(better: Mapping, worse: Mapping) -> dict[str, tuple[float, float]]:
    """{seed: (mean of `better`, mean of `worse`)} over the volumes both sides hold (finite) in that seed.

    Args:
        better: values keyed by (seed, subject).
        worse: values keyed by (seed, subject).
    """
    keys, a, b = paired_values(better, worse)
    out: dict[str, list] = {}
    for (seed, _), x, y in zip(keys, a, b):
        out.setdefault(str(seed), []).append((x, y))
    return {seed: (float(np.mean([x for x, _ in v])), float(np.mean([y for _, y in v]))) for seed, v in out.items()}


def seed_comparison(better: Mapping, worse: Mapping, confidence: float = CONFIDENCE, alpha: float = ALPHA,
                    min_seeds: int = MIN_SEEDS) -> dict:
    """The claim `better > worse` tested over seed means: paired t over the seeds both sides ran.

    Args:
        better: values keyed by (seed, subject).
        worse: values keyed by (seed, subject).
        confidence: level of the t interval of the mean seed difference.
        alpha: the level of the (unadjusted) verdict; `apply_holm` replaces it by the adjusted one.
        min_seeds: fewest paired seeds for a test.

    Returns:
        {seeds, seed_differences {seed: difference}, mean_difference, ci_low, ci_high, statistic, p_value,
        verdict, reason}; NaN statistics and "inconclusive" below `min_seeds` seeds.
    """
    means = seed_means(better, worse)
    d = np.asarray([x - y for x, y in means.values()], dtype=float)
    out = {"seeds": len(means), "seed_differences": {s: x - y for s, (x, y) in means.items()},
           "mean_difference": float(d.mean()) if d.size else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "statistic": math.nan, "p_value": math.nan, "verdict": INCONCLUSIVE, "reason": ""}
    if d.size < min_seeds:
        out["reason"] = (f"{d.size} seed{'s' if d.size != 1 else ''}: no seed-level test (needs {min_seeds})"
                         if d.size else "no paired volumes (a run is missing)")
        return out
    out["ci_low"], out["ci_high"] = t_interval(d, confidence)
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):  # no spread: t is infinite (p = 0) unless d = 0
        if abs(d[0]) <= 1e-12:
            out["reason"] = "every seed gives a zero difference"
            return out
        out["statistic"], out["p_value"] = math.copysign(math.inf, d[0]), 0.0
    else:
        test = stats.ttest_1samp(d, 0.0)
        out["statistic"], out["p_value"] = float(test.statistic), float(test.pvalue)
    out["verdict"] = verdict(out["mean_difference"], out["p_value"], alpha)
    out["reason"] = _reason(out["verdict"], out["p_value"], alpha)
    return out


def _reason(result: str, p_value: float, alpha: float, what: str = "p") -> str:
    if result == REPRODUCED:
        return f"{what} < {alpha:g}, in the paper's direction"
    if result == NOT_REPRODUCED:
        return f"{what} < {alpha:g}, opposite to the paper"
    return f"{what} >= {alpha:g}" if math.isfinite(p_value) else "the test gave no p-value"


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (same order; NaN / None stay NaN and are not counted in the family).

    Args:
        p_values: the raw p-values of the family.
    """
    p = [math.nan if v is None else float(v) for v in p_values]
    tested = sorted((v, i) for i, v in enumerate(p) if math.isfinite(v))
    m, running, out = len(tested), 0.0, [math.nan] * len(p)
    for rank, (value, index) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * value))
        out[index] = running
    return out


def apply_holm(results: list[dict], alpha: float = ALPHA, p_key: str = "p_value", prefix: str = "") -> list[dict]:
    """Add `<prefix>p_holm` to each result and set `<prefix>verdict` / `<prefix>reason` from it (in place).

    Args:
        results: dicts with `<prefix>mean_difference` and `<prefix><p_key>`; one family.
        alpha: the family-wise level.
        p_key: the raw p-value's key.
        prefix: the key prefix of one analysis ('' for seed-level, 'volume_' for per-volume).
    """
    adjusted = holm([r.get(prefix + p_key) for r in results])
    family = sum(math.isfinite(a) for a in adjusted)
    for r, a in zip(results, adjusted):
        r[prefix + "p_holm"] = a
        if math.isfinite(a):
            r[prefix + "verdict"] = verdict(r[prefix + "mean_difference"], a, alpha)
            r[prefix + "reason"] = _reason(r[prefix + "verdict"], a, alpha, f"Holm p (family of {family})")
    return results
