"""`-m` sweeps through Hydra's sweeper and launchers, overrides anywhere on the line, config folders
on hydra.searchpath, and hydra.* overrides that would be ignored refused."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mhsupport.cli import main

BIN = Path(sys.executable).parent
TINY = ["--profile", "tiny", "generator.train_subset=32", "generator.valid_subset=8", "generator.batch_size=16"]
# 2x2: the words format with a tag learning-rate scale is refused, so exactly one job fails
GRID = ["--strategy-tag", "generator.tag_format=token,words", "generator.tag_lr_scale=1,2"]
REFUSED = "generator.tag_lr_scale acts on tag tokens"


def own_artifacts(prepared, tmp_path: Path) -> Path:
    """An artifacts folder holding a copy of the session's prepare-data run (and nothing built on it)."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(prepared[1] / "prepare_data", artifacts / "prepare_data")
    return artifacts


def rows(stdout: str) -> list[dict]:
    """The sweep table's rows: overrides, run, status, metrics."""
    out = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            out.append(dict(zip(("job", "overrides", "run", "status", "metrics"), cells)))
    return out


def sweep(env, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mhs"), "train", "dialogpt", "-m", *TINY, *GRID, *extra], env=env,
                          capture_output=True, text=True, timeout=1800)


def check_grid(done: subprocess.CompletedProcess, status: str) -> list[dict]:
    assert done.returncode == 1, done.stderr[-3000:]  # one job failed
    table = rows(done.stdout)
    assert [r["overrides"] for r in table] == [
        f"generator.tag_format={fmt} generator.tag_lr_scale={scale}" for fmt in ("token", "words") for scale in (1, 2)]
    for row in table[:3]:
        assert row["status"] == status and (Path(row["run"]) / "manifest.json").is_file()
        assert re.fullmatch(r"valid loss \d+\.\d{4}, valid ppl \d+\.\d\d", row["metrics"])
    assert table[3]["status"].startswith(f"failed: {REFUSED}") and not table[3]["run"]
    assert len({row["run"] for row in table[:3]}) == 3
    return table


@pytest.mark.slow
def test_a_sweep_with_the_basic_launcher_builds_each_job_once(mhs_env, prepared, tmp_path):
    env = mhs_env(MHS_ARTIFACTS_DIR=str(own_artifacts(prepared, tmp_path)), OMP_NUM_THREADS="1")
    first = check_grid(sweep(env), "built")
    again = check_grid(sweep(env), "up to date")
    assert [r["run"] for r in again] == [r["run"] for r in first]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in first]


@pytest.mark.slow
def test_a_sweep_with_submitit_local_runs_each_job_in_its_own_process(mhs_env, prepared, tmp_path):
    artifacts = own_artifacts(prepared, tmp_path)
    env = mhs_env(MHS_ARTIFACTS_DIR=str(artifacts), OMP_NUM_THREADS="1")
    table = check_grid(sweep(env, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20"), "built")
    logs = list((artifacts / "multirun").glob("*/.submitit/*/*_log.out"))
    assert len(logs) == 4  # submitit's own log of each job's process
    assert all(Path(row["run"]).parent == artifacts / "train_generator" for row in table[:3])


def test_overrides_go_anywhere_on_the_line(capsys):
    assert main(["train", "dialogpt", "generator.epochs=2", "--strategy-tag", "seed=3", "--profile", "tiny",
                 "generator.batch_size=4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "seed: 3" in printed and "strategy_tag: true" in printed
    assert "epochs: 2" in printed and "batch_size: 4" in printed and "profile: tiny" in printed


@pytest.mark.parametrize("override, says", [
    ("hydra.run.dir=out", "set paths.artifacts_dir=DIR (or MHS_ARTIFACTS_DIR)"),
    ("hydra/launcher=joblib", "add -m"),
    ("hydra.job.chdir=true", "add -m"),
])
def test_hydra_settings_that_would_be_ignored_are_refused_in_one_line(capsys, override, says):
    assert main(["train", "dialogpt", override]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"mhs train dialogpt: error: {override}: ") and says in error


def test_hydra_run_dir_is_refused_in_a_sweep_too(capsys):
    assert main(["likelihood", "-m", "seed=1,2", "hydra.run.dir=out"]) == 2
    assert "error: hydra.run.dir=out: every run is written to its own content-addressed folder" in capsys.readouterr().err


def test_help_lists_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "-m, --multirun" in text and "--print-config prints every key with its value" in text
    for key in ("generator.*", "decoding.*", "sampler", "seed", "test_subset"):
        assert re.search(rf"\b{re.escape(key)}(,|\s)", text), key


def user_configs(folder: Path) -> Path:
    """A profile of the user's own, outside the package: the tiny models with a smaller learning rate."""
    files = {
        "profile/mine.yaml": "# @package _global_\n",
        "generator/mine.yaml": "defaults:\n  - tiny\n  - _self_\nprofile: mine\nlearning_rate: 5.0e-4\n",
        "classifier/mine.yaml": "defaults:\n  - tiny\n  - _self_\nprofile: mine\n",
        "profile/eval/mine.yaml": "# @package _global_\ntest_subset: 8\ndecoding:\n  batch_size: 4\n",
        "profile/likelihood/mine.yaml": "# @package _global_\ntest_subset: 8\nruntime:\n  batch_size: 4\n",
        "profile/llm/mine.yaml": "# @package _global_\nllm:\n  test_subset: 8\n",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_a_profile_on_the_search_path_works_end_to_end(prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MHS_RAW_DIR", str(prepared[0]))
    monkeypatch.setenv("MHS_ARTIFACTS_DIR", str(prepared[1]))
    searchpath = f"hydra.searchpath=[file://{user_configs(tmp_path / 'my_configs')}]"
    assert main(["eval", "--profile", "mine", searchpath, "--sampler", "random", "--strategy-tag"]) == 2
    error = capsys.readouterr().err
    hints = [line.strip() for line in error.splitlines()[1:] if line.strip().startswith("mhs ")]
    assert any(h.startswith("mhs train dialogpt --profile mine") for h in hints), error
    for hint in hints:  # every hinted command composes: the search path travels with it
        assert "hydra.searchpath=" in hint
        assert main([*shlex.split(hint)[1:], "--print-config"]) == 0, hint
        assert "profile: mine" in capsys.readouterr().out


def test_an_unknown_profile_is_one_line_naming_the_profiles(capsys):
    assert main(["train", "dialogpt", "--profile", "nope", "--print-config"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "Could not find 'profile/nope' (options: cpu, offline, paper, tiny)" in error
    assert "hydra.searchpath=[file:///abs/folder]" in error
