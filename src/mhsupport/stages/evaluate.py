"""`mhs eval`: generate ESConv test responses under a tag sampler, score them against the
references with bootstrap intervals, and keep every generation so the scores can be recomputed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from transformers import DataCollatorForSeq2Seq, set_seed

from mhsupport import artifacts, classifier as classifier_api, devices, llm, models, sampling, training, upstream
from mhsupport.errors import MhsError
from mhsupport.examples_io import read_examples
from mhsupport.formatting import IGNORE_INDEX
from mhsupport.generation import generate
from mhsupport.metrics import GenerationScores, bootstrap_intervals
from mhsupport.stages import train_classifier, train_generator
from mhsupport.taxonomy import Taxonomy

log = logging.getLogger(__name__)
STAGE = "eval"
GENERATIONS = "generations.jsonl"


def generator_config(cfg: DictConfig) -> DictConfig:
    return upstream.derived_config("train_generator", cfg, {
        "generator": cfg.generator, "dataset": cfg.dataset, "strategy_tag": cfg.strategy_tag,
        "tag_set": cfg.tag_set, "tags_in_history": cfg.tags_in_history})


def classifier_config(cfg: DictConfig, mode: str) -> DictConfig:
    run = cfg.classifier_run
    dataset = run.dataset if mode == "next_category" else "unified"
    if cfg.tag_set == "strategy":
        dataset = "esconv"
    return upstream.derived_config("train_classifier", cfg, {
        "classifier": cfg.classifier, "mode": mode, "tag_set": cfg.tag_set, "dataset": dataset,
        "context_turns": run.context_turns, "history_categories": run.history_categories,
        "class_weighting": run.class_weighting})


def train_generator_command(cfg: DictConfig) -> str:
    parts = ["mhs train dialogpt", f"--profile {cfg.generator.profile}", f"--dataset {cfg.dataset}"]
    parts += ["--strategy-tag"] if cfg.strategy_tag else []
    parts += [f"--tag-set {cfg.tag_set}"] if cfg.tag_set != "category" else []
    return " ".join(parts + upstream.profile_overrides(cfg, "generator"))


def train_classifier_command(ccfg: DictConfig) -> str:
    parts = ["mhs train classifier", f"--profile {ccfg.classifier.profile}", f"--dataset {ccfg.dataset}",
             f"--mode {ccfg.mode}", f"--context-turns {ccfg.context_turns}"]
    parts += [f"--tag-set {ccfg.tag_set}"] if ccfg.tag_set != "category" else []
    parts += ["--history-categories"] if ccfg.history_categories else []
    parts += ["--class-weighting"] if ccfg.class_weighting else []
    return " ".join(parts + upstream.profile_overrides(ccfg, "classifier"))


def check_options(cfg: DictConfig) -> None:
    if cfg.generator_source not in ("finetuned", "base", "llm"):
        raise MhsError(f"generator_source={cfg.generator_source!r}: expected finetuned, base or llm")
    if cfg.generator_source == "llm":
        if cfg.llm.prompt not in llm.PROMPTS:
            raise MhsError(f"llm.prompt={cfg.llm.prompt!r}: expected one of {list(llm.PROMPTS)}")
        if cfg.llm.backend not in ("local", "openai"):
            raise MhsError(f"llm.backend={cfg.llm.backend!r}: expected local or openai")
        if cfg.strategy_tag or cfg.sampler != "none":
            raise MhsError("--generator llm takes --prompt, not --strategy-tag or --sampler")
        return
    if cfg.generator_source == "base" and cfg.strategy_tag:
        raise MhsError("generator_source=base is the model without fine-tuning: it has no tags (drop --strategy-tag)")
    sampling.check_sampler(cfg.sampler, tagged=bool(cfg.strategy_tag))


def plan(cfg: DictConfig) -> artifacts.Run:
    check_options(cfg)
    inputs = {"prepare_data": upstream.prepare_data_run(cfg)}
    if cfg.generator_source == "finetuned":
        gcfg = generator_config(cfg)
        inputs["generator"] = upstream.require_complete(train_generator.plan(gcfg), train_generator_command(cfg))
    llm_categories = cfg.generator_source == "llm" and cfg.llm.prompt in ("strategy", "oracle")
    if cfg.sampler == "classifier" or (cfg.generator_source == "llm" and cfg.llm.prompt == "strategy"):
        ccfg = classifier_config(cfg, "next_category")
        inputs["classifier"] = upstream.require_complete(train_classifier.plan(ccfg), train_classifier_command(ccfg))
    if cfg.tag_adherence and (cfg.strategy_tag or llm_categories):
        rcfg = classifier_config(cfg, "response")
        inputs["recogniser"] = upstream.require_complete(train_classifier.plan(rcfg), train_classifier_command(rcfg))
    return artifacts.plan_run(STAGE, cfg, inputs)


def run(cfg: DictConfig) -> artifacts.StageResult:
    run_ = plan(cfg)
    if run_.up_to_date(cfg.force):
        return artifacts.StageResult(run_, run_.read_metrics(), skipped=True)
    inputs = run_.inputs
    gcfg = generator_config(cfg)
    label_key = train_generator.label_key(gcfg)
    labels = train_generator.tag_labels(gcfg)
    data_run = Path(inputs["prepare_data"]["run"])
    examples = training.seeded_subset(read_examples(data_run, "esconv", "test"), cfg.test_subset, cfg.seed)

    set_seed(cfg.seed)
    recogniser = classifier_api.load(inputs["recogniser"]["run"], cfg.runtime) if "recogniser" in inputs else None
    if cfg.generator_source == "llm":
        examples = training.seeded_subset(examples, cfg.llm.test_subset, cfg.seed)
        respond, tags, labels, loaded = llm_responder(cfg, inputs, examples, label_key)
    else:
        respond, tags, loaded = model_responder(cfg, gcfg, inputs, data_run, examples, labels, label_key)
    if recogniser:
        loaded["recogniser"] = recogniser.model

    d = cfg.decoding
    seeds = list(d.seeds) if d.do_sample and cfg.generator_source != "llm" else [d.seeds[0]]
    lines, per_seed = [], {}
    for seed in seeds:
        outputs, nll, counts = respond(seed)
        used_tags = [o["tag"] for o in outputs]
        responses = [o["response"] for o in outputs]
        recognised = recogniser.predict(responses) if recogniser else None
        gold = [e[label_key] for e in examples]
        scores = GenerationScores(responses, [e["response"] for e in examples], nll, counts,
                                  used_tags if labels else None, gold, recognised)
        per_seed[str(seed)] = bootstrap_intervals(scores, cfg.bootstrap.resamples, cfg.bootstrap.seed)
        for i, (example, output) in enumerate(zip(examples, outputs)):
            lines.append({"seed": seed, "conversation_id": example["conversation_id"],
                          "turn_index": example["turn_index"], "context": example["context"],
                          "reference": example["response"], "gold_label": example[label_key],
                          "gold_category": example["category"], "gold_strategy": example["strategy"],
                          "chosen_tag": tags[i], "tag": output["tag"], "response": output["response"],
                          "raw_output": output.get("raw"),
                          "reference_nll": nll[i] if nll else None, "reference_tokens": counts[i] if counts else None,
                          "recognised": recognised[i] if recognised else None})

    run_.metrics = {
        "system": system_name(cfg), "profile": cfg.generator.profile, "generator_source": cfg.generator_source,
        "dataset": cfg.dataset, "strategy_tag": bool(cfg.strategy_tag), "sampler": cfg.sampler,
        "examples": len(examples), "decoding": "sampled" if len(seeds) > 1 or d.do_sample else "greedy",
        "seeds": seeds,
        "metrics": mean_over_seeds(per_seed), "per_seed": per_seed,
        "note": ("tiny profile: a plumbing check; these numbers mean nothing" if cfg.generator.profile == "tiny" else ""),
    }
    run_.device = devices.describe(cfg.runtime, loaded)
    with run_.build(seed=cfg.seed) as out:
        with open(out / GENERATIONS, "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    log.info("eval wrote %s", run_.path)
    return artifacts.StageResult(run_, run_.metrics, skipped=False)


def model_responder(cfg, gcfg, inputs, data_run, examples, labels, label_key):
    """Responses of a fine-tuned (or base) generator under the configured tag sampler; the
    models it loaded (name -> model)."""
    placement = devices.inference(cfg.runtime)
    if cfg.generator_source == "finetuned":
        model, tokenizer = models.load_saved_causal_lm(Path(inputs["generator"]["run"]) / "model", placement)
    else:  # the model before fine-tuning (tiny: untrained, with the tokenizer training would build)
        train = training.seeded_subset(read_examples(data_run, cfg.dataset, "train"), cfg.generator.train_subset,
                                       cfg.seed)
        model, tokenizer = models.load_causal_lm(cfg.generator, placement,
                                                 train_texts=train_generator.tokenizer_texts(train))
    formatter = train_generator.build_formatter(gcfg, tokenizer)
    prior = None
    if cfg.sampler == "random_prior":
        train = read_examples(data_run, cfg.dataset, "train")
        prior = {label: sum(e[label_key] == label for e in train) / len(train) for label in labels}
    next_classifier = classifier_api.load(inputs["classifier"]["run"], cfg.runtime) if "classifier" in inputs else None
    loaded = {"generator": model, **({"classifier": next_classifier.model} if next_classifier else {})}
    tags = sampling.choose_tags(cfg.sampler, examples, labels or [], label_key, cfg.seed, prior=prior,
                                classifier=next_classifier, classifier_sampling=cfg.classifier_sampling)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    d = cfg.decoding

    def respond(seed):
        outputs = generate(model, tokenizer, formatter, [e["context"] for e in examples], tags,
                           batch_size=d.batch_size, max_new_tokens=d.max_new_tokens, do_sample=d.do_sample,
                           top_p=d.top_p, temperature=d.temperature, seed=seed, progress=cfg.runtime.progress)
        nll, counts = reference_nll(model, formatter, examples, [o["tag"] for o in outputs], label_key, collator,
                                    d.batch_size)
        return outputs, nll, counts

    return respond, tags, loaded


def llm_responder(cfg, inputs, examples, label_key):
    """Responses of an instruction-tuned chat model prompted (optionally) with a category; the
    local models it loaded (name -> model)."""
    c = cfg.llm
    categories = [None] * len(examples)
    labels, loaded = None, {}
    if c.prompt in ("strategy", "oracle"):
        labels = list(Taxonomy.from_config(cfg.taxonomy).categories)
        sampler = "classifier" if c.prompt == "strategy" else "oracle"
        next_classifier = classifier_api.load(inputs["classifier"]["run"], cfg.runtime) if "classifier" in inputs else None
        if next_classifier:
            loaded["classifier"] = next_classifier.model
        categories = sampling.choose_tags(sampler, examples, labels, "category", cfg.seed, classifier=next_classifier)
    prompts = [llm.system_prompt(c, category) for category in categories]
    max_new = c.max_new_tokens * (3 if c.prompt == "cot" else 1)
    d = cfg.decoding
    contexts = [e["context"] for e in examples]
    if c.backend == "openai":
        backend = llm.OpenAICompatibleBackend(c)
    else:
        model, tokenizer = models.load_causal_lm(cfg.generator, devices.inference(cfg.runtime))
        backend = llm.LocalChatBackend(model, tokenizer, cfg.generator.max_context_tokens)
        loaded["generator"] = model

    def respond(seed):
        raw = backend.respond(contexts, prompts, max_new, d.batch_size, cfg.runtime.progress)
        replies = [llm.final_answer(r) if c.prompt == "cot" else r for r in raw]
        outputs = [{"tag": category, "response": reply, "raw": r} for category, reply, r in zip(categories, replies, raw)]
        if c.backend == "openai":
            return outputs, None, None  # an HTTP endpoint gives no token probabilities here
        nll, counts = [0.0] * len(examples), [0] * len(examples)
        collator = DataCollatorForSeq2Seq(backend.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        for prompt in sorted(set(prompts)):
            rows = [i for i, p in enumerate(prompts) if p == prompt]
            part_nll, part_counts = reference_nll(backend.model, backend.formatter(prompt), [examples[i] for i in rows],
                                                  [None] * len(rows), label_key, collator, d.batch_size)
            for i, value, count in zip(rows, part_nll, part_counts):
                nll[i], counts[i] = value, count
        return outputs, nll, counts

    return respond, categories, labels, loaded


def reference_nll(model, formatter, examples, tags, label_key, collator, batch_size):
    """NLL of each reference response (tag excluded) given the context and the tag the generator used."""
    features = []
    for example, tag in zip(examples, tags):
        if formatter.tagged and tag is not None:
            f = formatter.training_features({**example, label_key: tag}, label_key)
            f["labels"][f["labels"].index(formatter.tag_ids[tag])] = IGNORE_INDEX
        else:
            prompt, target = formatter.prompt_ids(example["context"]), formatter.response_ids(example["response"])
            f = {"input_ids": prompt + target, "attention_mask": [1] * (len(prompt) + len(target)),
                 "labels": [IGNORE_INDEX] * len(prompt) + target}
        features.append(f)
    return training.per_example_nll(model, features, collator, batch_size)


def mean_over_seeds(per_seed: dict) -> dict:
    """Each metric's value and interval bounds averaged over decoding seeds (one seed: itself)."""
    names = next(iter(per_seed.values())).keys()
    return {name: {key: None if any(s[name][key] is None for s in per_seed.values())
                   else float(np.mean([s[name][key] for s in per_seed.values()]))
                   for key in ("value", "ci_low", "ci_high")} for name in names}


