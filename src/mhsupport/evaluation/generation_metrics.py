"""Generation metrics (DESIGN.md section 8): the two metric protocols of `metric_protocols`,
perplexity, length, strategy accuracy and tag adherence, with bootstrap intervals and paired tests.

Every metric is a function of per-example statistics (summed rows, or per-response n-gram ids for
Distinct-n), so a bootstrap resample or a paired permutation re-sums rows: intervals and paired
tests stay exact and fast."""

from __future__ import annotations

import itertools
import math

import numpy as np

from mhsupport.evaluation.metric_protocols import PROTOCOLS, metric_value, per_example_statistics, signatures
from mhsupport.evaluation import statistics


class GenerationScores:
    """Per-example statistics of one system's outputs, and every corpus metric over any
    resample of the examples (`rows`: indices, repeats allowed) or any mix with another system
    over the same examples."""

    def __init__(self, hypotheses: list[str], references: list[str], nll: list[float] | None = None,
                 nll_tokens: list[int] | None = None, chosen: list | None = None, gold: list | None = None,
                 recognised: list | None = None, protocols=PROTOCOLS):
        self.n = len(hypotheses)
        self.protocols = tuple(protocols)
        self.sums: dict[str, np.ndarray] = {}
        self.ngrams: dict[str, list[np.ndarray]] = {}
        for protocol in self.protocols:
            sums, ngrams = per_example_statistics(protocol, hypotheses, references)
            self.sums.update(sums)
            self.ngrams.update(ngrams)
        self.sums["length"] = np.array([[len(h.split())] for h in hypotheses], dtype=np.float64)
        if nll is not None:
            self.sums["ppl"] = np.column_stack([np.array(nll, dtype=np.float64),
                                                np.array(nll_tokens, dtype=np.float64)])
        if chosen is not None and gold is not None and any(c is not None for c in chosen):
            self.sums["strategy_accuracy"] = np.array([[c == g] for c, g in zip(chosen, gold)], dtype=np.float64)
        if recognised is not None and chosen is not None and any(c is not None for c in chosen):
            self.sums["tag_adherence"] = np.array([[c is not None and c == r] for c, r in zip(chosen, recognised)],
                                                  dtype=np.float64)

    @property
    def metric_names(self) -> list[str]:
        return [*self.sums, *self.ngrams]

    def signatures(self) -> dict[str, dict]:
        out = signatures(self.protocols)
        either = {"protocol": "any", "library": "ours", "case": "n/a", "smoothing": "none", "ngram_order": "n/a"}
        out["length"] = {**either, "tokenizer": "whitespace (words per response)"}
        extra = {"ppl": "the generator's own tokenizer (exp of reference NLL per token, teacher forcing)",
                 "strategy_accuracy": "none (tag used = gold label)",
                 "tag_adherence": "none (response recogniser's label = tag used)"}
        out.update({name: {**either, "tokenizer": tokenizer} for name, tokenizer in extra.items() if name in self.sums})
        return out

    def scores(self, rows: np.ndarray | None = None, names=None) -> dict[str, float]:
        """Every metric (or those in `names`) over the examples `rows` (default: all)."""
        rows = np.arange(self.n) if rows is None else rows
        return self._values({name: a[rows].sum(axis=0) for name, a in self.sums.items() if _wanted(name, names)},
                            {name: [ids[i] for i in rows] for name, ids in self.ngrams.items() if _wanted(name, names)},
                            len(rows))

    def drawn_scores(self, draws: list[np.ndarray], names=None) -> list[dict[str, float]]:
        """`scores(rows, names)` of each draw (example indices, repeats allowed), the summed statistics
        of all the draws at once: each draw's count of every example times the examples' rows."""
        counts = np.stack([np.bincount(rows, minlength=self.n) for rows in draws]).astype(np.float64)
        summed = {name: counts @ a for name, a in self.sums.items() if _wanted(name, names)}
        return [self._values({name: s[i] for name, s in summed.items()},
                             {name: [ids[j] for j in rows] for name, ids in self.ngrams.items() if _wanted(name, names)},
                             len(rows))
                for i, rows in enumerate(draws)]

    def swapped_scores(self, other: GenerationScores, swaps: np.ndarray, names=None,
                       chunk: int = 1000) -> list[dict[str, float]]:
        """For each row of `swaps` (trials, n), the scores of the system that answers example i as `other`
        did where the row is true, else as this one (the metrics both have, or those in `names`): this
        system's sums plus, where a trial swaps, the other's rows less its own, many trials at once."""
        shared = [name for name in self.sums if name in other.sums and _wanted(name, names)]
        out = []
        for start in range(0, len(swaps), chunk):
            part = swaps[start:start + chunk]
            summed = {name: self.sums[name].sum(axis=0) + part.astype(np.float64) @ (other.sums[name] - self.sums[name])
                      for name in shared}
            for i, take_other in enumerate(part):
                out.append(self._values({name: s[i] for name, s in summed.items()},
                                        {name: [o if t else s for s, o, t in zip(ids, other.ngrams[name], take_other)]
                                         for name, ids in self.ngrams.items()
                                         if name in other.ngrams and _wanted(name, names)}, self.n))
        return out

    @staticmethod
    def _values(sums: dict[str, np.ndarray], ngrams: dict[str, list[np.ndarray]], examples: int) -> dict[str, float]:
        out = {}
        for name, summed in sums.items():
            if name == "ppl":
                out[name] = math.exp(summed[0] / max(summed[1], 1))
            elif name == "length":
                out[name] = float(summed[0]) / examples
            elif name in ("strategy_accuracy", "tag_adherence"):
                out[name] = 100 * float(summed[0]) / examples
            else:
                out[name] = metric_value(name, summed, examples)
        for name, chosen in ngrams.items():
            total = sum(len(a) for a in chosen)
            out[name] = 100 * len(np.unique(np.concatenate(chosen))) / total if total else 0.0
        return out


