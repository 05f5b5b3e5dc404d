"""`mhs clean`: hidden build folders of runs that no process is building (no process holds the
run's lock) are removed (or, when one holds the only complete copy of a run, put back), those of a
run being built are kept, and resumable training checkpoints are only listed unless --partial asks
for them. The pid in a folder's name plays no part: it names a process on one machine only."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mhsupport.runs.artifacts import lock_path, soft_lock_path
from mhsupport.cli import main

# Holds the locks of the runs named on its command line (artifacts dir, then stage/run_id pairs) until
# its stdin closes, as a build in another process does; FLOCK_ERRNO makes flock fail as a file system
# without flock support does.
HOLDER = """
import contextlib, errno, fcntl, os, sys
from pathlib import Path
from mhsupport.runs.artifacts import holding, lock_path
if os.environ.get("FLOCK_ERRNO"):
    def flock(fd, operation):
        raise OSError(int(os.environ["FLOCK_ERRNO"]), os.strerror(int(os.environ["FLOCK_ERRNO"])))
    fcntl.flock = flock
with contextlib.ExitStack() as stack:
    for run in sys.argv[2:]:
        stage, run_id = run.split("/")
        stack.enter_context(holding(lock_path(Path(sys.argv[1]), stage, run_id)))
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def building(artifacts_dir):
    """Start a process that holds the locks of these runs ("stage/run_id"), as a build does."""
    holders = []

    def start(*runs: str, flock_errno: int | None = None) -> subprocess.Popen:
        env = dict(os.environ, FLOCK_ERRNO=str(flock_errno or ""))
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(artifacts_dir), *runs], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        holders.append(holder)
        assert holder.stdout.readline() == "held\n"
        return holder

    yield start
    for holder in holders:
        holder.stdin.close()
        holder.wait(timeout=30)


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
def leftovers(artifacts_dir, dead_pid, building):
    """Folders of killed builds and of builds in progress. Their pids are the wrong way round on purpose
    (a live pid on a stale folder, a dead one on a folder in use), as they are for a build of another machine."""
    live = os.getpid()
    made = {
        "dead tmp": folder(artifacts_dir / "train_generator" / f".aaaa.tmp-{live}", 2048),
        "dead old": folder(artifacts_dir / "eval" / f".bbbb.old-{dead_pid}", 900, complete=True),
        "run": folder(artifacts_dir / "eval" / "bbbb", 10, complete=True),
        "live tmp": folder(artifacts_dir / "eval" / f".cccc.tmp-{dead_pid}", 100),
        "live old": folder(artifacts_dir / "report" / f".dddd.old-{dead_pid}", 100, complete=True),
        "partial": folder(artifacts_dir / "train_generator" / ".eeee.partial", 3 * 1024 * 1024),
        "only copy": folder(artifacts_dir / "eval" / f".ffff.old-{dead_pid}", 500, complete=True),
    }
    building("eval/cccc", "report/dddd")
    return made


def test_removes_only_folders_of_runs_no_process_builds_and_says_what(leftovers, artifacts_dir, capsys):
    assert main(["clean", f"paths.artifacts_dir={artifacts_dir}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(out) == sorted([
        f"removed {leftovers['dead old']} (917B): no process is building its run",
        f"restored {leftovers['only copy']} (517B) as {artifacts_dir / 'eval' / 'ffff'}: the only complete copy",
        f"kept {leftovers['live tmp']} (100B): its run is being built (a process holds "
        f"{lock_path(artifacts_dir, 'eval', 'cccc')})",
        f"kept {leftovers['live old']} (119B): its run is being built (a process holds "
        f"{lock_path(artifacts_dir, 'report', 'dddd')})",
        f"resumable {leftovers['partial']} (3.00MB): rerun the same command, or delete with --partial",
        f"removed {leftovers['dead tmp']} (2.00kB): no process is building its run",
    ])
    assert not leftovers["dead tmp"].exists() and not leftovers["dead old"].exists()
    assert not leftovers["only copy"].exists() and (artifacts_dir / "eval" / "ffff" / "manifest.json").is_file()
    assert all(leftovers[name].exists() for name in ("run", "live tmp", "live old", "partial"))
    assert main(["clean", f"paths.artifacts_dir={artifacts_dir}"]) == 0  # the second time: only what stays
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_dry_run_lists_and_changes_nothing(leftovers, artifacts_dir, capsys):
    before = sorted(artifacts_dir.rglob("*"))
    assert main(["clean", "--dry-run", "--partial", f"paths.artifacts_dir={artifacts_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {leftovers['dead tmp']} (2.00kB): no process is building its run" in out
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


def test_checkpoints_of_a_training_in_progress_stay_even_with_partial(leftovers, artifacts_dir, building, capsys):
    building("train_generator/eeee")
    assert main(["clean", "--partial", f"paths.artifacts_dir={artifacts_dir}"]) == 0
    assert f"kept {leftovers['partial']} (3.00MB): its run is being built" in capsys.readouterr().out
    assert leftovers["partial"].exists()


def test_without_flock_the_soft_lock_tells_what_is_in_use(artifacts_dir, dead_pid, building, monkeypatch, capsys):
    """A file system mounted without flock (NFS with nolock answers ENOLCK): builds and clean fall back to
    filelock's soft lock, a file beside the lock that exists while a process holds it."""
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    in_use = folder(artifacts_dir / "eval" / f".cccc.tmp-{dead_pid}", 100)
    holder = building("eval/cccc", flock_errno=errno.ENOLCK)
    soft = soft_lock_path(lock_path(artifacts_dir, "eval", "cccc"))
    assert soft.is_file()
    assert main(["clean", f"paths.artifacts_dir={artifacts_dir}"]) == 0
    assert capsys.readouterr().out.startswith(f"kept {in_use} (100B): its run is being built")

    holder.stdin.close()
    holder.wait(timeout=30)
    assert not soft.exists()  # released with the build
    assert main(["clean", f"paths.artifacts_dir={artifacts_dir}"]) == 0
    assert capsys.readouterr().out == f"removed {in_use} (100B): no process is building its run\n"
    assert not in_use.exists() and not soft.exists()
