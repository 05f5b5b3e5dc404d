"""Tag use by likelihood: the shared-context computation against separate forward passes, a model
trained to depend on its tag against the same model trained on shuffled tags, and the stage."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, GPT2Config, GPT2LMHeadModel, TrainingArguments

from mhsupport import likelihood, models, training
from mhsupport.formatting import IGNORE_INDEX, EosJoinedFormatter, tag_token
from mhsupport.generation import shared_prefix_length

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


def tiny_model_and_formatter(texts):
    tokenizer = models.train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    models.add_tag_tokens(model, tokenizer, {tag_token(label): label for label in LABELS})
    return model, EosJoinedFormatter(tokenizer, 32, 16, LABELS)


def trained(examples, tmp_path):
    texts = CONTEXTS + list(REPLIES.values())
    model, formatter = tiny_model_and_formatter(texts)
    features = [formatter.training_features(e) for e in examples]
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=6, per_device_train_batch_size=16,
                             learning_rate=3e-3, use_cpu=True, report_to="none", save_strategy="no", seed=0,
                             disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(formatter.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    training.LabelledPositionsTrainer(model=model, args=args, data_collator=collator,
                                      train_dataset=Dataset.from_list(features)).train()
    return model, formatter


@pytest.fixture(scope="module")
def test_examples():
    return [{**e, "category": e["true_category"]} for e in toy_examples(80, seed=1)]


@pytest.mark.parametrize("opening", [None, "hi there"])
def test_shared_context_equals_separate_forward_passes(tmp_path, test_examples, opening):
    model, formatter = tiny_model_and_formatter(CONTEXTS + list(REPLIES.values()) + [opening or ""])
    model.eval()
    if opening:  # every prompt starts with the same turn: encoded once, as a chat model's system prompt is
        test_examples = [{**e, "context": [{"speaker": "supporter", "text": opening}] + e["context"]}
                         for e in test_examples]
        assert shared_prefix_length([formatter.prompt_ids(e["context"]) for e in test_examples[:12]]) > 2
    nll, tokens = likelihood.reference_nll(model, formatter, test_examples[:12], LABELS, batch_size=5, progress=False)
    collator = DataCollatorForSeq2Seq(formatter.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    for k, label in enumerate(LABELS):
        features = []
        for example in test_examples[:12]:
            f = formatter.training_features({**example, "category": label})
            f["labels"][f["labels"].index(formatter.tag_ids[label])] = IGNORE_INDEX  # the tag is input only
            features.append(f)
        separate, counts = training.per_example_nll(model, features, collator, batch_size=3)
        np.testing.assert_allclose(nll[:, k], separate, atol=1e-4)
        assert list(tokens) == counts
    untagged = EosJoinedFormatter(formatter.tokenizer, 32, 16, None)
    nll_plain, _ = likelihood.reference_nll(model, untagged, test_examples[:12], None, batch_size=4, progress=False)
    features = [{"input_ids": p + t, "attention_mask": [1] * (len(p) + len(t)), "labels": [IGNORE_INDEX] * len(p) + t}
                for p, t in ((untagged.prompt_ids(e["context"]), untagged.response_ids(e["response"]))
                             for e in test_examples[:12])]
    np.testing.assert_allclose(nll_plain[:, 0], training.per_example_nll(model, features, collator, 3)[0], atol=1e-4)


def test_a_model_that_uses_its_tag_discriminates_and_shuffled_tags_do_not(tmp_path, test_examples):
    gold = [e["category"] for e in test_examples]
    scores = {}
    for name, shuffle in (("tagged", False), ("shuffled", True)):
        model, formatter = trained(toy_examples(320, seed=0, shuffle_tags=shuffle), tmp_path / name)
        nll, tokens = likelihood.reference_nll(model, formatter, test_examples, LABELS, batch_size=16, progress=False)
        scores[name] = likelihood.tag_use_scores(nll, tokens, gold, LABELS, resamples=200, seed=0)
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
    scores = likelihood.tag_use_scores(nll, tokens, ["A", "A"], ["A", "B"], resamples=50, seed=0)
    m = scores["metrics"]
    assert m["tag_discrimination"]["value"] == 0.5
    assert m["most_chosen_share"]["value"] == 0.5
    assert m["nll_gold_tag"]["value"] == pytest.approx((2.0 + 3.0) / 3)
    assert m["nll_wrong_tags"]["value"] == pytest.approx((4.0 + 1.0) / 3)
    assert m["ppl_gold_tag"]["value"] == pytest.approx(np.exp(5 / 3))
    assert scores["confusion"]["rows_gold_cols_predicted"] == [[1, 1], [0, 0]]
    untagged = likelihood.tag_use_scores(nll[:, :1], tokens, None, None, resamples=50, seed=0)["metrics"]
    assert untagged["ppl"]["value"] == pytest.approx(np.exp(5 / 3))


def test_paired_test_finds_a_consistent_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    base = rng.uniform(20, 40, size=300)
    tokens = np.full(300, 10)
    better = likelihood.paired_nll_test(base - 1.0 + rng.normal(0, 0.5, 300), base, tokens, 500, 0)
    assert better["value"] == pytest.approx(-0.1, abs=0.01) and better["p"] < 0.01 and better["high"] < 0
    same = likelihood.paired_nll_test(base + rng.normal(0, 0.5, 300), base, tokens, 500, 0)
    assert same["p"] > 0.05


def test_stage_scores_every_tag_once_per_generator_and_refuses_a_tagged_base_model(make_cfg):
    from mhsupport import pipeline
    from mhsupport.errors import MhsError

    cfg = make_cfg("likelihood", "generator=tiny", "strategy_tag=true")
    result = pipeline.Pipeline().ensure("likelihood", cfg)
    m = result.metrics
    lines = likelihood.read_likelihoods(result.run.path)
    assert m["labels"] == LABELS and len(lines) == m["examples"] > 0
    assert all(len(line["nll"]) == 4 and line["tokens"] > 0 and line["gold_label"] in LABELS for line in lines)
    assert 0 <= m["metrics"]["tag_discrimination"]["low"] <= m["metrics"]["tag_discrimination"]["value"] \
        <= m["metrics"]["tag_discrimination"]["high"] <= 1
    untagged = pipeline.Pipeline().ensure("likelihood", make_cfg("likelihood", "generator=tiny")).metrics
    assert untagged["labels"] is None and untagged["metrics"]["ppl"]["value"] > 1
    with pytest.raises(MhsError, match="no tags"):
        pipeline.run("likelihood", make_cfg("likelihood", "generator=tiny", "generator_source=base", "strategy_tag=true"))
