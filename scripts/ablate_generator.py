"""Generator recipe ablation: train a tagged generator (and, with --untagged, the untagged one
with the same budget) through the real `mhs train dialogpt` stage, then measure tag use by
likelihood on seeded ESConv *valid* examples (recipes are chosen on valid; test is scored only by
the pipeline's likelihood stage). Appends one JSON line per recipe to --out.

    python scripts/ablate_generator.py --out ablation.jsonl --name "lr 1e-3" --untagged -- \
        --profile cpu generator.learning_rate=1e-3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mhsupport import devices, pipeline
from mhsupport.cli import build_parser, flag_overrides
from mhsupport.config import load_config, prepare_data_config
from mhsupport.examples_io import read_examples
from mhsupport.formatting import FormatterSettings
from mhsupport.likelihood import paired_nll_test, reference_nll, tag_use_scores
from mhsupport.models import load_saved_causal_lm
from mhsupport.training import seeded_subset


def score(run, examples, runtime, batch_size):
    model, tokenizer = load_saved_causal_lm(run.path / "model", devices.inference(runtime))
    formatter = FormatterSettings.load(run.path / "model").build(tokenizer)
    started = time.perf_counter()
    nll, tokens = reference_nll(model, formatter, examples, formatter.labels, batch_size, progress=False)
    return nll, tokens, formatter.labels, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True, help="the recipe's name in the table")
    parser.add_argument("--valid-examples", type=int, default=400)
    parser.add_argument("--untagged", action="store_true", help="also train and score the untagged model")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `mhs train dialogpt` flags/overrides")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    row = {"recipe": args.name, "overrides": train_args, "torch_threads": torch.get_num_threads(),
           "cpu": devices.cpu_description()}
    nll_by_variant = {}
    for tagged in ([True, False] if args.untagged else [True]):
        parsed = build_parser().parse_args(["train", "dialogpt", *train_args, *(["--strategy-tag"] if tagged else [])])
        cfg = load_config("train_generator", flag_overrides(parsed) + list(parsed.overrides))
        result = pipeline.run("train_generator", cfg)
        data_run = pipeline.Pipeline().plan("prepare_data", prepare_data_config(cfg)).path
        examples = seeded_subset(read_examples(data_run, "esconv", "valid"), args.valid_examples, 0)
        nll, tokens, labels, seconds = score(result.run, examples, cfg.runtime, 16)
        name = "tagged" if tagged else "untagged"
        m = result.metrics
        row[name] = {"run": str(result.run.path), "train_seconds": m["session"]["train_seconds"],
                     "train_examples": m["train_examples"], "valid_loss": m["valid_loss"],
                     "score_seconds": round(seconds, 1),
                     **tag_use_scores(nll, tokens, [e["category"] for e in examples], labels, 1000, 0)}
        nll_by_variant[name] = nll[range(len(examples)), [labels.index(e["category"]) for e in examples]] \
            if labels else nll[:, 0]
        row["tokens"] = int(tokens.sum())
    if args.untagged:
        row["gold_minus_untagged"] = paired_nll_test(nll_by_variant["tagged"], nll_by_variant["untagged"], tokens, 1000, 0)
    with open(args.out, "a") as out:
        out.write(json.dumps(row) + "\n")
    t = row["tagged"]["metrics"]
    print(f"{args.name}: discrimination {t['tag_discrimination']['value']:.3f} "
          f"(most chosen {t['most_chosen_share']['value']:.2f}), gold-tag PPL {t['ppl_gold_tag']['value']:.2f}, "
          f"train {row['tagged']['train_seconds']} s"
          + (f"; untagged PPL {row['untagged']['metrics']['ppl']['value']:.2f}, gold - untagged "
             f"{row['gold_minus_untagged']['value']:+.4f} nats/token p={row['gold_minus_untagged']['p']:.3f}"
             if args.untagged else ""))


if __name__ == "__main__":
    main()
