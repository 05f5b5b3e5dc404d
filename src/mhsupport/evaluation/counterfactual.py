"""The counterfactual test of steering: the recogniser's reading of replies generated for the same
contexts under every forced category. Independent of what the human supporter happened to do, it
asks whether a reply written under category k reads as k: a K x K confusion (rows: the forced
category, columns: the recognised one), each category's following rate, and their mean ("tag
following") beside the recogniser's accuracy on the human replies of the same contexts (its
ceiling on text it was trained to read)."""

from __future__ import annotations

import numpy as np

from mhsupport.evaluation.statistics import bootstrap_interval, bootstrap_p, bootstrap_rows, wilson_interval

EMPTY = "(empty)"  # a reply that decoded to nothing: never recognised as any category


def counterfactual_scores(forced: list[list[str]], recognised: list[list[str | None]], labels: list[str],
                          reference_hits: list[bool] | None, resamples: int, seed: int) -> dict:
    """forced[i][j] is the category reply j of context i was generated under and recognised[i][j]
    what the recogniser read in it (None: an empty reply). reference_hits[i]: whether the recogniser
    read context i's human reply as its gold category."""
    hits = np.array([[r == f for f, r in zip(row_forced, row_recognised)]
                     for row_forced, row_recognised in zip(forced, recognised)], dtype=np.float64)
    columns = [*labels, EMPTY]
    confusion = {f: dict.fromkeys(columns, 0) for f in labels}
    for row_forced, row_recognised in zip(forced, recognised):
        for f, r in zip(row_forced, row_recognised):
            confusion[f][EMPTY if r is None else r] += 1
    per_category = {}
    for label in labels:
        total = sum(confusion[label].values())
        low, high = wilson_interval(confusion[label][label], total) if total else (0.0, 0.0)
        per_category[label] = {"rate": 100 * confusion[label][label] / total if total else 0.0,
                               "low": 100 * low, "high": 100 * high, "replies": total}
    per_context = hits.mean(axis=1)  # every context has one reply per category: the mean of these is the macro mean
    following = bootstrap_interval(lambda x, axis=-1: 100 * x.mean(axis=axis), (per_context,), resamples, seed)
    out = {"labels": labels, "contexts": len(forced), "replies": int(hits.size), "confusion": confusion,
           "per_category": per_category, "tag_following": following, "recogniser_on_references": None,
           "following_minus_references": None}
    if reference_hits is not None:
        reference = np.array(reference_hits, dtype=np.float64)
        low, high = wilson_interval(int(reference.sum()), len(reference))
        out["recogniser_on_references"] = {"value": 100 * reference.mean(), "low": 100 * low, "high": 100 * high,
                                           "examples": len(reference)}
        difference = per_context - reference
        observed = 100 * difference.mean()
        resampled = np.array([100 * difference[rows].mean() for rows in bootstrap_rows(len(difference), resamples, seed)])
        out["following_minus_references"] = {"value": observed, "low": float(np.percentile(resampled, 2.5)),
                                             "high": float(np.percentile(resampled, 97.5)),
                                             "p_value": bootstrap_p(observed, resampled)}
    return out
