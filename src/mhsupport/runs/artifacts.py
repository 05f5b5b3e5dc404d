"""Content-addressed run directories (DESIGN.md section 10), shared by every stage.

A run lives in `<artifacts_dir>/<stage>/<run_id>`, where run_id hashes the resolved
config (less the keys that cannot change results) and the sha256 of every input. It is
built under a temporary name and renamed when complete, so a crash leaves nothing that
looks like a run; `manifest.json` is written last and marks a run as complete.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from filelock import FileLock, SoftFileLock, Timeout
from omegaconf import DictConfig, OmegaConf

import mhsupport
from mhsupport import preemption
from mhsupport.errors import MhsError

log = logging.getLogger(__name__)

# Config keys that say where or how a stage runs, not what it computes (`endpoint`: where a judge's
# server is; the model it serves is named in the config).
NON_RESULT_KEYS = ("force", "paths", "runtime", "download", "endpoint")  # raw inputs are hashed by content
# Arguments of the `trainer` node (the Trainer's TrainingArguments) that say how a training logs, keeps
# checkpoints or is spread over processes, like `runtime`, not what it computes; so do the arguments whose
# names start with TRAINER_NON_RESULT_PREFIXES. Every other argument is part of the run id.
TRAINER_NON_RESULT_KEYS = ("report_to", "run_name", "project", "disable_tqdm", "log_level", "log_level_replica",
                           "log_on_each_node", "skip_memory_metrics", "include_num_input_tokens_seen", "push_to_hub",
                           "use_cpu", "ddp_backend", "fsdp", "dataloader_num_workers", "dataloader_pin_memory",
                           "dataloader_persistent_workers", "dataloader_prefetch_factor")
TRAINER_NON_RESULT_PREFIXES = ("logging_", "save_", "hub_", "trackio_")
# Settings of a feature that is off (its switch at 0 or false) compute nothing: left out of the run id, so
# a run made before the feature existed stays up to date. (node, or None for the top level; switch; the
# feature's keys, the switch among them)
SWITCHED_OFF_KEYS = (("decoding", "guidance_scale", ("guidance_scale", "guidance_tokens")),
                     (None, "screen_replies", ("screen_replies", "safety")))
PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "accelerate", "hydra-core", "sacrebleu",
            "pyarrow", "scikit-learn", "numpy", "gguf", "peft")
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
LOCKS = ".locks"  # <artifacts>/.locks/<stage>-<run_id>.lock: one per run, held while it is checked and built
# What flock answers on a file system that does not do it, as opposed to "another process holds it": NFS
# mounted with nolock says ENOLCK, some FUSE and parallel file systems EOPNOTSUPP (filelock itself turns
# ENOSYS into its soft lock).
FLOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
CHECKPOINTS = "checkpoints"  # a run's resumable state (training checkpoints, finished batches): never an output
BATCHES = "batches"  # under CHECKPOINTS: the finished batches of an eval or likelihood run


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def result_config(cfg: DictConfig) -> dict:
    """What a run's id is made of: the config less where it runs, but with its numeric precision
    setting (`runtime.bf16`), because bf16 and fp32 give different numbers, and with the Trainer
    arguments of the `trainer` node less the non-result ones (none left: no node, as before it existed)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    result = {k: v for k, v in container.items() if k not in NON_RESULT_KEYS}
    result = relative_to_paths(result, container.get("paths") or {})
    if "bf16" in (container.get("runtime") or {}):
        result["runtime.bf16"] = container["runtime"]["bf16"]
    if "trainer" in result:
        trainer = {k: v for k, v in (result.pop("trainer") or {}).items() if not is_trainer_non_result_key(k)}
        if trainer:
            result["trainer"] = trainer
    for node, switch, keys in SWITCHED_OFF_KEYS:
        settings = result if node is None else result.get(node)
        if isinstance(settings, dict) and settings.get(switch, 0) == 0:
            kept = {k: v for k, v in settings.items() if k not in keys}
            if node is None:
                result = kept
            else:
                result[node] = kept
    return result


