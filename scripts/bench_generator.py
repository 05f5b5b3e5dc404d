"""Benchmark generator training on this machine: wall time, tokens/s and, for real models,
achieved FLOP/s (6 x parameters x tokens / s) against this machine's measured fp32 matmul
FLOP/s, both measured in the same process. Writes a JSON report and prints it.

    python scripts/bench_generator.py --out bench.json -- --profile tiny --dataset unified
    python scripts/bench_generator.py --out bench.json -- --profile cpu generator.train_subset=96
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mhsupport.cli import build_parser, flag_overrides
from mhsupport.settings.config import load_config
from mhsupport import pipeline


def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """Sustained fp32 matrix-multiply FLOP/s with torch's current thread settings."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `mhs train dialogpt` flags/overrides")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    parsed = build_parser().parse_args(["train", "dialogpt", *train_args])
    cfg = load_config("train_generator", flag_overrides(parsed) + list(parsed.overrides) + ["force=true"])

    peak_before = matmul_flops()
    started = time.perf_counter()
    result = pipeline.run("train_generator", cfg)
    wall = time.perf_counter() - started
    peak_after = matmul_flops()
    m = result.metrics
    tokens_per_s = m["session"]["tokens_per_s"]
    achieved = 6 * m["parameters"] * tokens_per_s
    peak = max(peak_before, peak_after)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "profile": m["profile"], "dataset": m["dataset"], "train_examples": m["train_examples"],
        "run": str(result.run.path),
        "wall_seconds_total": round(wall, 1),
        "train_seconds": m["session"]["train_seconds"],
        "tokens_seen": m["tokens_seen"], "tokens_per_s": tokens_per_s,
        "padding_share": round(m["padding_share"], 4),
        "parameters": m["parameters"], "trainable_parameters": m["trainable_parameters"],
        "achieved_flops_6NT": achieved,
        "matmul_peak_flops": peak,
        "utilisation_6NT_over_peak": achieved / peak,
        "valid_loss": m["valid_loss"], "valid_ppl": m["valid_ppl"],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
