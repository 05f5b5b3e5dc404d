"""The two metric protocols against their libraries and against a direct transcription of the
ESConv code's metric formulas (thu-coai `codes_zcj/metric/myMetrics.py`), on hand-worked cases
and on real ESConv test pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nltk.tokenize import NLTKWordTokenizer
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score import rouge_scorer

from mhsupport.evaluation.metric_protocols import tokens_13a, tokens_nltk
from mhsupport.evaluation.generation_metrics import GenerationScores


@pytest.fixture(scope="module")
def esconv_pairs(real_raw_dir):
    """300 (hypothesis, reference) pairs of ESConv test: each supporter turn as the reference and
    the same conversation's previous supporter turn as the hypothesis."""
    pairs = []
    for line in (real_raw_dir / "esconv" / "test.json").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        turns = [" ".join(t["text"].split()) for t in json.loads(line)["dialog"] if t["speaker"] == "sys"]
        pairs += list(zip(turns, turns[1:]))
        if len(pairs) >= 300:
            return pairs[:300]
    return pairs


# --- a direct transcription of the codes_zcj formulas ---------------------------------------

def zcj_lcs(string, sub):
    if len(string) < len(sub):
        sub, string = string, sub
    lengths = [[0] * (len(sub) + 1) for _ in range(len(string) + 1)]
    for j in range(1, len(sub) + 1):
        for i in range(1, len(string) + 1):
            lengths[i][j] = (lengths[i - 1][j - 1] + 1 if string[i - 1] == sub[j - 1]
                             else max(lengths[i - 1][j], lengths[i][j - 1]))
    return lengths[len(string)][len(sub)]


def zcj_metrics(hypotheses, references):
    hyps = [tokens_nltk(h) for h in hypotheses]
    refs = [[tokens_nltk(r)] for r in references]
    out = {}
    for k in range(1, 5):
        out[f"esconv_bleu_{k}"] = 100 * corpus_bleu(refs, hyps, weights=[1 / k] * k + [0.0] * (4 - k),
                                                    smoothing_function=SmoothingFunction().method3)
    for k in (1, 2):
        grams = [tuple(sen[i:i + k]) for sen in hyps for i in range(0, len(sen) - k)]
        out[f"esconv_distinct_{k}"] = 100 * len(set(grams)) / len(grams)
    scores = []
    for hyp, (ref,) in zip(hyps, refs):
        lcs = zcj_lcs(ref, hyp)
        p, r = lcs / max(len(hyp), 1e-10), lcs / max(len(ref), 1e-10)
        scores.append((1 + 1.2 ** 2) * p * r / (r + 1.2 ** 2 * p) if p != 0 and r != 0 else 0.0)
    out["esconv_rouge_l"] = 100 * float(np.mean(scores))
    return out


def assert_esconv_equals_transcription(hypotheses, references, rows=None):
    scores = GenerationScores(hypotheses, references, protocols=("esconv",))
    ours = scores.scores(rows)
    if rows is not None:
        hypotheses, references = [hypotheses[i] for i in rows], [references[i] for i in rows]
    expected = zcj_metrics(hypotheses, references)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name


# --- tokenizers -------------------------------------------------------------------------------

def test_nltk_tokens_split_sentences_with_punkt_then_words():
    text = "Hello Mr. Smith. I can't go... What?! OK."
    assert tokens_nltk(text) == ["hello", "mr.", "smith", ".", "i", "ca", "n't", "go", "...", "what", "?", "!", "ok", "."]
    # Without Punkt's sentence split, a period inside the text stays on its word: word_tokenize != Treebank alone.
    assert "smith." in NLTKWordTokenizer().tokenize(text.lower())


def test_13a_tokens_split_punctuation_and_lowercase():
    assert tokens_13a("Yes, EXCELLENT!") == ["yes", ",", "excellent", "!"]


# --- esconv protocol = codes_zcj formulas -----------------------------------------------------

