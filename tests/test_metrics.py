"""Generation metrics against sacrebleu called directly and against hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from mhsupport.metrics import GenerationScores, bootstrap_intervals, paired_bootstrap, rouge_l

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


def test_rouge_l_hand_worked():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5; P = R = 5/6
    assert rouge_l("the cat sat on the mat", "The cat lay on the mat") == pytest.approx(5 / 6)
    # LCS = 2 ("a c"); P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c", "a x c y") == pytest.approx(4 / 7)
    assert rouge_l("", "a") == 0.0 and rouge_l("x", "y") == 0.0


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
        if name.startswith("distinct"):
            assert metric["ci_low"] is None  # resampling with replacement biases a type/token ratio
        else:
            assert metric["ci_low"] <= metric["value"] <= metric["ci_high"], name
    assert a["bleu"]["ci_low"] < a["bleu"]["ci_high"]


def test_paired_bootstrap_separates_a_better_system_and_not_an_identical_one():
    worse = GenerationScores(["hello there"] * 50, REFS * 10)
    better = GenerationScores(HYPS * 10, REFS * 10)
    result = paired_bootstrap(worse, better, 300, seed=0)
    assert result["bleu"]["delta"] > 0 and result["bleu"]["p_value"] < 0.01
    same = paired_bootstrap(better, better, 300, seed=0)
    assert same["bleu"]["delta"] == 0 and same["bleu"]["p_value"] == 1.0
