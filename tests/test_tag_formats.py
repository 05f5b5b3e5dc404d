"""The three ways a generator is given its strategy (generator.tag_format: token, words, instruction):
where each puts the strategy, that the strategy is never part of a scored or shown reply, that
forced-opening generation agrees with teacher-forced likelihood, and a model's own strategy drawn
from its distribution rather than collapsed to one tag."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mhsupport import pipeline
from mhsupport.modeling import tag_likelihood
from mhsupport.errors import MhsError
from mhsupport.modeling.formatting import (IGNORE_INDEX, SETTINGS_FILE, TAG_FORMATS, ChatTemplateFormatter, EosJoinedFormatter,
                                  FormatterSettings)
from mhsupport.modeling.decoding import generate, read_opening
from mhsupport.evaluation.generations_io import read_generations, scores_from_generations
from mhsupport.modeling.loading import train_bpe_tokenizer
from mhsupport.evaluation.sampling import choose_tags
from mhsupport.modeling.scoring import shared_prefix_length
from test_formatting import CHATML, CONTEXT, EXAMPLE
from test_likelihood import CONTEXTS, LABELS, REPLIES, WORDS, toy_examples, trained

GEN = ["generator=tiny", "generator.train_subset=64", "generator.valid_subset=16"]
CLF = ["classifier=tiny", "classifier.train_subset=200"]
EVAL = [*GEN, *CLF, "test_subset=24", "bootstrap.resamples=50", "decoding.max_new_tokens=12"]


@pytest.fixture(scope="module")
def chat_tokenizer():
    texts = [t["text"] for t in CONTEXT] * 20 + [EXAMPLE["response"]] * 20 + ["<|im_start|> <|im_end|> user assistant"]
    texts += [w for label in LABELS for w in WORDS[label].values()]
    tok = train_bpe_tokenizer(texts, vocab_size=500, min_frequency=1)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_words_open_the_reply_and_are_trained_but_never_scored(chat_tokenizer):
    f = ChatTemplateFormatter(chat_tokenizer, 1000, 100, LABELS, system_prompt="Be kind.", tag_format="words",
                              words=WORDS)
    features = f.training_features(EXAMPLE)
    prompt, opening = f.prompt_ids(CONTEXT, "Exploration"), f.opening_ids("Exploration")
    assert prompt == f.prompt_ids(CONTEXT)  # the words are not in the prompt
    assert features["input_ids"][len(prompt):len(prompt) + len(opening)] == opening
    assert features["labels"][len(prompt):] == features["input_ids"][len(prompt):]  # a model learns to write them
    scored = f.scored_reply(CONTEXT, "Exploration", EXAMPLE["response"])
    assert scored.ids[scored.scored_from:] == f.response_ids(EXAMPLE["response"])  # only the reply is scored
    assert chat_tokenizer.decode(opening) == WORDS["Exploration"]["opening"]


@pytest.mark.parametrize("family", ["chat_template", "eos_joined"])
def test_an_instruction_follows_the_conversation_outside_its_token_budget(chat_tokenizer, family):
    formatter_class = ChatTemplateFormatter if family == "chat_template" else EosJoinedFormatter
    plain = formatter_class(chat_tokenizer, 1000, 100, LABELS, tag_format="instruction", words=WORDS)
    full = len(plain.prompt_ids(CONTEXT))
    tight = formatter_class(chat_tokenizer, full - 1, 100, LABELS, tag_format="instruction", words=WORDS)
    untagged_prompt = tight.prompt_ids(CONTEXT)
    noted = tight.prompt_ids(CONTEXT, "Action")
    note = WORDS["Action"]["instruction"]
    text = chat_tokenizer.decode(noted)
    assert note in text and note not in chat_tokenizer.decode(untagged_prompt)
    assert text.index("I do not know what to do next") < text.index(note)  # after the conversation
    assert "I lost my job" not in text  # the same turns are dropped with and without the note
    if family == "chat_template":
        assert text.endswith(f"<|im_start|>system\n{note}<|im_end|>\n<|im_start|>assistant\n")
    # the tagged prompts of all strategies share the conversation, so its encoding can be shared
    reply_start = len(chat_tokenizer("<|im_start|>assistant\n" if family == "chat_template" else "",
                                     add_special_tokens=False)["input_ids"])
    shared = shared_prefix_length([untagged_prompt] + [tight.prompt_ids(CONTEXT, label) for label in LABELS],
                                  limit=len(untagged_prompt))
    assert shared >= len(untagged_prompt) - reply_start
    features = tight.training_features({**EXAMPLE, "category": "Action"})
    assert features["input_ids"][:len(noted)] == noted
    assert features["labels"][:len(noted)] == [IGNORE_INDEX] * len(noted)  # the note is prompt, not target
    assert tight.opening_ids("Action") == [] and not tight.model_writes_tag


def test_settings_keep_the_format_and_its_words(chat_tokenizer, tmp_path):
    settings = FormatterSettings("chat_template", 64, 32, LABELS, False, "Be kind.", "category", "words", WORDS)
    settings.save(tmp_path)
    assert FormatterSettings.load(tmp_path) == settings
    formatter = settings.build(chat_tokenizer)
    assert formatter.tag_format == "words" and formatter.opening_ids("Others") == chat_tokenizer(
        WORDS["Others"]["opening"], add_special_tokens=False)["input_ids"]
    saved = json.loads((tmp_path / SETTINGS_FILE).read_text())
    del saved["tag_format"], saved["words"]  # a model saved before tag formats existed: the token format
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(saved))
    assert FormatterSettings.load(tmp_path).tag_format == "token"


def test_words_from_the_config_fill_the_templates(make_cfg):
    cfg = make_cfg("train_generator", *GEN, "strategy_tag=true", "generator.tag_format=instruction",
                   "strategy_words.Action=offer one small next step", "generator.strategy_instruction='Now: {description}.'")
    settings = FormatterSettings.from_config(cfg)
    assert settings.words["Action"]["instruction"] == "Now: offer one small next step."
    assert settings.words["Comforting"]["opening"] == cfg.generator.strategy_opening.format(
        label="Comforting", description=cfg.strategy_words.Comforting)
    untagged = FormatterSettings.from_config(make_cfg("train_generator", *GEN, "generator.tag_format=instruction"))
    assert untagged.words is None and untagged.tag_format == "token"


@pytest.mark.parametrize("overrides, message", [
    (["generator.tag_format=sentence"], "expected one of token, words, instruction"),
    (["generator.strategy_opening='{label} {tone}'"], "may name only {label} and {description}"),
    (["generator.tag_lr_scale=30"], "generator.tag_lr_scale acts on tag tokens"),
    (["generator.tag_format=instruction", "generator.tag_contrast_weight=1"], "an instruction is part of the prompt"),
    (["~strategy_words.Action"], "strategy_words: no words for ['Action']"),
])
def test_bad_format_settings_are_one_line_errors(make_cfg, overrides, message):
    cfg = make_cfg("train_generator", *GEN, "strategy_tag=true", "generator.tag_format=words", *overrides)
    with pytest.raises(MhsError) as raised:
        pipeline.check_config("train_generator", cfg)
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    """A tiny model per format, trained where the reply depends on the strategy alone."""
    root = tmp_path_factory.mktemp("toy")
    return {tag_format: trained(toy_examples(320, seed=0), root / tag_format, tag_format) for tag_format in TAG_FORMATS}


@pytest.mark.parametrize("tag_format", TAG_FORMATS)
def test_forced_generation_agrees_with_teacher_forced_likelihood(toy_models, tag_format):
    model, formatter = toy_models[tag_format]
    model.eval()
    contexts = [[{"speaker": "seeker", "text": text, "category": None}] for text in CONTEXTS[:3]]
    for label in LABELS:
        outputs = generate(model, formatter.tokenizer, formatter, contexts, [label] * len(contexts), batch_size=2,
                           max_new_tokens=12, progress=False)
        for context, output in zip(contexts, outputs):
            assert output["tag"] == label
            # every generated token is the teacher-forced argmax after the same prompt and opening
            sequence = formatter.scored_reply(context, label, output["response"])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([sequence.ids])).logits[0]
            predicted = logits[sequence.scored_from - 1:-2].argmax(dim=-1).tolist()
            assert predicted == sequence.ids[sequence.scored_from:-1]  # the reply's tokens (then the end token)
        # and the likelihood stage finds that reply likeliest under the tag it was generated with
        examples = [{"context": c, "response": o["response"]} for c, o in zip(contexts, outputs)]
        nll, _ = tag_likelihood.reference_nll(model, formatter, examples, LABELS, batch_size=2, progress=False)
        assert [LABELS[k] for k in nll.argmin(axis=1)] == [label] * len(contexts)


@pytest.mark.parametrize("tag_format", ["token", "words"])
def test_a_model_writes_its_own_strategy_which_is_never_part_of_the_reply(toy_models, tag_format):
    model, formatter = toy_models[tag_format]
    contexts = [[{"speaker": "seeker", "text": text, "category": None}] for text in CONTEXTS]
    free = generate(model, formatter.tokenizer, formatter, contexts, [None] * len(contexts), max_new_tokens=30,
                    progress=False)
    for output in free:  # decoded freely: the opening is read back as the tag and cut from the reply
        assert output["tag"] in LABELS and output["response"].split()[:2] == REPLIES[output["tag"]].split()[:2]
    # an opening written again after a forced one is cut too
    again = formatter.opening_ids("Action") + formatter.tokenizer(REPLIES["Action"], add_special_tokens=False)["input_ids"]
    assert read_opening(formatter, again) == ("Action", REPLIES["Action"])


@pytest.mark.parametrize("tag_format", ["token", "words"])
def test_own_strategy_is_drawn_from_the_model_distribution_not_collapsed(toy_models, tag_format):
    model, formatter = toy_models[tag_format]
    contexts = [[{"speaker": "seeker", "text": CONTEXTS[i % len(CONTEXTS)], "category": None}] for i in range(400)]
    probabilities = tag_likelihood.opening_probabilities(model, formatter, contexts, batch_size=64)
    assert probabilities.shape == (400, 4) and np.allclose(probabilities.sum(axis=1), 1)
    # trained on uniformly drawn strategies: no strategy dominates the model's own distribution
    assert probabilities.mean(axis=0).max() < 0.5
    examples = [{"context": c} for c in contexts]
    drawn = choose_tags("none", examples, LABELS, "category", 7, own_probabilities=probabilities)
    assert drawn == choose_tags("none", examples, LABELS, "category", 7, own_probabilities=probabilities)  # seeded
    shares = np.array([drawn.count(label) for label in LABELS]) / len(drawn)
    np.testing.assert_allclose(shares, probabilities.mean(axis=0), atol=0.08)
    argmax = choose_tags("none", examples, LABELS, "category", 7, own_probabilities=probabilities, own_strategy="argmax")
    assert argmax == [LABELS[k] for k in probabilities.argmax(axis=1)]
    with pytest.raises(MhsError, match="own_strategy='mode'"):
        choose_tags("none", examples, LABELS, "category", 7, own_probabilities=probabilities, own_strategy="mode")


@pytest.fixture(scope="module")
def recogniser(make_cfg, prepared):
    pipeline.run("train_classifier", make_cfg("train_classifier", *CLF, "mode=response"))


@pytest.mark.parametrize("tag_format", ["words", "instruction"])
def test_eval_in_words_keeps_the_words_out_of_replies_and_metrics(make_cfg, recogniser, tag_format):
    tagging = ["strategy_tag=true", f"generator.tag_format={tag_format}", "generator.tag_lr_scale=1"]
    train_cfg = make_cfg("train_generator", *GEN, *tagging)
    pipeline.run("train_generator", train_cfg)
    words = FormatterSettings.from_config(train_cfg).words.values()
    for sampler in ("none", "oracle"):
        result = pipeline.Pipeline().ensure("eval", make_cfg("eval", *EVAL, *tagging, f"sampler={sampler}"))
        lines = read_generations(result.run.path)
        for line in lines:  # what the model was given, or wrote first, is not the reply
            assert not any(line["response"].startswith(text) for w in words
                           for text in (w["opening"].strip(), w["instruction"]))
        if sampler == "none" and tag_format == "words":  # the model's own strategies, scored as predictions
            assert {line["tag"] for line in lines} <= set(LABELS) and "strategy_accuracy" in result.metrics["metrics"]
        if sampler == "none" and tag_format == "instruction":  # no strategy given: no instruction
            assert all(line["tag"] is None for line in lines)
        if sampler == "oracle":
            assert all(line["tag"] == line["gold_category"] for line in lines)
        recomputed = scores_from_generations(lines).scores()
        assert recomputed["bleu"] == pytest.approx(result.metrics["metrics"]["bleu"]["value"])
