"""The local judge's levers, measured on known pairs of the ESConv VALID split (the test split's
known pairs are only for the figures a judge run reports): the prompt and its rubric, the framing
of the options, and scoring each reply's own likelihood instead of asking A or B, alone or less a
weight times its likelihood without the conversation (`scoring.neutral_weight`). The model is
loaded once; every variant judges the same seeded pairs; each result is one JSON line (accuracy,
position consistency with Wilson intervals, per kind, for several tie bands or neutral weights, and
the time taken). Variants share one request cache, so a reply scored once is not scored again.

    python scripts/tune_judge.py --per-kind 12 --out results/judge_tuning_valid.jsonl -- --profile cpu

Timings depend on whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mhsupport.cli import build_parser, flag_overrides
from mhsupport.data.examples_io import read_examples
from mhsupport.evaluation import judge, judge_validity
from mhsupport.evaluation.judge_scoring import OptionScorer, ReplyScorer
from mhsupport.modeling.devices import cpu_description
from mhsupport.pipeline import Pipeline
from mhsupport.settings.config import load_config, prepare_data_config
from mhsupport.stages.judge import local_judge_model

# Each variant: judge.prompts / judge.scoring values put over the config's.
VARIANTS = {
    "rubric": {},
    "bare": {"prompts.system": "", "scoring.answer_prefix": "",
             "prompts.user": "{conversation}\n\nReply A: {reply_a}\n\nReply B: {reply_b}\n\n{question} Answer with the "
                             "single letter A or B."},
    "likelihood": {"scoring.method": "reply_likelihood"},
    # Pointwise mutual information after the last 1, 2 or 4 turns: judged at each of NEUTRAL_WEIGHTS
    # (0: the likelihood alone).
    "pmi_1turn": {"scoring.method": "reply_likelihood", "prompts.reply_context_turns": 1},
    "pmi_2turns": {"scoring.method": "reply_likelihood", "prompts.reply_context_turns": 2},
    "pmi_4turns": {"scoring.method": "reply_likelihood", "prompts.reply_context_turns": 4},
    "criteria": {"prompts.system": (
        "You judge replies in emotional-support conversations. A better reply answers what the seeker has just "
        "said in this conversation, is a complete thought, and reads as coherent, well-ordered sentences; a reply "
        "that fits another conversation, stops mid-thought or jumbles its sentences is worse. Reply with your "
        "verdict only: [[A]] if Reply A is better, [[B]] if Reply B is better.")},
}
TIE_BANDS = (0.0, 0.05, 0.2)
NEUTRAL_WEIGHTS = (0.0, 0.25, 0.5, 0.6, 0.75, 0.9, 1.0)


def variant_config(cfg, overrides: dict):
    variant = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in overrides.items():
        OmegaConf.update(variant, f"judge.{key}", value)
    return variant


def run_variant(name: str, cfg, rows, model, tokenizer, model_name: str, batch_size: int, cache_path: Path) -> dict:
    """One variant on the known pairs: scored once (timed), then read back from the cache at each tie
    band (options) or each neutral weight (the pmi variants, at tie band 0)."""
    variant = variant_config(cfg, VARIANTS[name])
    s = variant.judge.scoring
    pmi = name.startswith("pmi")
    backend = (ReplyScorer(model, tokenizer, model_name) if s.method == "reply_likelihood" else
               OptionScorer(model, tokenizer, tuple(s.options), s.answer_prefix, model_name))
    prompts = judge.Prompts.from_config(variant)
    cache = judge.RequestCache(cache_path)
    found, seconds, seconds_alone = {}, 0.0, None
    try:
        for setting in NEUTRAL_WEIGHTS if pmi else TIE_BANDS:
            if pmi:
                backend.neutral_weight = setting
            started = time.perf_counter()
            records = judge.judge_rows(rows, ["overall"], prompts, backend, model_name, judge.parameters(variant),
                                       cache, 0, batch_size, True, 0.0 if pmi else setting)
            # Only the first setting (and, for pmi, the first with a neutral weight) asks the model.
            seconds += time.perf_counter() - started
            seconds_alone = seconds if seconds_alone is None else seconds_alone
            summary = judge_validity.summary(records, rows, variant.judge.length_match_ratio,
                                             variant.judge.validity.bars)
            found[str(setting)] = {kind: {"accuracy": f["accuracy"], "position_consistent": f["position_consistent"]}
                                   for kind, f in [*summary["kinds"].items(), ("all", summary["overall"])]}
    finally:
        cache.close()
    pairs = sum(len(r.pairs) for r in rows)
    result = {"variant": name, "overrides": VARIANTS[name],
              ("by_neutral_weight" if pmi else "by_tie_band"): found, "pairs": pairs}
    if pmi:  # the conditional scores alone (neutral weight 0) and with the neutral ones, from a cold cache
        result.update(seconds_likelihood_alone=round(seconds_alone, 1),
                      seconds_per_pair_likelihood_alone=round(seconds_alone / pairs, 2))
    return {**result, "seconds": round(seconds, 1), "seconds_per_pair": round(seconds / pairs, 2),
            "note": "seconds from a cold cache except requests an earlier variant of this run already scored"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-kind", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("mhs_args", nargs=argparse.REMAINDER, help="-- then `mhs judge` flags and overrides")
    args = parser.parse_args()
    judge_args = build_parser().parse_args(["judge", "--known-pairs", "--backend", "local",
                                            *[a for a in args.mhs_args if a != "--"]])
    cfg = load_config("judge", flag_overrides(judge_args) + list(judge_args.overrides))
    data = Pipeline().upstream({"data": ("prepare_data", prepare_data_config(cfg))})["data"]
    v = cfg.judge.validity
    rows = judge_validity.known_pair_rows(read_examples(data.path, "esconv", "valid"), args.per_kind, args.seed,
                                          v.truncate_words, v.min_words)
    started = time.perf_counter()
    model, tokenizer, name = local_judge_model(cfg)
    load_seconds = time.perf_counter() - started
    machine = {"cpu": cpu_description(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
               "dtype": cfg.judge.scoring.dtype, "load_seconds": round(load_seconds, 1)}
    print(json.dumps(machine), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variants.split(","):
            result = run_variant(variant, cfg, rows, model, tokenizer, name, args.batch_size,
                                 Path(folder) / "requests.jsonl")
            result.update(split="valid", per_kind=args.per_kind, seed=args.seed, model=name, **machine,
                          peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
            print(json.dumps(result), flush=True)
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
