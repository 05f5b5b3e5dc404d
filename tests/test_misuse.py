"""A careless user, an interrupt, a full disk and a read-only folder, through the `mhs` command:
one line on stderr naming what is wrong, a non-zero exit, nothing partial left behind."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhsupport import pipeline
from mhsupport.cli import main
from mhsupport.settings.config import prepare_data_config
from mhsupport.training.loop import last_complete_checkpoint

TINY_EVAL = ["--profile", "tiny", "test_subset=8", "decoding.max_new_tokens=4", "bootstrap.resamples=20",
             "generator.train_subset=48", "generator.valid_subset=8"]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("command, override, message", [
    (["train", "dialogpt"], "generator.epochs=abc", "generator.epochs='abc': expected an integer >= 1"),
    (["train", "dialogpt"], "generator.epochs=0", "generator.epochs=0: expected an integer >= 1"),
    (["train", "dialogpt"], "generator.batch_size=-4", "generator.batch_size=-4: expected an integer >= 1"),
    (["train", "dialogpt"], "generator.train_subset=0", "generator.train_subset=0: expected null or an integer >= 1"),
    (["train", "dialogpt"], "generator.learning_rate=0", "generator.learning_rate=0: expected a finite number > 0"),
    (["train", "classifier"], "classifier.epochs=1.5", "classifier.epochs=1.5: expected an integer >= 1"),
    (["eval"], "decoding.batch_size=0", "decoding.batch_size=0: expected an integer >= 1"),
    (["eval"], "test_subset=0", "test_subset=0: expected null or an integer >= 1"),
    (["eval"], "bootstrap.resamples=0", "bootstrap.resamples=0: expected an integer >= 1"),
    (["eval"], "decoding.max_new_tokens=0", "decoding.max_new_tokens=0: expected an integer >= 1"),
    (["eval"], "decoding.seeds=[]", "decoding.seeds=[]: expected a non-empty list of distinct integers"),
    (["eval"], "decoding.seeds=[0,0]", "decoding.seeds=[0, 0]: expected a non-empty list of distinct integers"),
    (["eval"], "sampler=oracle", "sampler='oracle' needs a tagged generator"),
    (["report"], "table4_samplers=[none,sometimes]", "table4_samplers=['none', 'sometimes']: expected a non-empty list"),
    (["chat"], "max_new_tokens=0", "max_new_tokens=0: expected an integer >= 1"),
    (["train", "dialogpt"], "runtime.logging_steps=-5", "runtime.logging_steps=-5: expected an integer >= 1"),
    (["train", "classifier"], "runtime.dataloader_workers=-1", "runtime.dataloader_workers=-1: expected an integer >= 0"),
    (["likelihood"], "runtime.batch_size=0", "runtime.batch_size=0: expected an integer >= 1"),
    (["train", "dialogpt"], "data.esconv_split_fractions.valid=0.4", "train 0.7 + valid 0.4 must be < 1"),
    (["train", "dialogpt"], "data.epitome_bucket_bounds.valid=70", "expected 0 < train < valid < 100"),
    (["train", "dialogpt"], "generator.architecture.n_head=5", "must be a multiple of generator.architecture.n_head=5"),
    (["generate"], "decoding.max_new_tokens=0", "decoding.max_new_tokens=0: expected an integer >= 1"),
])
def test_bad_config_values_are_one_line_and_write_nothing(command, override, message, prepared, tmp_path, capsys):
    raw, _ = prepared
    artifacts = tmp_path / "artifacts"
    code = main([*command, "--profile", "tiny", f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts}", override])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert files_under(artifacts) == []


def test_every_numeric_config_key_has_its_range_checked():
    """Each number a stage reads has a rule (type and range) in settings/options.py, checked before any
    work: a key without one would pass a negative or zero value on to a run."""
    from omegaconf import OmegaConf

    from mhsupport.settings.config import load_config
    from mhsupport.settings.options import RULES, profiles

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    unchecked = set()
    for stage in [*pipeline.STAGES, "chat", "models", "clean"]:
        for profile in profiles():
            profiled = stage not in ("prepare_data", "models", "clean")  # the stages with profiles
            cfg = OmegaConf.to_container(load_config(stage, [f"profile={profile}"] if profiled else []), resolve=True)
            unchecked |= {key for key, value in leaves(cfg)
                          if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in RULES}
    assert not unchecked, f"numeric config keys without a range rule: {sorted(unchecked)}"


def test_sigint_during_training_is_one_line_and_the_same_command_resumes(mhs_env, tmp_path):
    env = mhs_env(MHS_ARTIFACTS_DIR=str(tmp_path / "artifacts"))
    mhs = [sys.executable, "-m", "mhsupport.cli"]
    assert subprocess.run([*mhs, "prepare-data"], env=env, capture_output=True).returncode == 0
    train = [*mhs, "train", "dialogpt", "--profile", "tiny", "generator.train_subset=400", "generator.valid_subset=8",
             "generator.batch_size=8", "generator.save_steps=5"]
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps it so:
    # give the command the terminal's default, as a user's Ctrl-C would find it.
    process = subprocess.Popen(train, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stage_dir = tmp_path / "artifacts" / "train_generator"
    deadline = time.time() + 300
    # interrupted once a checkpoint is whole (one still being written is skipped on resume, by design)
    while time.time() < deadline and not any(last_complete_checkpoint(folder)
                                             for folder in stage_dir.glob(".*.partial/checkpoints")):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "mhs train dialogpt: interrupted; the same command resumes"
    assert "Traceback" not in err
    again = subprocess.run(train, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 2 MiB tmpfs: full disks and read-only folders, as a test can make them."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def copy_prepared_data(make_cfg, artifacts: Path) -> None:
    """The session's prepare-data run, copied into another artifacts folder."""
    data_run = pipeline.Pipeline().plan("prepare_data", prepare_data_config(make_cfg("eval")))
    shutil.copytree(data_run.path, artifacts / "prepare_data" / data_run.run_id)


