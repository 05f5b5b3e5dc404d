"""Where a `mhs reproduce` spent its time: every run the report was built from (followed through the
manifests' inputs), in the order they finished, each with the time since the previous one finished
(a reproduce builds its stages one after another, so that gap is the stage's wall time, model loading
included), summed per stage as shares of the whole. Also the CPU and dtype the training ran with.

    python scripts/stage_shares.py ARTIFACTS/report/RUN_ID --out results/cpu/stage_shares.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime
from pathlib import Path


def upstream_runs(report: Path) -> list[dict]:
    """The manifests of the report and every run it was built from, each once."""
    artifacts = report.parent.parent
    seen, pending, manifests = set(), [report], []
    while pending:
        run = pending.pop()
        if run in seen:
            continue
        seen.add(run)
        manifest_file = run / "manifest.json"
        if not manifest_file.is_file():
            sys.exit(f"{manifest_file}: no manifest (expected a finished run folder under {artifacts})")
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as err:
            sys.exit(f"{manifest_file}: damaged manifest ({err}); rebuild that run with `mhs reproduce --force`")
        manifests.append(manifest)
        for ref in manifest.get("inputs", {}).values():
            if isinstance(ref, dict) and "run" in ref:  # a run folder (raw files carry only a hash)
                stage, run_id = Path(ref["run"]).parts[-2:]
                pending.append(artifacts / stage / run_id)
    return manifests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="the report's run folder")
    parser.add_argument("--out", type=Path, required=True, help="CSV of runs in finishing order")
    args = parser.parse_args()
    manifests = sorted(upstream_runs(args.report), key=lambda m: m["finished_at"])
    rows, previous = [], None
    for manifest in manifests:
        finished = datetime.fromisoformat(manifest["finished_at"])
        seconds = manifest["wall_time_s"] if previous is None else (finished - previous).total_seconds()
        rows.append({"stage": manifest["stage"], "run_id": manifest["run_id"], "finished_at": manifest["finished_at"],
                     "seconds": round(seconds, 1)})
        previous = finished
    total = sum(r["seconds"] for r in rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} runs, {total / 60:.1f} min from the first run's start to the report")
    per_stage: dict[str, float] = {}
    for r in rows:
        per_stage[r["stage"]] = per_stage.get(r["stage"], 0.0) + r["seconds"]
    for stage, seconds in sorted(per_stage.items(), key=lambda item: -item[1]):
        count = sum(r["stage"] == stage for r in rows)
        print(f"  {stage:16s} {count:2d} runs {seconds / 60:5.1f} min {100 * seconds / total:5.1f}%")
    trained = [m for m in manifests if m["stage"] == "train_generator" and m.get("device")]
    if trained:
        device = trained[0]["device"]
        print(f"CPU {device['cpu']['name']}, {device['cpu']['logical_cores']} threads, flags "
              f"{' '.join(device['cpu']['flags'])}; autocast {device.get('autocast')}")


if __name__ == "__main__":
    main()
