"""Generation throughput, batched vs one example at a time: the same model, the same ESConv test
examples, greedy decoding. Prints and writes a JSON report.

    python scripts/bench_generation.py --out gen.json -- --profile cpu --strategy-tag
"""

from __future__ import annotations

import argparse
import json
import time

from mhsupport.cli import build_parser, flag_overrides
from mhsupport.config import load_config
from mhsupport.examples_io import read_examples
from mhsupport.generation import generate
from mhsupport.models import load_saved_causal_lm
from mhsupport.config import generator_config, prepare_data_config
from mhsupport.formatting import build_formatter
from mhsupport.pipeline import Pipeline
from mhsupport.training import seeded_subset
from mhsupport import devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("eval_args", nargs=argparse.REMAINDER, help="-- then `mhs eval` flags/overrides")
    args = parser.parse_args()
    parsed = build_parser().parse_args(["eval", *[a for a in args.eval_args if a != "--"]])
    cfg = load_config("eval", flag_overrides(parsed) + list(parsed.overrides))
    gcfg = generator_config(cfg)
    runs = Pipeline().upstream({"generator": ("train_generator", gcfg), "prepare_data": ("prepare_data", prepare_data_config(cfg))})
    run, data_run = runs["generator"], runs["prepare_data"]
    model, tokenizer = load_saved_causal_lm(run.path / "model", devices.inference(cfg.runtime))
    formatter = build_formatter(gcfg, tokenizer)
    examples = seeded_subset(read_examples(data_run.path, "esconv", "test"), args.examples, cfg.seed)
    contexts, tags = [e["context"] for e in examples], [e["category"] if cfg.strategy_tag else None for e in examples]

    timings = {}
    for name, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
        started = time.perf_counter()
        outputs = generate(model, tokenizer, formatter, contexts, tags, batch_size=batch_size,
                           max_new_tokens=args.max_new_tokens, progress=False)
        seconds = time.perf_counter() - started
        tokens = sum(len(tokenizer(o["response"], add_special_tokens=False)["input_ids"]) for o in outputs)
        timings[name] = {"batch_size": batch_size, "seconds": round(seconds, 2), "generated_tokens": tokens,
                         "examples_per_s": round(len(examples) / seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
    report = {"model": str(run.path), "examples": len(examples), "max_new_tokens": args.max_new_tokens, **timings,
              "speedup_examples_per_s": round(timings["batched"]["examples_per_s"]
                                              / timings["one_at_a_time"]["examples_per_s"], 2)}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
