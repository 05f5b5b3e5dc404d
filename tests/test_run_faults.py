"""No window in which a kill loses finished work: a real SIGKILL at each rename of a run
directory, after training and before the manifest, and damaged checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mhsupport.training.loop import checkpoint_problem

TRAIN = ["train", "dialogpt", "--profile", "tiny", "generator.train_subset=64", "generator.valid_subset=8",
         "generator.batch_size=8", "generator.save_steps=4", "runtime.logging_steps=4"]

# Runs `mhs` in this process with a kill switch at one point of the run's life: the process
# sends itself SIGKILL there, as a power cut or the OOM killer would.
KILL_SWITCH = """
import os, pathlib, signal, sys
from mhsupport.runs import artifacts
point = os.environ["KILL_AT"]
real_rename = pathlib.Path.rename

def rename(self, target):
    target = pathlib.Path(target)
    if point == "between_force_renames" and ".old-" in target.name:
        real_rename(self, target)
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "before_into_place" and self.name.endswith((".partial", ".tmp-" + str(os.getpid()))):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(self, target)

pathlib.Path.rename = rename
if point == "before_manifest":
    artifacts.Run._finish = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from mhsupport.cli import main
sys.exit(main(sys.argv[1:]))
"""


def mhs(args, env, kill_at=None):
    command = [sys.executable, "-c", KILL_SWITCH] if kill_at else [sys.executable, "-m", "mhsupport.cli"]
    return subprocess.run(command + list(args), env=dict(env, KILL_AT=kill_at or ""), capture_output=True, text=True)


@pytest.fixture
def env(mhs_env, tmp_path):
    environment = mhs_env(MHS_ARTIFACTS_DIR=str(tmp_path / "artifacts"))
    assert mhs(["prepare-data"], environment).returncode == 0
    return environment


def only_run(env, stage="train_generator") -> Path:
    (run,) = [p for p in (Path(env["MHS_ARTIFACTS_DIR"]) / stage).iterdir() if not p.name.startswith(".")]
    return run


def hidden(env, stage="train_generator") -> list[str]:
    return sorted(p.name.split(".", 2)[-1] for p in (Path(env["MHS_ARTIFACTS_DIR"]) / stage).iterdir()
                  if p.name.startswith("."))


def test_kill_between_the_renames_of_a_force_rebuild_keeps_the_previous_run(env):
    prepared_run = only_run(env, "prepare_data")
    before = json.loads((prepared_run / "manifest.json").read_text())
    killed = mhs(["prepare-data", "--force"], env, kill_at="between_force_renames")
    assert killed.returncode == -signal.SIGKILL
    assert not prepared_run.exists()  # the kill came with the old run moved aside

    again = mhs(["prepare-data"], env)
    assert again.returncode == 0, again.stderr
    assert "restoring the previous run" in again.stderr and "up to date" in again.stderr
    assert json.loads((prepared_run / "manifest.json").read_text())["finished_at"] == before["finished_at"]


def test_kill_between_the_renames_of_a_forced_training_puts_the_finished_one_in_place(env):
    assert mhs(TRAIN, env).returncode == 0
    run = only_run(env)
    before = json.loads((run / "manifest.json").read_text())
    killed = mhs([*TRAIN, "--force"], env, kill_at="between_force_renames")
    assert killed.returncode == -signal.SIGKILL and not run.exists()

    again = mhs(TRAIN, env)
    assert again.returncode == 0, again.stderr
    assert "putting it in place" in again.stderr and "up to date" in again.stderr
    assert json.loads((run / "manifest.json").read_text())["finished_at"] != before["finished_at"]
    assert hidden(env) == []  # neither the replaced run nor the checkpoints are left


def test_kill_before_the_run_is_put_in_place_loses_no_training(env):
    killed = mhs(TRAIN, env, kill_at="before_into_place")
    assert killed.returncode == -signal.SIGKILL and hidden(env) == ["partial"]
    again = mhs(TRAIN, env)
    assert again.returncode == 0, again.stderr
    assert "putting it in place" in again.stderr
    run = only_run(env)
    assert not (run / "checkpoints").exists() and hidden(env) == []
    assert json.loads((run / "metrics.json").read_text())["session"]["resumed_from"] is None


def test_kill_after_training_before_the_manifest_resumes_from_the_last_checkpoint(env, tmp_path):
    reference_env = dict(env, MHS_ARTIFACTS_DIR=str(tmp_path / "reference"))
    assert mhs(["prepare-data"], reference_env).returncode == 0
    assert mhs(TRAIN, reference_env).returncode == 0
    reference = json.loads((only_run(reference_env) / "metrics.json").read_text())

    assert mhs(TRAIN, env, kill_at="before_manifest").returncode == -signal.SIGKILL
    again = mhs(TRAIN, env)
    assert again.returncode == 0, again.stderr
    metrics = json.loads((only_run(env) / "metrics.json").read_text())
    assert metrics["session"]["resumed_from"].endswith("checkpoint-8")  # the final step: nothing retrained
    assert metrics["valid_loss"] == pytest.approx(reference["valid_loss"], abs=1e-6)


def test_force_after_an_interrupted_run_starts_fresh(env):
    assert mhs(TRAIN, env, kill_at="before_manifest").returncode == -signal.SIGKILL
    forced = mhs([*TRAIN, "--force"], env)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((only_run(env) / "metrics.json").read_text())["session"]["resumed_from"] is None


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(env):
    assert mhs(TRAIN, env, kill_at="before_manifest").returncode == -signal.SIGKILL
    (partial,) = [p for p in (Path(env["MHS_ARTIFACTS_DIR"]) / "train_generator").glob(".*.partial")]
    (partial / "checkpoints" / "checkpoint-8" / "trainer_state.json").write_text("")
    again = mhs(TRAIN, env)
    assert again.returncode == 0, again.stderr
    assert "skipping" in again.stderr and "checkpoint-8" in again.stderr and "trainer_state.json" in again.stderr
    assert json.loads((only_run(env) / "metrics.json").read_text())["session"]["resumed_from"].endswith("checkpoint-4")


def test_truncated_checkpoint_weights_are_skipped(tmp_path):
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({"x": torch.zeros(4)}, checkpoint / name)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    save_file({"w": torch.zeros(64)}, str(checkpoint / "model.safetensors"))
    assert checkpoint_problem(checkpoint) is None
    data = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert "optimizer.pt" in checkpoint_problem(checkpoint)
    torch.save({"x": torch.zeros(4)}, checkpoint / "optimizer.pt")
    weights = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(weights[:20])
    assert "model.safetensors" in checkpoint_problem(checkpoint)
