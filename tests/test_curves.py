"""Training curves: TensorBoard event files with training and validation scalars, the log
history and the loss-curve figure, and clear errors for unknown or missing loggers."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mhsupport import pipeline
from mhsupport.training import curves
from mhsupport.cli import main
from mhsupport.errors import MhsError

TINY = ["generator=tiny", "generator.train_subset=96", "generator.valid_subset=24", "generator.batch_size=8",
        "generator.epochs=2", "runtime.logging_steps=4"]


def test_tensorboard_event_files_hold_training_and_validation_scalars(make_cfg, prepared):
    result = pipeline.run("train_generator", make_cfg("train_generator", *TINY, "seed=11",
                                              "runtime.report_to=tensorboard"))
    out = result.run.path
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/loss" in scalars and "train/valid_loss" in scalars and "train/valid_ppl" in scalars
    valid = events.Scalars("train/valid_loss")
    # 96 examples in batches of 8: 12 steps per epoch, validated at each epoch end
    assert [e.step for e in valid] == [12, 24]
    assert valid[-1].value == pytest.approx(result.metrics["epochs"][-1]["valid_loss"], rel=1e-5)
    assert len(events.Scalars("train/loss")) == 24 // 4

    history = json.loads((out / "log_history.json").read_text())
    assert [e["step"] for e in history if "valid_loss" in e] == [12, 24]
    assert sum("loss" in e for e in history) == 6
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / "checkpoints").exists()


def test_report_to_none_writes_no_event_files(make_cfg, prepared):
    out = pipeline.run("train_generator", make_cfg("train_generator", *TINY, "seed=12",
                                           "runtime.report_to=none")).run.path
    assert not (out / "tensorboard").exists()
    assert (out / "loss_curve.png").is_file() and (out / "log_history.json").is_file()


def test_report_to_values():
    assert curves.report_to("auto") == ["tensorboard"]  # the tensorboard extra, which dev installs
    assert curves.report_to("none") == [] and curves.report_to("tensorboard") == ["tensorboard"]
    with pytest.raises(MhsError, match="unknown logger 'tensorbored'"):
        curves.report_to("tensorbored")
    with pytest.raises(MhsError, match="is not installed; `pip install neptune`"):
        curves.report_to("tensorboard,neptune")


def test_unknown_logger_is_refused_before_anything_is_written(prepared, capsys, tmp_path):
    raw, _ = prepared
    code = main(["train", "dialogpt", "--profile", "tiny", f"paths.raw_dir={raw}",
                 f"paths.artifacts_dir={tmp_path}", "runtime.report_to=tensorbored"])
    assert code == 2 and "runtime.report_to='tensorbored': unknown logger" in capsys.readouterr().err
    assert not (tmp_path / "train_generator").exists()
