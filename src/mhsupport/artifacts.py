"""Content-addressed run directories (DESIGN.md section 10), shared by every stage.

A run lives in `<artifacts_dir>/<stage>/<run_id>`, where run_id hashes the resolved
config (less the keys that cannot change results) and the sha256 of every input. It is
built under a temporary name and renamed when complete, so a crash leaves nothing that
looks like a run; `manifest.json` is written last and marks a run as complete.
"""

from __future__ import annotations

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

from omegaconf import DictConfig, OmegaConf

import mhsupport

log = logging.getLogger(__name__)

# Config keys that say where or how a stage runs, not what it computes.
NON_RESULT_KEYS = ("force", "paths", "runtime")
PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "accelerate", "hydra-core", "sacrebleu",
            "pandas", "pyarrow", "scikit-learn", "numpy", "gguf", "peft")
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def result_config(cfg: DictConfig) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in container.items() if k not in NON_RESULT_KEYS}


@dataclass
class Run:
    stage: str
    run_id: str
    path: Path
    cfg: DictConfig
    inputs: dict[str, dict]  # name -> {"path" or "run", "sha256"}
    metrics: dict = field(default_factory=dict)
    device: dict | None = None  # devices.describe(...) of the models a stage loaded

    @property
    def complete(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def up_to_date(self, force: bool) -> bool:
        """Complete and not asked to rebuild: the stage has nothing to do (and says where its run is)."""
        if self.complete and not force:
            log.info("%s is up to date: %s", self.stage, self.path)
            return True
        return False

    def read_metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    @contextmanager
    def build(self, seed: int | None = None, is_main: bool = True, resumable: bool = False):
        """Yield a temporary directory to write outputs into; on success it becomes the run.

        A resumable build (training) uses a fixed temporary name and keeps it when interrupted,
        so the same command finds its checkpoints there; other builds are removed on failure."""
        started = time.time()
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / (f".{self.run_id}.partial" if resumable else f".{self.run_id}.tmp-{os.getpid()}")
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(exist_ok=True)
        try:
            yield tmp
            if is_main:
                self._finish(tmp, seed, time.time() - started)
        except BaseException:
            if not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _finish(self, tmp: Path, seed: int | None, wall_time_s: float) -> None:
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
        outputs = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "stage": self.stage,
            "run_id": self.run_id,
            "inputs": self.inputs,
            "outputs": outputs,
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
        if self.path.exists():  # force=true: replace the old run only once the new one is whole
            old = self.path.parent / f".{self.run_id}.old-{os.getpid()}"
            self.path.rename(old)
            tmp.rename(self.path)
            shutil.rmtree(old)
        else:
            tmp.rename(self.path)


@dataclass
class StageResult:
    """What a training or eval stage returns: its run, its metrics, whether it was up to date."""
    run: Run
    metrics: dict
    skipped: bool


def plan_run(stage: str, cfg: DictConfig, inputs: dict[str, Path | Run]) -> Run:
    """The run that this config and these inputs (files, or upstream runs) make."""
    described = {}
    for name, source in sorted(inputs.items()):
        if isinstance(source, Run):
            described[name] = {"run": str(source.path), "sha256": source.run_id}
        else:
            described[name] = {"path": str(source), "sha256": file_sha256(Path(source))}
    key = json.dumps({"stage": stage, "config": result_config(cfg),
                      "inputs": {k: v["sha256"] for k, v in described.items()}}, sort_keys=True)
    run_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cfg.paths.artifacts_dir).resolve() / stage / run_id
    return Run(stage, run_id, path, cfg, described)


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
