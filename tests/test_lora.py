"""generator.trainable=lora: adapters and the tag rows train, the rest stays frozen, and the
saved run is a plain model with the adapters merged in."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mhsupport import pipeline
from mhsupport import generator
from mhsupport.cli import main

TINY = ["generator=tiny", "generator.train_subset=64", "generator.valid_subset=16", "generator.batch_size=8",
        "generator.trainable=lora", "strategy_tag=true"]


def test_lora_run_is_a_plain_model_whose_tag_rows_trained(make_cfg, prepared):
    result = pipeline.run("train_generator", make_cfg("train_generator", *TINY))
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


@pytest.mark.parametrize("overrides, message", [
    (["generator.trainable=adapters"], "generator.trainable='adapters': expected one of all, top_layers, lora"),
    (["generator.lora.target_modules=[q_proj]"], "generator.lora: "),
])
def test_bad_lora_options_are_clear_errors(prepared, overrides, message, capsys):
    raw, artifacts = prepared
    code = main(["train", "dialogpt", "--profile", "tiny", f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts}",
                 "generator.train_subset=16", "generator.trainable=lora", *overrides])
    assert code == 2 and message in capsys.readouterr().err
