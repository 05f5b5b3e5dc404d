"""scripts/stage_shares.py: a reproduce's runs in finishing order, each timed by the gap since the one before."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "stage_shares.py"


def write_run(artifacts: Path, stage: str, run_id: str, finished_at: str, inputs: dict, wall: float = 1.0) -> Path:
    folder = artifacts / stage / run_id
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "run_id": run_id, "finished_at": finished_at,
                                                      "wall_time_s": wall, "inputs": inputs}))
    return folder


def test_runs_are_followed_through_inputs_and_timed_by_their_gaps(tmp_path):
    art = tmp_path / "art"
    data = write_run(art, "prepare_data", "d", "2026-01-01T00:00:02+0000", {"raw": {"path": "x", "sha256": "0"}}, 2.0)
    gen = write_run(art, "train_generator", "g", "2026-01-01T00:01:02+0000", {"data": {"run": str(data), "sha256": "1"}})
    write_run(art, "eval", "unrelated", "2026-01-01T00:01:30+0000", {})
    report = write_run(art, "report", "r", "2026-01-01T00:01:12+0000",
                       {"gen": {"run": str(gen), "sha256": "2"}, "data": {"run": str(data), "sha256": "1"}})
    out = tmp_path / "shares.csv"
    done = subprocess.run([sys.executable, SCRIPT, str(report), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    assert [(r["stage"], float(r["seconds"])) for r in rows] == [("prepare_data", 2.0), ("train_generator", 60.0),
                                                                  ("report", 10.0)]
    assert "3 runs" in done.stdout and "train_generator" in done.stdout


def test_a_damaged_manifest_is_one_line_and_writes_nothing(tmp_path):
    art = tmp_path / "art"
    report = write_run(art, "report", "r", "2026-01-01T00:01:12+0000", {})
    (report / "manifest.json").write_text('{"stage": ')
    out = tmp_path / "shares.csv"
    done = subprocess.run([sys.executable, SCRIPT, str(report), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "damaged manifest" in done.stderr
    assert not out.exists()
