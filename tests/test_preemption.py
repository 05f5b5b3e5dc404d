"""A real SIGTERM (what SLURM sends on preemption) during training and during an eval: the command
stops at the next safe point with exit code 75, keeps its work, writes nothing partial as complete,
and the same command resumes to the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhsupport import preemption

BIN = Path(sys.executable).parent
TRAIN = [str(BIN / "mhs"), "train", "dialogpt", "--profile", "tiny", "generator.train_subset=96",
         "generator.valid_subset=16", "generator.batch_size=8", "generator.save_steps=4"]
GENERATOR = ["--profile", "tiny", "generator.train_subset=64", "generator.valid_subset=16"]
EVAL = [str(BIN / "mhs"), "eval", *GENERATOR, "test_subset=24", "decoding.batch_size=2"]


def artifacts_with_data(prepared, folder: Path) -> Path:
    shutil.copytree(prepared[1] / "prepare_data", folder / "prepare_data")
    return folder


def stop_when(args, env, ready, what: str) -> subprocess.CompletedProcess:
    """Start `args`, send SIGTERM once `ready()` holds, and wait for it to stop."""
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == preemption.EXIT_CODE, f"{what} was not stopped by SIGTERM: {stderr[-2000:]}"
    assert "stopped by SIGTERM" in stderr and "the same command resumes" in stderr
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(c.name.split("-")[1]) for c in folder.glob("checkpoint-*") if (c / "scheduler.pt").is_file())


@pytest.mark.slow
def test_sigterm_during_training_saves_a_checkpoint_and_the_same_command_resumes(mhs_env, prepared, tmp_path):
    reference_env = mhs_env(MHS_ARTIFACTS_DIR=str(artifacts_with_data(prepared, tmp_path / "reference")))
    subprocess.run(TRAIN, env=reference_env, check=True, capture_output=True)
    (reference,) = (tmp_path / "reference" / "train_generator").iterdir()

    env = mhs_env(MHS_ARTIFACTS_DIR=str(artifacts_with_data(prepared, tmp_path / "stopped")))
    checkpoints = tmp_path / "stopped" / "train_generator" / f".{reference.name}.partial" / "checkpoints"
    stop_when(TRAIN, env, lambda: 4 in checkpoint_steps(checkpoints), "training")
    assert not (tmp_path / "stopped" / "train_generator" / reference.name).exists()
    assert max(checkpoint_steps(checkpoints)) > 4  # saved where it stopped, not only at save_steps

    done = subprocess.run(TRAIN, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    resumed = json.loads((tmp_path / "stopped" / "train_generator" / reference.name / "metrics.json").read_text())
    uninterrupted = json.loads((reference / "metrics.json").read_text())
    assert resumed["session"]["resumed_from"] is not None
    assert {k: v for k, v in resumed.items() if k != "session"} == \
        {k: v for k, v in uninterrupted.items() if k != "session"}


@pytest.mark.slow
def test_sigterm_during_an_eval_keeps_its_finished_batches_and_resumes_to_the_same_result(mhs_env, prepared,
                                                                                        tmp_path):
    reference_dir = artifacts_with_data(prepared, tmp_path / "reference")
    reference_env = mhs_env(MHS_ARTIFACTS_DIR=str(reference_dir))
    subprocess.run([str(BIN / "mhs"), "train", "dialogpt", *GENERATOR], env=reference_env, check=True,
                   capture_output=True)
    shutil.copytree(reference_dir / "train_generator", tmp_path / "stopped" / "train_generator")
    shutil.copytree(reference_dir / "prepare_data", tmp_path / "stopped" / "prepare_data")
    subprocess.run(EVAL, env=reference_env, check=True, capture_output=True)
    (reference,) = (reference_dir / "eval").iterdir()

    env = mhs_env(MHS_ARTIFACTS_DIR=str(tmp_path / "stopped"))
    batches = tmp_path / "stopped" / "eval" / f".{reference.name}.partial" / "checkpoints" / "batches"
    stop_when(EVAL, env, lambda: len(list(batches.glob("*.json"))) >= 2, "the eval")
    kept = len(list(batches.glob("*.json")))
    assert 2 <= kept < 12 and not (tmp_path / "stopped" / "eval" / reference.name).exists()

    done = subprocess.run(EVAL, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {kept} finished batches" in done.stderr
    resumed = tmp_path / "stopped" / "eval" / reference.name
    assert (resumed / "generations.jsonl").read_text() == (reference / "generations.jsonl").read_text()
    assert (resumed / "metrics.json").read_text() == (reference / "metrics.json").read_text()
    assert not (resumed / "checkpoints").exists()


def test_sigusr1_waits_for_the_safe_point_inside_a_deferred_block_and_stops_at_once_outside(monkeypatch):
    monkeypatch.setitem(preemption._state, "signal", None)  # put back after the test: no stop asked for
    with preemption.handling():
        with pytest.raises(preemption.Preempted, match="stopped by SIGUSR1"):
            with preemption.deferred():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.1)  # the handler has run: only a flag is set, this block goes on
                finished = True
        assert finished and preemption.requested()
        with pytest.raises(preemption.Preempted, match="stopped by SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is not preemption._handle  # the handlers before are back


def test_scoring_resumes_from_the_batches_kept_and_only_from_those_of_its_batch_size(tmp_path):
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mhsupport.modeling.scoring import Scored, sequence_nll
    from mhsupport.runs.artifacts import FinishedBatches

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    rng = np.random.default_rng(0)
    groups = [[Scored([int(t) for t in rng.integers(1, 50, size=int(rng.integers(6, 12)))], 4)] for _ in range(7)]

    def score(batches, batch_size=2):
        sums, counts = sequence_nll(model, groups, batch_size, batches=batches)
        return [s.tolist() for s in sums], [c.tolist() for c in counts]

    uninterrupted = score(None)
    kept = FinishedBatches(tmp_path / "batches")
    assert score(kept) == uninterrupted and kept.count() == 4
    (tmp_path / "batches" / "score-2-4.json").unlink()  # a stop after three of the four batches
    (tmp_path / "batches" / "score-2-6.json").write_text('{"sums": [1e9], "counts": [1]}')  # a batch read back...
    resumed = score(kept)
    assert resumed[0][6] == [1e9]  # ...is used as it was kept, not recomputed
    (tmp_path / "batches" / "score-2-6.json").unlink()
    assert score(kept) == uninterrupted
    assert score(kept, batch_size=3) == score(None, batch_size=3)  # other batches: nothing of size 2 is reused
