"""The systems an eval scores, behind one interface chosen once from `generator_source`: a fine-tuned
generator under a tag sampler, the same model without fine-tuning (base), or an instruction-tuned
chat model prompted with (or without) a strategy (llm). The eval stage asks its responder which
upstream runs it needs, what it is called, which examples and decoding seeds it is scored on, and
for its replies (each batch of them kept in the run's finished batches, so that a stopped eval
resumes); it never asks which kind of responder it holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from mhsupport.data.examples_io import read_examples
from mhsupport.data.subsets import seeded_subset
from mhsupport.data.taxonomy import Taxonomy
from mhsupport.errors import MhsError
from mhsupport.evaluation import llm, replies_io, sampling
from mhsupport.modeling import classifier as classifier_api, devices, loading, tag_likelihood
from mhsupport.modeling.decoding import generate
from mhsupport.modeling.formatting import build_formatter
from mhsupport.modeling.scoring import sequence_nll

# respond(decoding seed) -> (outputs: [{"tag", "response", "raw"?, "recognised"?}], reference NLL per example or
# None, reference tokens per example or None); "recognised": the recogniser's category of the reply, where the
# responder read it already
Respond = Callable[[int], tuple[list[dict], list[float] | None, list[int] | None]]


@dataclass
class Replies:
    """What a responder prepared: its replies per decoding seed, the tag chosen for each example,
    the labels its tags are predictions of (None: its tags predict nothing), the models it loaded."""
    respond: Respond
    tags: list[str | None]
    labels: list[str] | None
    loaded: dict
    reference_check: dict | None = None  # the recogniser on the human replies, where the responder read them already


class GeneratorResponder:
    """A causal LM fine-tuned by `mhs train dialogpt` (its run is an upstream input), each reply's tag
    chosen by the configured sampler."""

    fine_tuned = True  # reads the generator's training run

    def __init__(self, cfg):
        self.cfg = cfg

    def check(self) -> None:
        sampling.check_sampler(self.cfg.sampler, tagged=bool(self.cfg.strategy_tag))

    def upstream(self) -> list[str]:
        """The upstream runs it reads, in the order they are planned: generator, classifier (next
        category), recogniser (a reply's category)."""
        cfg = self.cfg
        needs = ["generator"] if self.fine_tuned else []
        if cfg.sampler == "classifier":
            needs.append("classifier")
        if cfg.tag_adherence and cfg.strategy_tag:
            needs.append("recogniser")
        return needs

    def name(self) -> str:
        cfg = self.cfg
        return f"{cfg.dataset}{'+tag' if cfg.strategy_tag else ''} / {cfg.sampler}"

    def scored_examples(self, examples: list[dict]) -> list[dict]:
        return examples

    def decoding_seeds(self) -> list[int]:
        d = self.cfg.decoding
        return list(d.seeds) if d.do_sample else [d.seeds[0]]

    def prepare(self, inputs: dict, gcfg, examples: list[dict], labels: list[str], label_key: str,
                batches) -> Replies:
        cfg = self.cfg
        data_run = inputs["prepare_data"].path
        generator_run = inputs["generator"].path if self.fine_tuned else None
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

        # An untagged model's reference NLL is read from the prompt's cache before decoding (once, with the
        # first decoding seed): its ppl, and the likelihoods the report reads for it where the likelihood
        # stage would score the same examples. A tagged model's comes from its generation pass.
        references = ([formatter.response_ids(e["response"]) for e in examples]
                      if all(tag is None for tag in tags) else None)
        scored = {}  # the reference's NLL and tokens, read with the first decoding seed: the same for every seed

        def respond(seed):
            reading = references if references is not None and not scored else None
            outputs = generate(model, tokenizer, formatter, [e["context"] for e in examples], tags,
                               batch_size=d.batch_size, max_new_tokens=d.max_new_tokens, do_sample=d.do_sample,
                               top_p=d.top_p, temperature=d.temperature, seed=seed, progress=cfg.runtime.progress,
                               batches=batches, name=f"generate-seed{seed}{'-scored' if reading else ''}",
                               references=reading)
            if reading is not None:
                scored.update(nll=[o["reference_nll"] for o in outputs], tokens=[o["reference_tokens"] for o in outputs])
            return outputs, scored.get("nll"), scored.get("tokens")

        return Replies(respond, tags, labels, loaded)


class TagSelectionResponder(GeneratorResponder):
    """A tagged fine-tuned generator: its replies under every tag come from one generation pass
    (`mhs generate`), and the sampler chooses, per example, which of them is shown. The replies equal
    what generating under the chosen tags gives (same seeds), for the cost of the choice."""

    def upstream(self) -> list[str]:
        return ["generation"] + (["classifier"] if self.cfg.sampler == "classifier" else [])

    def prepare(self, inputs: dict, gcfg, examples: list[dict], labels: list[str], label_key: str,
                batches) -> Replies:
        cfg = self.cfg
        generation = inputs["generation"]
        made = generation.read_metrics()
        variants = made["tags"]
        seeds = self.decoding_seeds()
        passed = replies_io.read_replies(generation, examples, variants, seeds)
        prior = None
        if cfg.sampler == "random_prior":
            train = read_examples(inputs["prepare_data"].path, cfg.dataset, "train")
            prior = {label: sum(e[label_key] == label for e in train) / len(train) for label in labels}
        next_classifier = classifier_api.load(inputs["classifier"].path, cfg.runtime) if "classifier" in inputs else None
        own = None
        if cfg.sampler == "none" and None not in variants:  # the model's own tag: drawn from its opening probabilities
            first = seeds[0]
            own = softmax(np.array([[passed[(first, e["conversation_id"], e["turn_index"], label)]["own_logprob"]
                                     for label in labels] for e in examples], dtype=np.float64), axis=1)
        tags = sampling.choose_tags(cfg.sampler, examples, labels or [], label_key, cfg.seed, prior=prior,
                                    classifier=next_classifier, classifier_sampling=cfg.classifier_sampling,
                                    own_probabilities=own, own_strategy=cfg.own_strategy)
        reference_check = None
        references = (made.get("counterfactual") or {}).get("recogniser_on_references")
        if cfg.tag_adherence and references:
            reference_check = {"accuracy": references["value"], "examples": references["examples"]}

        def respond(seed):
            outputs = []
            for example, tag in zip(examples, tags):
                line = passed[(seed, example["conversation_id"], example["turn_index"], tag)]
                outputs.append({"tag": tag, "response": line["response"], "tokens": line["tokens"],
                                **({"recognised": line["recognised"]} if cfg.tag_adherence else {})})
            return outputs, None, None

        loaded = {"classifier": next_classifier.model} if next_classifier else {}
        return Replies(respond, tags, labels, loaded, reference_check)


class BaseModelResponder(GeneratorResponder):
    """The generator profile's model without fine-tuning (Table 2's "pretrained" row): no training
    run, and no tags."""

    fine_tuned = False

    def check(self) -> None:
        if self.cfg.strategy_tag:
            raise MhsError("generator_source=base is the model without fine-tuning: it has no tags (drop --strategy-tag)")
        super().check()

    def name(self) -> str:
        return "pretrained (untrained model)" if self.cfg.generator.profile == "tiny" else "pretrained"


LLM_ENDPOINT_KEYS = llm.EndpointKeys(base_url="llm.base_url", model="llm.model_name", api_key_env="llm.api_key_env",
                                     timeout="llm.timeout_s", what="LLM endpoint")


class PromptedLLMResponder:
    """An instruction-tuned chat model prompted (the paper's section 4.3), optionally with a category:
    the classifier's (prompt strategy) or the gold one (prompt oracle). Local backend: the generator
    profile's base model; openai backend: any OpenAI-compatible endpoint. Scored on llm.test_subset
    of the eval's examples, greedily."""

    def __init__(self, cfg):
        self.cfg = cfg

    def check(self) -> None:
        if self.cfg.strategy_tag or self.cfg.sampler != "none":
            raise MhsError("--generator llm takes --prompt, not --strategy-tag or --sampler")

    @property
    def given_categories(self) -> bool:
        return self.cfg.llm.prompt in ("strategy", "oracle")

    def upstream(self) -> list[str]:
        needs = ["classifier"] if self.cfg.llm.prompt == "strategy" else []
        if self.cfg.tag_adherence and self.given_categories:
            needs.append("recogniser")
        return needs

    def name(self) -> str:
        c = self.cfg.llm
        return f"LLM ({c.backend}{', ' + c.model_name if c.model_name else ''}) / {c.prompt}"

    def scored_examples(self, examples: list[dict]) -> list[dict]:
        return seeded_subset(examples, self.cfg.llm.test_subset, self.cfg.test_subset_seed)

    def decoding_seeds(self) -> list[int]:
        return [self.cfg.decoding.seeds[0]]

    def prepare(self, inputs: dict, gcfg, examples: list[dict], labels: list[str], label_key: str,
                batches) -> Replies:
        cfg, c = self.cfg, self.cfg.llm
        categories = [None] * len(examples)
        labels, loaded = None, {}
        if self.given_categories:
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
            backend = llm.OpenAIChatBackend(c.base_url, c.model_name, c.api_key_env, c.timeout_s,
                                            cfg.runtime.llm.max_retries, cfg.runtime.llm.concurrency, LLM_ENDPOINT_KEYS)
        else:
            model, tokenizer = loading.load_causal_lm(cfg.generator, devices.inference(cfg.runtime))
            backend = llm.LocalChatBackend(model, tokenizer, cfg.generator.max_context_tokens)
            loaded["generator"] = model
            kept = {"batches": batches}  # a local model's finished batches are kept for a resume

        def respond(seed):
            raw = [" ".join(reply.split()) for reply in backend.complete(requests, max_new, d.batch_size,
                                                                           cfg.runtime.progress, **kept)]
            replies = [llm.final_answer(r) if c.prompt == "cot" else r for r in raw]
            outputs = [{"tag": category, "response": reply, "raw": r}
                       for category, reply, r in zip(categories, replies, raw)]
            if c.backend == "openai":
                return outputs, None, None  # an HTTP endpoint gives no token probabilities here
            groups = [[backend.formatter(prompt).scored_reply(example["context"], None, example["response"])]
                      for prompt, example in zip(prompts, examples)]
            sums, tokens = sequence_nll(backend.model, groups, d.batch_size, pad=backend.tokenizer.pad_token_id or 0,
                                        desc="reference nll", batches=batches)
            return outputs, [float(s[0]) for s in sums], [int(t[0]) for t in tokens]

        return Replies(respond, categories, labels, loaded)


RESPONDERS = {"finetuned": GeneratorResponder, "base": BaseModelResponder, "llm": PromptedLLMResponder}


def responder(cfg) -> GeneratorResponder | PromptedLLMResponder:
    """The responder an eval config names (generator_source): a tagged fine-tuned generator's replies
    are chosen from its generation pass."""
    if cfg.generator_source == "finetuned" and cfg.strategy_tag:
        return TagSelectionResponder(cfg)
    return RESPONDERS[cfg.generator_source](cfg)
