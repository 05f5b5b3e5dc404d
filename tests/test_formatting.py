"""Formatters: left truncation, loss masks, tag placement, chat template roles."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mhsupport.modeling.formatting import (IGNORE_INDEX, SETTINGS_FILE, ChatTemplateFormatter, EosJoinedFormatter,
                                  FormatterSettings, tag_token, whole_sentences)
from mhsupport.modeling.edits import add_tag_tokens
from mhsupport.modeling.loading import train_bpe_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LABELS = ["Comforting", "Exploration", "Action", "Others"]
CONTEXT = [{"speaker": "seeker", "text": "I lost my job today", "category": None},
           {"speaker": "supporter", "text": "That sounds really hard", "category": "Comforting"},
           {"speaker": "seeker", "text": "I do not know what to do next", "category": None}]
EXAMPLE = {"context": CONTEXT, "response": "What kind of work did you do?", "category": "Exploration"}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t["text"] for t in CONTEXT] * 20 + [EXAMPLE["response"]] * 20 + ["<|im_start|> <|im_end|> user assistant"]
    tok = train_bpe_tokenizer(texts, vocab_size=400, min_frequency=1)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2))
    add_tag_tokens(model, tok, {tag_token(label): label for label in LABELS})
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tok)
    words = tok(" comforting", add_special_tokens=False)["input_ids"]
    assert torch.allclose(weight[tok.convert_tokens_to_ids("<|comforting|>")], weight[words].mean(dim=0))
    return tok


def test_tag_token_names():
    assert tag_token("Comforting") == "<|comforting|>"
    assert tag_token("Providing Suggestions") == "<|providing_suggestions|>"
    assert tag_token("Self-disclosure") == "<|self_disclosure|>"


def test_eos_joined_prompt_and_loss_mask(tokenizer):
    f = EosJoinedFormatter(tokenizer, max_context_tokens=1000, max_response_tokens=100, labels=LABELS)
    features = f.training_features(EXAMPLE)
    eos = tokenizer.eos_token_id
    prompt = f.prompt_ids(CONTEXT)
    assert prompt.count(eos) == 3 and prompt[-1] == eos
    assert tokenizer.decode(prompt, skip_special_tokens=True).replace(" ", "") == "".join(t["text"] for t in CONTEXT).replace(" ", "")
    n = len(prompt)
    assert features["input_ids"][:n] == prompt
    assert features["labels"][:n] == [IGNORE_INDEX] * n  # no loss on the context
    assert features["input_ids"][n] == tokenizer.convert_tokens_to_ids("<|exploration|>")  # tag right before the response
    assert features["labels"][n:] == features["input_ids"][n:]
    assert features["labels"][-1] == eos
    assert tokenizer.decode(features["input_ids"][n + 1:-1]) == EXAMPLE["response"]


def test_context_is_truncated_from_the_left_and_response_capped(tokenizer):
    full = EosJoinedFormatter(tokenizer, 1000, 100, None).prompt_ids(CONTEXT)
    short = EosJoinedFormatter(tokenizer, 7, 3, None)
    assert short.prompt_ids(CONTEXT) == full[-7:]  # the most recent tokens survive
    features = short.training_features(EXAMPLE)
    assert len(features["input_ids"]) == 7 + 3 + 1  # untagged: capped response + EOS
    assert features["labels"][:7] == [IGNORE_INDEX] * 7


def test_a_long_training_reply_is_cut_after_its_last_whole_sentence_that_fits(tokenizer):
    def length(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    reply = "That sounds really hard. What kind of work did you do? I lost my job today too, and I do not know"
    budget = length("That sounds really hard. What kind of work did you do?") + 1
    assert length(reply) > budget
    assert whole_sentences(reply, tokenizer, budget) == "That sounds really hard. What kind of work did you do?"
    assert whole_sentences(reply, tokenizer, length(reply)) == reply  # fits: unchanged
    # no whole sentence fits: left whole, for the formatter to truncate
    assert whole_sentences(reply, tokenizer, 2) == reply


def test_history_tags_only_when_asked(tokenizer):
    comforting = tokenizer.convert_tokens_to_ids("<|comforting|>")
    assert comforting not in EosJoinedFormatter(tokenizer, 1000, 100, LABELS).prompt_ids(CONTEXT)
    assert comforting in EosJoinedFormatter(tokenizer, 1000, 100, LABELS, tags_in_history=True).prompt_ids(CONTEXT)


def test_chat_template_roles_and_turn_dropping(tokenizer):
    f = ChatTemplateFormatter(tokenizer, 1000, 100, LABELS, system_prompt="Be kind.")
    text = tokenizer.decode(f.prompt_ids(CONTEXT))
    assert text.index("system") < text.index("user") < text.index("assistant\nThat sounds") < text.rindex("user")
    assert text.endswith("<|im_start|>assistant\n")
    full = len(f.prompt_ids(CONTEXT))
    tight = ChatTemplateFormatter(tokenizer, full - 1, 100, LABELS, system_prompt="Be kind.")
    kept = tokenizer.decode(tight.prompt_ids(CONTEXT))
    assert "I lost my job" not in kept and "I do not know what to do next" in kept  # oldest turn dropped first
    features = tight.training_features(EXAMPLE)
    n = len(tight.prompt_ids(CONTEXT))
    assert features["input_ids"][n] == tokenizer.convert_tokens_to_ids("<|exploration|>")
    assert features["labels"][:n] == [IGNORE_INDEX] * n


def test_a_single_overlong_turn_keeps_its_end(tokenizer):
    long_turn = [{"speaker": "seeker", "text": " ".join(["I lost my job today"] * 30) + " and I do not know what to do next"}]
    f = ChatTemplateFormatter(tokenizer, 30, 10, None)
    ids = f.prompt_ids(long_turn)
    assert len(ids) <= 30
    assert tokenizer.decode(ids).endswith("what to do next<|im_end|>\n<|im_start|>assistant\n")


def test_a_strategy_tagged_formatter_reads_history_tags_from_the_strategy_field(tokenizer, tmp_path):
    strategies = ["Question", "Others"]
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [tag_token(s) for s in strategies]},
                           replace_extra_special_tokens=False)
    settings = FormatterSettings("eos_joined", 1000, 100, strategies, tags_in_history=True, system_prompt=None,
                                 tag_set="strategy")
    settings.save(tmp_path)
    formatter = FormatterSettings.load(tmp_path).build(tok)
    context = [{**turn, "strategy": "Question" if turn["speaker"] == "supporter" else None} for turn in CONTEXT]
    prompt = formatter.prompt_ids(context)
    assert tok.convert_tokens_to_ids(tag_token("Question")) in prompt
    assert tok.convert_tokens_to_ids("<|comforting|>") not in prompt  # the category field is not read
    features = formatter.training_features({**EXAMPLE, "context": context, "strategy": "Others"})
    assert features["labels"][len(prompt)] == tok.convert_tokens_to_ids(tag_token("Others"))
    # settings saved before tag_set was recorded: the 8 strategies or the 4 categories, told apart by count
    for labels, tag_set in ((["Question", "Restatement or Paraphrasing", "Reflection of feelings", "Self-disclosure",
                              "Affirmation and Reassurance", "Providing Suggestions", "Information", "Others"],
                             "strategy"), (LABELS, "category"), (None, "category")):
        saved = {**json.loads((tmp_path / SETTINGS_FILE).read_text()), "labels": labels}
        del saved["tag_set"]
        (tmp_path / "old").mkdir(exist_ok=True)
        (tmp_path / "old" / SETTINGS_FILE).write_text(json.dumps(saved))
        assert FormatterSettings.load(tmp_path / "old").tag_set == tag_set