def _wanted(name: str, names) -> bool:
    return names is None or name in names


def no_interval(name: str) -> bool:
    # A resample with replacement repeats responses, which lowers any type/token ratio by
    # construction (the interval would miss the value), so Distinct-n gets no interval; paired
    # differences are fine.
    return "distinct_" in name


def bootstrap_intervals(scores: GenerationScores, resamples: int, seed: int) -> dict[str, dict]:
    """Each metric's value with a 95% percentile bootstrap interval over examples."""
    point = scores.scores()
    with_interval = [name for name in point if not no_interval(name)]
    samples = [scores.scores(rows, with_interval) for rows in statistics.bootstrap_rows(scores.n, resamples, seed)]
    out = {}
    for name, value in point.items():
        low, high = (None, None) if no_interval(name) else statistics.percentile_interval([s[name] for s in samples])
        out[name] = {"value": value, "ci_low": low, "ci_high": high}
    return out


def bootstrap_mean_over_seeds(scores: list[GenerationScores], resamples: int, seed: int) -> dict[str, dict]:
    """Each metric's mean over decoding seeds, its sd across them, and a 95% percentile interval from
    resamples that draw the same examples for every seed and average the seeds' scores on them."""
    points = [s.scores() for s in scores]
    names = list(points[0])
    with_interval = [name for name in names if not no_interval(name) and all(p[name] is not None for p in points)]
    samples = []
    for rows in statistics.bootstrap_rows(scores[0].n, resamples, seed):
        drawn = [s.scores(rows, with_interval) for s in scores]
        samples.append({name: float(np.mean([d[name] for d in drawn])) for name in with_interval})
    out = {}
    for name in names:
        values = [p[name] for p in points]
        if any(v is None for v in values):
            out[name] = {"value": None, "ci_low": None, "ci_high": None, "sd": None}
            continue
        low, high = statistics.percentile_interval([s[name] for s in samples]) if name in with_interval else (None, None)
        out[name] = {"value": float(np.mean(values)), "ci_low": low, "ci_high": high,
                     "sd": float(np.std(values, ddof=1))}
    return out


def shared_metrics(a: GenerationScores, b: GenerationScores, names=None) -> list[str]:
    """The metrics both systems score (of `names`, if given), for a paired test over the same examples."""
    if a.n != b.n:
        raise ValueError(f"paired test needs the same examples: {a.n} vs {b.n}")
    point_b = b.scores(names=names)
    return [name for name in a.scores(names=names) if name in point_b]


def paired_bootstrap(a: GenerationScores, b: GenerationScores, resamples: int, seed: int,
                     metrics=None) -> dict[str, dict]:
    """Paired bootstrap over the same examples (statistics.paired_bootstrap): for each metric (all
    shared, or `metrics`), A, B, B - A, its interval and two-sided p."""
    names = shared_metrics(a, b, metrics)
    draws = statistics.bootstrap_rows(a.n, resamples, seed)
    drawn_a, drawn_b = [], []
    while chunk := list(itertools.islice(draws, 1000)):  # the same draws for both, a thousand at a time
        drawn_a += a.drawn_scores(chunk, names)
        drawn_b += b.drawn_scores(chunk, names)
    return statistics.paired_bootstrap(a.scores(names=names), b.scores(names=names), drawn_a, drawn_b)


def paired_randomisation(a: GenerationScores, b: GenerationScores, trials: int, seed: int,
                         metrics=None) -> dict[str, dict]:
    """Paired approximate randomisation over the same examples (statistics.paired_randomisation): each
    trial swaps A's and B's outputs on a random half of the examples and recomputes every metric (all
    shared, or `metrics`)."""
    names = shared_metrics(a, b, metrics)
    swaps = statistics.randomisation_swaps(a.n, trials, seed)
    return statistics.paired_randomisation(a.scores(names=names), b.scores(names=names),
                                           list(zip(a.swapped_scores(b, swaps, names), b.swapped_scores(a, swaps, names))))
