"""Benchmark the safety screen on this machine: the latency it adds to a chat turn (the seeker
screen over the last turns, then the reply screen of one reply, as `mhs chat` runs them; p50 and p95
over ESConv conversations) and its throughput on a batch of replies with their seeker contexts (as
an eval would call `screen_replies`). Prints and writes one JSON file.

    python scripts/bench_safety.py --out results/safety/bench.json [--turns 200] [--replies 2000] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mhsupport import safety
from mhsupport.modeling.devices import cpu_description
from mhsupport.safety.screen import encoder_bf16
from mhsupport.settings.config import load_config

REPO = Path(__file__).resolve().parents[1]


def esconv_dialogues(raw_dir: Path) -> list[list[dict]]:
    return [json.loads(line)["dialog"] for line in (raw_dir / "esconv" / "test.json").read_text().splitlines()
            if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--turns", type=int, default=200, help="chat turns timed")
    parser.add_argument("--replies", type=int, default=2000, help="replies in the batch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--raw-dir", type=Path, default=Path(os.environ.get("MHS_RAW_DIR", REPO.parent / "shared" / "data")))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("screen", args.overrides)
    started = time.perf_counter()
    guard = safety.load(cfg.safety, cfg.paths)
    load_s = time.perf_counter() - started

    turns, pairs = [], []  # (seeker turns so far, the supporter's reply) per seeker turn answered
    for dialog in esconv_dialogues(args.raw_dir):
        seeker = []
        for turn in dialog:
            if turn["speaker"] == "usr":
                seeker.append(" ".join(turn["text"].split()))
            elif seeker:
                turns.append((seeker[-cfg.safety.seeker_turns:], " ".join(turn["text"].split())))
                pairs.append((seeker[-1], " ".join(turn["text"].split())))
    guard.seeker([turns[0][0]]), guard.replies([turns[0][1]])  # warm-up
    latencies = []
    for seeker_turns, reply in turns[1:args.turns + 1]:
        started = time.perf_counter()
        guard.seeker([seeker_turns])
        guard.replies([reply])
        latencies.append(time.perf_counter() - started)

    batch = pairs[:args.replies]
    started = time.perf_counter()
    guard.replies([reply for _, reply in batch], [context for context, _ in batch])
    batch_s = time.perf_counter() - started
    machine = cpu_description()
    machine["encoder_dtype"] = "bfloat16" if encoder_bf16(cfg.safety) else "float32"
    machine["torch_threads"] = torch.get_num_threads()
    machine["load_average"] = os.getloadavg()
    result = {"machine": machine, "load_s": round(load_s, 2),
              "chat_turn_ms": {"turns": len(latencies), "p50": 1000 * float(np.percentile(latencies, 50)),
                               "p95": 1000 * float(np.percentile(latencies, 95))},
              "batch": {"replies": len(batch), "distinct_contexts": len({c for c, _ in batch}), "seconds": batch_s,
                        "replies_per_s": len(batch) / batch_s, "projected_s_for_8000": 8000 * batch_s / len(batch)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
