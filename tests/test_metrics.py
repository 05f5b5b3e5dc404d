"""Generation metrics against sacrebleu called directly and against hand-worked cases; paired
tests; strategy-prediction scores (Q, preference bias B). The protocols' tokenisation, ROUGE-L and
the esconv formulas are in test_metric_protocols.py."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from mhsupport.evaluation.classification import classification_scores, preference_bias
from mhsupport.evaluation.generation_metrics import (GenerationScores, bootstrap_intervals, bootstrap_mean_over_seeds,
                                                   paired_bootstrap, paired_randomisation)

HYPS = ["I am sorry to hear that.", "Have you talked to your boss about it?", "That sounds hard",
        "Maybe try a walk outside.", "ok"]
REFS = ["I am so sorry to hear that!", "Did you talk to your manager about it?", "That must be really hard.",
        "You could try going for a walk.", "Okay, I understand."]


def test_bleu_is_sacrebleu_corpus_bleu_with_default_settings():
    scores = GenerationScores(HYPS, REFS).scores()
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bleu_n_is_cumulative_smoothed_lowercased(n):
    expected = sacrebleu.BLEU(max_ngram_order=n, smooth_method="exp", lowercase=True).corpus_score(HYPS, [REFS]).score
    assert GenerationScores(HYPS, REFS).scores()[f"bleu_{n}"] == pytest.approx(expected)
    upper = [h.upper() for h in HYPS]
    assert GenerationScores(upper, REFS).scores()[f"bleu_{n}"] == pytest.approx(expected)  # lowercased
    assert GenerationScores(upper, REFS).scores()["bleu"] < GenerationScores(HYPS, REFS).scores()["bleu"]


def test_every_metric_has_a_signature_naming_its_protocol():
    scores = GenerationScores(HYPS, REFS, nll=[1.0] * 5, nll_tokens=[1] * 5)
    signatures = scores.signatures()
    for name in scores.scores():
        assert {"protocol", "library", "tokenizer", "case", "smoothing", "ngram_order"} <= set(signatures[name]), name
    reference_bleu = sacrebleu.BLEU()
    reference_bleu.corpus_score(HYPS, [REFS])
    assert signatures["bleu"]["signature"] == reference_bleu.get_signature().format()
    assert signatures["bleu_2"]["signature"].startswith("nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:")
    assert signatures["esconv_rouge_l"]["protocol"] == "esconv" and signatures["rouge_l"]["protocol"] == "default"
    only_default = GenerationScores(HYPS, REFS, protocols=("default",)).scores()
    assert "bleu" in only_default and not any(name.startswith("esconv_") for name in only_default)


def test_distinct_hand_worked_and_length():
    s = GenerationScores(["a b a", "a c"], ["x", "y"]).scores()
    assert s["distinct_1"] == pytest.approx(100 * 3 / 5)  # {a, b, c} of 5 unigrams
    assert s["distinct_2"] == pytest.approx(100 * 3 / 3)  # ab, ba, ac
    assert s["length"] == pytest.approx(2.5)


def test_perplexity_strategy_accuracy_and_adherence():
    s = GenerationScores(["a", "b", "c"], ["a", "b", "c"], nll=[2.0, 4.0, 0.0], nll_tokens=[1, 2, 1],
                         chosen=["A", "B", "A"], gold=["A", "A", "A"], recognised=["A", "B", "B"]).scores()
    assert s["ppl"] == pytest.approx(np.exp(6.0 / 4))
    assert s["strategy_accuracy"] == pytest.approx(100 * 2 / 3)
    assert s["tag_adherence"] == pytest.approx(100 * 2 / 3)


def test_bootstrap_interval_brackets_the_value_and_is_seeded():
    scores = GenerationScores(HYPS * 10, REFS * 10)
    a = bootstrap_intervals(scores, 200, seed=1)
    assert a == bootstrap_intervals(scores, 200, seed=1)
    for name, metric in a.items():
        if "distinct_" in name:
            assert metric["ci_low"] is None  # resampling with replacement biases a type/token ratio
        else:
            assert metric["ci_low"] <= metric["value"] <= metric["ci_high"], name
    assert a["bleu"]["ci_low"] < a["bleu"]["ci_high"]


def test_the_mean_over_decoding_seeds_has_an_interval_of_pooled_resamples():
    one, other = GenerationScores(HYPS * 10, REFS * 10), GenerationScores(REFS[::-1] * 10, REFS * 10)
    alone = bootstrap_intervals(one, 200, seed=3)
    twice = bootstrap_mean_over_seeds([one, one], 200, seed=3)
    for name in ("bleu", "rouge_l", "esconv_bleu_2"):  # two identical seeds: the one seed's interval, sd 0
        assert twice[name]["value"] == pytest.approx(alone[name]["value"]) and twice[name]["sd"] == 0
        assert (twice[name]["ci_low"], twice[name]["ci_high"]) == pytest.approx((alone[name]["ci_low"],
                                                                                 alone[name]["ci_high"]))
    mixed = bootstrap_mean_over_seeds([one, other], 200, seed=3)
    separate = [bootstrap_intervals(s, 200, seed=3)["bleu"] for s in (one, other)]
    assert mixed["bleu"]["value"] == pytest.approx(np.mean([s["value"] for s in separate]))
    assert mixed["bleu"]["sd"] == pytest.approx(np.std([s["value"] for s in separate], ddof=1))
    # not the average of the two intervals' bounds: the resamples draw the same examples for both seeds
    assert mixed["bleu"]["ci_low"] <= mixed["bleu"]["value"] <= mixed["bleu"]["ci_high"]
    assert mixed["bleu"]["ci_low"] != pytest.approx(np.mean([s["ci_low"] for s in separate]), abs=1e-9)


def test_paired_bootstrap_separates_a_better_system_and_not_an_identical_one():
    worse = GenerationScores(["hello there"] * 50, REFS * 10)
    better = GenerationScores(HYPS * 10, REFS * 10)
    result = paired_bootstrap(worse, better, 300, seed=0)
    assert result["bleu"]["delta"] > 0 and result["bleu"]["p_value"] < 0.01
    same = paired_bootstrap(better, better, 300, seed=0)
    assert same["bleu"]["delta"] == 0 and same["bleu"]["p_value"] == 1.0
    chosen = paired_bootstrap(worse, better, 300, seed=0, metrics=["bleu", "esconv_rouge_l"])
    assert chosen == {name: result[name] for name in ("bleu", "esconv_rouge_l")}  # same resamples, fewer metrics


def test_paired_randomisation_separates_a_better_system_and_not_an_identical_one():
    worse = GenerationScores(["hello there"] * 50, REFS * 10)
    better = GenerationScores(HYPS * 10, REFS * 10)
    result = paired_randomisation(worse, better, 300, seed=0)
    for name in ("bleu", "bleu_2", "rouge_l", "esconv_bleu_2", "esconv_rouge_l", "distinct_1"):
        assert result[name]["delta"] > 0 and result[name]["p_value"] < 0.01, name
    assert result["bleu"]["p_value"] == pytest.approx(1 / 301)
    same = paired_randomisation(better, better, 300, seed=0)
    assert all(r["delta"] == 0 and r["p_value"] == 1.0 for r in same.values())


def test_many_draws_and_swaps_at_once_score_what_each_scored_alone_gives():
    a = GenerationScores(HYPS * 10, REFS * 10)
    b = GenerationScores(["hello there", "i am sorry to hear that"] * 25, REFS * 10)
    draws = [np.random.default_rng(seed).integers(0, a.n, a.n) for seed in range(3)]
    for drawn, rows in zip(a.drawn_scores(draws), draws):
        assert drawn == pytest.approx(a.scores(rows))
    swaps = np.random.default_rng(0).random((3, a.n)) < 0.5
    hypotheses_a, hypotheses_b = HYPS * 10, ["hello there", "i am sorry to hear that"] * 25
    for swapped, take_b in zip(a.swapped_scores(b, swaps, chunk=2), swaps):
        mixed = GenerationScores([hb if t else ha for ha, hb, t in zip(hypotheses_a, hypotheses_b, take_b)], REFS * 10)
        assert swapped == pytest.approx(mixed.scores())


def test_paired_randomisation_of_one_differing_example_is_not_significant():
    a = GenerationScores(HYPS * 10, REFS * 10)
    b = GenerationScores(["hello there"] + (HYPS * 10)[1:], REFS * 10)
    result = paired_randomisation(a, b, 400, seed=1)
    # Only example 0 differs: a trial either swaps it (B' - A' = -(B - A)) or not (= B - A), so every
    # trial reaches the observed difference.
    assert result["bleu"]["delta"] < 0 and result["bleu"]["p_value"] == 1.0


def newman_iteration(confusion, rounds):
    """A transcription of the preference update Kang et al. publish (Newman 2023), run to convergence."""
    k = len(confusion)
    p = np.ones(k)
    for _ in range(rounds):
        for i in range(k):
            num = sum(confusion[j, i] * p[j] / (p[i] + p[j]) for j in range(k))
            den = sum(confusion[i, j] / (p[i] + p[j]) for j in range(k))
            p[i] = num / den
        p = p * k / p.sum()
    return p


def test_preference_bias_hand_built_confusion_matrices():
    # Two classes: predicting A where the gold is B 30 times, B where A 10 times: p_A / p_B = 3,
    # so p = (1.5, 0.5) at mean 1 and B = 0.5. The diagonal does not enter.
    preferences, bias = preference_bias(np.array([[50, 10], [30, 7]]))
    assert preferences == pytest.approx([1.5, 0.5], abs=1e-6) and bias == pytest.approx(0.5, abs=1e-6)
    perfect, bias = preference_bias(np.diag([20, 5, 9, 3]))
    assert perfect == pytest.approx([1, 1, 1, 1]) and bias == pytest.approx(0.0, abs=1e-9)
    always_first = np.zeros((4, 4))
    always_first[:, 0] = [20, 5, 9, 3]
    preferences, bias = preference_bias(always_first)
    assert preferences[0] == pytest.approx(4, abs=1e-4) and bias == pytest.approx(np.sqrt(3), abs=1e-4)


def test_preference_bias_is_the_bradley_terry_fit_of_the_published_update():
    confusion = np.random.default_rng(3).integers(1, 40, (5, 5)).astype(float)
    confusion[:, 2] *= 4  # a favoured class
    preferences, bias = preference_bias(confusion)
    expected = newman_iteration(confusion, 500)
    assert preferences == pytest.approx(expected, rel=1e-5)
    assert bias == pytest.approx(np.std(expected), rel=1e-5) and int(np.argmax(preferences)) == 2


def test_classification_scores_carry_q_and_preferences():
    gold = ["A", "B", "C", "A", "B", "C"]
    out = classification_scores(gold, ["A"] * 6, ["A", "B", "C"])
    assert out["macro_f1"] == pytest.approx((2 * (2 / 6) * 1 / (2 / 6 + 1)) / 3)
    assert out["preference"]["A"] > 2.99 and out["preference_bias"] == pytest.approx(np.sqrt(2), abs=1e-4)
    assert classification_scores(gold, gold, ["A", "B", "C"])["preference_bias"] == pytest.approx(0, abs=1e-9)
