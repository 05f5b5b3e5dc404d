"""`mhs clean`: hidden build folders of processes that no longer exist are removed (or, when one
holds the only complete copy of a run, put back), a live process's are kept, and resumable
training checkpoints are only listed unless --partial asks for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mhsupport.cli import main


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def folder(path: Path, size: int, complete: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "model.bin").write_bytes(b"x" * size)
    if complete:
        (path / "manifest.json").write_text(json.dumps({"stage": path.parent.name}))
    return path


@pytest.fixture
def leftovers(artifacts_dir, dead_pid):
    live = os.getpid()
    return {
        "dead tmp": folder(artifacts_dir / "train_generator" / f".aaaa.tmp-{dead_pid}", 2048),
        "dead old": folder(artifacts_dir / "eval" / f".bbbb.old-{dead_pid}", 900, complete=True),
        "run": folder(artifacts_dir / "eval" / "bbbb", 10, complete=True),
        "live tmp": folder(artifacts_dir / "eval" / f".cccc.tmp-{live}", 100),
        "live old": folder(artifacts_dir / "report" / f".dddd.old-{live}", 100, complete=True),
        "partial": folder(artifacts_dir / "train_generator" / ".eeee.partial", 3 * 1024 * 1024),
        "only copy": folder(artifacts_dir / "eval" / f".ffff.old-{dead_pid}", 500, complete=True),
    }




def test_removes_only_dead_processes_folders_and_says_what(leftovers, artifacts_dir, dead_pid, capsys):
    assert main(["clean", f"paths.artifacts_dir={artifacts_dir}"]) == 0
    out = capsys.readouterr().out.splitlines()
    live = os.getpid()
    assert sorted(out) == sorted([
        f"removed {leftovers['dead old']} (917B): process {dead_pid} is gone",
        f"restored {leftovers['only copy']} (517B) as {artifacts_dir / 'eval' / 'ffff'}: the only complete copy",
        f"kept {leftovers['live tmp']} (100B): process {live} is running",
        f"kept {leftovers['live old']} (119B): process {live} is running",
        f"resumable {leftovers['partial']} (3.00MB): rerun the same command, or delete with --partial",
        f"removed {leftovers['dead tmp']} (2.00kB): process {dead_pid} is gone",
    ])
    assert not leftovers["dead tmp"].exists() and not leftovers["dead old"].exists()
    assert not leftovers["only copy"].exists() and (artifacts_dir / "eval" / "ffff" / "manifest.json").is_file()
    assert all(leftovers[name].exists() for name in ("run", "live tmp", "live old", "partial"))
    assert main(["clean", f"paths.artifacts_dir={artifacts_dir}"]) == 0  # the second time: only what stays
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_dry_run_lists_and_changes_nothing(leftovers, artifacts_dir, dead_pid, capsys):
    before = sorted(artifacts_dir.rglob("*"))
    assert main(["clean", "--dry-run", "--partial", f"paths.artifacts_dir={artifacts_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {leftovers['dead tmp']} (2.00kB): process {dead_pid} is gone" in out
    assert f"would remove {leftovers['partial']} (3.00MB): asked with --partial" in out
    assert f"would restore {leftovers['only copy']} (517B)" in out
    assert sorted(artifacts_dir.rglob("*")) == before


def test_partial_checkpoints_go_only_when_asked(leftovers, artifacts_dir, capsys):
    assert main(["clean", "--partial", f"paths.artifacts_dir={artifacts_dir}"]) == 0
    assert f"removed {leftovers['partial']} (3.00MB): asked with --partial" in capsys.readouterr().out
    assert not leftovers["partial"].exists() and leftovers["live tmp"].exists() and leftovers["run"].exists()


def test_nothing_to_clean_says_so(artifacts_dir, capsys):
    assert main(["clean", f"paths.artifacts_dir={artifacts_dir}"]) == 0
    assert capsys.readouterr().out == f"nothing to clean in {artifacts_dir}\n"
