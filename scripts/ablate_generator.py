"""Generator recipe ablation: train a tagged generator (and, with --untagged, the untagged one
with the same budget) through the real `mhs train dialogpt` stage, then measure on seeded ESConv
*valid* examples (recipes are chosen on valid; test is scored only by the pipeline's stages):
tag use by likelihood (discrimination, gold-tag vs untagged NLL, paired) and, with --adherence N,
oracle adherence: replies generated under the gold tag for N of those examples, judged by the
cpu recogniser, beside the recogniser's accuracy on the human references of the same examples.
With --steering N, replies under every category for N examples (one generation pass, as
`mhs generate` decodes them), judged by the recogniser: the counterfactual tag following, each
category's rate and oracle adherence, once per guided-decoding setting of --guidance.
Appends one JSON line per recipe (and guidance setting) to --out, with the CPU's flags and the dtype.

    python scripts/ablate_generator.py --out ablation.jsonl --name "words, lr 1e-3" --untagged \
        --adherence 200 -- --profile cpu generator.tag_format=words generator.tag_lr_scale=1
    python scripts/ablate_generator.py --out steering.jsonl --name "esconv, words" --steering 200 \
        --guidance 0:0,2:4,4:4 -- --profile cpu
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mhsupport import pipeline
from mhsupport.modeling import classifier, devices
from mhsupport.cli import build_parser, flag_overrides
from mhsupport.settings.config import classifier_config, load_config, prepare_data_config
from mhsupport.data.examples_io import read_examples
from mhsupport.modeling.formatting import FormatterSettings
from mhsupport.modeling.decoding import generate, generate_under_tags
from mhsupport.evaluation.counterfactual import counterfactual_scores
from mhsupport.evaluation.statistics import wilson_interval
from mhsupport.evaluation.generation_metrics import GenerationScores
from mhsupport.evaluation.tag_use import paired_nll_test, tag_use_scores
from mhsupport.modeling.tag_likelihood import reference_nll
from mhsupport.modeling.loading import load_saved_causal_lm
from mhsupport.data.subsets import seeded_subset


ORACLE_TOKENS = 40  # new tokens of each oracle reply
TAG_ONLY_KEYS = tuple(f"generator.{key}=" for key in ("tag_format", "tag_lr_scale", "strategy_opening", "strategy_instruction",
                                                     "tag_contrast_weight", "tag_contrast_negatives")) + ("strategy_words.",)


def score(run, examples, runtime, batch_size):
    model, tokenizer = load_saved_causal_lm(run.path / "model", devices.inference(runtime))
    formatter = FormatterSettings.load(run.path / "model").build(tokenizer)
    started = time.perf_counter()
    nll, tokens = reference_nll(model, formatter, examples, formatter.labels, batch_size, progress=False)
    return model, tokenizer, formatter, nll, tokens, time.perf_counter() - started


def adherence(model, tokenizer, formatter, examples, recogniser, batch_size):
    """Oracle adherence (the recogniser's category of replies generated under the gold tag equals
    it) and the recogniser's accuracy on the human references of the same examples."""
    started = time.perf_counter()
    outputs = generate(model, tokenizer, formatter, [e["context"] for e in examples], [e["category"] for e in examples],
                       batch_size=batch_size, max_new_tokens=ORACLE_TOKENS, progress=False)
    seconds = time.perf_counter() - started
    replies = [o["response"] for o in outputs]
    judged = recogniser.predict([r for r in replies if r]) if any(replies) else []
    recognised = iter(judged)
    gold = [e["category"] for e in examples]
    adhered = [bool(r) and next(recognised) == g for r, g in zip(replies, gold)]
    human = recogniser.predict([e["response"] for e in examples])
    return {"oracle_adherence": float(np.mean(adhered)),
            "recogniser_on_references": float(np.mean([h == g for h, g in zip(human, gold)])),
            "empty_replies": sum(not r for r in replies), "mean_words": float(np.mean([len(r.split()) for r in replies])),
            # replies that never wrote their end token (loops run to the limit), and their variety
            "at_token_limit": float(np.mean([o["tokens"] >= ORACLE_TOKENS for o in outputs])),
            "distinct_2": GenerationScores(replies, [e["response"] for e in examples], protocols=["default"]).scores(
                names=["distinct_2"])["distinct_2"],
            "examples": len(examples), "generate_seconds": round(seconds, 1),
            "samples": [{"gold": g, "reply": r} for g, r in zip(gold[:8], replies[:8])]}


