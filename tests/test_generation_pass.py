"""One generation pass per tagged generator (`mhs generate`): each context encoded once, a reply under
every tag. A sampler's selection from the pass equals generating under its tags separately; the
model's own tag probabilities equal teacher-forced scoring; the counterfactual test counts right;
a damaged pass is one line naming the run and the command that rebuilds it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mhsupport import pipeline
from mhsupport.errors import MhsError
from mhsupport.evaluation.counterfactual import EMPTY, counterfactual_scores
from mhsupport.evaluation.generations_io import read_generations
from mhsupport.modeling import devices, loading, tag_likelihood
from mhsupport.modeling.decoding import generate, generate_under_tags, reply
from mhsupport.modeling.formatting import ChatTemplateFormatter, EosJoinedFormatter, build_formatter
from mhsupport.modeling.loading import train_bpe_tokenizer
from mhsupport.settings.config import generation_config, generator_config, prepare_data_config
from mhsupport.evaluation import replies_io
from mhsupport.stages import generate as generate_stage
from test_formatting import CHATML
from test_likelihood import LABELS, WORDS

GEN = ["generator=tiny", "generator.train_subset=64", "generator.valid_subset=16"]
CLF = ["classifier=tiny", "classifier.train_subset=200"]
EVAL = [*GEN, *CLF, "test_subset=24", "bootstrap.resamples=50", "decoding.max_new_tokens=12", "strategy_tag=true"]
CONTEXTS = [[{"speaker": "seeker", "text": text}, {"speaker": "supporter", "text": "I hear you."},
             {"speaker": "seeker", "text": text[::-1]}]
            for text in ("i lost my job today", "my sister does not talk to me", "exams are next week and i panic",
                         "i cannot sleep", "my dog died", "work is too much", "i feel alone here")]


@pytest.fixture(scope="module")
def tiny_lm():
    texts = [t["text"] for c in CONTEXTS for t in c] * 5 + [w for label in LABELS for w in WORDS[label].values()]
    tokenizer = train_bpe_tokenizer(texts + ["<|im_start|> <|im_end|> user assistant system"], vocab_size=300,
                                    min_frequency=1)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                       eos_token_id=tokenizer.eos_token_id, initializer_range=0.3)).eval()
    return model, tokenizer


@pytest.mark.parametrize("tag_format,family", [("words", "chat_template"), ("instruction", "chat_template"),
                                               ("instruction", "eos_joined"), ("words", "eos_joined")])
@pytest.mark.parametrize("do_sample", [False, True])
def test_every_tags_reply_equals_generating_under_that_tag_alone(tiny_lm, tag_format, family, do_sample):
    model, tokenizer = tiny_lm
    formatter_class = ChatTemplateFormatter if family == "chat_template" else EosJoinedFormatter
    formatter = formatter_class(tokenizer, 60, 20, LABELS, system_prompt="Be kind." if family == "chat_template" else None,
                                tag_format=tag_format, words=WORDS)
    tags = LABELS + ([] if formatter.model_writes_tag else [None])
    references = ["i am so sorry about that", "what happened next?", "ok"] * 3
    examples = [{"context": c, "response": r} for c, r in zip(CONTEXTS, references)]
    passed = generate_under_tags(model, tokenizer, formatter, CONTEXTS, tags, batch_size=3, max_new_tokens=10,
                                 do_sample=do_sample, seed=5, progress=False,
                                 references=[formatter.response_ids(e["response"]) for e in examples])
    # the reference scored in the pass equals the likelihood stage's teacher-forced scoring, tag by tag
    nll, tokens = tag_likelihood.reference_nll(model, formatter, examples, LABELS, batch_size=2, progress=False)
    labelled = [tags.index(label) for label in LABELS]
    np.testing.assert_allclose(np.array([[p["reference_nll"][j] for j in labelled] for p in passed]), nll, rtol=1e-5)
    assert [p["reference_tokens"] for p in passed] == tokens.tolist()
    for j, tag in enumerate(tags):
        # another batch size, one tag at a time: the same replies
        alone = generate(model, tokenizer, formatter, CONTEXTS, [tag] * len(CONTEXTS), batch_size=2, max_new_tokens=10,
                         do_sample=do_sample, seed=5, progress=False,
                         references=[formatter.response_ids(e["response"]) for e in examples])
        assert [p["replies"][j] for p in passed] == [{k: a[k] for k in ("tag", "response", "tokens")} for a in alone]
        # generating alone reads the same reference NLL from its prompt's cache
        np.testing.assert_allclose([a["reference_nll"] for a in alone], [p["reference_nll"][j] for p in passed],
                                   rtol=1e-5)
    responses = {r["response"] for p in passed for r in p["replies"]}
    assert len(responses) > len(CONTEXTS)  # the tags change the replies: the test compares different texts
    if formatter.model_writes_tag:
        own = tag_likelihood.opening_probabilities(model, formatter, CONTEXTS, batch_size=4)
        log_p = np.array([p["own"] for p in passed])
        from_pass = np.exp(log_p - log_p.max(axis=1, keepdims=True))
        np.testing.assert_allclose(from_pass / from_pass.sum(axis=1, keepdims=True), own, atol=1e-5)
    else:
        assert all(p["own"] is None for p in passed)


def guided_by_brute_force(model, formatter, context, tags, j, scale, steps, max_new_tokens, eos_id):
    """Greedy reply under tags[j], the first `steps` tokens guided: every tag's whole sequence (its
    prompt, opening and the reply so far) run through the model from scratch at every step."""
    labelled = [t for t in tags if t is not None]
    sequences = {t: formatter.prompt_ids(context, t) + formatter.opening_ids(t) for t in tags}
    reply = []
    for step in range(max_new_tokens):
        def log_p(tag):
            return torch.log_softmax(model(torch.tensor([sequences[tag] + reply])).logits[0, -1].float(), dim=-1)
        own = log_p(tags[j])
        if step < steps and tags[j] is not None:
            mean = torch.logsumexp(torch.stack([log_p(t) for t in labelled]), dim=0) - np.log(len(labelled))
            own = own + scale * (own - mean)
        reply.append(int(own.argmax()))
        if reply[-1] == eos_id:
            break
    return reply


@pytest.mark.parametrize("tag_format", ["words", "instruction"])
@torch.no_grad()
def test_guided_replies_equal_guidance_computed_from_scratch(tiny_lm, tag_format):
    model, tokenizer = tiny_lm
    formatter = ChatTemplateFormatter(tokenizer, 60, 20, LABELS, system_prompt="Be kind.", tag_format=tag_format,
                                      words=WORDS)
    tags = LABELS + ([] if formatter.model_writes_tag else [None])
    contexts = CONTEXTS[:5]
    plain = generate_under_tags(model, tokenizer, formatter, contexts, tags, batch_size=2, max_new_tokens=8,
                                progress=False)
    # scale 0 is no guidance at all
    assert generate_under_tags(model, tokenizer, formatter, contexts, tags, batch_size=2, max_new_tokens=8,
                               progress=False, guidance_scale=0.0, guidance_tokens=4) == plain
    guided = generate_under_tags(model, tokenizer, formatter, contexts, tags, batch_size=2, max_new_tokens=8,
                                 progress=False, guidance_scale=3.0, guidance_tokens=4)
    changed = 0
    for context, result, unguided in zip(contexts, guided, plain):
        for j, tag in enumerate(tags):
            expected = guided_by_brute_force(model, formatter, context, tags, j, 3.0, 4, 8, tokenizer.eos_token_id)
            assert result["replies"][j] == reply(formatter, expected, tag)
            changed += result["replies"][j] != unguided["replies"][j]
            if tag is None:  # the reply without a tag is never guided
                assert result["replies"][j] == unguided["replies"][j]
    assert changed  # guidance changed some replies: the comparison is not of unguided decoding with itself


def test_counterfactual_scores_count_the_forced_category_and_the_reference_ceiling():
    labels = ["A", "B"]
    forced = [labels] * 4
    recognised = [["A", "B"], ["A", "A"], [None, "B"], ["B", "A"]]
    scores = counterfactual_scores(forced, recognised, labels, [True, True, False, True], resamples=200, seed=0)
    assert scores["confusion"] == {"A": {"A": 2, "B": 1, EMPTY: 1}, "B": {"A": 2, "B": 2, EMPTY: 0}}
    assert scores["per_category"]["A"]["rate"] == 50.0 and scores["per_category"]["B"]["rate"] == 50.0
    assert scores["tag_following"]["value"] == 50.0
    assert scores["tag_following"]["low"] <= 50.0 <= scores["tag_following"]["high"]
    assert scores["recogniser_on_references"]["value"] == 75.0
    assert scores["following_minus_references"]["value"] == pytest.approx(-25.0)


@pytest.fixture(scope="module")
def passed_run(make_cfg, prepared):
    cfg = make_cfg("eval", *EVAL)
    graph = pipeline.Pipeline()
    graph.ensure("generate", generation_config(cfg))
    return graph.ensure("generate", generation_config(cfg)).run, cfg


@pytest.mark.parametrize("sampler", ["none", "random", "classifier", "oracle"])
def test_a_samplers_eval_shows_what_generating_under_its_tags_gives(make_cfg, passed_run, sampler):
    run, cfg = passed_run
    lines = read_generations(pipeline.Pipeline().ensure("eval", make_cfg("eval", *EVAL, f"sampler={sampler}")).run.path)
    generator = pipeline.Pipeline().plan("train_generator", generator_config(cfg))
    model, tokenizer = loading.load_saved_causal_lm(generator.path / "model", devices.inference(cfg.runtime))
    formatter = build_formatter(generator_config(cfg), tokenizer)
    assert all(line["tag"] in LABELS for line in lines)
    direct = generate(model, tokenizer, formatter, [line["context"] for line in lines], [line["tag"] for line in lines],
                      batch_size=5, max_new_tokens=12, progress=False)
    assert [line["response"] for line in lines] == [d["response"] for d in direct]


def test_the_pass_records_every_tag_and_the_counterfactual_test(passed_run):
    run, _ = passed_run
    metrics = run.read_metrics()
    lines = [json.loads(line) for line in (run.path / replies_io.REPLIES).read_text().splitlines()]
    assert len(lines) == 24 * 4 == metrics["replies"] and metrics["tags"] == LABELS
    counterfactual = metrics["counterfactual"]
    assert sum(sum(row.values()) for row in counterfactual["confusion"].values()) == 96
    hits = sum(line["recognised"] == line["tag"] for line in lines)
    assert counterfactual["tag_following"]["value"] == pytest.approx(100 * hits / 96)


def test_a_damaged_pass_is_one_line_naming_the_run_and_its_command(make_cfg, passed_run, tmp_path):
    run, cfg = passed_run
    examples = generate_stage.test_examples(cfg, pipeline.Pipeline().plan("prepare_data", prepare_data_config(cfg)).path)
    copy = dataclasses.replace(run, path=tmp_path / "copy", command="mhs generate --profile tiny")
    (tmp_path / "copy").mkdir()
    text = (run.path / replies_io.REPLIES).read_text().splitlines()
    (tmp_path / "copy" / replies_io.REPLIES).write_text("\n".join(text[:10]) + "\n{\"seed\": 0,\n")
    with pytest.raises(MhsError, match=r"replies.jsonl, line 11: not a JSON object .*mhs generate --profile tiny --force"):
        replies_io.read_replies(copy, examples, LABELS, [0])
    (tmp_path / "copy" / replies_io.REPLIES).write_text("\n".join(text[:10]) + "\n")
    with pytest.raises(MhsError, match=r"no reply for conversation .* \(86 of 96 missing.*--force"):
        replies_io.read_replies(copy, examples, LABELS, [0])


def test_generate_refuses_an_untagged_generator(make_cfg):
    with pytest.raises(MhsError, match="add --strategy-tag"):
        pipeline.run("generate", make_cfg("generate", *GEN, "strategy_tag=false"))


def test_reference_scoring_reads_a_sliding_window_cache_from_a_copy(tiny_lm):
    """A model whose layers keep only a window of their past cannot be cut back or indexed as plain
    (keys, values) pairs: the reference is read from a copy of its cache, and decoding is unchanged."""
    from transformers import MistralConfig, MistralForCausalLM

    _, tokenizer = tiny_lm
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             sliding_window=4, max_position_embeddings=256,
                                             eos_token_id=tokenizer.eos_token_id)).eval()
    formatter = EosJoinedFormatter(tokenizer, 60, 20, None)
    examples = [{"context": c, "response": r} for c, r in zip(CONTEXTS, ["i am so sorry", "what happened next?", "ok"] * 3)]
    references = [formatter.response_ids(e["response"]) for e in examples]
    scored = generate(model, tokenizer, formatter, CONTEXTS, [None] * len(CONTEXTS), batch_size=3, max_new_tokens=8,
                      progress=False, references=references)
    plain = generate(model, tokenizer, formatter, CONTEXTS, [None] * len(CONTEXTS), batch_size=3, max_new_tokens=8,
                     progress=False)
    assert [{k: s[k] for k in ("tag", "response", "tokens")} for s in scored] == plain
    nll, _ = tag_likelihood.reference_nll(model, formatter, examples, None, batch_size=2, progress=False)
    np.testing.assert_allclose([s["reference_nll"] for s in scored], nll[:, 0], rtol=1e-4)
