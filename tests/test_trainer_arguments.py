"""The `trainer` node: any TrainingArguments argument reaches the Trainer of both training stages,
the ones that change results join the run id, bad keys are one-line errors, and with W&B the run is
named, configured and continued on resume."""

from __future__ import annotations

import json

import pytest

from mhsupport import pipeline
from mhsupport.runs import artifacts
from mhsupport.cli import main
from mhsupport.settings.config import prepare_data_config

TINY = ["generator=tiny", "generator.train_subset=64", "generator.valid_subset=16", "generator.batch_size=8"]


def run_id(make_cfg, stage: str, *overrides: str) -> str:
    return pipeline.Pipeline().plan(stage, make_cfg(stage, *overrides)).run_id


def test_max_steps_joins_the_run_id_and_logging_steps_does_not(make_cfg, prepared, capsys):
    default = run_id(make_cfg, "train_generator", *TINY)
    short = run_id(make_cfg, "train_generator", *TINY, "trainer.max_steps=3")
    assert short != default
    assert run_id(make_cfg, "train_generator", *TINY, "trainer.max_steps=3", "trainer.logging_steps=1") == short
    assert run_id(make_cfg, "train_generator", *TINY, "trainer.logging_steps=1", "trainer.save_total_limit=1") == default
    assert run_id(make_cfg, "train_classifier", "classifier=tiny", "trainer.optim=adafactor") != \
        run_id(make_cfg, "train_classifier", "classifier=tiny")

    raw, artifacts_dir = prepared
    code = main(["train", "dialogpt", f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts_dir}", *TINY,
                 "trainer.max_steps=3", "trainer.logging_steps=1"])
    assert code == 0, capsys.readouterr().err
    run_dir = artifacts_dir / "train_generator" / short
    history = json.loads((run_dir / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3]  # both arguments reached the Trainer
    # The command that makes the run, as hints print it, names the argument as users type it.
    command = pipeline.command("train_generator", make_cfg("train_generator", *TINY, "trainer.max_steps=3"))
    assert " trainer.max_steps=3" in command and "+trainer" not in command


@pytest.mark.parametrize("stage, override, message", [
    ("dialogpt", "trainer.max_stpes=3", "trainer.max_stpes: not an argument of TrainingArguments in transformers "),
    ("dialogpt", "trainer.max_stpes=3", "nearest valid keys: trainer.max_steps"),
    ("dialogpt", "trainer.num_train_epochs=2", "trainer.num_train_epochs is set by the model profile: use "
                                               "generator.epochs=... instead of trainer.num_train_epochs"),
    ("classifier", "trainer.learning_rate=0.1", "use classifier.learning_rate=... instead of trainer.learning_rate"),
    ("dialogpt", "trainer.seed=3", "trainer.seed is set by seed: use seed=... instead of trainer.seed"),
    ("dialogpt", "trainer.output_dir=/tmp/x", "trainer.output_dir cannot be set: checkpoints go to the run's own"),
    ("dialogpt", "trainer.lr_scheduler_type=sideways", "TrainingArguments refused the arguments "
                                                       "(trainer.lr_scheduler_type='sideways'): "),
    ("dialogpt", "trainer.report_to=nowhere", "trainer.report_to='nowhere': unknown logger 'nowhere'"),
])
def test_bad_trainer_arguments_are_one_line_errors_that_write_nothing(prepared, stage, override, message, capsys):
    raw, artifacts_dir = prepared
    before = sorted(p.name for p in artifacts_dir.rglob("*"))
    profile = "generator" if stage == "dialogpt" else "classifier"
    code = main(["train", stage, f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts_dir}", f"{profile}=tiny",
                 override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in artifacts_dir.rglob("*") if not p.name.endswith(".lock")) == \
        [name for name in before if not name.endswith(".lock")]  # no run and no partial folder


@pytest.mark.parametrize("command", [["eval"], ["likelihood"], ["report"], ["reproduce"]])
def test_stages_without_a_trainer_refuse_trainer_arguments_instead_of_ignoring_them(prepared, command, capsys):
    raw, artifacts_dir = prepared
    code = main([*command, "--profile", "tiny", f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts_dir}",
                 "trainer.max_steps=3"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "trainer.max_steps=3: the " in err and "config has no trainer node" in err


def test_wandb_run_is_named_configured_and_continued_on_resume(make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = make_cfg("train_generator", *TINY, "generator.save_steps=4", "runtime.report_to=wandb",
                   artifacts=tmp_path / "artifacts")
    pipeline.run("prepare_data", prepare_data_config(cfg))

    def killed_before_the_manifest(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # training ends, with its checkpoints, and the run is not put in place
        patch.setattr(artifacts.Run, "_finish", killed_before_the_manifest)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run("train_generator", cfg)
    result = pipeline.run("train_generator", cfg)
    session = result.metrics["session"]
    assert session["resumed_from"].endswith("checkpoint-8")
    wandb_id = session["wandb_run_id"]
    assert wandb_id.startswith(result.run.run_id + "-")

    sessions = sorted((tmp_path / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(sessions) == 2  # the resumed session continued the first one's W&B run
    for folder in sessions:
        log = (folder / f"run-{wandb_id}.wandb").read_bytes()
        assert f"train dialogpt esconv (seed 42) [train_generator/{result.run.run_id}]".encode() in log  # its name
        assert b"mhsupport" in log  # the project
        assert b"subset_seed" in log and b"tags_in_history" in log  # the research config, beside the Trainer's

    fresh = pipeline.run("train_generator", make_cfg("train_generator", *TINY, "generator.save_steps=4",
                                                     "runtime.report_to=wandb", "force=true",
                                                     artifacts=tmp_path / "artifacts"))
    assert fresh.metrics["session"]["wandb_run_id"] != wandb_id  # a rebuild from scratch is a new W&B run
