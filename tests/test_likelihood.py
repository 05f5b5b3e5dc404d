"""Tag use by likelihood: the shared-context computation against separate forward passes, a model
trained to depend on its tag against the same model trained on shuffled tags, and the stage."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from datasets import Dataset
import torch.nn.functional as F
from transformers import DataCollatorForSeq2Seq, GPT2Config, GPT2LMHeadModel, TrainingArguments

from mhsupport.evaluation import tag_use
from mhsupport.modeling import edits, loading, tag_likelihood
from mhsupport.training import trainers, validation
from mhsupport.modeling.formatting import IGNORE_INDEX, TAG_FORMATS, EosJoinedFormatter, tag_token
from mhsupport.modeling.scoring import shared_prefix_length

LABELS = ["Comforting", "Exploration", "Action", "Others"]
# Each category's replies: the reply's words depend on the tag alone, the context on nothing.
REPLIES = {"Comforting": "i am so sorry you feel this way", "Exploration": "what happened after that day ?",
           "Action": "maybe try to talk with your boss", "Others": "thanks for sharing , goodbye now"}
CONTEXTS = ["i lost my job last week", "my sister does not call me", "i cannot sleep at night",
            "work is too much for me", "i feel alone these days", "my exam went badly today"]


def toy_examples(n: int, seed: int, shuffle_tags: bool = False) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        category = rng.choice(LABELS)
        context = [{"speaker": "seeker", "text": rng.choice(CONTEXTS), "category": None}]
        # shuffled: the tag the model is trained with says nothing about the reply
        tag = rng.choice(LABELS) if shuffle_tags else category
        out.append({"context": context, "response": REPLIES[category], "category": tag, "true_category": category})
    return out


WORDS = {label: {"opening": f"( {label.lower()} ) ", "instruction": f"now : {REPLIES[label].split()[0]} {label.lower()}"}
         for label in LABELS}


def tiny_model_and_formatter(texts, tag_format="token"):
    texts = texts + [w for label in LABELS for w in WORDS[label].values()]
    tokenizer = loading.train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if tag_format == "token":
        edits.add_tag_tokens(model, tokenizer, {tag_token(label): label for label in LABELS})
    return model, EosJoinedFormatter(tokenizer, 32, 16, LABELS, tag_format=tag_format, words=WORDS)


def trained(examples, tmp_path, tag_format="token"):
    texts = CONTEXTS + list(REPLIES.values())
    model, formatter = tiny_model_and_formatter(texts, tag_format)
    features = [formatter.training_features(e) for e in examples]
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=10, per_device_train_batch_size=16,
                             learning_rate=3e-3, use_cpu=True, report_to="none", save_strategy="no", seed=0,
                             disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(formatter.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainers.LabelledPositionsTrainer(model=model, args=args, data_collator=collator,
                                      train_dataset=Dataset.from_list(features)).train()
    return model, formatter


@pytest.fixture(scope="module")
def test_examples():
    return [{**e, "category": e["true_category"]} for e in toy_examples(80, seed=1)]


def plain_nll(model, sequence) -> tuple[float, int]:
    """A sequence's scored NLL from one forward pass over the whole sequence, alone: no cache, no padding."""
    ids = torch.tensor([sequence.ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    token_nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")[sequence.scored_from - 1:]
    return float(token_nll.sum()), len(token_nll)


@pytest.mark.parametrize("tag_format", TAG_FORMATS)
@pytest.mark.parametrize("opening", [None, "hi there"])
def test_shared_context_equals_separate_forward_passes(tmp_path, test_examples, opening, tag_format):
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()) + [opening or ""], tag_format)
    model.eval()
    if opening:  # every prompt starts with the same turn: encoded once, as a chat model's system prompt is
        test_examples = [{**e, "context": [{"speaker": "supporter", "text": opening}] + e["context"]}
                         for e in test_examples]
        assert shared_prefix_length([formatter.prompt_ids(e["context"]) for e in test_examples[:12]]) > 2
    nll, tokens = tag_likelihood.reference_nll(model, formatter, test_examples[:12], LABELS, batch_size=5, progress=False)
    for k, label in enumerate(LABELS):
        separate = [plain_nll(model, formatter.scored_reply(e["context"], label, e["response"]))
                    for e in test_examples[:12]]
        np.testing.assert_allclose(nll[:, k], [value for value, _ in separate], atol=1e-4)
        assert list(tokens) == [count for _, count in separate]
        # the reply alone is scored: its tokens and the end token, whatever the tag's form
        assert list(tokens) == [len(formatter.response_ids(e["response"])) for e in test_examples[:12]]
    untagged = EosJoinedFormatter(formatter.tokenizer, 32, 16, None)
    nll_plain, _ = tag_likelihood.reference_nll(model, untagged, test_examples[:12], None, batch_size=4, progress=False)
    features = [untagged.training_features(e) for e in test_examples[:12]]
    expected = [plain_nll(model, validation.labelled_sequence(f))[0] for f in features]
    np.testing.assert_allclose(nll_plain[:, 0], expected, atol=1e-4)
    np.testing.assert_allclose(validation.per_example_nll(model, features, 3)[0], expected, atol=1e-4)


