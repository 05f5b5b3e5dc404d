"""Scores: classification (accuracy, F1, per-class, confusion matrix) and generation (BLEU,
ROUGE-L, Distinct, perplexity, strategy accuracy, tag adherence) with bootstrap statistics."""

from __future__ import annotations

import math

import numpy as np
from sacrebleu.metrics import BLEU
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_scores(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=labels, zero_division=0)
    return {
        "n": len(gold),
        "accuracy": accuracy_score(gold, predicted),
        "macro_f1": f1_score(gold, predicted, labels=labels, average="macro", zero_division=0),
        "weighted_f1": f1_score(gold, predicted, labels=labels, average="weighted", zero_division=0),
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for label, p, r, f, s in zip(labels, precision, recall, f1, support)},
        "confusion": {"labels": labels, "rows_gold_cols_predicted":
                      confusion_matrix(gold, predicted, labels=labels).tolist()},
    }


# --- generation metrics (DESIGN.md section 8) --------------------------------------------
#
# Every metric is a function of per-example statistics, so one bootstrap resample is a
# re-summing of rows: intervals and paired tests stay exact and fast.

BLEU_METRICS = {"bleu": BLEU(), **{f"bleu_{n}": BLEU(max_ngram_order=n, smooth_method="exp", lowercase=True)
                                   for n in range(1, 5)}}


def bleu_stats(metric: BLEU, hypotheses: list[str], references: list[str]) -> np.ndarray:
    """sacrebleu's per-sentence sufficient statistics (n-gram matches, totals, lengths)."""
    return np.array(metric._extract_corpus_statistics(hypotheses, [references]), dtype=np.int64)


def bleu_from_stats(metric: BLEU, summed: np.ndarray) -> float:
    return metric._compute_score_from_stats(summed.tolist()).score


def rouge_l(hypothesis: str, reference: str) -> float:
    """LCS F-measure over lowercased whitespace tokens (beta = 1)."""
    h, r = hypothesis.lower().split(), reference.lower().split()
    if not h or not r:
        return 0.0
    previous = [0] * (len(r) + 1)
    for token in h:
        current = [0]
        for j, other in enumerate(r):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(h), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def ngram_ids(texts: list[str], n: int) -> list[np.ndarray]:
    """Each text's n-grams (lowercased whitespace tokens) as integer ids shared across texts."""
    vocabulary: dict[tuple, int] = {}
    out = []
    for text in texts:
        tokens = text.lower().split()
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        out.append(np.array([vocabulary.setdefault(g, len(vocabulary)) for g in grams], dtype=np.int64))
    return out


def distinct(ids: list[np.ndarray], rows: np.ndarray) -> float:
    chosen = [ids[i] for i in rows]
    total = sum(len(a) for a in chosen)
    return len(np.unique(np.concatenate(chosen))) / total if total else 0.0


class GenerationScores:
    """Per-example statistics of one system's outputs, and every corpus metric over any
    resample of the examples (`rows`: indices, repeats allowed)."""

    def __init__(self, hypotheses: list[str], references: list[str], nll: list[float] | None = None,
                 nll_tokens: list[int] | None = None, chosen: list | None = None, gold: list | None = None,
                 recognised: list | None = None):
        self.n = len(hypotheses)
        self.bleu = {name: bleu_stats(metric, hypotheses, references) for name, metric in BLEU_METRICS.items()}
        self.rouge = np.array([rouge_l(h, r) for h, r in zip(hypotheses, references)])
        self.ngrams = {n: ngram_ids(hypotheses, n) for n in (1, 2)}
        self.length = np.array([len(h.split()) for h in hypotheses], dtype=np.float64)
        self.nll = None if nll is None else (np.array(nll, dtype=np.float64), np.array(nll_tokens, dtype=np.float64))
        self.strategy_hit = None
        if chosen is not None and gold is not None and any(c is not None for c in chosen):
            self.strategy_hit = np.array([c == g for c, g in zip(chosen, gold)], dtype=np.float64)
        self.adherence = None
        if recognised is not None and chosen is not None and any(c is not None for c in chosen):
            self.adherence = np.array([c is not None and c == r for c, r in zip(chosen, recognised)], dtype=np.float64)

    def scores(self, rows: np.ndarray | None = None) -> dict[str, float]:
        rows = np.arange(self.n) if rows is None else rows
        out = {name: bleu_from_stats(BLEU_METRICS[name], stats[rows].sum(axis=0)) for name, stats in self.bleu.items()}
        out["rouge_l"] = float(self.rouge[rows].mean()) * 100
        out["distinct_1"] = distinct(self.ngrams[1], rows) * 100
        out["distinct_2"] = distinct(self.ngrams[2], rows) * 100
        out["length"] = float(self.length[rows].mean())
        if self.nll is not None:
            out["ppl"] = math.exp(self.nll[0][rows].sum() / max(self.nll[1][rows].sum(), 1))
        if self.strategy_hit is not None:
            out["strategy_accuracy"] = float(self.strategy_hit[rows].mean()) * 100
        if self.adherence is not None:
            out["tag_adherence"] = float(self.adherence[rows].mean()) * 100
        return out


# A resample with replacement repeats responses, which lowers any type/token ratio by construction
# (the interval would miss the value), so Distinct-n gets no interval; paired differences are fine.
NO_INTERVAL = ("distinct_1", "distinct_2")


def bootstrap_intervals(scores: GenerationScores, resamples: int, seed: int) -> dict[str, dict]:
    """Each metric's value with a 95% percentile bootstrap interval over examples."""
    point = scores.scores()
    rng = np.random.default_rng(seed)
    samples = [scores.scores(rng.integers(0, scores.n, scores.n)) for _ in range(resamples)]
    out = {}
    for name, value in point.items():
        if name in NO_INTERVAL:
            out[name] = {"value": value, "ci_low": None, "ci_high": None}
        else:
            values = [s[name] for s in samples]
            out[name] = {"value": value, "ci_low": float(np.percentile(values, 2.5)),
                         "ci_high": float(np.percentile(values, 97.5))}
    return out


def paired_bootstrap(a: GenerationScores, b: GenerationScores, resamples: int, seed: int) -> dict[str, dict]:
    """Paired bootstrap over the same examples: for each metric, B - A and the two-sided
    p-value of 'no difference' (share of resampled differences on the other side of zero, doubled)."""
    if a.n != b.n:
        raise ValueError(f"paired test needs the same examples: {a.n} vs {b.n}")
    point_a, point_b = a.scores(), b.scores()
    rng = np.random.default_rng(seed)
    deltas: dict[str, list[float]] = {name: [] for name in point_a if name in point_b}
    for _ in range(resamples):
        rows = rng.integers(0, a.n, a.n)
        sa, sb = a.scores(rows), b.scores(rows)
        for name in deltas:
            deltas[name].append(sb[name] - sa[name])
    out = {}
    for name, values in deltas.items():
        values = np.array(values)
        observed = point_b[name] - point_a[name]
        other_side = (values <= 0).sum() if observed > 0 else (values >= 0).sum()
        out[name] = {"a": point_a[name], "b": point_b[name], "delta": observed,
                     "ci_low": float(np.percentile(values, 2.5)), "ci_high": float(np.percentile(values, 97.5)),
                     "p_value": float(min(1.0, 2 * (other_side + 1) / (resamples + 1)))}
    return out