def relative_to_paths(value, paths: dict):
    """`value` with every string under a folder of the `paths` node (e.g. an offline model's folder
    under `paths.models_dir`) written as `<paths.models_dir>/...`: where the folders are is not what a
    run computes, so the same config under another HOME or cache folder makes the same run id. A
    string under two such folders (a model cache inside the artifacts folder) counts under the deeper."""
    if isinstance(value, dict):
        return {k: relative_to_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_to_paths(v, paths) for v in value]
    if not isinstance(value, str):
        return value
    matches = []
    for key, folder in paths.items():
        if not isinstance(folder, str) or not folder.strip():
            continue
        expanded = os.path.expanduser(folder)
        for form in {folder.rstrip("/"), expanded.rstrip("/"), os.path.abspath(expanded).rstrip("/")}:
            for text in {value, os.path.expanduser(value)}:
                if form and (text == form or text.startswith(form + "/")):
                    matches.append((len(form), key, text[len(form):].lstrip("/")))  # "//" after a trailing slash
    if not matches:
        return value
    _, key, rest = max(matches)
    return f"<paths.{key}>" + (f"/{rest}" if rest else "")


def is_trainer_non_result_key(key: str) -> bool:
    return key in TRAINER_NON_RESULT_KEYS or key.startswith(TRAINER_NON_RESULT_PREFIXES)