def test_esconv_hand_worked():
    s = GenerationScores(["Yes!"], ["Yes, excellent!"], protocols=("esconv",)).scores()
    # tokens yes ! / yes , excellent ! : LCS 2, P = 1, R = 1/2, F(beta 1.2) = 2.44 * 0.5 / (0.5 + 1.44)
    assert s["esconv_rouge_l"] == pytest.approx(100 * 2.44 * 0.5 / 1.94)
    # unigram matches 2/2, bigram 0/1 -> method3 1/(2*1); brevity exp(1 - 4/2)
    assert s["esconv_bleu_1"] == pytest.approx(100 * np.exp(-1))
    assert s["esconv_bleu_2"] == pytest.approx(100 * np.exp(-1) * np.sqrt(1 * 0.5))
    # codes_zcj counts positions 0..len-n-1: "yes" only (the last unigram "!" is left out)
    assert s["esconv_distinct_1"] == 100.0
    d = GenerationScores(["a b a", "a c"], ["x", "y"], protocols=("esconv",)).scores()
    assert d["esconv_distinct_1"] == pytest.approx(100 * 2 / 3)  # a, b | a  -> {a, b} of 3
    assert d["esconv_distinct_2"] == pytest.approx(100 * 1 / 1)  # (a, b) | none


def test_esconv_no_unigram_match_is_zero_like_nltk():
    s = GenerationScores(["foo bar"], ["baz qux"], protocols=("esconv",)).scores()
    assert s["esconv_bleu_1"] == 0.0 and s["esconv_bleu_4"] == 0.0


def test_esconv_equals_codes_zcj_formulas_on_hand_built_pairs():
    hyps = ["I am sorry to hear that.", "Have you talked to your boss about it? Mr. Smith may help.", "That sounds hard",
            "Maybe try a walk outside.", "ok", "Yes!"]
    refs = ["I am so sorry to hear that!", "Did you talk to your manager about it?", "That must be really hard.",
            "You could try going for a walk.", "Okay, I understand.", "Yes, excellent!"]
    assert_esconv_equals_transcription(hyps, refs)


def test_esconv_equals_codes_zcj_formulas_on_real_pairs_and_resamples(esconv_pairs):
    hyps, refs = [h for h, _ in esconv_pairs], [r for _, r in esconv_pairs]
    assert_esconv_equals_transcription(hyps, refs)
    rows = np.random.default_rng(0).integers(0, len(hyps), 120)  # a bootstrap resample re-sums rows
    assert_esconv_equals_transcription(hyps, refs, rows)


# --- default protocol: ROUGE-L = rouge-score, Distinct over 13a ------------------------------

def test_default_rouge_l_is_rouge_score_on_real_pairs(esconv_pairs):
    hyps, refs = [h for h, _ in esconv_pairs], [r for _, r in esconv_pairs]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, h)["rougeL"].fmeasure for h, r in esconv_pairs]
    scores = GenerationScores(hyps, refs, protocols=("default",))
    assert scores.scores()["rouge_l"] == pytest.approx(100 * np.mean(expected))
    rows = np.arange(0, 300, 7)
    assert scores.scores(rows)["rouge_l"] == pytest.approx(100 * np.mean([expected[i] for i in rows]))


def test_default_rouge_l_and_distinct_hand_worked():
    s = GenerationScores(["Yes!"], ["Yes, excellent!"], protocols=("default",)).scores()
    assert s["rouge_l"] == pytest.approx(100 * 2 / 3)  # yes / yes excellent: P 1, R 1/2
    d = GenerationScores(["Yes! Yes.", "no"], ["x", "y"], protocols=("default",)).scores()
    assert d["distinct_1"] == pytest.approx(100 * 4 / 5)  # yes ! yes . no -> {yes, !, ., no} of 5
    assert d["distinct_2"] == pytest.approx(100 * 3 / 3)  # (yes !) (! yes) (yes .)
