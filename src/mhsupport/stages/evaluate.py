"""`mhs eval`: generate ESConv test responses under a tag sampler, score them against the
references with bootstrap intervals, and keep every generation so the scores can be recomputed."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from transformers import set_seed

from mhsupport.data.examples_io import read_examples
from mhsupport.data.subsets import seeded_subset
from mhsupport.data.taxonomy import Taxonomy
from mhsupport.errors import MhsError
from mhsupport.evaluation import reply_safety, responders, tag_use
from mhsupport.evaluation.classification import classification_scores
from mhsupport.evaluation.generation_metrics import GenerationScores, bootstrap_intervals, bootstrap_mean_over_seeds
from mhsupport.evaluation.generations_io import GENERATIONS
from mhsupport.evaluation.metric_protocols import PROTOCOLS
from mhsupport.modeling import classifier as classifier_api, devices
from mhsupport.modeling.formatting import generator_tags
from mhsupport.runs import artifacts
from mhsupport.safety import screen as safety_screen
from mhsupport.settings.config import classifier_config, generation_config, generator_config, prepare_data_config

log = logging.getLogger(__name__)
STAGE = "eval"
COMMAND = "mhs eval"
PROFILE_GROUPS = ("generator", "classifier")
NO_TAG = "(no tag)"


def check(cfg: DictConfig) -> None:
    """The rules between options (each option's own values are checked in `options`)."""
    unknown = [p for p in cfg.metrics.protocols if p not in PROTOCOLS]
    if unknown or not cfg.metrics.protocols or len(set(cfg.metrics.protocols)) != len(cfg.metrics.protocols):
        raise MhsError(f"metrics.protocols={list(cfg.metrics.protocols)}: expected a non-empty list of "
                       f"distinct names from {list(PROTOCOLS)}, e.g. metrics.protocols=[default]")
    responders.responder(cfg).check()


# The upstream runs a responder may read, by the name it gives them.
UPSTREAM = {"generator": lambda cfg: ("train_generator", generator_config(cfg)),
            "generation": lambda cfg: ("generate", generation_config(cfg)),
            "classifier": lambda cfg: ("train_classifier", classifier_config(cfg, "next_category")),
            "recogniser": lambda cfg: ("train_classifier", classifier_config(cfg, "response"))}


def requires(cfg: DictConfig) -> dict:
    return {"prepare_data": ("prepare_data", prepare_data_config(cfg)),
            **{name: UPSTREAM[name](cfg) for name in responders.responder(cfg).upstream()}}


def file_inputs(cfg: DictConfig) -> dict[str, Path]:
    """The safety screen's exemplars when it screens the replies: they decide what it flags."""
    return safety_screen.exemplar_files() if cfg.screen_replies and not cfg.safety.patterns_only else {}


def label(cfg: DictConfig) -> str:
    return f"eval {system_name(cfg)} (seed {cfg.seed})"


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    gcfg = generator_config(cfg)
    label_key = Taxonomy.label_key(cfg.tag_set)
    responder = responders.responder(cfg)
    examples = responder.scored_examples(seeded_subset(read_examples(inputs["prepare_data"].path, "esconv", "test"),
                                                       cfg.test_subset, cfg.test_subset_seed))

    if cfg.screen_replies:  # before any reply is generated (a finished eval needs no weights: only one to build)
        safety_screen.require_weights(cfg.safety, otherwise=", or screen_replies=false to evaluate unscreened")
    with run_.finished_batches(fresh=cfg.force) as batches:
        lines, loaded = generations(cfg, gcfg, run_, responder, inputs, examples, label_key, batches)
    # the reference's NLL where the replies' model read it (the first decoding seed's lines): written as a
    # likelihood run's file, which the report reads as this system's perplexity
    first = [line for line in lines[:len(examples)] if line["reference_nll"] is not None]
    likelihoods = tag_use.likelihood_lines(examples, [line["gold_label"] for line in first],
                                           np.array([[line["reference_nll"]] for line in first]),
                                           np.array([line["reference_tokens"] for line in first])) \
        if len(first) == len(examples) and examples else []
    flagged = screen(cfg, run_, lines) if cfg.screen_replies else None
    run_.device = devices.describe(cfg.runtime, loaded)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    try:
        with run_.build(seed=cfg.seed, resumable=True) as out:
            (out / GENERATIONS).write_text(text)
            if flagged is not None:
                (out / reply_safety.FLAGGED).write_text("".join(json.dumps(line) + "\n" for line in flagged))
            if likelihoods:
                (out / tag_use.LIKELIHOODS).write_text("".join(json.dumps(line) + "\n" for line in likelihoods))
    except OSError as err:  # e.g. a full disk: keep the generations where they can still be written
        kept = Path(tempfile.gettempdir()) / f"mhs-eval-{run_.run_id}-{GENERATIONS}"
        try:
            kept.write_text(text)
        except OSError:
            raise err from None
        raise MhsError(f"could not write eval run {run_.path} ({err.strerror or err}); its {len(lines)} "
                       f"generations are kept in {kept}. Free space and rerun `{run_.command}`") from None
    log.info("eval wrote %s", run_.path)


def generations(cfg, gcfg, run_, responder, inputs, examples, label_key, batches) -> tuple[list[dict], dict]:
    """Generate and score every example (each finished batch kept in `batches`) and fill run_.metrics;
    (the lines of the generations file, the models loaded by name)."""
    set_seed(cfg.seed)
    recogniser = classifier_api.load(inputs["recogniser"].path, cfg.runtime) if "recogniser" in inputs else None
    replies = responder.prepare(inputs, gcfg, examples, generator_tags(gcfg), label_key, batches)
    respond, tags, labels, loaded = replies.respond, replies.tags, replies.labels, replies.loaded
    reference_check = replies.reference_check
    if recogniser:
        loaded["recogniser"] = recogniser.model
        # how often the recogniser finds the gold label in the human replies themselves: the ceiling
        # its judgement of generated replies is read against
        recognised_references = recogniser.predict([e["response"] for e in examples])
        hits = [r == e[label_key] for r, e in zip(recognised_references, examples)]
        reference_check = {"accuracy": 100 * sum(hits) / len(hits), "examples": len(hits)}

    d = cfg.decoding
    seeds = responder.decoding_seeds()
    lines, per_seed, seed_scores, strategy_prediction = [], {}, [], {}
    protocols = list(cfg.metrics.protocols)
    empty_per_seed = {}
    for seed in seeds:
        outputs, nll, counts = respond(seed)
        used_tags = [o["tag"] for o in outputs]
        responses = [o["response"] for o in outputs]
        empty = [not response for response in responses]
        empty_per_seed[str(seed)] = sum(empty)
        recognised = judge(recogniser, responses, empty) if recogniser else None
        if recognised is None and outputs and "recognised" in outputs[0]:  # read by the generation pass
            recognised = [o["recognised"] for o in outputs]
        gold = [e[label_key] for e in examples]
        scores = GenerationScores(responses, [e["response"] for e in examples], nll, counts,
                                  used_tags if labels else None, gold, recognised, protocols=protocols)
        per_seed[str(seed)] = bootstrap_intervals(scores, cfg.bootstrap.resamples, cfg.bootstrap.seed)
        seed_scores.append(scores)
        if labels and any(tag is not None for tag in used_tags):
            # the tags used as predictions of the gold label: accuracy, Q (macro-F1), preference bias B;
            # a response without a tag counts as a wrong prediction outside the label set
            strategy_prediction[str(seed)] = classification_scores(
                gold, [NO_TAG if tag is None else tag for tag in used_tags], list(labels))
        for i, (example, output) in enumerate(zip(examples, outputs)):
            lines.append({"seed": seed, "conversation_id": example["conversation_id"],
                          "turn_index": example["turn_index"], "context": example["context"],
                          "reference": example["response"], "gold_label": example[label_key],
                          "gold_category": example["category"], "gold_strategy": example["strategy"],
                          "chosen_tag": tags[i], "tag": output["tag"], "response": output["response"],
                          "empty": empty[i],
                          "raw_output": output.get("raw"),
                          "reference_nll": nll[i] if nll else None, "reference_tokens": counts[i] if counts else None,
                          "recognised": recognised[i] if recognised else None})

    run_.metrics = {
        "system": responder.name(), "profile": cfg.generator.profile, "generator_source": cfg.generator_source,
        "dataset": cfg.dataset, "strategy_tag": bool(cfg.strategy_tag), "sampler": cfg.sampler,
        "examples": len(examples), "decoding": "sampled" if len(seeds) > 1 or d.do_sample else "greedy",
        "seeds": seeds,
        "empty_replies": empty_replies(empty_per_seed, len(examples)),
        "metrics": (per_seed[str(seeds[0])] if len(seeds) == 1 else
                    bootstrap_mean_over_seeds(seed_scores, cfg.bootstrap.resamples, cfg.bootstrap.seed)),
        "per_seed": per_seed,
        "protocols": protocols, "signatures": scores.signatures(),
        "strategy_prediction": strategy_prediction,
        "recogniser_on_references": reference_check,
        "note": cfg.generator.get("warning") or "",
    }
    if any(empty_per_seed.values()):
        log.warning("%s: %d of %d replies are empty (scored as empty strings, never judged by the recogniser)",
                    responder.name(), sum(empty_per_seed.values()), len(examples) * len(seeds))
    return lines, loaded


def screen(cfg: DictConfig, run_: artifacts.Run, lines: list[dict]) -> list[dict]:
    """The replies through the safety screen's reply screen: its summary into run_.metrics (and the
    share flagged as the metric `flagged_replies`, in %), the flagged lines returned."""
    summary, flagged = reply_safety.screen_generations(safety_screen.load_shared(cfg.safety, cfg.paths), lines,
                                                       cfg.safety.seeker_turns, cfg.bootstrap)
    run_.metrics["safety"] = summary
    run_.metrics["metrics"]["flagged_replies"] = {"value": 100 * summary["share"], "ci_low": 100 * summary["ci_low"],
                                                  "ci_high": 100 * summary["ci_high"]}
    log.info("%s: the safety screen flagged %d of %d replies (%s)", responders.responder(cfg).name(),
             summary["flagged"], summary["replies"], ", ".join(f"{k} {v}" for k, v in summary["reasons"].items()) or "-")
    return [{"training_seed": cfg.seed, **line} for line in flagged]


def judge(recogniser, responses: list[str], empty: list[bool]) -> list[str | None]:
    """The recogniser's category of each reply; None for an empty reply, which has no category
    (so it never counts as adhering to its tag)."""
    replies = [r for r, e in zip(responses, empty) if not e]
    predicted = iter(recogniser.predict(replies) if replies else [])
    return [None if e else next(predicted) for e in empty]


def empty_replies(per_seed: dict[str, int], examples: int) -> dict:
    """Replies that decode to nothing (e.g. a forced tag followed by another tag or EOS): they stay in
    the corpus as empty strings, so every system is scored on the same examples, and are counted here."""
    count = sum(per_seed.values())
    return {"count": count, "share": count / (examples * len(per_seed)), "per_seed": per_seed}


def system_name(cfg: DictConfig) -> str:
    return responders.responder(cfg).name()
