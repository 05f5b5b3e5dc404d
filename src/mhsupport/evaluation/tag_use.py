"""Does a generator use its tag? The metrics of a likelihood run (DESIGN.md section 8, "Tag use, by
likelihood") from the reference reply's NLL under every tag (`modeling.tag_likelihood`): tag
discrimination, the most-chosen tag, NLL under the gold and the wrong tags, perplexity; and the
paired test of a tagged generator against the untagged one of the same data.

A tag carries at most log2(4) = 2 bits about a reply, so its effect is read where it is cheapest
and least noisy: in how likely the human reference becomes under the gold tag versus the others.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mhsupport.errors import MhsError
from mhsupport.evaluation.classification import classification_scores
from mhsupport.evaluation.jsonl_io import read_checked_lines
from mhsupport.evaluation.statistics import bootstrap_interval, paired_permutation_p

LIKELIHOODS = "likelihoods.jsonl"  # a likelihood run's per-example NLL under every tag


LINE_KEYS = ("conversation_id", "turn_index", "gold_label", "nll", "tokens")


def read_likelihoods(run_dir: Path, fix: str = "rebuild the run with its command and --force") -> list[dict]:
    """The lines of a run's `likelihoods.jsonl`, each checked: a missing or damaged file is one line
    naming it, the line and `fix`."""
    path = Path(run_dir) / LIKELIHOODS
    lines = read_checked_lines(path, LINE_KEYS, fix)
    for number, line in enumerate(lines, start=1):
        if not isinstance(line["nll"], list):
            raise MhsError(f"{path}, line {number}: expected nll to be a list (one NLL per tag); {fix}")
    return lines


def likelihood_lines(examples: list[dict], gold: list[str], nll: np.ndarray, tokens: np.ndarray) -> list[dict]:
    """The lines of `likelihoods.jsonl`: per example, its reference's NLL under every tag and its token count."""
    return [{"conversation_id": e["conversation_id"], "turn_index": e["turn_index"], "gold_label": g,
             "nll": [round(float(v), 5) for v in row], "tokens": int(n)}
            for e, g, row, n in zip(examples, gold, nll, tokens)]


def _per_token(nll_sum, tokens, axis=-1):
    return np.sum(nll_sum, axis=axis) / np.sum(tokens, axis=axis)


def tag_use_scores(nll: np.ndarray, tokens: np.ndarray, gold: list[str] | None, labels: list[str] | None,
                   resamples: int, seed: int) -> dict:
    """Metrics of a likelihood run. Tagged (labels given): tag_discrimination (gold tag lowest NLL),
    most_chosen_share, nll_gold_tag / nll_wrong_tags (per token), ppl_gold_tag, and the gold x
    lowest-NLL confusion matrix; untagged: nll and ppl. Every value with a bootstrap interval."""
    tokens = tokens.astype(np.float64)
    if not labels:
        column = nll[:, 0]
        scores = {"nll": bootstrap_interval(_per_token, (column, tokens), resamples, seed)}
        scores["ppl"] = {key: math.exp(value) for key, value in scores["nll"].items()}
        return {"metrics": scores}
    gold_index = np.array([labels.index(g) for g in gold])
    lowest = nll.argmin(axis=1)
    n, k = nll.shape
    gold_nll = nll[np.arange(n), gold_index]
    wrong_nll = (nll.sum(axis=1) - gold_nll) / (k - 1)  # mean over the wrong tags, per example

    def most_chosen_share(choice, axis=-1):
        counts = np.stack([(choice == j).sum(axis=axis) for j in range(k)])
        return counts.max(axis=0) / choice.shape[axis]

    scores = {
        "tag_discrimination": bootstrap_interval(lambda hit, axis=-1: np.mean(hit, axis=axis),
                                                 ((lowest == gold_index).astype(np.float64),), resamples, seed),
        "most_chosen_share": bootstrap_interval(most_chosen_share, (lowest,), resamples, seed),
        "nll_gold_tag": bootstrap_interval(_per_token, (gold_nll, tokens), resamples, seed),
        "nll_wrong_tags": bootstrap_interval(_per_token, (wrong_nll, tokens), resamples, seed),
        "nll_gold_minus_wrong": bootstrap_interval(lambda a, b, t, axis=-1: _per_token(a - b, t, axis),
                                                   (gold_nll, wrong_nll, tokens), resamples, seed),
    }
    scores["ppl_gold_tag"] = {key: math.exp(value) for key, value in scores["nll_gold_tag"].items()}
    chosen = classification_scores(list(gold), [labels[j] for j in lowest], labels)
    return {"metrics": scores, "chance": 1 / k,
            "most_chosen_tag": labels[int(np.bincount(lowest, minlength=k).argmax())],
            "confusion": chosen["confusion"], "per_class": chosen["per_class"]}


def paired_nll_test(a_nll: np.ndarray, b_nll: np.ndarray, tokens: np.ndarray, resamples: int, seed: int) -> dict:
    """Per-token NLL of system a minus system b on the same examples and references: the difference
    with a paired bootstrap interval and a paired permutation test's two-sided p (swapping a and b
    within examples)."""
    tokens = tokens.astype(np.float64)

    def difference(a, b, t, axis=-1):
        return _per_token(a - b, t, axis)

    interval = bootstrap_interval(difference, (a_nll, b_nll, tokens), resamples, seed)
    p = paired_permutation_p(a_nll, b_nll, lambda a, b, axis=-1: np.sum(a - b, axis=axis), resamples, seed)
    return {**interval, "p": p}
