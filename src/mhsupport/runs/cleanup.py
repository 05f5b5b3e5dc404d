"""`mhs clean`: the hidden folders that runs leave in `<artifacts>/<stage>/` when a process dies.

A build writes into `.<run_id>.tmp-<pid>` and, replacing a run (--force), moves the old one to
`.<run_id>.old-<pid>` until the new one is in place. A process killed in between leaves them
behind. Only folders whose process no longer exists are touched (a pid we may not signal belongs to
a live process of another user); one that holds a complete run (its manifest.json) while the run
itself is missing is renamed back into place instead of removed. Training keeps its checkpoints
in `.<run_id>.partial` so that the same command resumes: those are listed, and removed only when
asked (--partial), since nothing tells whether a training is using one right now; a finished one
(with its manifest: killed just before its rename) is put in place like a complete tmp folder. A pid names a
process on this machine only: an artifacts dir shared with other machines or containers is not
for `mhs clean` while they run.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mhsupport.errors import MhsError

TEMPORARY = re.compile(r"^\.(?P<run_id>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
PARTIAL = re.compile(r"^\.(?P<run_id>.+)\.partial$")


@dataclass
class Leftover:
    path: Path
    kind: str  # "tmp", "old" or "partial"
    pid: int | None
    size: int  # bytes
    action: str  # "remove", "restore", "keep" (its process runs) or "resumable" (a partial, not asked to remove)
    done: bool  # False in a dry run

    def describe(self) -> str:
        size = tqdm.format_sizeof(self.size, "B", 1024)
        if self.action == "keep":
            return f"kept {self.path} ({size}): process {self.pid} is running"
        if self.action == "resumable":
            return f"resumable {self.path} ({size}): rerun the same command, or delete with --partial"
        verb = {"remove": "removed", "restore": "restored"}[self.action] if self.done else f"would {self.action}"
        if self.action == "restore":
            return f"{verb} {self.path} ({size}) as {self.path.parent / run_id_of(self.path)}: the only complete copy"
        reason = f"process {self.pid} is gone" if self.pid is not None else "asked with --partial"
        return f"{verb} {self.path} ({size}): {reason}"


def process_alive(pid: int) -> bool:
    if pid <= 0:  # not a pid a build writes; such a folder is left alone
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:  # no process can have this number
        return False
    return True


def run_id_of(path: Path) -> str:
    match = TEMPORARY.match(path.name) or PARTIAL.match(path.name)
    return match["run_id"]


def folder_size(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def clean(artifacts_dir: Path, dry_run: bool = False, partial: bool = False) -> list[Leftover]:
    """Find the hidden build folders under every stage of artifacts_dir and deal with each (see
    the module docstring); nothing changes in a dry run."""
    artifacts_dir = Path(artifacts_dir)
    if not artifacts_dir.is_dir():
        return []
    found = []
    for stage_dir in sorted(p for p in artifacts_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            if match := TEMPORARY.match(path.name):
                found.append((path, match["kind"], int(match["pid"])))
            elif PARTIAL.match(path.name):
                found.append((path, "partial", None))
    # A complete new build (tmp, or a finished training's partial) is the better copy to restore than
    # the run it was replacing (old), as the stage itself does when it next runs.
    found.sort(key=lambda entry: (entry[0].parent, run_id_of(entry[0]), entry[1] == "old"))
    leftovers, restored = [], set()
    for path, kind, pid in found:
        target = path.parent / run_id_of(path)
        finished = (path / "manifest.json").is_file()
        if kind == "partial" and finished:
            action = "restore" if not target.exists() and target not in restored else "remove"
            restored.add(target)
        elif kind == "partial":
            action = "remove" if partial else "resumable"
        elif process_alive(pid):
            action = "keep"
        elif (path / "manifest.json").is_file() and not target.exists() and target not in restored:
            action = "restore"
            restored.add(target)
        else:
            action = "remove"
        leftovers.append(Leftover(path, kind, pid, folder_size(path), action, done=not dry_run))
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