def test_a_full_disk_is_one_line_and_keeps_nothing_partial(make_cfg, small_filesystem, capsys):
    copy_prepared_data(make_cfg, small_filesystem)
    fill(small_filesystem)
    before = files_under(small_filesystem)
    code = main(["train", "dialogpt", *TINY_EVAL[:2], *TINY_EVAL[-2:], "runtime.report_to=none", f"paths.artifacts_dir={small_filesystem}",
                 f"paths.raw_dir={make_cfg('eval').paths.raw_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("mhs train dialogpt: error: no space left on the device"), err[-3:]
    assert "free space and rerun the same command" in err[-1]
    assert not [f for f in files_under(small_filesystem) if f not in before and "tmp-" in f]


def test_an_eval_whose_write_fails_keeps_its_generations(make_cfg, small_filesystem, tmp_path, capsys):
    shared = Path(make_cfg("eval").paths.artifacts_dir)
    pipeline.Pipeline().ensure("train_generator", _generator_cfg(make_cfg))
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for stage in ("prepare_data", "train_generator"):
        (artifacts / stage).symlink_to(shared / stage)
    (artifacts / "eval").symlink_to(small_filesystem)  # eval runs land on a full disk
    fill(small_filesystem)
    code = main(["eval", *TINY_EVAL, f"paths.artifacts_dir={artifacts}", f"paths.raw_dir={make_cfg('eval').paths.raw_dir}",
                 "runtime.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "generations are kept in" in err and "rerun `mhs eval --profile tiny" in err, err
    kept = Path(err.split("generations are kept in ")[1].split(". ")[0])
    lines = [json.loads(line) for line in kept.read_text().splitlines()]
    assert len(lines) == 8 and all("response" in line for line in lines)
    kept.unlink()


def _generator_cfg(make_cfg):
    from mhsupport.settings.config import generator_config
    return generator_config(make_cfg("eval", *[a for a in TINY_EVAL if "=" in a], "generator=tiny", "classifier=tiny"))


def test_a_read_only_artifacts_folder_is_one_line(make_cfg, small_filesystem, capsys):
    copy_prepared_data(make_cfg, small_filesystem)
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    code = main(["train", "dialogpt", "--profile", "tiny", f"paths.artifacts_dir={small_filesystem}",
                 f"paths.raw_dir={make_cfg('eval').paths.raw_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "Read-only file system" in err[-1] and "MHS_ARTIFACTS_DIR" in err[-1], err[-3:]
