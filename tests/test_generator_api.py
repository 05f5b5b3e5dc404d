"""The generator's Python API: load a run (or its model folder), respond with or without a tag,
batched, and clear errors for unknown tags, tags on untagged models and malformed contexts."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mhsupport import pipeline
from mhsupport import generator
from mhsupport.errors import MhsError
from mhsupport.modeling.formatting import FormatterSettings, build_formatter
from mhsupport.modeling.decoding import generate
from mhsupport.evaluation.sampling import choose_tags

TINY = ["generator=tiny", "generator.train_subset=64", "generator.valid_subset=16", "generator.batch_size=8"]
CONTEXTS = [[{"speaker": "seeker", "text": "I lost my job and I can't sleep."}],
            [{"speaker": "seeker", "text": "hi"}, {"speaker": "supporter", "text": "Hello, how are you feeling?"},
             {"speaker": "seeker", "text": "Not great, my friends ignore me."}]]


@pytest.fixture(scope="module")
def tagged_run(make_cfg, prepared):
    return pipeline.run("train_generator", make_cfg("train_generator", *TINY, "strategy_tag=true")).run.path


def test_respond_matches_the_evaluation_decoding_path(tagged_run):
    g = generator.load(tagged_run)
    assert g.tags == ["Comforting", "Exploration", "Action", "Others"]
    cfg = OmegaConf.load(tagged_run / "config.yaml")
    assert g.settings == FormatterSettings.from_config(cfg)
    # without a tag the model's own is drawn from its distribution over the tags, as eval's "none" does
    (own,) = choose_tags("none", [{}], g.tags, "", 0, own_probabilities=g.own_strategy_probabilities(CONTEXTS[1:]))
    expected = generate(g.model, g.tokenizer, build_formatter(cfg, g.tokenizer), CONTEXTS, ["Action", own],
                        max_new_tokens=12, progress=False)
    assert g.respond_many(CONTEXTS, ["Action", None], max_new_tokens=12) == [o["response"] for o in expected]
    assert g.respond(CONTEXTS[0], tag="Action", max_new_tokens=12) == expected[0]["response"]
    assert isinstance(g.respond(CONTEXTS[1]), str)
    assert generator.load(tagged_run / "model").settings == g.settings  # the model folder alone also loads


def test_unknown_tag_lists_the_run_s_tags(tagged_run):
    g = generator.load(tagged_run)
    with pytest.raises(MhsError, match=r"tag='Hugging': not one of this generator's tags \['Comforting', "):
        g.respond(CONTEXTS[0], tag="Hugging")
    with pytest.raises(MhsError, match="2 contexts but 1 tags"):
        g.respond_many(CONTEXTS, ["Action"])


@pytest.mark.parametrize("context, message", [
    ([], "context 0: expected a non-empty list"),
    ("I feel sad", "context 0: expected a non-empty list"),
    ([{"speaker": "therapist", "text": "hi"}], "context 0, turn 0: expected {'speaker': 'seeker' or 'supporter'"),
    ([{"speaker": "seeker"}], "context 0, turn 0"),
])
def test_malformed_contexts_are_refused(tagged_run, context, message):
    with pytest.raises(MhsError, match=message.replace("(", r"\(").replace("{", r"\{")):
        generator.load(tagged_run).respond(context)


def test_tag_on_an_untagged_model_is_refused(make_cfg, prepared, tmp_path):
    out = pipeline.run("train_generator", make_cfg("train_generator", *TINY)).run.path
    g = generator.load(out)
    assert g.tags == [] and isinstance(g.respond(CONTEXTS[0], max_new_tokens=8), str)
    with pytest.raises(MhsError, match="tag='Comforting': this generator was trained without tags"):
        g.respond(CONTEXTS[0], tag="Comforting")
    with pytest.raises(MhsError, match="no generator.json found"):
        generator.load(tmp_path)
