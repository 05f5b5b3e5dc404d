"""Downloading missing raw files, for real, from a local HTTP server over ../shared/data."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mhsupport.artifacts import file_sha256
from mhsupport.cli import main
from mhsupport.config import load_config
from mhsupport import pipeline


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(real_raw_dir):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(real_raw_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_missing_raw_files_are_downloaded_and_verified(mirror, real_raw_dir, tmp_path):
    raw = tmp_path / "raw"
    cfg = load_config("prepare_data", [f"paths.raw_dir={raw}", f"paths.artifacts_dir={tmp_path / 'art'}",
                                       f"download.esconv_base_url={mirror}/esconv",
                                       f"download.epitome_base_url={mirror}/epitome"])
    result = pipeline.run("prepare_data", cfg)
    for corpus, suffix in (("esconv", ".json"), ("epitome", ".csv")):
        for stem, sha256 in cfg.download.sha256[corpus].items():
            name = f"{corpus}/{stem}{suffix}"
            assert file_sha256(raw / name) == sha256 == file_sha256(real_raw_dir / name)
    assert result.run.read_json("stats.json")["raw_totals"]["esconv_supporter_turns"] == 18376
    assert sorted(p.name for p in (raw / "epitome").iterdir()) == sorted(
        ["emotional-reactions-reddit.csv", "explorations-reddit.csv", "interpretations-reddit.csv"])


def test_checksum_mismatch_saves_nothing(mirror, tmp_path, capsys):
    raw = tmp_path / "raw"
    code = main(["prepare-data", f"--raw-dir={raw}", f"paths.artifacts_dir={tmp_path / 'art'}",
                 f"download.esconv_base_url={mirror}/esconv", f"download.epitome_base_url={mirror}/epitome",
                 "download.sha256.esconv.train=" + "0" * 64])
    assert code == 2
    assert "sha256" in capsys.readouterr().err
    assert not (raw / "esconv" / "train.json").exists()
    assert not list((raw / "esconv").glob(".*part*"))
    assert not (tmp_path / "art").exists()


def test_unreachable_upstream_is_a_clear_error(tmp_path, capsys):
    code = main(["prepare-data", f"--raw-dir={tmp_path / 'raw'}", f"paths.artifacts_dir={tmp_path / 'art'}",
                 "download.esconv_base_url=http://127.0.0.1:9/esconv"])
    assert code == 2
    assert "could not download http://127.0.0.1:9/esconv/train.json" in capsys.readouterr().err
