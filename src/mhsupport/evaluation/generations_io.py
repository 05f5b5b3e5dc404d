"""Stored generations: an eval run's `generations.jsonl`, one JSON object per test example and
decoding seed. Reading checks every line, so a damaged run gets one message naming the file, the
line and the command that rebuilds it, not a traceback in whatever reads it next."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mhsupport.errors import MhsError
from mhsupport.evaluation.metric_protocols import PROTOCOLS
from mhsupport.evaluation.generation_metrics import GenerationScores

GENERATIONS = "generations.jsonl"
# What compare, report and human-eval read from each line.
REQUIRED_KEYS = ("seed", "conversation_id", "turn_index", "context", "reference", "gold_label", "tag", "response",
                 "reference_nll", "reference_tokens", "recognised")


def read_generations(run_dir: Path, seed: int | None = None) -> list[dict]:
    """An eval run's generations.jsonl lines (of one decoding seed: the first by default)."""
    run_dir = Path(run_dir)
    path = run_dir / GENERATIONS
    if not run_dir.is_dir():
        raise MhsError(f"{run_dir}: no such directory (expected an `mhs eval` run directory, "
                       "artifacts/eval/<run_id>)")
    if not path.is_file():
        stage = _manifest(run_dir).get("stage")
        if stage != "eval":
            made_by = f"a {stage} run" if stage else "not a complete run"
            raise MhsError(f"{path} not found: {run_dir} is {made_by}, expected an `mhs eval` run directory")
        raise MhsError(f"{path} not found; rebuild the run with {rebuild_command(run_dir)}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise MhsError(f"{path}: byte {err.start} is not UTF-8 (the file is damaged); "
                       f"rebuild the run with {rebuild_command(run_dir)}") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as err:
            raise MhsError(f"{path}, line {number}: not a JSON object ({err.msg}; the file is truncated or damaged); "
                           f"rebuild the run with {rebuild_command(run_dir)}") from None
        if not isinstance(line, dict):
            raise MhsError(f"{path}, line {number}: a JSON {type(line).__name__}, expected one object per generation; "
                           f"rebuild the run with {rebuild_command(run_dir)}")
        missing = [key for key in REQUIRED_KEYS if key not in line]
        if missing:
            raise MhsError(f"{path}, line {number}: missing key(s) {', '.join(repr(k) for k in missing)}; "
                           f"rebuild the run with {rebuild_command(run_dir)}")
        lines.append(line)
    if not lines:
        raise MhsError(f"{path} is empty; rebuild the run with {rebuild_command(run_dir)}")
    seed = lines[0]["seed"] if seed is None else seed
    chosen = [line for line in lines if line["seed"] == seed]
    if not chosen:
        seeds = sorted({line["seed"] for line in lines}, key=str)
        raise MhsError(f"{path}: no generations for decoding seed {seed} (the run has seeds {seeds})")
    return chosen


def rebuild_command(run_dir: Path) -> str:
    """The `mhs eval` command recorded in the run's manifest, with --force; where the run was made
    some other way (`mhs reproduce`, Python), a pointer to its config instead."""
    argv = _manifest(run_dir).get("command")
    if isinstance(argv, list) and len(argv) >= 2 and Path(str(argv[0])).name == "mhs" and argv[1] == "eval":
        return "`" + " ".join(["mhs", "eval", "--force"] + [shlex.quote(str(a)) for a in argv[2:] if a != "--force"]) + "`"
    return f"the `mhs eval` command that made it, with --force (its settings: {Path(run_dir) / 'config.yaml'})"


def _manifest(run_dir: Path) -> dict:
    """The run's manifest, or {} where it is missing or unreadable (the caller names what that means)."""
    try:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def scores_from_generations(lines: list[dict], protocols=PROTOCOLS) -> GenerationScores:
    """The scores of stored generations, recomputed exactly as `mhs eval` computed them."""
    tagged = any(line["tag"] is not None for line in lines)
    recognised = [line["recognised"] for line in lines] if lines[0]["recognised"] is not None else None
    has_nll = lines[0]["reference_nll"] is not None
    return GenerationScores([line["response"] for line in lines], [line["reference"] for line in lines],
                            [line["reference_nll"] for line in lines] if has_nll else None,
                            [line["reference_tokens"] for line in lines] if has_nll else None,
                            [line["tag"] for line in lines] if tagged else None,
                            [line["gold_label"] for line in lines], recognised, protocols=protocols)
