"""Fetching missing raw files from their upstream locations, sha256-verified."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from mhsupport.errors import MhsError
from mhsupport.data.raw import ESCONV_SPLIT_FILES, esconv_layout

log = logging.getLogger(__name__)


def missing_raw_files(raw_dir: Path, epitome_files) -> list[str]:
    """Raw files (relative to raw_dir) that are not there; ESConv counts as present in either layout."""
    missing = []
    if esconv_layout(raw_dir / "esconv") == "missing":
        missing += [f"esconv/{name}" for name in ESCONV_SPLIT_FILES.values()
                    if not (raw_dir / "esconv" / name).is_file()]
    missing += [f"epitome/{name}" for name in epitome_files if not (raw_dir / "epitome" / name).is_file()]
    return missing


def fetch_missing(raw_dir: Path, download_cfg, epitome_files) -> list[str]:
    """Download every missing raw file when downloads were asked for (download.enabled=true);
    otherwise one line naming the raw folder, where it was set, what is missing and what it must
    hold. Nothing is created under raw_dir unless a download was asked for. Returns what was fetched."""
    missing = missing_raw_files(raw_dir, epitome_files)
    if missing and not download_cfg.enabled:
        esconv = f"esconv/{{{','.join(ESCONV_SPLIT_FILES.values())}}} or esconv/ESConv.json"
        epitome = f"epitome/{{{','.join(epitome_files)}}}"
        problem = "no such folder" if not raw_dir.is_dir() else f"{', '.join(missing)} not found"
        raise MhsError(f"{raw_dir_setting(raw_dir)}: {problem} (it must hold {esconv} and {epitome}); "
                       "point MHS_RAW_DIR or --raw-dir at the raw data, or download it there with "
                       "`mhs prepare-data download.enabled=true`")
    for relative in missing:
        corpus, name = relative.split("/", 1)
        base = download_cfg.esconv_base_url if corpus == "esconv" else download_cfg.epitome_base_url
        expected = download_cfg.sha256.get(corpus, {}).get(Path(name).stem)
        download(f"{base.rstrip('/')}/{name}", raw_dir / relative, expected)
    return missing


def raw_dir_setting(raw_dir: Path) -> str:
    """Where the raw folder came from, as a user set it: the variable, or the config key."""
    variable = os.environ.get("MHS_RAW_DIR")
    if variable and Path(variable) == Path(raw_dir):
        return f"MHS_RAW_DIR={variable}"
    return f"raw data folder {raw_dir} (from --raw-dir, paths.raw_dir or MHS_RAW_DIR; default data/raw)"


def download(url: str, target: Path, sha256: str | None) -> None:
    """Stream url into target via a temporary file; a wrong checksum leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}") as progress:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    digest.update(block)
                    progress.update(len(block))
        if sha256 and digest.hexdigest() != sha256:
            raise MhsError(f"{url}: sha256 {digest.hexdigest()} does not match the expected {sha256}; "
                           "nothing was saved")
        partial.rename(target)
        log.info("downloaded %s -> %s", url, target)
    except (urllib.error.URLError, OSError) as err:
        raise MhsError(f"could not download {url}: {err}") from None
    finally:
        partial.unlink(missing_ok=True)