@pytest.mark.parametrize("tag_format", TAG_FORMATS)
def test_a_model_that_uses_its_tag_discriminates_and_shuffled_tags_do_not(tmp_path, test_examples, tag_format):
    gold = [e["category"] for e in test_examples]
    scores = {}
    for name, shuffle in (("tagged", False), ("shuffled", True)):
        model, formatter = trained(toy_examples(320, seed=0, shuffle_tags=shuffle), tmp_path / name, tag_format)
        nll, tokens = tag_likelihood.reference_nll(model, formatter, test_examples, LABELS, batch_size=16, progress=False)
        scores[name] = tag_use.tag_use_scores(nll, tokens, gold, LABELS, resamples=200, seed=0)
    tagged, shuffled = scores["tagged"]["metrics"], scores["shuffled"]["metrics"]
    assert tagged["tag_discrimination"]["value"] > 0.95
    assert shuffled["tag_discrimination"]["value"] < 0.5
    assert tagged["nll_gold_tag"]["value"] < tagged["nll_wrong_tags"]["value"] - 0.1
    confusion = np.array(scores["tagged"]["confusion"]["rows_gold_cols_predicted"])
    assert confusion.trace() == pytest.approx(confusion.sum() * tagged["tag_discrimination"]["value"])


def test_scores_on_known_numbers():
    # two examples, two tags: example 0 prefers its gold tag, example 1 does not
    nll = np.array([[2.0, 4.0], [3.0, 1.0]])
    tokens = np.array([2, 1])
    scores = tag_use.tag_use_scores(nll, tokens, ["A", "A"], ["A", "B"], resamples=50, seed=0)
    m = scores["metrics"]
    assert m["tag_discrimination"]["value"] == 0.5
    assert m["most_chosen_share"]["value"] == 0.5
    assert m["nll_gold_tag"]["value"] == pytest.approx((2.0 + 3.0) / 3)
    assert m["nll_wrong_tags"]["value"] == pytest.approx((4.0 + 1.0) / 3)
    assert m["ppl_gold_tag"]["value"] == pytest.approx(np.exp(5 / 3))
    assert scores["confusion"]["rows_gold_cols_predicted"] == [[1, 1], [0, 0]]
    untagged = tag_use.tag_use_scores(nll[:, :1], tokens, None, None, resamples=50, seed=0)["metrics"]
    assert untagged["ppl"]["value"] == pytest.approx(np.exp(5 / 3))


def test_paired_test_finds_a_consistent_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = rng.uniform(20, 40, size=300)
    tokens = np.full(300, 10)
    better = tag_use.paired_nll_test(base - 1.0 + rng.normal(0, 0.5, 300), base, tokens, 500, 0)
    assert better["value"] == pytest.approx(-0.1, abs=0.01) and better["p"] < 0.01 and better["high"] < 0
    same = tag_use.paired_nll_test(base + rng.normal(0, 0.5, 300), base, tokens, 500, 0)
    assert same["p"] > 0.05


def test_stage_scores_every_tag_once_per_generator_and_refuses_a_tagged_base_model(make_cfg):
    from mhsupport import pipeline
    from mhsupport.errors import MhsError

    cfg = make_cfg("likelihood", "generator=tiny", "strategy_tag=true")
    result = pipeline.Pipeline().ensure("likelihood", cfg)
    m = result.metrics
    lines = tag_use.read_likelihoods(result.run.path)
    assert m["labels"] == LABELS and len(lines) == m["examples"] > 0
    assert all(len(line["nll"]) == 4 and line["tokens"] > 0 and line["gold_label"] in LABELS for line in lines)
    assert 0 <= m["metrics"]["tag_discrimination"]["low"] <= m["metrics"]["tag_discrimination"]["value"] \
        <= m["metrics"]["tag_discrimination"]["high"] <= 1
    untagged = pipeline.Pipeline().ensure("likelihood", make_cfg("likelihood", "generator=tiny")).metrics
    assert untagged["labels"] is None and untagged["metrics"]["ppl"]["value"] > 1
    with pytest.raises(MhsError, match="no tags"):
        pipeline.run("likelihood", make_cfg("likelihood", "generator=tiny", "generator_source=base", "strategy_tag=true"))
