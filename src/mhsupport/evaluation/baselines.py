"""The baselines a classifier is judged against (DESIGN.md section 6): the majority label, the
previous supporter turn's label, and TF-IDF + logistic regression."""

from __future__ import annotations

from collections import Counter

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression


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
