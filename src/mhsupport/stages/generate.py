"""`mhs generate`: one generation pass of a tagged generator. Each seeded ESConv test context is
encoded once and a reply decoded under every tag (modeling.decoding.generate_under_tags); the
replies, the model's own log-probability of each tag opening its reply, and the recogniser's
reading of each reply go to `replies.jsonl` (evaluation/replies_io.py), one line per decoding seed, context and tag. `mhs eval`'s
tag samplers choose among these replies, and the metrics hold the counterfactual test of steering
(evaluation/counterfactual.py). With score_references, the reference reply's NLL under every tag is
read from the same cache before decoding and written as a likelihood run's `likelihoods.jsonl`: the
report's tag use and perplexity of this generator, without a likelihood run encoding every context
and opening again."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from mhsupport.data.examples_io import read_examples
from mhsupport.data.subsets import seeded_subset
from mhsupport.data.taxonomy import Taxonomy
from mhsupport.errors import MhsError
from mhsupport.evaluation import tag_use
from mhsupport.evaluation.counterfactual import counterfactual_scores
from mhsupport.evaluation.replies_io import REPLIES
from mhsupport.modeling import classifier as classifier_api, devices, loading
from mhsupport.modeling.decoding import generate_under_tags
from mhsupport.modeling.formatting import build_formatter, generator_tags
from mhsupport.runs import artifacts
from mhsupport.settings.config import classifier_config, generator_config, prepare_data_config

log = logging.getLogger(__name__)
STAGE = "generate"
COMMAND = "mhs generate"
PROFILE_GROUPS = ("generator", "classifier")


def check(cfg: DictConfig) -> None:
    if not cfg.strategy_tag:
        raise MhsError("mhs generate decodes a tagged generator's replies under every tag; an untagged generator "
                       "has one reply per context, which `mhs eval` generates (add --strategy-tag)")


def requires(cfg: DictConfig) -> dict:
    needs = {"prepare_data": ("prepare_data", prepare_data_config(cfg)),
             "generator": ("train_generator", generator_config(cfg))}
    if cfg.tag_adherence:
        needs["recogniser"] = ("train_classifier", classifier_config(cfg, "response"))
    return needs


def label(cfg: DictConfig) -> str:
    return f"generate {cfg.dataset}+tag under every tag (seed {cfg.seed})"


def test_examples(cfg: DictConfig, data_run: Path) -> list[dict]:
    """The seeded ESConv test examples an eval and its generation pass score (the same ones)."""
    return seeded_subset(read_examples(data_run, "esconv", "test"), cfg.test_subset, cfg.test_subset_seed)


def decoding_seeds(cfg: DictConfig) -> list[int]:
    d = cfg.decoding
    return list(d.seeds) if d.do_sample else [d.seeds[0]]


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    data_run = inputs["prepare_data"].path
    examples = test_examples(cfg, data_run)
    gcfg = generator_config(cfg)
    model, tokenizer = loading.load_scored_generator(cfg, inputs["generator"].path, data_run,
                                                     devices.inference(cfg.runtime))
    formatter = build_formatter(gcfg, tokenizer)
    labels = generator_tags(gcfg)
    # where the tag is an instruction the model cannot choose its own: sampler none is the reply without one
    tags = labels + ([] if formatter.model_writes_tag else [None])
    d = cfg.decoding
    contexts = [e["context"] for e in examples]
    passes = {}
    references = [formatter.response_ids(e["response"]) for e in examples] if cfg.score_references else None
    with run_.finished_batches(fresh=cfg.force) as batches:
        for n, seed in enumerate(decoding_seeds(cfg)):
            # the reference's NLL does not depend on the decoding seed: scored in the first seed's pass
            passes[seed] = generate_under_tags(model, tokenizer, formatter, contexts, tags, batch_size=d.batch_size,
                                               max_new_tokens=d.max_new_tokens, do_sample=d.do_sample, top_p=d.top_p,
                                               temperature=d.temperature, seed=seed, progress=cfg.runtime.progress,
                                               batches=batches, name=f"generate-seed{seed}",
                                               references=references if n == 0 else None,
                                               guidance_scale=d.guidance_scale, guidance_tokens=d.guidance_tokens)
    loaded = {"generator": model}
    recogniser = classifier_api.load(inputs["recogniser"].path, cfg.runtime) if "recogniser" in inputs else None
    label_key = Taxonomy.label_key(cfg.tag_set)
    lines = []
    reference_hits = None
    if recogniser is not None:
        loaded["recogniser"] = recogniser.model
        reference_hits = [r == e[label_key]
                          for r, e in zip(recogniser.predict([e["response"] for e in examples]), examples)]
    per_seed = {}
    for seed, results in passes.items():
        replies = [reply for result in results for reply in result["replies"]]
        texts = [reply["response"] for reply in replies]
        read = iter(recogniser.predict([t for t in texts if t]) if recogniser is not None and any(texts) else [])
        recognised = [next(read) if t else None for t in texts] if recogniser is not None else [None] * len(texts)
        k = len(tags)
        for i, (example, result) in enumerate(zip(examples, results)):
            for j, tag in enumerate(tags):
                reply = result["replies"][j]
                own = result["own"][j] if result["own"] is not None else None
                lines.append({"seed": seed, "conversation_id": example["conversation_id"],
                              "turn_index": example["turn_index"], "tag": tag, "response": reply["response"],
                              "tokens": reply["tokens"], "own_logprob": own, "recognised": recognised[i * k + j]})
        if recogniser is not None:
            under_labels = [[recognised[i * k + j] for j, tag in enumerate(tags) if tag is not None]
                            for i in range(len(examples))]
            per_seed[str(seed)] = counterfactual_scores([labels] * len(examples), under_labels, labels, reference_hits,
                                                        cfg.bootstrap.resamples, cfg.bootstrap.seed)
    likelihoods, tag_use_metrics = [], None
    if references is not None:
        first = passes[next(iter(passes))]
        columns = [tags.index(label) for label in labels]
        nll = np.array([[result["reference_nll"][j] for j in columns] for result in first], dtype=np.float64)
        tokens = np.array([result["reference_tokens"] for result in first])
        gold = [e[label_key] for e in examples]
        tag_use_metrics = tag_use.tag_use_scores(nll, tokens, gold, labels, cfg.bootstrap.resamples, cfg.bootstrap.seed)
        likelihoods = tag_use.likelihood_lines(examples, gold, nll, tokens)
    empty = sum(not line["response"] for line in lines)
    run_.metrics = {"system": f"{cfg.dataset}+tag", "profile": cfg.generator.profile, "dataset": cfg.dataset,
                    "examples": len(examples), "tags": tags, "labels": labels, "seeds": list(passes),
                    "tag_use": tag_use_metrics,
                    "decoding": "sampled" if d.do_sample else "greedy", "replies": len(lines),
                    "empty_replies": {"count": empty, "share": empty / len(lines)},
                    "counterfactual": per_seed.get(str(next(iter(passes)))), "counterfactual_per_seed": per_seed}
    run_.device = devices.describe(cfg.runtime, loaded)
    with run_.build(seed=cfg.seed, resumable=True) as out:
        (out / REPLIES).write_text("".join(json.dumps(line) + "\n" for line in lines))
        if likelihoods:
            (out / tag_use.LIKELIHOODS).write_text("".join(json.dumps(line) + "\n" for line in likelihoods))
    log.info("generate wrote %s", run_.path)
