"""Run directories: content-addressed, atomic, and the config shipped inside the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from mhsupport.runs import artifacts
from mhsupport.settings.config import load_config


@pytest.fixture
def cfg(tmp_path):
    return load_config("prepare_data", [f"paths.artifacts_dir={tmp_path / 'art'}"])


def test_run_id_ignores_paths_and_force_but_not_results(cfg, tmp_path):
    data = tmp_path / "input.txt"
    data.write_text("abc")
    base = artifacts.plan_run("stage", cfg, {"data": data})
    moved = load_config("prepare_data", [f"paths.artifacts_dir={tmp_path / 'art'}", "paths.raw_dir=/elsewhere", "force=true"])
    assert artifacts.plan_run("stage", moved, {"data": data}).run_id == base.run_id
    changed = load_config("prepare_data", [f"paths.artifacts_dir={tmp_path / 'art'}", "data.max_context_turns=3"])
    assert artifacts.plan_run("stage", changed, {"data": data}).run_id != base.run_id
    data.write_text("abd")
    assert artifacts.plan_run("stage", cfg, {"data": data}).run_id != base.run_id
    assert artifacts.plan_run("other", cfg, {"data": data}).run_id != artifacts.plan_run("stage", cfg, {"data": data}).run_id


def test_run_id_names_model_folders_relative_to_the_model_cache(tmp_path):
    """The same config under another HOME or MHS_MODELS_DIR makes the same run; another model does not."""
    def planned(*overrides):
        eval_cfg = load_config("eval", [f"paths.artifacts_dir={tmp_path}", "screen_replies=true", *overrides])
        return artifacts.plan_run("stage", eval_cfg, {}).run_id

    base = planned("paths.models_dir=/home/ann/.cache/mhsupport/models")
    assert planned("paths.models_dir=/scratch/bob/models/") == base
    assert planned("paths.models_dir='~/models'") == planned("paths.models_dir=/elsewhere")
    assert planned("paths.models_dir=/a", "safety.encoder=/a/another-encoder") != base
    assert planned("paths.models_dir=/a", "safety.encoder=/b/all-mpnet-base-v2/all-mpnet-base-v2") != base
    recorded = artifacts.result_config(load_config("eval", ["paths.models_dir=/home/ann/models", "screen_replies=true"]))
    assert recorded["safety"]["encoder"] == "<paths.models_dir>/all-mpnet-base-v2/all-mpnet-base-v2"


def test_only_a_whole_folder_counts_and_the_deepest_folder_wins():
    paths = {"artifacts_dir": "/s", "models_dir": "/s/models", "raw_dir": "data/raw", "searchpath": []}
    relative = artifacts.relative_to_paths
    assert relative("/s/models/enc", paths) == "<paths.models_dir>/enc"  # not <paths.artifacts_dir>/models/enc
    assert relative("/s/eval/abc", paths) == "<paths.artifacts_dir>/eval/abc"
    assert relative("/sx/models/enc", paths) == "/sx/models/enc"  # /s is not a prefix of /sx
    assert relative("/s", paths) == "<paths.artifacts_dir>"
    assert relative(os.path.abspath("data/raw/esconv"), paths) == "<paths.raw_dir>/esconv"  # a relative folder, resolved
    home = {"models_dir": os.path.expanduser("~/m")}
    assert relative("~/m/enc", home) == relative(os.path.expanduser("~/m/enc"), home) == "<paths.models_dir>/enc"
    assert relative({"a": ["/s/models/x", 3, None]}, paths) == {"a": ["<paths.models_dir>/x", 3, None]}


def test_a_crash_leaves_no_run_and_no_temporary_directory(cfg, tmp_path):
    run = artifacts.plan_run("stage", cfg, {})
    with pytest.raises(RuntimeError):
        with run.build() as out:
            (out / "half.txt").write_text("partial")
            raise RuntimeError("killed")
    assert not run.complete and not any(run.path.parent.iterdir())


def test_a_finished_run_has_config_manifest_and_metrics(cfg):
    run = artifacts.plan_run("stage", cfg, {})
    run.metrics = {"score": 1.5}
    with run.build(seed=11) as out:
        (out / "result.txt").write_text("done")
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert run.complete and manifest["seed"] == 11 and manifest["run_id"] == run.run_id
    assert manifest["outputs"]["result.txt"] == artifacts.file_sha256(run.path / "result.txt")
    assert "torch" in manifest["packages"] and manifest["wall_time_s"] >= 0
    assert run.read_metrics() == {"score": 1.5}
    assert "max_context_turns" in (run.path / "config.yaml").read_text()


def test_wall_time_counts_the_work_done_before_the_outputs_are_written(cfg):
    # eval and likelihood compute everything, then open the build to write: that work is the run's time
    run = artifacts.plan_run("stage", cfg, {})
    time.sleep(0.3)
    with run.build() as out:
        (out / "result.txt").write_text("done")
    assert json.loads((run.path / "manifest.json").read_text())["wall_time_s"] >= 0.3


def test_the_wheel_ships_the_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(artifacts.Path(__file__).resolve().parents[1])], check=True)
    (wheel,) = tmp_path.glob("mhsupport-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mhsupport/configs/prepare_data.yaml" in names
    assert "mhsupport/configs/taxonomy/paper.yaml" in names


def test_installed_command_works_outside_the_checkout(tmp_path):
    mhs = artifacts.Path(sys.executable).parent / "mhs"
    done = subprocess.run([str(mhs), "prepare-data", "--print-config"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "esconv_split_seed: 42" in done.stdout
    helped = subprocess.run([str(mhs), "prepare-data", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert "--raw-dir" in helped.stdout
