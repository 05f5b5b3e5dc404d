"""The statistics of every interval and comparison in the pipeline: percentile bootstrap intervals,
the paired bootstrap and paired approximate-randomisation tests, the paired permutation test,
binomial tests, Wilson intervals and Holm's adjustment. Metrics, the classifier's baselines, tag use,
the LLM judge, the report and `mhs compare` call these; none computes a p-value of its own.

Two kinds of bootstrap. A statistic that numpy can compute on a batch of resamples (a mean, a ratio
of sums: the likelihood runs' metrics) goes through `scipy.stats.bootstrap`. Corpus metrics (BLEU,
ROUGE-L, macro-F1) are recomputed per resample from the rows it draws, and every metric and every
system of one comparison is scored on the same draws, so paired differences pair: `bootstrap_rows`
is that one sequence of draws, seeded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

Scores = dict[str, float]  # metric name -> value


def bootstrap_rows(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The example indices of each bootstrap resample: n draws with replacement from n examples."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.integers(0, n, n)


def percentile_interval(values) -> tuple[float, float]:
    """The 95% percentile interval of resampled values."""
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def bootstrap_p(observed: float, resampled: np.ndarray) -> float:
    """Two-sided p of 'no difference' from a paired bootstrap: the share of resampled differences on
    the other side of zero from the observed one, doubled (add-one smoothed, at most 1)."""
    resampled = np.asarray(resampled)
    other_side = (resampled <= 0).sum() if observed > 0 else (resampled >= 0).sum()
    return float(min(1.0, 2 * (other_side + 1) / (len(resampled) + 1)))


def paired_bootstrap(point_a: Scores, point_b: Scores, drawn_a: list[Scores], drawn_b: list[Scores]) -> dict[str, dict]:
    """Paired bootstrap of two systems over the same examples: their metrics on all of them and on
    each of the same draws (`bootstrap_rows`). For each metric both give: A, B, B - A, the 95%
    interval of B - A and its two-sided p (`bootstrap_p`)."""
    names = [name for name in point_a if name in point_b]
    out = {}
    for name in names:
        values = np.array([sb[name] - sa[name] for sa, sb in zip(drawn_a, drawn_b)])
        observed = point_b[name] - point_a[name]
        low, high = percentile_interval(values)
        out[name] = {"a": point_a[name], "b": point_b[name], "delta": observed, "ci_low": low, "ci_high": high,
                     "p_value": bootstrap_p(observed, values)}
    return out


def randomisation_swaps(n: int, trials: int, seed: int) -> np.ndarray:
    """(trials, n) booleans: in each trial of approximate randomisation, the examples whose outputs swap."""
    return np.random.default_rng(seed).random((trials, n)) < 0.5


def paired_randomisation(point_a: Scores, point_b: Scores, swapped: list[tuple[Scores, Scores]]) -> dict[str, dict]:
    """Paired approximate randomisation (Noreen 1989; sacrebleu's `--paired-ar` for BLEU): each trial
    swaps A's and B's outputs on a random half of the examples (`randomisation_swaps`; `swapped` holds
    both systems' metrics after each trial's swap); the two-sided p is (1 + #trials with
    |B' - A'| >= |B - A|) / (1 + trials)."""
    names = [name for name in point_a if name in point_b]
    out = {}
    for name in names:
        observed = abs(point_b[name] - point_a[name])
        # a tolerance, so that float noise in re-summed statistics does not count as a difference
        at_least = sum(abs(sb[name] - sa[name]) >= observed - 1e-9 for sa, sb in swapped)
        out[name] = {"a": point_a[name], "b": point_b[name], "delta": point_b[name] - point_a[name],
                     "p_value": (at_least + 1) / (len(swapped) + 1)}
    return out


def bootstrap_interval(statistic, data: tuple, resamples: int, seed: int) -> dict:
    """A vectorised statistic of paired per-example arrays, with its 95% percentile bootstrap interval
    (scipy.stats.bootstrap): {"value", "low", "high"}. One example gives a zero-width interval."""
    value = float(statistic(*data))
    if len(data[0]) < 2:
        return {"value": value, "low": value, "high": value}
    result = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                             method="percentile", random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return {"value": value, "low": float(low), "high": float(high)}


def paired_permutation_p(a: np.ndarray, b: np.ndarray, statistic, resamples: int, seed: int) -> float:
    """Two-sided p of a paired permutation test (scipy.stats.permutation_test, a and b swapped within
    examples) of a vectorised statistic(a, b, axis)."""
    test = stats.permutation_test((a, b), statistic, permutation_type="samples", vectorized=True,
                                  n_resamples=resamples, alternative="two-sided",
                                  random_state=np.random.default_rng(seed))
    return float(test.pvalue)


def binomial_p(successes: int, trials: int, p: float = 0.5, alternative: str = "two-sided") -> float:
    """The exact binomial test's p (scipy.stats.binomtest): a sign test at p = 0.5, or a share
    against chance."""
    return float(stats.binomtest(successes, trials, p, alternative=alternative).pvalue)


def wilson_interval(count: int, total: int) -> tuple[float, float]:
    """The Wilson 95% interval of a proportion count / total (statsmodels `proportion_confint`)."""
    low, high = proportion_confint(count, total, alpha=0.05, method="wilson")
    return float(low), float(high)


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels `multipletests`), in the order given."""
    return [float(p) for p in multipletests(list(p_values), method="holm")[1]] if len(p_values) else []
