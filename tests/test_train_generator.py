"""mhs train dialogpt with the tiny profile: outputs, determinism, resume, torchrun, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mhsupport.cli import main
from mhsupport import pipeline
from mhsupport.settings.config import prepare_data_config

BIN = Path(sys.executable).parent
TINY = ["generator=tiny", "generator.train_subset=96", "generator.valid_subset=24", "generator.batch_size=8"]


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "session"}


def test_tagged_tiny_run_writes_a_loadable_model_with_tag_tokens(make_cfg, tmp_path):
    cfg = make_cfg("train_generator", *TINY, "strategy_tag=true", "dataset=unified", artifacts=tmp_path / "artifacts")
    pipeline.Pipeline().ensure("prepare_data", prepare_data_config(cfg))
    result = pipeline.run("train_generator", cfg)
    out = result.run.path
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    for tag in ("<|comforting|>", "<|exploration|>", "<|action|>", "<|others|>"):
        assert tag in tokenizer.all_special_tokens
        assert tokenizer.convert_tokens_to_ids(tag) < model.get_input_embeddings().weight.shape[0]
    m = result.metrics
    assert m["train_examples"] == 96 and m["valid_examples"] == 24 and m["dataset"] == "unified"
    assert len(m["epochs"]) == 1 and m["epochs"][0]["valid_ppl"] == pytest.approx(m["valid_ppl"])
    assert 0 <= m["padding_share"] < 0.5 and m["tokens_seen"] > 0 and m["session"]["tokens_per_s"] > 0
    assert 5e5 < m["parameters"] < 2e6
    card = (out / "model" / "README.md").read_text()
    assert "Not a substitute for" in card and "mean nothing" in card and "CC BY-NC 4.0" in card
    assert not (out / "checkpoints").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no partial directory left


def test_untagged_model_has_no_tag_tokens(make_cfg, prepared):
    out = pipeline.run("train_generator", make_cfg("train_generator", *TINY)).run.path
    assert "<|comforting|>" not in AutoTokenizer.from_pretrained(out / "model").get_vocab()


def test_training_learns_something(make_cfg, prepared):
    """Two epochs on the same examples: the training loss must fall well below the untrained model's."""
    m = pipeline.run("train_generator", make_cfg("train_generator", *TINY, "generator.epochs=3",
                                         "generator.train_subset=64")).metrics
    assert m["train_loss"] < 7.0  # an untrained model over a 4,000-token vocabulary sits near ln(4000) = 8.3


def test_same_command_twice_gives_identical_metrics(make_cfg, prepared, tmp_path):
    first = pipeline.run("train_generator", make_cfg("train_generator", *TINY, "seed=5")).metrics
    again = pipeline.run("train_generator", make_cfg("train_generator", *TINY, "seed=5",
                                             "force=true")).metrics
    assert comparable(first) == comparable(again)
    other = pipeline.run("train_generator", make_cfg("train_generator", *TINY, "seed=6")).metrics
    assert other["valid_loss"] != first["valid_loss"]


def test_second_run_is_skipped(make_cfg, prepared, capsys):
    cfg = make_cfg("train_generator", *TINY, "seed=9")
    first = pipeline.run("train_generator", cfg)
    second = pipeline.run("train_generator", cfg)
    assert second.skipped and second.run.path == first.run.path and second.metrics == first.metrics


def test_killed_training_resumes_to_the_same_result(mhs_env, prepared, tmp_path):
    args = [str(BIN / "mhs"), "train", "dialogpt", "--profile", "tiny", "generator.train_subset=160",
            "generator.valid_subset=16", "generator.batch_size=8", "generator.epochs=2", "generator.save_steps=4"]
    for name in ("reference", "killed"):
        subprocess.run([str(BIN / "mhs"), "prepare-data"], env=mhs_env(MHS_ARTIFACTS_DIR=str(tmp_path / name)),
                       check=True, capture_output=True)
    subprocess.run(args, env=mhs_env(MHS_ARTIFACTS_DIR=str(tmp_path / "reference")), check=True,
                   capture_output=True)
    (reference,) = (tmp_path / "reference" / "train_generator").iterdir()

    victim = subprocess.Popen(args, env=mhs_env(MHS_ARTIFACTS_DIR=str(tmp_path / "killed")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = tmp_path / "killed" / "train_generator" / f".{reference.name}.partial" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and any(
            (c / "scheduler.pt").is_file() and int(c.name.split("-")[1]) >= 8 for c in partial.glob("checkpoint-*"))):
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (tmp_path / "killed" / "train_generator" / reference.name).exists()

    done = subprocess.run(args, env=mhs_env(MHS_ARTIFACTS_DIR=str(tmp_path / "killed")),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    resumed = json.loads((tmp_path / "killed" / "train_generator" / reference.name / "metrics.json").read_text())
    uninterrupted = json.loads((reference / "metrics.json").read_text())
    assert resumed["session"]["resumed_from"] is not None
    assert comparable(resumed) == comparable(uninterrupted)
    assert len(resumed["epochs"]) == 2


def test_torchrun_two_processes_on_cpu(mhs_env, prepared, tmp_path):
    env = mhs_env(MHS_ARTIFACTS_DIR=str(tmp_path / "ddp"), OMP_NUM_THREADS="1")
    subprocess.run([str(BIN / "mhs"), "prepare-data"], env=env, check=True, capture_output=True)
    done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python",
                           str(BIN / "mhs"), "train", "dialogpt", "--profile", "tiny", "--strategy-tag",
                           "generator.train_subset=64", "generator.valid_subset=16", "generator.batch_size=8"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "ddp" / "train_generator").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["session"]["processes"] == 2
    # two processes of batch 8 over 64 examples: 4 optimizer steps per epoch, not 8
    assert metrics["epochs"][0]["step"] == 4
    assert manifest["outputs"]["model/model.safetensors"]
    assert done.stdout.count("train dialogpt run (written)") == 1  # only the main process reports


def test_missing_prepare_data_run_names_the_command(prepared, tmp_path, capsys):
    raw, _ = prepared
    code = main(["train", "dialogpt", "--profile", "tiny", f"paths.raw_dir={raw}",
                 f"paths.artifacts_dir={tmp_path / 'empty'}", "data.max_context_turns=4"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"  mhs prepare-data data.max_context_turns=4 paths.raw_dir={raw} paths.artifacts_dir={tmp_path / 'empty'}\n" in err
    assert not (tmp_path / "empty" / "train_generator").exists()


@pytest.mark.parametrize("overrides, message", [
    (["generator=paper", "generator.name_or_path=/no/such/model"], "cannot load model '/no/such/model'"),
    (["generator=offline", "paths.models_dir=/no/such/cache"], "run `mhs models fetch`"),
    (["generator=huge"], "generator"),
    (["dataset=reddit"], "dataset='reddit'"),
    (["dataset=unified", "tag_set=strategy", "strategy_tag=true"], "needs dataset=esconv"),
])
def test_bad_options_are_clear_errors_and_write_nothing(prepared, overrides, message, capsys):
    raw, artifacts = prepared
    code = main(["train", "dialogpt", f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts}", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list((artifacts / "train_generator").glob(".*")) if (artifacts / "train_generator").exists() else True


def test_unknown_profile_flag_is_refused(capsys):
    assert main(["train", "dialogpt", "--profile", "huge"]) == 2
    assert "Could not find 'profile/huge' (options: cpu, offline, paper, tiny)" in capsys.readouterr().err
