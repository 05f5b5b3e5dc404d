"""Stored generations: an eval run's `generations.jsonl`, one JSON object per test example and
decoding seed, read back by `mhs report`, `mhs compare` and `mhs human-eval`."""

from __future__ import annotations

import json
from pathlib import Path

from mhsupport.errors import MhsError
from mhsupport.metrics import GenerationScores

GENERATIONS = "generations.jsonl"


def read_generations(run_dir: Path, seed: int | None = None) -> list[dict]:
    """An eval run's generations.jsonl lines (of one decoding seed: the first by default)."""
    path = Path(run_dir) / GENERATIONS
    if not path.is_file():
        raise MhsError(f"{path} not found: expected an `mhs eval` run directory")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    seed = lines[0]["seed"] if seed is None else seed
    return [line for line in lines if line["seed"] == seed]


def scores_from_generations(lines: list[dict]) -> GenerationScores:
    """The scores of stored generations, recomputed exactly as `mhs eval` computed them."""
    tagged = any(line["tag"] is not None for line in lines)
    recognised = [line["recognised"] for line in lines] if lines[0]["recognised"] is not None else None
    has_nll = lines[0]["reference_nll"] is not None
    return GenerationScores([line["response"] for line in lines], [line["reference"] for line in lines],
                            [line["reference_nll"] for line in lines] if has_nll else None,
                            [line["reference_tokens"] for line in lines] if has_nll else None,
                            [line["tag"] for line in lines] if tagged else None,
                            [line["gold_label"] for line in lines], recognised)