def steering(model, tokenizer, formatter, examples, recogniser, batch_size, scale, tokens):
    """Replies under every category (guided by `scale` over the first `tokens` tokens), read by the
    recogniser: tag following (the counterfactual test), per category, and oracle adherence."""
    labels = formatter.labels
    started = time.perf_counter()
    passed = generate_under_tags(model, tokenizer, formatter, [e["context"] for e in examples], labels,
                                 batch_size=batch_size, max_new_tokens=ORACLE_TOKENS, progress=False,
                                 guidance_scale=scale, guidance_tokens=tokens)
    seconds = time.perf_counter() - started
    outputs = [r for p in passed for r in p["replies"]]
    replies = [o["response"] for o in outputs]
    read = iter(recogniser.predict([r for r in replies if r]) if any(replies) else [])
    recognised = [next(read) if r else None for r in replies]
    k = len(labels)
    gold = [e["category"] for e in examples]
    human = recogniser.predict([e["response"] for e in examples])
    scores = counterfactual_scores([labels] * len(examples), [recognised[i * k:(i + 1) * k] for i in range(len(examples))],
                                   labels, [h == g for h, g in zip(human, gold)], 1000, 0)
    oracle = [recognised[i * k + labels.index(g)] == g for i, g in enumerate(gold)]
    low, high = wilson_interval(sum(oracle), len(oracle))
    return {"guidance_scale": scale, "guidance_tokens": tokens,
            "tag_following": scores["tag_following"], "per_category": scores["per_category"],
            "recogniser_on_references": scores["recogniser_on_references"],
            "oracle_adherence": {"value": float(np.mean(oracle)), "low": low, "high": high},
            "distinct_2": GenerationScores(replies, [e["response"] for e in examples for _ in labels],
                                           protocols=["default"]).scores(names=["distinct_2"])["distinct_2"],
            "at_token_limit": float(np.mean([o["tokens"] >= ORACLE_TOKENS for o in outputs])),
            "mean_words": float(np.mean([len(r.split()) for r in replies])),
            "empty_replies": sum(not r for r in replies), "examples": len(examples), "generate_seconds": round(seconds, 1),
            "samples": [{"forced": labels[j], "reply": replies[j]} for j in range(k)]
                       + [{"forced": labels[j], "reply": replies[k + j]} for j in range(k)]}


