"""`mhs clean`: the hidden folders that runs leave in `<artifacts>/<stage>/` when a process dies.

A build writes into `.<run_id>.tmp-<pid>` and, replacing a run (--force), moves the old one to
`.<run_id>.old-<pid>` until the new one is in place; training keeps its checkpoints in
`.<run_id>.partial` so that the same command resumes. Every build holds its run's lock
(`<artifacts>/.locks/<stage>-<run_id>.lock`) from start to end, so the lock, not the pid in a name,
tells whether a folder is in use: a pid names a process on one machine only, while the lock lives
beside the runs and is seen by every machine that shares them. `clean` takes each run's lock
without waiting: held by another process, the run's folders are in use and kept; taken, they are
stale and dealt with while `clean` holds it, so no build of that run starts meanwhile. A stale
folder that holds a complete run (its manifest.json) while the run itself is missing is renamed
back into place; other stale tmp and old folders are removed; a partial one is listed, and removed
only when asked (--partial), since the same command would resume from it.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from tqdm import tqdm

from mhsupport.runs.artifacts import holding, lock_path
from mhsupport.errors import MhsError

TEMPORARY = re.compile(r"^\.(?P<run_id>.+)\.(?P<kind>tmp|old)-\d+$")
PARTIAL = re.compile(r"^\.(?P<run_id>.+)\.partial$")


@dataclass
class Leftover:
    path: Path
    kind: str  # "tmp", "old" or "partial"
    lock: Path  # the lock of its run
    size: int  # bytes
    action: str  # "remove", "restore", "keep" (its run is being built) or "resumable" (a partial, not asked to remove)
    done: bool  # False in a dry run

    def describe(self) -> str:
        size = tqdm.format_sizeof(self.size, "B", 1024)
        if self.action == "keep":
            return f"kept {self.path} ({size}): its run is being built (a process holds {self.lock})"
        if self.action == "resumable":
            return f"resumable {self.path} ({size}): rerun the same command, or delete with --partial"
        verb = {"remove": "removed", "restore": "restored"}[self.action] if self.done else f"would {self.action}"
        if self.action == "restore":
            return f"{verb} {self.path} ({size}) as {self.path.parent / run_id_of(self.path)}: the only complete copy"
        reason = "asked with --partial" if self.kind == "partial" else "no process is building its run"
        return f"{verb} {self.path} ({size}): {reason}"


def run_id_of(path: Path) -> str:
    match = TEMPORARY.match(path.name) or PARTIAL.match(path.name)
    return match["run_id"]


def folder_size(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def clean(artifacts_dir: Path, dry_run: bool = False, partial: bool = False) -> list[Leftover]:
    """Find the hidden build folders under every stage of artifacts_dir and deal with each (see
    the module docstring); nothing changes in a dry run, not even a lock file."""
    artifacts_dir = Path(artifacts_dir)
    if not artifacts_dir.is_dir():
        return []
    found = []
    for stage_dir in sorted(p for p in artifacts_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            if match := TEMPORARY.match(path.name):
                found.append((path, match["kind"]))
            elif PARTIAL.match(path.name):
                found.append((path, "partial"))
    # A complete new build (tmp, or a finished training's partial) is the better copy to restore than
    # the run it was replacing (old), as the stage itself does when it next runs.
    found.sort(key=lambda entry: (entry[0].parent, run_id_of(entry[0]), entry[1] == "old"))
    leftovers = []
    for (stage_dir, run_id), entries in groupby(found, key=lambda entry: (entry[0].parent, run_id_of(entry[0]))):
        lock = lock_path(artifacts_dir, stage_dir.name, run_id)
        with holding(lock, wait=False, create=not dry_run) as free:
            restored = False
            for path, kind in entries:
                target = path.parent / run_id
                finished = (path / "manifest.json").is_file()
                if not free:
                    action = "keep"
                elif finished and not target.exists() and not restored:
                    action, restored = "restore", True
                elif kind == "partial" and not finished:
                    action = "remove" if partial else "resumable"
                else:
                    action = "remove"
                leftovers.append(Leftover(path, kind, lock, folder_size(path), action, done=not dry_run))
                if not dry_run:
                    _apply(path, action)
    return leftovers


def _apply(path: Path, action: str) -> None:
    try:
        if action == "remove":
            shutil.rmtree(path)
        elif action == "restore":
            target = path.parent / run_id_of(path)
            path.rename(target)
            shutil.rmtree(target / "checkpoints", ignore_errors=True)  # a training's resumable state
    except FileNotFoundError:  # another `mhs clean` got there first
        pass
    except OSError as err:
        raise MhsError(f"cannot {action} {path} ({err.strerror}); check the permissions of {path.parent}") from None
