"""Stored examples: one Parquet file per dataset and split, with a fixed schema."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mhsupport.errors import MhsError

DATASETS = ("esconv", "unified")
TURN = pa.struct([("speaker", pa.string()), ("text", pa.string()),
                  ("strategy", pa.string()), ("category", pa.string())])
EXAMPLE_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("conversation_id", pa.string()),
    ("split", pa.string()),
    ("turn_index", pa.int32()),
    ("context", pa.list_(TURN)),
    ("response", pa.string()),
    ("strategy", pa.string()),
    ("category", pa.string()),
    ("situation", pa.string()),
])


def examples_path(run_dir: Path, dataset: str, split: str) -> Path:
    return Path(run_dir) / "examples" / dataset / f"{split}.parquet"


def write_examples(run_dir: Path, dataset: str, split: str, examples: list[dict]) -> Path:
    path = examples_path(run_dir, dataset, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(examples, schema=EXAMPLE_SCHEMA), path)
    return path


def read_examples(run_dir: Path, dataset: str, split: str) -> list[dict]:
    if dataset not in DATASETS:
        raise MhsError(f"unknown dataset {dataset!r}: expected one of {list(DATASETS)}")
    path = examples_path(run_dir, dataset, split)
    if not path.is_file():
        raise MhsError(f"{path} not found: the prepare-data run is incomplete; rerun `mhs prepare-data force=true`")
    return pq.read_table(path).to_pylist()
