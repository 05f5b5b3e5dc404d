"""Classification scores: accuracy, F1 (Q), per-class scores, the confusion matrix and the
preference bias B; bootstrap intervals and paired tests of a classifier against its baselines;
the calibration of its softmax."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logsumexp
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from mhsupport.evaluation.statistics import bootstrap_p, bootstrap_rows, percentile_interval


def classification_scores(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=labels, zero_division=0)
    confusion = confusion_matrix(gold, predicted, labels=labels)
    preferences, bias = preference_bias(confusion)
    return {
        "n": len(gold),
        "accuracy": accuracy_score(gold, predicted),
        "macro_f1": f1_score(gold, predicted, labels=labels, average="macro", zero_division=0),
        "weighted_f1": f1_score(gold, predicted, labels=labels, average="weighted", zero_division=0),
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for label, p, r, f, s in zip(labels, precision, recall, f1, support)},
        "confusion": {"labels": labels, "rows_gold_cols_predicted": confusion.tolist()},
        # Kang et al. 2024 (arXiv:2402.13211): proficiency Q is the macro-F1 above.
        "preference": dict(zip(labels, preferences)),
        "preference_bias": bias,
    }


def preference_bias(confusion: np.ndarray) -> tuple[list[float], float]:
    """Each class's Bradley-Terry preference and the preference bias B (Kang et al. 2024, "Can
    Large Language Models be Good Emotional Supporter?", arXiv:2402.13211, section 3): predicting
    class i where the gold is j counts as i winning over j (confusion[j, i] wins, rows gold); the
    strengths p are the Bradley-Terry maximum-likelihood fit of these wins, scaled to mean 1; B is
    their standard deviation (population). The authors' code reaches the same fit by 20 rounds of
    Newman's (2023) fixed-point update; we maximise the likelihood with scipy to convergence.
    Diagonal counts do not enter the likelihood. A perfect predictor gives every class p = 1 and
    B = 0; one that always predicts the same class gives p -> (K, 0, ..., 0) and B -> sqrt(K - 1)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    k = confusion.shape[0]
    wins = confusion.T.copy()  # wins[i, j]: i predicted, j gold
    np.fill_diagonal(wins, 0.0)
    games = wins + wins.T

    def negative_log_likelihood(theta):
        diff = theta[:, None] - theta[None, :]
        nll = float((wins * np.logaddexp(0.0, -diff)).sum())
        # d/dtheta_i of sum_ij wins_ij log(1 + exp(theta_j - theta_i))
        loss_share = wins * expit(-diff)
        return nll, loss_share.T.sum(axis=1) - loss_share.sum(axis=1)

    theta = np.zeros(k)
    if games.sum() > 0:
        theta = minimize(negative_log_likelihood, theta, jac=True, method="L-BFGS-B",
                         options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 10_000}).x
    preferences = k * np.exp(theta - logsumexp(theta))
    return [float(p) for p in preferences], float(np.std(preferences))


# --- intervals and paired tests over examples ----------------------------------------------

def _accuracy_and_macro_f1(gold: np.ndarray, predicted: np.ndarray, k: int) -> tuple[float, float]:
    """Both scores from label indices in one confusion count (a resample scores thousands of times)."""
    confusion = np.bincount(gold * k + predicted, minlength=k * k).reshape(k, k)
    true_positive = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)  # predicted + gold counts per class
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(k), where=denominator > 0)
    return float(true_positive.sum() / len(gold)), float(f1.mean())


def bootstrap_systems(gold: list[str], systems: dict[str, list[str]], labels: list[str], reference: str,
                      resamples: int, seed: int) -> dict:
    """95% percentile bootstrap intervals of accuracy and macro-F1 for every system, and the paired
    bootstrap of `reference` against each other system (the same resampled examples for all): the
    difference reference - other, its interval and the two-sided p-value of 'no difference'
    (statistics.bootstrap_p)."""
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    gold_ids = np.array([index[g] for g in gold])
    predicted = {name: np.array([index[p] for p in preds]) for name, preds in systems.items()}
    point = {name: _accuracy_and_macro_f1(gold_ids, p, k) for name, p in predicted.items()}
    samples = {name: [] for name in systems}
    for rows in bootstrap_rows(len(gold_ids), resamples, seed):
        for name, p in predicted.items():
            samples[name].append(_accuracy_and_macro_f1(gold_ids[rows], p[rows], k))
    samples = {name: np.array(values) for name, values in samples.items()}
    metric_names = ("accuracy", "macro_f1")
    intervals = {name: {metric: dict(zip(("value", "ci_low", "ci_high"),
                                         (point[name][m], *percentile_interval(samples[name][:, m]))))
                        for m, metric in enumerate(metric_names)} for name in systems}
    paired = {}
    for name in systems:
        if name == reference:
            continue
        paired[name] = {}
        for m, metric in enumerate(metric_names):
            deltas = samples[reference][:, m] - samples[name][:, m]
            observed = point[reference][m] - point[name][m]
            low, high = percentile_interval(deltas)
            paired[name][metric] = {"delta": observed, "ci_low": low, "ci_high": high,
                                    "p_value": bootstrap_p(observed, deltas)}
    return {"resamples": resamples, "seed": seed, "intervals": intervals, "reference": reference,
            "paired_vs_reference": paired}


def calibration(gold: list[str], probabilities: np.ndarray, labels: list[str], bins: int = 10) -> dict:
    """Reliability of the softmax: the top-label curve (confidence of the argmax against its
    accuracy, sklearn's calibration_curve over equal-width bins), its expected calibration error
    (bin-count-weighted |accuracy - confidence|), and one one-vs-rest curve per class (the
    probabilities a classifier sampler draws from)."""
    index = {label: i for i, label in enumerate(labels)}
    gold_ids = np.array([index[g] for g in gold])
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == gold_ids).astype(int)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform", pos_label=1)
    # the example count of each bin, binned as calibration_curve bins (it returns non-empty bins only)
    counts = np.bincount(np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], confidence), minlength=bins)
    counts = counts[counts > 0]
    per_class = {}
    for label, i in index.items():
        fraction, mean_probability = calibration_curve((gold_ids == i).astype(int), probabilities[:, i],
                                                       n_bins=bins, strategy="uniform", pos_label=1)
        per_class[label] = {"mean_probability": mean_probability.tolist(), "fraction_gold": fraction.tolist()}
    return {"bins": bins,
            "top_label": {"mean_confidence": mean_confidence.tolist(), "accuracy": accuracy.tolist(),
                          "count": counts.tolist()},
            "expected_calibration_error": float((counts * np.abs(accuracy - mean_confidence)).sum() / counts.sum()),
            "mean_confidence": float(confidence.mean()), "accuracy": float(correct.mean()),
            "per_class": per_class}
