"""What the reference's NLL under every tag costs, measured in one process on the same examples: a
tagged generator's generation pass without and with the reference scored in it (`mhs generate`,
score_references), the likelihood stage's own scoring under every tag (each context and opening
encoded again), and the untagged scoring of the same references (what an untagged `mhs likelihood`
run does). Prints and writes a JSON report with the ratios to the untagged scoring, the dtype and
the CPU's flags.

    python scripts/bench_reference_scoring.py --model-dir RUN/model --data-dir PREPARE_DATA_RUN --out ref.json -- --profile cpu --strategy-tag
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mhsupport.cli import build_parser, flag_overrides
from mhsupport.data.examples_io import read_examples
from mhsupport.data.subsets import seeded_subset
from mhsupport.modeling import devices, loading, tag_likelihood
from mhsupport.modeling.decoding import generate_under_tags
from mhsupport.modeling.formatting import build_formatter, generator_tags
from mhsupport.settings.config import generator_config, load_config


def timed(work) -> tuple[float, object]:
    start = time.perf_counter()
    value = work()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", required=True, help="a tagged generator's model/ folder")
    parser.add_argument("--data-dir", required=True, help="a prepare_data run folder")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="each measurement's best of this many")
    parser.add_argument("eval_args", nargs=argparse.REMAINDER, help="-- then `mhs generate` flags/overrides")
    args = parser.parse_args()
    parsed = build_parser().parse_args(["generate", *[a for a in args.eval_args if a != "--"]])
    cfg = load_config("generate", flag_overrides(parsed) + list(parsed.overrides))
    gcfg = generator_config(cfg)
    placement = devices.inference(cfg.runtime)
    model, tokenizer = loading.load_saved_causal_lm(Path(args.model_dir), placement)
    formatter = build_formatter(gcfg, tokenizer)
    labels = generator_tags(gcfg)
    tags = labels + ([] if formatter.model_writes_tag else [None])
    examples = seeded_subset(read_examples(Path(args.data_dir), "esconv", "test"), args.examples, cfg.test_subset_seed)
    contexts = [e["context"] for e in examples]
    references = [formatter.response_ids(e["response"]) for e in examples]
    d = cfg.decoding
    batch = cfg.runtime.batch_size if "batch_size" in cfg.runtime else 16

    def generation(scored):
        return generate_under_tags(model, tokenizer, formatter, contexts, tags, batch_size=d.batch_size,
                                   max_new_tokens=d.max_new_tokens, progress=False,
                                   references=references if scored else None)

    work = {"pass_without_references": lambda: generation(False),
            "pass_with_references": lambda: generation(True),
            "likelihood_under_every_tag": lambda: tag_likelihood.reference_nll(model, formatter, examples, labels, batch,
                                                                               progress=False),
            "likelihood_untagged": lambda: tag_likelihood.reference_nll(model, formatter, examples, None, batch,
                                                                        progress=False)}
    seconds = {name: min(timed(run)[0] for _ in range(args.repeats)) for name, run in work.items()}
    untagged = seconds["likelihood_untagged"]
    added = seconds["pass_with_references"] - seconds["pass_without_references"]
    report = {"examples": len(examples), "tags": tags, "seconds": {k: round(v, 2) for k, v in seconds.items()},
              "scoring_added_to_the_pass_s": round(added, 2),
              "ratio_to_untagged": {"added_to_the_pass": round(added / untagged, 2),
                                    "likelihood_under_every_tag": round(seconds["likelihood_under_every_tag"] / untagged, 2)},
              "dtype": str(placement.dtype), "threads": torch.get_num_threads(),
              "cpu": devices.cpu_description()}
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