def guidance_settings(text: str) -> list[tuple[float, int]]:
    try:
        return [(float(scale), int(tokens)) for scale, tokens in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise SystemExit(f"--guidance {text!r}: expected SCALE:TOKENS[,SCALE:TOKENS...], e.g. 0:0,2:4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True, help="the recipe's name in the table")
    parser.add_argument("--valid-examples", type=int, default=400)
    parser.add_argument("--untagged", action="store_true", help="also train and score the untagged model")
    parser.add_argument("--adherence", type=int, default=0, metavar="N",
                        help="also generate under the gold tag for the first N scored examples and judge them")
    parser.add_argument("--steering", type=int, default=0, metavar="N",
                        help="also generate under every category for the first N scored examples and judge them")
    parser.add_argument("--guidance", type=guidance_settings, default=[(0.0, 0)], metavar="SCALE:TOKENS,...",
                        help="guided-decoding settings of --steering, one row each (default 0:0, unguided)")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain the tagged model even when its run exists (to time it on a quiet machine)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `mhs train dialogpt` flags/overrides")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    row = {"recipe": args.name, "overrides": train_args, "torch_threads": torch.get_num_threads(),
           "cpu": devices.cpu_description(), "valid_examples": args.valid_examples}
    nll_by_variant = {}
    for tagged in ([True, False] if args.untagged else [True]):
        # the untagged twin leaves out the settings of the tag alone, so every tagged recipe of the same
        # budget shares one twin
        variant_args = train_args if tagged else [a for a in train_args if not a.startswith(TAG_ONLY_KEYS)]
        parsed = build_parser().parse_args(["train", "dialogpt", *variant_args, *(["--strategy-tag"] if tagged else []),
                                            *(["--force"] if tagged and args.fresh else [])])
        cfg = load_config("train_generator", flag_overrides(parsed) + list(parsed.overrides))
        result = pipeline.run("train_generator", cfg)
        data_run = pipeline.Pipeline().plan("prepare_data", prepare_data_config(cfg)).path
        examples = seeded_subset(read_examples(data_run, "esconv", "valid"), args.valid_examples, 0)
        model, tokenizer, formatter, nll, tokens, seconds = score(result.run, examples, cfg.runtime, 16)
        name = "tagged" if tagged else "untagged"
        m = result.metrics
        row[name] = {"run": str(result.run.path), "train_seconds": m["session"]["train_seconds"],
                     "train_examples": m["train_examples"], "valid_loss": m["valid_loss"],
                     "score_seconds": round(seconds, 1),
                     "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                     **tag_use_scores(nll, tokens, [e["category"] for e in examples], formatter.labels, 1000, 0)}
        nll_by_variant[name] = nll[range(len(examples)), [formatter.labels.index(e["category"]) for e in examples]] \
            if formatter.labels else nll[:, 0]
        row["tokens"] = int(tokens.sum())
        if tagged and (args.adherence or args.steering):
            # the recogniser of the profile: training-only settings are no eval keys
            eval_cfg = load_config("eval", flag_overrides(parsed) + [o for o in parsed.overrides
                                                                     if not o.startswith(("generator.", "runtime."))])
            recogniser_run = pipeline.run("train_classifier", classifier_config(eval_cfg, "response")).run
            recogniser = classifier.load(recogniser_run.path, cfg.runtime)
            if args.adherence:
                row["adherence"] = adherence(model, tokenizer, formatter, examples[:args.adherence], recogniser, 64)
            if args.steering:
                steered = [steering(model, tokenizer, formatter, examples[:args.steering], recogniser, 16, scale, steps)
                           for scale, steps in args.guidance]
    if args.untagged:
        row["gold_minus_untagged"] = paired_nll_test(nll_by_variant["tagged"], nll_by_variant["untagged"], tokens, 1000, 0)
    rows = [row]
    if args.steering:
        rows = [{**row, "recipe": args.name + (f", guided {scale:g} x {steps} tokens" if scale > 0 else ""),
                 "steering": result} for (scale, steps), result in zip(args.guidance, steered)]
    with open(args.out, "a") as out:
        out.write("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows[1:] if args.steering else []:
        print(f"{r['recipe']}: tag following {r['steering']['tag_following']['value']:.1f}")
    t = row["tagged"]["metrics"]
    print(f"{args.name}: discrimination {t['tag_discrimination']['value']:.3f} "
          f"(most chosen {t['most_chosen_share']['value']:.2f}), gold-tag PPL {t['ppl_gold_tag']['value']:.2f}, "
          f"train {row['tagged']['train_seconds']} s"
          + (f"; untagged PPL {row['untagged']['metrics']['ppl']['value']:.2f}, gold - untagged "
             f"{row['gold_minus_untagged']['value']:+.4f} nats/token p={row['gold_minus_untagged']['p']:.3f}"
             if args.untagged else "")
          + (f"; oracle adherence {row['adherence']['oracle_adherence']:.3f} (recogniser on references "
             f"{row['adherence']['recogniser_on_references']:.3f})" if "adherence" in row else "")
          + (f"; tag following {rows[0]['steering']['tag_following']['value']:.1f}" if args.steering else ""))


if __name__ == "__main__":
    main()
