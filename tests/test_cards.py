"""Hugging Face forms: the prepare-data run as a dataset with a card, model cards for generators
and classifiers, and `mhs export`."""

from __future__ import annotations

import json

import pytest
from datasets import load_dataset
from huggingface_hub import DatasetCard, ModelCard
from transformers import AutoModelForCausalLM

from mhsupport import pipeline
from mhsupport.runs import cards
from mhsupport.cli import main
from mhsupport.settings.config import load_config

GENERATOR = ["generator=tiny", "generator.train_subset=64", "generator.valid_subset=16", "generator.batch_size=8"]


def prepare_run(prepared):
    (run_dir,) = (prepared[1] / "prepare_data").iterdir()
    return run_dir, json.loads((run_dir / "stats.json").read_text())


def test_prepare_data_run_loads_as_a_dataset_per_config(prepared, tmp_path):
    run_dir, stats = prepare_run(prepared)
    sizes = cards.split_sizes(stats)
    unified = load_dataset(str(run_dir), "unified", cache_dir=str(tmp_path))
    esconv = load_dataset(str(run_dir), "esconv", cache_dir=str(tmp_path))
    for name, loaded in (("unified", unified), ("esconv", esconv)):
        assert set(loaded) == {"train", "validation", "test"}
        assert {split: loaded[cards.HF_SPLITS[split]].num_rows for split in sizes[name]} == sizes[name]
    for split in ("train", "valid", "test"):
        epitome = sum(stats["epitome"][split].values())
        assert epitome > 0 or split != "train"
        # ESConv once in unified, not twice: unified = ESConv + EPITOME
        assert unified[cards.HF_SPLITS[split]].num_rows == esconv[cards.HF_SPLITS[split]].num_rows + epitome
    assert set(unified["train"]["source"]) == {"esconv", "epitome"} and set(esconv["train"]["source"]) == {"esconv"}
    assert set(unified["validation"]["split"]) == {"valid"}
    assert unified["train"].features["context"].feature["speaker"].dtype == "string"
    default = load_dataset(str(run_dir), cache_dir=str(tmp_path))  # the default config is unified
    assert default["train"].num_rows == unified["train"].num_rows


def test_dataset_card_metadata_and_dropped_conversations(prepared):
    run_dir, stats = prepare_run(prepared)
    card = DatasetCard.load(run_dir / "README.md")
    assert card.data.license == "other" and "CC BY-NC 4.0" in card.text
    assert [c["config_name"] for c in card.data.configs] == ["unified", "esconv"]
    assert {f["split"]: f["path"] for f in card.data.configs[1]["data_files"]}["validation"] == \
        "examples/esconv/valid.parquet"
    dropped = [{"conversation_id": "c7", "split": "test", "also_in": "train", "situation": "daily stresses"}]
    text = cards.dataset_card(load_config("prepare_data"), dict(stats, dropped_for_leakage=dropped)).content
    assert "`c7` (test; its situation also occurs in train): 'daily stresses'" in text
    assert "- none" in card.text  # the slice has no overlapping situations


def test_generator_card_has_metadata_tags_and_relative_paths_only(make_cfg, prepared):
    result = pipeline.run("train_generator", make_cfg("train_generator", *GENERATOR, "strategy_tag=true",
                                              "dataset=unified"))
    card = ModelCard.load(result.run.path / "model" / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.datasets == ["thu-coai/esconv", "epitome"]
    assert "strategy-tags" in card.data.tags and card.data.base_model is None  # tiny: from scratch
    (perplexity,) = card.data.eval_results
    assert perplexity.metric_value == pytest.approx(result.metrics["valid_ppl"], rel=1e-3)
    assert "`<|comforting|>` (Comforting)" in card.text and "right after the prompt" in card.text
    assert "from mhsupport import generator" in card.text and 'tag="Comforting"' in card.text
    assert str(prepared[1]) not in card.content and "mean nothing" in card.text
    settings = json.loads((result.run.path / "model" / "generator.json").read_text())
    assert settings["labels"] == ["Comforting", "Exploration", "Action", "Others"]


def test_classifier_card_and_export(make_cfg, prepared, tmp_path, capsys):
    result = pipeline.run("train_classifier", make_cfg("train_classifier", "classifier=tiny",
                                               "classifier.train_subset=200"))
    card = ModelCard.load(result.run.path / "model" / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    accuracy = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert accuracy[0].metric_value == pytest.approx(result.metrics["test"]["model"]["accuracy"], abs=1e-4)
    assert "previous_category" in card.text and str(prepared[1]) not in card.content

    assert main(["export", str(result.run.path), "--to", str(tmp_path / "out")]) == 0
    exported = tmp_path / "out"
    assert (exported / "README.md").read_text() == (result.run.path / "model" / "README.md").read_text()
    assert (exported / "classifier.json").is_file() and (exported / "model.safetensors").is_file()
    assert main(["export", str(result.run.path), "--to", str(exported)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--to", str(tmp_path / "other")]) == 2
    assert "not a training run" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_exported_generator_loads_with_from_pretrained(make_cfg, prepared, tmp_path):
    result = pipeline.run("train_generator", make_cfg("train_generator", *GENERATOR))
    assert main(["export", str(result.run.path), "--to", str(tmp_path / "g")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert sum(p.numel() for p in model.parameters()) == result.metrics["parameters"]