@dataclass
class Run:
    stage: str
    run_id: str
    path: Path
    cfg: DictConfig
    inputs: dict[str, dict]  # name -> {"path" or "run", "sha256"}
    metrics: dict = field(default_factory=dict)
    command: str = ""  # the command that builds this run (for messages)
    device: dict | None = None  # devices.describe(...) of the models a stage loaded
    # When the stage planned this run: its wall time counts from here, so the models it loads and the
    # work it does before writing its outputs (eval, likelihood) are in it.
    planned_at: float = field(default_factory=time.time, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return (self.path / MANIFEST).is_file()

    @property
    def rebuild_hint(self) -> str:
        return f"`{self.command} --force`" if self.command else "its stage's command with --force"

    def manifest(self) -> dict:
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
            if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), dict):
                raise ValueError("no 'outputs' mapping")
        except (OSError, ValueError) as err:
            raise MhsError(f"{self.path / MANIFEST}: unreadable manifest ({err}); rebuild the run with "
                           f"{self.rebuild_hint}") from None
        return manifest

    def content_digest(self) -> str:
        """The digest of what the run holds (its outputs' hashes): a downstream run id includes it,
        so a rebuilt upstream run makes new downstream runs. The config file is left out: the run id
        covers the config, and the file also names where the run was built."""
        outputs = {name: sha256 for name, sha256 in self.manifest()["outputs"].items() if name != CONFIG}
        return hashlib.sha256(json.dumps([self.run_id, outputs], sort_keys=True).encode()).hexdigest()

    def verify(self) -> None:
        """Check the run's outputs against its manifest before a stage uses them: size and mtime
        first, the full hash only when those differ. One line naming the run, the file and the fix."""
        manifest = self.manifest()
        stats = manifest.get("output_stats", {})
        for name, sha256 in manifest["outputs"].items():
            file = self.path / name
            try:
                stat = file.stat()
            except OSError:
                raise MhsError(f"{self.stage} run {self.path}: {name} is missing; rebuild it with "
                               f"{self.rebuild_hint}") from None
            if stats.get(name) == [stat.st_size, stat.st_mtime_ns]:
                continue
            if stat.st_size != (stats.get(name) or [stat.st_size])[0] or file_sha256(file) != sha256:
                raise MhsError(f"{self.stage} run {self.path}: {name} differs from the run's manifest (damaged or "
                               f"replaced); rebuild it with {self.rebuild_hint}")
        built_by = manifest.get("code_version")
        if built_by and built_by != code_version():
            log.warning("%s run %s was built by mhsupport %s, this is %s: if the code change matters, rebuild it "
                        "with %s", self.stage, self.path, built_by, code_version(), self.rebuild_hint)

    def read_json(self, name: str) -> dict:
        """One of the run's JSON outputs (metrics.json, stats.json, ...), or one line naming it."""
        path = self.path / name
        try:
            value = json.loads(path.read_text())
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise MhsError(f"{path}: unreadable ({err}); rebuild the run with {self.rebuild_hint}") from None
        return value

    def read_metrics(self) -> dict:
        return self.read_json("metrics.json")

    # --- building ------------------------------------------------------------------------

    @property
    def partial_path(self) -> Path:
        return self.path.parent / f".{self.run_id}.partial"

    @property
    def checkpoints_path(self) -> Path:
        """Where a resumable build (training) keeps its checkpoints: in its temporary folder, until the
        run is in place."""
        return self.partial_path / CHECKPOINTS

    @contextmanager
    def finished_batches(self, fresh: bool = False):
        """The store of this run's finished batches (eval, likelihood), kept in its temporary folder
        until the run is in place, so an interrupted run resumes from them (`fresh` discards them:
        --force). Within the block SIGTERM and SIGUSR1 stop the run after the batch in progress."""
        store = FinishedBatches(self.checkpoints_path / BATCHES)
        if fresh:
            shutil.rmtree(store.folder, ignore_errors=True)
        if store.count():
            log.info("resuming from %d finished batches in %s", store.count(), store.folder)
        with preemption.deferred():
            yield store

    @contextmanager
    def lock(self, is_main: bool = True):
        """Hold the run's lock while checking and building it, so two identical commands do not
        build it twice; a second one waits and then finds the run complete. Before yielding, put
        back what an interrupted process left: a previous run moved aside by a --force rebuild, or a
        finished run that was not yet renamed into place."""
        if not is_main:  # torchrun: the main process holds the lock for its whole group
            yield
            return
        path = lock_path(self.path.parent.parent, self.stage, self.run_id)
        with holding(path, waiting=f"another process is building {self.path}; waiting for it"):
            self._recover()
            yield

    def _recover(self) -> None:
        if self.complete:  # what a kill after the final rename can leave: checkpoints, a replaced run
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
            for old in self.path.parent.glob(f".{self.run_id}.old-*"):
                shutil.rmtree(old, ignore_errors=True)
            return
        if self.path.exists():
            return
        if (self.partial_path / MANIFEST).is_file():
            log.info("a finished %s run was interrupted before it was put in place; putting it in place: %s",
                     self.stage, self.path)
            self.partial_path.rename(self.path)
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
            for old in self.path.parent.glob(f".{self.run_id}.old-*"):  # what a --force rebuild replaced
                shutil.rmtree(old, ignore_errors=True)
            return
        for old in sorted(self.path.parent.glob(f".{self.run_id}.old-*")):
            if (old / MANIFEST).is_file():
                log.info("a --force rebuild was interrupted; restoring the previous run %s", self.path)
                old.rename(self.path)
                return

    @contextmanager
    def build(self, seed: int | None = None, is_main: bool = True, resumable: bool = False, fresh: bool = False):
        """Yield a temporary directory to write outputs into; on success it becomes the run.

        A resumable build (training) uses a fixed temporary name and keeps it when interrupted,
        so the same command finds its checkpoints there (`fresh` discards them: --force); its
        `checkpoints/` folder stays until the run is in place. Other builds are removed on failure."""
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = self.partial_path if resumable else parent / f".{self.run_id}.tmp-{os.getpid()}"
        if is_main and (not resumable or fresh):
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(exist_ok=True)
        try:
            yield tmp
            if is_main:
                self._finish(tmp, seed, time.time() - self.planned_at)
        except BaseException:
            if not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if is_main:
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)

    def _finish(self, tmp: Path, seed: int | None, wall_time_s: float) -> None:
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
        files = [p for p in sorted(tmp.rglob("*")) if p.is_file() and p.relative_to(tmp).parts[0] != CHECKPOINTS]
        outputs = {str(p.relative_to(tmp)): file_sha256(p) for p in files}
        output_stats = {str(p.relative_to(tmp)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
        manifest = {
            "stage": self.stage,
            "run_id": self.run_id,
            "inputs": self.inputs,
            "outputs": outputs,
            "output_stats": output_stats,
            "code_version": code_version(),
            "packages": package_versions(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "command": sys.argv,
            "seed": seed,
            "device": self.device,
            "wall_time_s": round(wall_time_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if self.path.exists():  # force: the old run is moved aside, and put back by _recover if a kill comes now
            old = self.path.parent / f".{self.run_id}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)  # a half-deleted one of an earlier process with this pid
            self.path.rename(old)
            tmp.rename(self.path)
            shutil.rmtree(old)
        else:
            tmp.rename(self.path)


def lock_path(artifacts_dir: Path, stage: str, run_id: str) -> Path:
    return Path(artifacts_dir) / LOCKS / f"{stage}-{run_id}.lock"


def soft_lock_path(path: Path) -> Path:
    """Where the lock of `path` lives on a file system without flock: a file that exists while it is held."""
    return path.with_name(path.name + ".soft")


@contextmanager
def holding(path: Path, wait: bool = True, waiting: str = "", create: bool = True):
    """Hold the lock at `path` (filelock's flock lock, or where the file system has no flock, its soft lock
    beside it) and yield True; with wait=False, yield False at once when another process holds it. With
    create=False a lock that was never made (no file) counts as free and no file is made: what a dry run
    asks."""
    soft = soft_lock_path(path)
    if not create and not path.exists() and not soft.exists():
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        held = _acquired_now(lock)
    except OSError as err:
        if err.errno not in FLOCK_UNSUPPORTED:
            raise
        lock = SoftFileLock(soft)
        held = _acquired_now(lock)
    if not held and wait:
        log.info("%s (lock %s; on a file system without flock, a lock left by a process killed on another "
                 "machine stays until it is deleted)", waiting, lock.lock_file)
        lock.acquire()
        held = True
    try:
        yield held
    finally:
        if held:
            lock.release()


def _acquired_now(lock) -> bool:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True


class FinishedBatches:
    """Finished batches by name (`<computation>-<first row>`), one JSON file each, written atomically;
    storing one is a safe point at which a requested stop happens (`preemption.check`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.unwritable = False

    def count(self) -> int:
        return len(list(self.folder.glob("*.json"))) if self.folder.is_dir() else 0

    def get(self, name: str):
        """The stored value, or None when the batch is not finished (or its file is damaged)."""
        try:
            return json.loads((self.folder / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    def put(self, name: str, value) -> None:
        """Keep a finished batch. One that cannot be written (e.g. a full disk) is only not kept for a
        resume: the run goes on, and its outputs meet the disk at the end."""
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(value))
            os.replace(tmp, self.folder / f"{name}.json")
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if not self.unwritable:
                log.warning("cannot keep finished batches in %s (%s): an interrupted run will redo them",
                            self.folder, err.strerror or err)
            self.unwritable = True
        preemption.check()


@dataclass
class StageResult:
    """What a stage returns: its run, its metrics, whether it was up to date."""
    run: Run
    metrics: dict
    skipped: bool


def plan_run(stage: str, cfg: DictConfig, inputs: dict[str, Path | Run]) -> Run:
    """The run that this config and these inputs (files, or complete upstream runs) make. An
    upstream run counts by its content digest, so rebuilding it changes this run's id."""
    described = {}
    for name, source in sorted(inputs.items()):
        if isinstance(source, Run):
            described[name] = {"run": str(source.path), "sha256": source.content_digest()}
        else:
            described[name] = {"path": str(source), "sha256": file_sha256(Path(source))}
    key = json.dumps({"stage": stage, "config": result_config(cfg),
                      "inputs": {k: v["sha256"] for k, v in described.items()}}, sort_keys=True)
    run_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cfg.paths.artifacts_dir).resolve() / stage / run_id
    return Run(stage, run_id, path, cfg, described)


def open_run(path: Path, stage: str, given_as: str) -> Run:
    """A complete run that a user names by its folder (e.g. the two evals `mhs judge` compares), or
    one line naming `given_as`, the folder and what was expected."""
    path = Path(path).expanduser().resolve()
    expected = f"expected a complete `mhs {stage}` run folder, {Path('artifacts') / stage / '<run_id>'}"
    if not path.is_dir():
        raise MhsError(f"{given_as} {path}: no such folder ({expected})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        cfg = OmegaConf.load(path / CONFIG)
    except (OSError, ValueError) as err:
        raise MhsError(f"{given_as} {path}: not a complete run ({type(err).__name__}: {err}; {expected})") from None
    if not isinstance(manifest, dict) or manifest.get("stage") != stage:
        made_by = manifest.get("stage") if isinstance(manifest, dict) else None
        raise MhsError(f"{given_as} {path}: a {made_by or 'unknown'} run ({expected})")
    argv = manifest.get("command")
    command = " ".join(["mhs", *map(str, argv[1:])]) if isinstance(argv, list) and argv and \
        Path(str(argv[0])).name == "mhs" else ""
    return Run(stage, manifest.get("run_id", path.name), path, cfg, manifest.get("inputs", {}),
               command=command.replace(" --force", ""))


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    package_dir = Path(mhsupport.__file__).resolve().parent
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=package_dir,
                                   capture_output=True, text=True, timeout=10)
        if described.returncode == 0 and described.stdout.strip():
            return f"{mhsupport.__version__}+git.{described.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return mhsupport.__version__


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
