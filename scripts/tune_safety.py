"""Choose the safety screen's thresholds on a dev set: the out-of-fold scores of its own exemplars
and the everyday ESConv turns it learns (5-fold, stratified by class), for each inverse
regularisation C. The evaluation set
(tests/data/safety_eval) is never read here. Prints, per C, the ROC AUC, the highest threshold that
keeps dev recall at --recall or above (the rule configs/safety.yaml uses) and the lowest that keeps
dev false alarms at --false-alarms or below, with the other rate at each, and the acknowledgement
threshold that keeps 95% of acknowledging replies; copy the chosen values into configs/safety.yaml.

    python scripts/tune_safety.py [--recall 0.95] [--false-alarms 0.15] [--c 1 10 100] [--threads 1] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from mhsupport.safety import screen
from mhsupport.safety.encoder import SentenceEncoder
from mhsupport.settings.config import load_config

HARMLESS = screen.HARMLESS


def out_of_fold(embeddings: np.ndarray, labels: list[str], c: float, seed: int = 0) -> tuple[np.ndarray, list]:
    """Each exemplar's class probabilities from the scorer fitted on the other four folds."""
    classes = sorted(set(labels))
    probabilities = np.zeros((len(labels), len(classes)))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    for train, test in folds.split(embeddings, labels):
        scorer = screen.fit_scorer(embeddings[train], [labels[i] for i in train], c)
        probabilities[np.ix_(test, [classes.index(k) for k in scorer.classes_])] = scorer.predict_proba(embeddings[test])
    return probabilities, classes


def threshold_for_recall(positive: np.ndarray, recall: float) -> float:
    """The highest threshold at which the share of positive scores at or above it is >= recall."""
    return float(np.sort(positive)[int(np.floor((1 - recall) * len(positive)))])


def threshold_for_false_alarms(negative: np.ndarray, rate: float) -> float:
    """The lowest threshold (a score flags at or above it) at which the share of negative scores
    flagged is <= rate."""
    ranked = np.sort(negative)
    return float(np.nextafter(ranked[int(np.ceil((1 - rate) * len(ranked))) - 1], 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--false-alarms", type=float, default=0.15)
    parser.add_argument("--c", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("screen", args.overrides)
    folder = screen.encoder_folder(cfg.safety)
    encoder = SentenceEncoder(folder, cfg.safety.max_length, cfg.safety.batch_size, screen.encoder_bf16(cfg.safety),
                              screen.encoder_pooling(cfg.safety))
    for name in ("seeker", "replies"):
        texts, labels = screen.training_rows(name, cfg.safety, cfg.paths.raw_dir)
        embeddings = screen.cached_embeddings(encoder, name, texts, Path(cfg.paths.models_dir).expanduser())
        positive_rows = np.array([label not in HARMLESS for label in labels])
        print(f"\n{name}: {len(texts)} exemplars, {positive_rows.sum()} risk/harmful")
        for c in args.c:
            probabilities, classes = out_of_fold(embeddings, labels, c)
            harmful_columns = np.array([label not in HARMLESS for label in classes])
            score = probabilities[:, harmful_columns].sum(1)
            line = f"  C={c:>5}: ROC AUC {roc_auc_score(positive_rows, score):.3f}"
            for threshold in (threshold_for_recall(score[positive_rows], args.recall),
                              threshold_for_false_alarms(score[~positive_rows], args.false_alarms)):
                line += (f"; threshold {threshold:.3f} -> dev recall {(score[positive_rows] >= threshold).mean():.3f}, "
                         f"false alarms {(score[~positive_rows] >= threshold).mean():.3f}")
            if screen.ACKNOWLEDGES in classes:
                ack = probabilities[:, classes.index(screen.ACKNOWLEDGES)]
                is_ack = np.array([label == screen.ACKNOWLEDGES for label in labels])
                plain = np.array([label == screen.ORDINARY for label in labels])
                ack_threshold = threshold_for_recall(ack[is_ack], 0.95)
                line += (f"; acknowledgement threshold {ack_threshold:.3f} keeps 95% of acknowledging replies, "
                         f"catches {(ack[plain] < ack_threshold).mean():.3f} of ordinary ones as ignoring")
            print(line)


if __name__ == "__main__":
    main()
