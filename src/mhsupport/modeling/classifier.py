"""The next-category classifier and the response recogniser: their inputs, the baselines they
are judged against, and the small API the samplers call (`load`, `predict_proba`)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.calibration import calibration_curve
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from mhsupport.modeling import devices

SETTINGS_FILE = "classifier.json"
SPEAKER_NAMES = {"seeker": "Seeker", "supporter": "Supporter"}


@dataclass
class ClassifierSettings:
    mode: str  # next_category | response
    labels: list[str]
    label_key: str  # "category" | "strategy"
    context_turns: int
    history_categories: bool
    max_length: int

    def text(self, item, separator: str = " | ") -> str:
        """The classifier's input: the last turns of a context, or a response."""
        if self.mode == "response":
            return item if isinstance(item, str) else item["response"]
        context = item if isinstance(item, list) else item["context"]
        return context_text(context, self.context_turns, separator,
                            self.label_key if self.history_categories else None)


def context_text(context: list[dict], turns: int, separator: str, label_key: str | None = None) -> str:
    parts = []
    for turn in context[-turns:] if turns else context:
        speaker = SPEAKER_NAMES[turn["speaker"]]
        if label_key and turn["speaker"] == "supporter" and turn.get(label_key):
            speaker += f" ({turn[label_key]})"
        parts.append(f"{speaker}: {turn['text']}")
    return separator.join(parts)


class Classifier:
    """A trained classifier run's model, for batched probabilities over its labels."""

    def __init__(self, model, tokenizer, settings: ClassifierSettings):
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.tokenizer.truncation_side = "left"  # keep the most recent context

    @property
    def labels(self) -> list[str]:
        return self.settings.labels

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (Path(path) / SETTINGS_FILE).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    @torch.no_grad()
    def predict_proba(self, items: list, batch_size: int = 64) -> np.ndarray:
        """Probabilities, shape (len(items), len(labels)), rows summing to 1. Items are contexts
        (lists of {speaker, text[, category]}), examples, or responses (recogniser)."""
        was_training = self.model.training  # the Trainer's epoch-end validation calls this mid-training
        self.model.eval()
        separator = f" {self.tokenizer.sep_token} " if self.tokenizer.sep_token else " | "
        texts = [self.settings.text(item, separator) for item in items]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            encoded = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                     max_length=self.settings.max_length, return_tensors="pt").to(self.model.device)
            logits = self.model(**encoded).logits.float()
            out[batch] = torch.softmax(logits, dim=-1).cpu().numpy()
        self.model.train(was_training)
        return out

    def predict(self, items: list, batch_size: int = 64) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(items, batch_size).argmax(axis=1)]


def load(path: str | Path, runtime=None) -> Classifier:
    """A classifier from a run's `model/` folder (or the run folder itself), placed by the device
    rule for inference (`runtime`: a config's runtime node; None: the defaults, auto)."""
    path = Path(path)
    if (path / "model" / SETTINGS_FILE).is_file():
        path = path / "model"
    settings = ClassifierSettings(**json.loads((path / SETTINGS_FILE).read_text()))
    model = devices.place(AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32),
                          devices.inference(runtime))
    return Classifier(model, AutoTokenizer.from_pretrained(path), settings)


# --- baselines (DESIGN.md section 6) -----------------------------------------------------

def majority_label(train_labels: list[str]) -> str:
    return Counter(train_labels).most_common(1)[0][0]


def previous_supporter_label(examples: list[dict], label_key: str, fallback: str) -> list[str]:
    """The label of the most recent supporter turn in each context (fallback when there is none)."""
    predictions = []
    for example in examples:
        previous = [t[label_key] for t in example["context"] if t["speaker"] == "supporter" and t.get(label_key)]
        predictions.append(previous[-1] if previous else fallback)
    return predictions


def tfidf_logistic_regression(train_texts, train_labels, eval_texts: dict[str, list[str]], ngram_max: int,
                              max_iter: int, seed: int, C: float = 1.0) -> dict[str, list[str]]:
    """One fitted TF-IDF + logistic regression's predictions for each named set of texts (split -> texts)."""
    vectorizer = TfidfVectorizer(ngram_range=(1, ngram_max), sublinear_tf=True, min_df=2)
    model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    model.fit(vectorizer.fit_transform(train_texts), train_labels)
    return {name: [str(label) for label in model.predict(vectorizer.transform(texts))]
            for name, texts in eval_texts.items()}


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
    difference reference - other, its interval and the two-sided p-value of 'no difference' (share
    of resampled differences on the other side of zero, doubled; the rule of
    metrics.paired_bootstrap)."""
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    gold_ids = np.array([index[g] for g in gold])
    predicted = {name: np.array([index[p] for p in preds]) for name, preds in systems.items()}
    point = {name: _accuracy_and_macro_f1(gold_ids, p, k) for name, p in predicted.items()}
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in systems}
    for _ in range(resamples):
        rows = rng.integers(0, len(gold_ids), len(gold_ids))
        for name, p in predicted.items():
            samples[name].append(_accuracy_and_macro_f1(gold_ids[rows], p[rows], k))
    samples = {name: np.array(values) for name, values in samples.items()}
    metric_names = ("accuracy", "macro_f1")
    intervals = {name: {metric: {"value": point[name][m], "ci_low": float(np.percentile(samples[name][:, m], 2.5)),
                                 "ci_high": float(np.percentile(samples[name][:, m], 97.5))}
                        for m, metric in enumerate(metric_names)} for name in systems}
    paired = {}
    for name in systems:
        if name == reference:
            continue
        paired[name] = {}
        for m, metric in enumerate(metric_names):
            deltas = samples[reference][:, m] - samples[name][:, m]
            observed = point[reference][m] - point[name][m]
            other_side = (deltas <= 0).sum() if observed > 0 else (deltas >= 0).sum()
            paired[name][metric] = {"delta": observed, "ci_low": float(np.percentile(deltas, 2.5)),
                                    "ci_high": float(np.percentile(deltas, 97.5)),
                                    "p_value": float(min(1.0, 2 * (other_side + 1) / (resamples + 1)))}
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
