"""generator.trainable=lora: adapters and the tag rows train, the rest stays frozen; the run is
saved as peft's adapter (generator.lora.save=adapter, the default), loadable with
PeftModel.from_pretrained and scored like the merged model, or merged into a plain model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from mhsupport import pipeline
from mhsupport import generator
from mhsupport.cli import main
from mhsupport.errors import MhsError
from mhsupport.evaluation.generations_io import read_generations
from mhsupport.evaluation.tag_use import read_likelihoods

TINY = ["generator=tiny", "generator.train_subset=64", "generator.valid_subset=16", "generator.batch_size=8",
        "generator.trainable=lora", "strategy_tag=true"]
SCORED = ["sampler=oracle", "tag_adherence=false", "test_subset=24", "decoding.max_new_tokens=12",
          "bootstrap.resamples=50"]


def test_lora_run_is_a_plain_model_whose_tag_rows_trained(make_cfg, prepared):
    result = pipeline.run("train_generator", make_cfg("train_generator", *TINY, "generator.lora.save=merged"))
    out, m = result.run.path / "model", result.metrics
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not [name for name in model.state_dict() if "lora" in name or "trainable_tokens" in name]
    assert sum(p.numel() for p in model.parameters()) == m["parameters"]
    assert 0 < m["trainable_parameters"] < 0.05 * m["parameters"]

    # Only the adapters and the tag rows train: every other embedding row keeps its initial value,
    # so an untrained tag row would still be the mean of its label's word rows (models.add_tag_tokens).
    embeddings = model.get_input_embeddings().weight
    for label in ("Comforting", "Exploration", "Action", "Others"):
        words = tokenizer(" " + label.lower(), add_special_tokens=False)["input_ids"]
        tag_row = embeddings[tokenizer.convert_tokens_to_ids(f"<|{label.lower()}|>")]
        assert not torch.allclose(tag_row, embeddings[words].mean(dim=0), atol=1e-4)
    assert torch.equal(model.lm_head.weight, embeddings)  # still tied after merging
    assert isinstance(generator.load(result.run.path).respond([{"speaker": "seeker", "text": "hi"}], tag="Action",
                                                              max_new_tokens=6), str)


def test_adapter_run_loads_with_peft_and_is_scored_like_the_merged_run(make_cfg, prepared):
    adapter = pipeline.run("train_generator", make_cfg("train_generator", *TINY)).run
    merged = pipeline.run("train_generator", make_cfg("train_generator", *TINY, "generator.lora.save=merged")).run
    out = adapter.path / "model"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # no merged weights: the adapter, and the base it goes over
    assert json.loads((out / "base_model.json").read_text())["source"] == "scratch"

    # As peft users load it: the base (here from scratch, so kept in the run), the adapter over it.
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    assert base.get_input_embeddings().num_embeddings == len(tokenizer)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged.path / "model").eval()
    ids = tokenizer("i lost my job <|comforting|> i am so sorry", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4)

    # Scored end to end like the merged run: the same greedy replies and reference likelihoods.
    evals = [pipeline.Pipeline().ensure("eval", make_cfg("eval", *TINY, *SCORED, f"generator.lora.save={save}"))
             for save in ("adapter", "merged")]
    assert [g["response"] for g in read_generations(evals[0].run.path)] == \
        [g["response"] for g in read_generations(evals[1].run.path)]
    likelihoods = [read_likelihoods(pipeline.run("likelihood", make_cfg("likelihood", *TINY, "test_subset=24",
                                                                      f"generator.lora.save={save}")).run.path)
                   for save in ("adapter", "merged")]
    assert [nll for line in likelihoods[0] for nll in line["nll"]] == \
        pytest.approx([nll for line in likelihoods[1] for nll in line["nll"]], abs=1e-3)
    assert isinstance(generator.load(adapter.path).respond([{"speaker": "seeker", "text": "hi"}], tag="Action",
                                                           max_new_tokens=6), str)


def test_adapter_whose_base_is_gone_is_a_one_line_error(make_cfg, prepared, tmp_path):
    run = pipeline.run("train_generator", make_cfg("train_generator", *TINY)).run
    copy = tmp_path / "exported"
    assert main(["export", str(run.path), "--to", str(copy)]) == 0
    (copy / "base_model.json").unlink()
    with pytest.raises(MhsError, match="base_model.json: unreadable .* rebuild the run"):
        generator.load(copy)


@pytest.mark.parametrize("overrides, message", [
    (["generator.trainable=adapters"], "generator.trainable='adapters': expected one of all, top_layers, lora"),
    (["generator.lora.target_modules=[q_proj]"], "generator.lora: "),
    (["generator.lora.save=both"], "generator.lora.save='both': expected one of adapter, merged"),
    (["generator.lora.target_modules=all"], "generator.lora.target_modules='all': expected all-linear or a "),
])
def test_bad_lora_options_are_clear_errors(prepared, overrides, message, capsys):
    raw, artifacts = prepared
    code = main(["train", "dialogpt", "--profile", "tiny", f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts}",
                 "generator.train_subset=16", "generator.trainable=lora", *overrides])
    assert code == 2 and message in capsys.readouterr().err
