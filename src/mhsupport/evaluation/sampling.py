"""Tag samplers (DESIGN.md section 7): which category tag the generator is given."""

from __future__ import annotations

import numpy as np

from mhsupport.errors import MhsError

SAMPLERS = ("none", "random", "random_prior", "classifier", "oracle")


def check_sampler(sampler: str, tagged: bool) -> None:
    if sampler not in SAMPLERS:
        raise MhsError(f"sampler={sampler!r}: expected one of {list(SAMPLERS)}")
    if not tagged and sampler != "none":
        raise MhsError(f"sampler={sampler!r} needs a tagged generator (--strategy-tag); "
                       "an untagged generator accepts only --sampler none")


def choose_tags(sampler: str, examples: list[dict], labels: list[str], label_key: str, seed: int,
                prior: dict[str, float] | None = None, classifier=None, classifier_sampling: str = "argmax",
                batch_size: int = 64, own_probabilities: np.ndarray | None = None,
                own_strategy: str = "sample") -> list[str | None]:
    """One tag per example, or None where the generator is given none ('none' for an untagged model
    or one whose tag is an instruction). Under 'none' a model whose tag opens its reply chooses its
    own: `own_probabilities` (n, K) is its distribution over the tags after each context, drawn from
    (seeded) or its most likely tag taken, by `own_strategy` (sample | argmax)."""
    rng = np.random.default_rng(seed)
    if sampler == "none":
        if own_probabilities is None:
            return [None] * len(examples)
        if own_strategy == "argmax":
            return [labels[i] for i in own_probabilities.argmax(axis=1)]
        if own_strategy == "sample":
            return [labels[rng.choice(len(labels), p=row / row.sum())] for row in own_probabilities]
        raise MhsError(f"own_strategy={own_strategy!r}: expected sample or argmax")
    if sampler == "oracle":
        return [e[label_key] for e in examples]
    if sampler == "random":
        return [labels[i] for i in rng.integers(0, len(labels), len(examples))]
    if sampler == "random_prior":
        weights = np.array([prior[label] for label in labels], dtype=np.float64)
        return [labels[i] for i in rng.choice(len(labels), size=len(examples), p=weights / weights.sum())]
    if sampler == "classifier":
        if classifier.labels != labels:
            raise MhsError(f"the classifier predicts {classifier.labels} but the generator's tags are {labels}")
        probabilities = classifier.predict_proba([e["context"] for e in examples], batch_size)
        if classifier_sampling == "argmax":
            return [labels[i] for i in probabilities.argmax(axis=1)]
        if classifier_sampling == "sample":
            return [labels[rng.choice(len(labels), p=row / row.sum())] for row in probabilities]
        raise MhsError(f"classifier_sampling={classifier_sampling!r}: expected argmax or sample")
    raise MhsError(f"sampler={sampler!r}: expected one of {list(SAMPLERS)}")
