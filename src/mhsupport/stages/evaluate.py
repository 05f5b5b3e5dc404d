"""`mhs eval`: generate ESConv test responses under a tag sampler, score them against the
references with bootstrap intervals, and keep every generation so the scores can be recomputed."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig
from transformers import set_seed

from mhsupport.runs import artifacts
from mhsupport.evaluation import llm, sampling
from mhsupport.modeling import classifier as classifier_api, devices, loading, tag_likelihood
from mhsupport.settings.config import classifier_config, generator_config, prepare_data_config
from mhsupport.errors import MhsError
from mhsupport.data.examples_io import read_examples
from mhsupport.data.subsets import seeded_subset
from mhsupport.modeling.formatting import build_formatter, generator_tags
from mhsupport.modeling.decoding import generate
from mhsupport.evaluation.generations_io import GENERATIONS
from mhsupport.evaluation.metric_protocols import PROTOCOLS
from mhsupport.evaluation.classification import classification_scores
from mhsupport.evaluation.generation_metrics import GenerationScores, bootstrap_intervals, bootstrap_mean_over_seeds
from mhsupport.modeling.scoring import sequence_nll
from mhsupport.data.taxonomy import Taxonomy

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
    if cfg.generator_source == "llm":
        if cfg.strategy_tag or cfg.sampler != "none":
            raise MhsError("--generator llm takes --prompt, not --strategy-tag or --sampler")
        return
    if cfg.generator_source == "base" and cfg.strategy_tag:
        raise MhsError("generator_source=base is the model without fine-tuning: it has no tags (drop --strategy-tag)")
    sampling.check_sampler(cfg.sampler, tagged=bool(cfg.strategy_tag))


def requires(cfg: DictConfig) -> dict:
    needs = {"prepare_data": ("prepare_data", prepare_data_config(cfg))}
    if cfg.generator_source == "finetuned":
        needs["generator"] = ("train_generator", generator_config(cfg))
    llm_categories = cfg.generator_source == "llm" and cfg.llm.prompt in ("strategy", "oracle")
    if cfg.sampler == "classifier" or (cfg.generator_source == "llm" and cfg.llm.prompt == "strategy"):
        needs["classifier"] = ("train_classifier", classifier_config(cfg, "next_category"))
    if cfg.tag_adherence and (cfg.strategy_tag or llm_categories):
        needs["recogniser"] = ("train_classifier", classifier_config(cfg, "response"))
    return needs


def label(cfg: DictConfig) -> str:
    return f"eval {system_name(cfg)} (seed {cfg.seed})"


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    gcfg = generator_config(cfg)
    label_key = Taxonomy.label_key(cfg.tag_set)
    labels = generator_tags(gcfg)
    data_run = inputs["prepare_data"].path
    examples = seeded_subset(read_examples(data_run, "esconv", "test"), cfg.test_subset,
                                        cfg.test_subset_seed)

    with run_.finished_batches(fresh=cfg.force) as batches:
        lines, loaded = generations(cfg, gcfg, run_, inputs, data_run, examples, labels, label_key, batches)
    run_.device = devices.describe(cfg.runtime, loaded)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    try:
        with run_.build(seed=cfg.seed, resumable=True) as out:
            (out / GENERATIONS).write_text(text)
    except OSError as err:  # e.g. a full disk: keep the generations where they can still be written
        kept = Path(tempfile.gettempdir()) / f"mhs-eval-{run_.run_id}-{GENERATIONS}"
        try:
            kept.write_text(text)
        except OSError:
            raise err from None
        raise MhsError(f"could not write eval run {run_.path} ({err.strerror or err}); its {len(lines)} "
                       f"generations are kept in {kept}. Free space and rerun `{run_.command}`") from None
    log.info("eval wrote %s", run_.path)


def generations(cfg, gcfg, run_, inputs, data_run, examples, labels, label_key, batches) -> tuple[list[dict], dict]:
    """Generate and score every example (each finished batch kept in `batches`) and fill run_.metrics;
    (the lines of the generations file, the models loaded by name)."""
    set_seed(cfg.seed)
    recogniser = classifier_api.load(inputs["recogniser"].path, cfg.runtime) if "recogniser" in inputs else None
    if cfg.generator_source == "llm":
        examples = seeded_subset(examples, cfg.llm.test_subset, cfg.test_subset_seed)
        respond, tags, labels, loaded = llm_responder(cfg, inputs, examples, batches)
    else:
        respond, tags, loaded = model_responder(cfg, gcfg, inputs, data_run, examples, labels, label_key, batches)
    reference_check = None
    if recogniser:
        loaded["recogniser"] = recogniser.model
        # how often the recogniser finds the gold label in the human replies themselves: the ceiling
        # its judgement of generated replies is read against
        recognised_references = recogniser.predict([e["response"] for e in examples])
        hits = [r == e[label_key] for r, e in zip(recognised_references, examples)]
        reference_check = {"accuracy": 100 * sum(hits) / len(hits), "examples": len(hits)}

    d = cfg.decoding
    seeds = list(d.seeds) if d.do_sample and cfg.generator_source != "llm" else [d.seeds[0]]
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
        "system": system_name(cfg), "profile": cfg.generator.profile, "generator_source": cfg.generator_source,
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
                    system_name(cfg), sum(empty_per_seed.values()), len(examples) * len(seeds))
    return lines, loaded


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


def model_responder(cfg, gcfg, inputs, data_run, examples, labels, label_key, batches):
    """Responses of a fine-tuned (or base) generator under the configured tag sampler; the
    models it loaded (name -> model)."""
    generator_run = inputs["generator"].path if cfg.generator_source == "finetuned" else None
    model, tokenizer = loading.load_scored_generator(cfg, generator_run, data_run, devices.inference(cfg.runtime))
    formatter = build_formatter(gcfg, tokenizer)
    prior = None
    if cfg.sampler == "random_prior":
        train = read_examples(data_run, cfg.dataset, "train")
        prior = {label: sum(e[label_key] == label for e in train) / len(train) for label in labels}
    next_classifier = classifier_api.load(inputs["classifier"].path, cfg.runtime) if "classifier" in inputs else None
    loaded = {"generator": model, **({"classifier": next_classifier.model} if next_classifier else {})}
    d = cfg.decoding
    own = None
    if cfg.sampler == "none" and formatter.model_writes_tag:
        own = tag_likelihood.opening_probabilities(model, formatter, [e["context"] for e in examples], d.batch_size,
                                                   cfg.runtime.progress, batches)
    tags = sampling.choose_tags(cfg.sampler, examples, labels or [], label_key, cfg.seed, prior=prior,
                                classifier=next_classifier, classifier_sampling=cfg.classifier_sampling,
                                own_probabilities=own, own_strategy=cfg.own_strategy)

    def respond(seed):
        outputs = generate(model, tokenizer, formatter, [e["context"] for e in examples], tags,
                           batch_size=d.batch_size, max_new_tokens=d.max_new_tokens, do_sample=d.do_sample,
                           top_p=d.top_p, temperature=d.temperature, seed=seed, progress=cfg.runtime.progress,
                           batches=batches, name=f"generate-seed{seed}")
        # No reference NLL here: a generator's perplexity is computed once, not per sampler, by the
        # likelihood stage, on more examples than are generated for.
        return outputs, None, None

    return respond, tags, loaded


LLM_ENDPOINT_KEYS = llm.EndpointKeys(base_url="llm.base_url", model="llm.model_name", api_key_env="llm.api_key_env",
                                     timeout="llm.timeout_s", what="LLM endpoint")


def llm_responder(cfg, inputs, examples, batches):
    """Responses of an instruction-tuned chat model prompted (optionally) with a category; the
    local models it loaded (name -> model)."""
    c = cfg.llm
    categories = [None] * len(examples)
    labels, loaded = None, {}
    if c.prompt in ("strategy", "oracle"):
        labels = list(Taxonomy.from_config(cfg.taxonomy).categories)
        sampler = "classifier" if c.prompt == "strategy" else "oracle"
        next_classifier = classifier_api.load(inputs["classifier"].path, cfg.runtime) if "classifier" in inputs else None
        if next_classifier:
            loaded["classifier"] = next_classifier.model
        categories = sampling.choose_tags(sampler, examples, labels, "category", cfg.seed, classifier=next_classifier)
    prompts = [llm.system_prompt(c, category, cfg.strategy_words) for category in categories]
    max_new = c.max_new_tokens * (3 if c.prompt == "cot" else 1)
    d = cfg.decoding
    requests = [llm.messages(prompt, e["context"]) for prompt, e in zip(prompts, examples)]
    kept = {}
    if c.backend == "openai":
        backend = llm.OpenAIChatBackend(c.base_url, c.model_name, c.api_key_env, c.timeout_s, cfg.runtime.llm.max_retries,
                                        cfg.runtime.llm.concurrency, LLM_ENDPOINT_KEYS)
    else:
        model, tokenizer = loading.load_causal_lm(cfg.generator, devices.inference(cfg.runtime))
        backend = llm.LocalChatBackend(model, tokenizer, cfg.generator.max_context_tokens)
        loaded["generator"] = model
        kept = {"batches": batches}  # a local model's finished batches are kept for a resume

    def respond(seed):
        raw = [" ".join(reply.split()) for reply in backend.complete(requests, max_new, d.batch_size,
                                                                       cfg.runtime.progress, **kept)]
        replies = [llm.final_answer(r) if c.prompt == "cot" else r for r in raw]
        outputs = [{"tag": category, "response": reply, "raw": r} for category, reply, r in zip(categories, replies, raw)]
        if c.backend == "openai":
            return outputs, None, None  # an HTTP endpoint gives no token probabilities here
        groups = [[backend.formatter(prompt).scored_reply(example["context"], None, example["response"])]
                  for prompt, example in zip(prompts, examples)]
        sums, tokens = sequence_nll(backend.model, groups, d.batch_size, pad=backend.tokenizer.pad_token_id or 0,
                                    desc="reference nll", batches=batches)
        return outputs, [float(s[0]) for s in sums], [int(t[0]) for t in tokens]

    return respond, categories, labels, loaded


def system_name(cfg: DictConfig) -> str:
    if cfg.generator_source == "llm":
        return f"LLM ({cfg.llm.backend}{', ' + cfg.llm.model_name if cfg.llm.model_name else ''}) / {cfg.llm.prompt}"
    if cfg.generator_source == "base":
        return "pretrained (untrained model)" if cfg.generator.profile == "tiny" else "pretrained"
    return f"{cfg.dataset}{'+tag' if cfg.strategy_tag else ''} / {cfg.sampler}"