def system_name(cfg: DictConfig) -> str:
    if cfg.generator_source == "llm":
        return f"LLM ({cfg.llm.backend}{', ' + cfg.llm.model_name if cfg.llm.model_name else ''}) / {cfg.llm.prompt}"
    if cfg.generator_source == "base":
        return "pretrained (untrained model)" if cfg.generator.profile == "tiny" else "pretrained"
    return f"{cfg.dataset}{'+tag' if cfg.strategy_tag else ''} / {cfg.sampler}"


def read_generations(run_dir: Path, seed: int | None = None) -> list[dict]:
    """An eval run's generations.jsonl lines (of one decoding seed: the first by default)."""
    path = Path(run_dir) / GENERATIONS
    if not path.is_file():
        raise MhsError(f"{path} not found: expected an `mhs eval` run directory")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    seed = lines[0]["seed"] if seed is None else seed
    return [line for line in lines if line["seed"] == seed]


def scores_from_generations(lines: list[dict]) -> GenerationScores:
    """The scores of stored generations, recomputed exactly as `mhs eval` computed them."""
    tagged = any(line["tag"] is not None for line in lines)
    recognised = [line["recognised"] for line in lines] if lines[0]["recognised"] is not None else None
    has_nll = lines[0]["reference_nll"] is not None
    return GenerationScores([line["response"] for line in lines], [line["reference"] for line in lines],
                            [line["reference_nll"] for line in lines] if has_nll else None,
                            [line["reference_tokens"] for line in lines] if has_nll else None,
                            [line["tag"] for line in lines] if tagged else None,
                            [line["gold_label"] for line in lines], recognised)
