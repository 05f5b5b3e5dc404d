"""`mhs likelihood`: does a generator use its tag? For each seeded ESConv test example, the
reference response's NLL under every tag (tagged generators) or without one (untagged generators
and the base model), once per generator, with the context's KV cache shared by the tags."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from mhsupport.runs import artifacts
from mhsupport.evaluation import tag_use
from mhsupport.modeling import devices, loading, tag_likelihood
from mhsupport.settings.config import generator_config, prepare_data_config
from mhsupport.errors import MhsError
from mhsupport.data.examples_io import read_examples
from mhsupport.data.subsets import seeded_subset
from mhsupport.modeling.formatting import build_formatter, generator_tags
from mhsupport.data.taxonomy import Taxonomy

log = logging.getLogger(__name__)
STAGE = "likelihood"
COMMAND = "mhs likelihood"
PROFILE_GROUPS = ("generator",)


def check(cfg: DictConfig) -> None:
    if cfg.generator_source not in ("finetuned", "base"):
        raise MhsError(f"generator_source={cfg.generator_source!r}: mhs likelihood scores a fine-tuned generator or "
                       "the base model (--base); an llm has no tags to score")
    if cfg.generator_source == "base" and cfg.strategy_tag:
        raise MhsError("generator_source=base is the model without fine-tuning: it has no tags (drop --strategy-tag)")


def requires(cfg: DictConfig) -> dict:
    needs = {"prepare_data": ("prepare_data", prepare_data_config(cfg))}
    if cfg.generator_source == "finetuned":
        needs["generator"] = ("train_generator", generator_config(cfg))
    return needs


def system_name(cfg: DictConfig) -> str:
    if cfg.generator_source == "base":
        return "pretrained"
    return f"{cfg.dataset}{'+tag' if cfg.strategy_tag else ''}"


def label(cfg: DictConfig) -> str:
    return f"likelihood {system_name(cfg)} (seed {cfg.seed})"


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    data_run = inputs["prepare_data"].path
    examples = seeded_subset(read_examples(data_run, "esconv", "test"), cfg.test_subset, cfg.test_subset_seed)
    generator_run = inputs["generator"].path if cfg.generator_source == "finetuned" else None
    model, tokenizer = loading.load_scored_generator(cfg, generator_run, data_run, devices.inference(cfg.runtime))
    formatter = build_formatter(generator_config(cfg), tokenizer)
    labels = generator_tags(cfg)
    key = Taxonomy.label_key(cfg.tag_set)
    batch_size = cfg.runtime.batch_size
    with run_.finished_batches(fresh=cfg.force) as batches:
        nll, tokens = tag_likelihood.reference_nll(model, formatter, examples, labels, batch_size,
                                                   cfg.runtime.progress, batches)
    gold = [e[key] for e in examples]
    scores = tag_use.tag_use_scores(nll, tokens, gold, labels, cfg.bootstrap.resamples, cfg.bootstrap.seed)
    run_.metrics = {"system": system_name(cfg), "profile": cfg.generator.profile, "dataset": cfg.dataset,
                    "strategy_tag": bool(cfg.strategy_tag), "generator_source": cfg.generator_source,
                    "examples": len(examples), "tokens": int(tokens.sum()), "labels": labels, **scores}
    run_.device = devices.describe(cfg.runtime, {"generator": model})
    lines = tag_use.likelihood_lines(examples, gold, nll, tokens)
    with run_.build(seed=cfg.seed, resumable=True) as out:
        (out / tag_use.LIKELIHOODS).write_text("".join(json.dumps(line) + "\n" for line in lines))
    log.info("likelihood wrote %s", run_.path)
