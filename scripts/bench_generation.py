"""Generation throughput, batched vs one example at a time: the same model, the same ESConv test
examples, greedy decoding, in fp32 and (on a CPU or GPU with bf16) in bf16; the teacher-forced
reference NLL in both dtypes; and the base model's load time from the GGUF file vs from the fp32
safetensors copy `mhs models fetch` writes. Asserts that batched fp32 outputs equal one-at-a-time
fp32 outputs; prints and writes a JSON report.

    python scripts/bench_generation.py --out gen.json -- --profile cpu --strategy-tag
    python scripts/bench_generation.py --model-dir RUN/model --data-dir PREPARE_DATA_RUN --out gen.json

Timings depend on the threads torch may use (--threads) and on whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mhsupport.modeling import devices, loading
from mhsupport.cli import build_parser, flag_overrides
from mhsupport.settings.config import generator_config, load_config, prepare_data_config
from mhsupport.data.examples_io import read_examples
from mhsupport.modeling.formatting import build_formatter
from mhsupport.modeling.decoding import generate
from mhsupport.pipeline import Pipeline
from mhsupport.data.subsets import seeded_subset
from mhsupport.training.validation import per_example_nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--model-dir", help="a trained generator's model/ folder (default: the run the eval flags name)")
    parser.add_argument("--data-dir", help="a prepare_data run folder (with --model-dir)")
    parser.add_argument("eval_args", nargs=argparse.REMAINDER, help="-- then `mhs eval` flags/overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parsed = build_parser().parse_args(["eval", *[a for a in args.eval_args if a != "--"]])
    cfg = load_config("eval", flag_overrides(parsed) + list(parsed.overrides))
    gcfg = generator_config(cfg)
    if args.model_dir:
        model_dir, data_dir = Path(args.model_dir), Path(args.data_dir)
    else:
        runs = Pipeline().upstream({"generator": ("train_generator", gcfg),
                                    "prepare_data": ("prepare_data", prepare_data_config(cfg))})
        model_dir, data_dir = runs["generator"].path / "model", runs["prepare_data"].path
    model, tokenizer = loading.load_saved_causal_lm(model_dir, devices.Placement(devices.resolve(cfg.runtime),
                                                                                torch.float32))
    formatter = build_formatter(gcfg, tokenizer)
    examples = seeded_subset(read_examples(data_dir, "esconv", "test"), args.examples, cfg.test_subset_seed)
    contexts = [e["context"] for e in examples]
    tags = [e["category"] if cfg.strategy_tag else None for e in examples]

    dtypes = [torch.float32]
    if devices.uses_bf16(model.device, {"bf16": "auto"}):
        dtypes.append(torch.bfloat16)
    report = {"model": str(model_dir), "examples": len(examples), "max_new_tokens": args.max_new_tokens,
              "torch_threads": torch.get_num_threads(), "cpu": devices.cpu_description(), "generation": {}, "nll": {}}
    outputs = {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        model.to(dtype)
        for mode, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
            started = time.perf_counter()
            outputs[name, mode] = generate(model, tokenizer, formatter, contexts, tags, batch_size=batch_size,
                                           max_new_tokens=args.max_new_tokens, progress=False)
            seconds = time.perf_counter() - started
            report["generation"][f"{name}/{mode}"] = {"batch_size": batch_size, "seconds": round(seconds, 2),
                                                      "examples_per_s": round(len(examples) / seconds, 3)}
            print(name, mode, report["generation"][f"{name}/{mode}"], flush=True)
        report["generation"][f"{name}/identical_outputs"] = outputs[name, "batched"] == outputs[name, "one_at_a_time"]
        report["generation"][f"{name}/speedup"] = round(report["generation"][f"{name}/one_at_a_time"]["seconds"]
                                                        / report["generation"][f"{name}/batched"]["seconds"], 2)
        started = time.perf_counter()
        features = [formatter.training_features(e) for e in examples]
        nll, tokens = per_example_nll(model, features, args.batch_size, tokenizer.pad_token_id or 0)
        report["nll"][name] = {"seconds": round(time.perf_counter() - started, 2),
                               "nll_per_token": round(sum(nll) / sum(tokens), 4)}
    generation = report["generation"]
    if torch.bfloat16 in dtypes:
        generation["bf16_batched_vs_fp32_one_at_a_time"] = round(
            generation["float32/one_at_a_time"]["seconds"] / generation["bfloat16/batched"]["seconds"], 2)
        generation["bf16_vs_fp32_batched"] = round(
            generation["float32/batched"]["seconds"] / generation["bfloat16/batched"]["seconds"], 2)
        # how much bf16 rounding alone changes greedy replies: if batching were at fault, bf16 batched vs
        # bf16 one at a time would agree less than bf16 vs fp32 at the same batch size
        for first, second in ((("float32", "batched"), ("bfloat16", "batched")),
                              (("float32", "one_at_a_time"), ("bfloat16", "one_at_a_time")),
                              (("bfloat16", "batched"), ("bfloat16", "one_at_a_time"))):
            generation["same_replies/" + "_vs_".join("/".join(key) for key in (first, second))] = round(
                sum(a == b for a, b in zip(outputs[first], outputs[second])) / len(examples), 3)
        report["nll"]["bf16_vs_fp32"] = round(report["nll"]["float32"]["seconds"] / report["nll"]["bfloat16"]["seconds"], 2)
    report["load_seconds"] = load_times(cfg)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    assert generation["float32/identical_outputs"], "batched fp32 generation differs from one example at a time"


def load_times(cfg) -> dict:
    """Seconds to load the base model: de-quantising the GGUF file vs reading its fp32 copy."""
    gguf_path = Path(cfg.generator.model_dir).expanduser() / cfg.generator.gguf_file
    if cfg.generator.source != "gguf" or not loading.dequantised_dir(gguf_path).is_dir():
        return {}
    times = {}
    started = time.perf_counter()
    loading.load_gguf(gguf_path.parent, gguf_path.name)
    times["gguf"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    loading.load_causal_lm(cfg.generator, devices.Placement(torch.device("cpu"), torch.float32))
    times["safetensors_copy"] = round(time.perf_counter() - started, 2)
    return times


if __name__ == "__main__":
    main()
