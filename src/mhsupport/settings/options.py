"""Every allowed config value, and the one check of a config's values (types, ranges, choices).

The CLI takes its `choices` from here, and the pipeline validates each stage's config here
once, before anything is planned or written: a bad value is one line naming the key, the
value, what was expected and how to set it.
"""

from __future__ import annotations

import math
import re

from omegaconf import DictConfig, ListConfig, OmegaConf

from mhsupport.errors import MhsError
from mhsupport.settings.config import CONFIG_DIR
from mhsupport.evaluation.sampling import SAMPLERS
from mhsupport.modeling.formatting import FORMATTERS, LONG_REPLIES, TAG_FORMATS


DATASETS = ("esconv", "unified")
TAG_SETS = ("category", "strategy")
MODES = ("next_category", "response")
CHAT_DEFAULT_SAMPLER = "classifier if_tagged"  # chat: classifier for a tagged generator, none otherwise
CLASSIFIER_SAMPLING = ("argmax", "sample")
OWN_STRATEGY = ("sample", "argmax")
GENERATOR_SOURCES = ("finetuned", "base", "llm")
PROMPTS = ("vanilla", "cot", "strategy", "oracle")
LLM_BACKENDS = ("local", "openai")
JUDGE_BACKENDS = ("none", "openai", "local")
JUDGE_DTYPES = ("float32", "bfloat16")
JUDGE_TABLES = ("table3", "table5", "table6")
TRAINABLE = ("all", "top_layers", "lora")
LORA_SAVES = ("adapter", "merged")
_ABSENT = object()
MODEL_SOURCES = {"generator": ("scratch", "pretrained", "gguf"), "classifier": ("scratch", "pretrained", "local")}


def profiles() -> tuple[str, ...]:
    """The profiles: the profile config group's files (paper, offline, cpu, tiny)."""
    return tuple(sorted(p.stem for p in (CONFIG_DIR / "profile").glob("*.yaml")))


def _choice(values):
    def check(value):
        return value in values, f"one of {', '.join(map(str, values))}"
    return check


def _int(low: int, optional: bool = False):
    def check(value):
        ok = (optional and value is None) or (isinstance(value, int) and not isinstance(value, bool) and value >= low)
        return ok, f"{'null or ' if optional else ''}an integer >= {low}"
    return check


def _number(low: float, inclusive: bool = True, high: float | None = None, high_inclusive: bool = True):
    def check(value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            (value >= low if inclusive else value > low) and \
            (high is None or (value <= high if high_inclusive else value < high))
        bounds = f"{'>=' if inclusive else '>'} {low}" + \
            (f" and {'<=' if high_inclusive else '<'} {high}" if high is not None else "")
        return ok, f"a finite number {bounds}"
    return check


def _bf16(value):
    return value == "auto" or isinstance(value, bool), "auto, true or false"


def _device(value):
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None, \
        "auto, cpu, cuda or cuda:N"


def _bool(value):
    return isinstance(value, bool), "true or false"


def _distinct_ints(value):
    ok = isinstance(value, (list, ListConfig)) and len(value) > 0 and \
        all(isinstance(v, int) and not isinstance(v, bool) for v in value) and len(set(value)) == len(value)
    return ok, "a non-empty list of distinct integers, e.g. [0,1,2]"


def _report_to(value):
    """Resolved by `curves.report_to`, which raises its own one-line error for an unknown or
    missing logger; imported here only when a config has the key (it pulls in transformers)."""
    from mhsupport.training.curves import report_to

    report_to(value)
    return True, ""


def _target_modules(value):
    ok = value == "all-linear" or (isinstance(value, (list, ListConfig)) and len(value) > 0
                                   and all(isinstance(v, str) and v for v in value))
    return ok, "all-linear or a non-empty list of module names, e.g. [q_proj,v_proj]"


def _samplers(value):
    ok = isinstance(value, (list, ListConfig)) and len(value) > 0 and all(v in SAMPLERS for v in value) \
        and len(set(value)) == len(value)
    return ok, f"a non-empty list of distinct samplers from {', '.join(SAMPLERS)}"


_MODEL_RULES = {
    "epochs": _int(1), "batch_size": _int(1), "grad_accum": _int(1), "eval_batch_size": _int(1),
    "save_steps": _int(1), "learning_rate": _number(0, inclusive=False), "warmup_ratio": _number(0, high=1.0, high_inclusive=False),
    "weight_decay": _number(0), "train_subset": _int(1, optional=True),
}
RULES = {
    "seed": _int(0), "subset_seed": _int(0), "test_subset_seed": _int(0), "force": _bool,
    "seeds": lambda value: (value is None or _distinct_ints(value)[0],
                            "null or a non-empty list of distinct integers, e.g. [1,2,3]"),
    "dataset": _choice(DATASETS), "tag_set": _choice(TAG_SETS), "mode": _choice(MODES),
    "strategy_tag": _bool, "tags_in_history": _bool, "history_categories": _bool, "class_weighting": _bool,
    "context_turns": _int(1), "tag_adherence": _bool, "score_references": _bool,
    "classifier_run.dataset": _choice(DATASETS), "classifier_run.context_turns": _int(1),
    "classifier_run.history_categories": _bool, "classifier_run.class_weighting": _bool,
    "runtime.device": _device, "runtime.bf16": _bf16, "runtime.report_to": _report_to,
    "sampler": _choice(SAMPLERS + (CHAT_DEFAULT_SAMPLER,)), "classifier_sampling": _choice(CLASSIFIER_SAMPLING),
    "own_strategy": _choice(OWN_STRATEGY),
    "generator_source": _choice(GENERATOR_SOURCES), "test_subset": _int(1, optional=True),
    "max_new_tokens": _int(1), "max_context_turns": _int(1),
    "table4_samplers": _samplers, "significance_resamples": _int(1),
    "data.max_context_turns": _int(1), "data.esconv_split_seed": _int(0),
    "llm.prompt": _choice(PROMPTS), "llm.backend": _choice(LLM_BACKENDS), "llm.test_subset": _int(1, optional=True),
    "llm.max_new_tokens": _int(1), "llm.timeout_s": _number(0, inclusive=False),
    "runtime.llm.concurrency": _int(1), "runtime.llm.max_retries": _int(0),
    "judge.backend": _choice(JUDGE_BACKENDS), "judge.temperature": _number(0), "judge.max_tokens": _int(1),
    "judge.seed": _int(0), "judge.examples": _int(1, optional=True), "judge.example_seed": _int(0),
    "judge.length_match_ratio": _number(0, high=1.0, high_inclusive=False),
    "judge.scoring.tie_band": _number(0), "judge.scoring.neutral_weight": _number(0, high=1.0),
    "judge.scoring.dtype": _choice(JUDGE_DTYPES),
    "judge.scoring.batch_size": _int(1), "judge.scoring.method": _choice(("options", "reply_likelihood")),
    "judge.known_pairs": _bool, "judge.validity.split": _choice(("test", "valid")),
    "judge.validity.pairs_per_kind": _int(1), "judge.validity.seed": _int(0), "judge.validity.truncate_words": _int(1),
    "judge.validity.min_words": _int(2), "judge.prompts.context_turns": _int(1, optional=True),
    "judge.prompts.reply_context_turns": _int(1, optional=True),
    "judge.validity.bars.accuracy": _number(0, high=100), "judge.validity.bars.position_consistency": _number(0, high=100),
    "judge_model.size_bytes": _int(1),
    "runtime.judge.concurrency": _int(1), "runtime.judge.timeout_s": _number(0, inclusive=False),
    "runtime.judge.max_retries": _int(0),
    "decoding.do_sample": _bool, "decoding.seeds": _distinct_ints, "decoding.top_p": _number(0, False, 1.0),
    "decoding.temperature": _number(0, inclusive=False), "decoding.max_new_tokens": _int(1),
    "decoding.batch_size": _int(1), "decoding.guidance_scale": _number(0), "decoding.guidance_tokens": _int(0),
    "bootstrap.resamples": _int(1), "bootstrap.seed": _int(0),
    **{f"tfidf_baseline_by_task.{mode}.{tag_set}.{key}": rule for mode in MODES for tag_set in TAG_SETS
       for key, rule in (("ngram_max", _int(1)), ("context_turns", _int(1)), ("max_iter", _int(1)),
                         ("C", _number(0, inclusive=False)))},
    "model_selection": _bool,
    **{f"generator.{k}": rule for k, rule in _MODEL_RULES.items()},
    "generator.source": _choice(MODEL_SOURCES["generator"]), "generator.family": _choice(tuple(FORMATTERS)),
    "generator.trainable": _choice(TRAINABLE), "generator.top_layers": _int(0),
    "generator.tag_lr_scale": _number(0, inclusive=False), "generator.tag_format": _choice(TAG_FORMATS),
    "generator.long_replies": _choice(LONG_REPLIES),
    "generator.tag_contrast_weight": _number(0), "generator.tag_contrast_negatives": _int(1),
    "generator.lora.r": _int(1), "generator.lora.alpha": _number(0, inclusive=False),
    "generator.lora.dropout": _number(0, high=1.0, high_inclusive=False),
    "generator.lora.target_modules": _target_modules, "generator.lora.save": _choice(LORA_SAVES),
    "generator.max_context_tokens": _int(1), "generator.max_response_tokens": _int(1),
    "generator.valid_subset": _int(1, optional=True), "generator.train_eval_subset": _int(1, optional=True),
    **{f"classifier.{k}": rule for k, rule in _MODEL_RULES.items()},
    "classifier.source": _choice(MODEL_SOURCES["classifier"]), "classifier.max_length": _int(1),
    **{f"classifier.architecture.{k}": _int(1)
       for k in ("hidden_size", "intermediate_size", "max_positions", "num_heads", "num_layers")},
    **{f"generator.architecture.{k}": _int(1) for k in ("n_embd", "n_head", "n_layer", "n_positions")},
    **{f"{model}.tokenizer.vocab_size": _int(1) for model in ("generator", "classifier")},
    **{f"{model}.tokenizer.min_frequency": _int(0) for model in ("generator", "classifier")},
    **{f"data.esconv_split_fractions.{split}": _number(0, False, 1.0, False) for split in ("train", "valid")},
    **{f"data.epitome_bucket_bounds.{split}": _int(0) for split in ("train", "valid")},
    "runtime.batch_size": _int(1), "runtime.dataloader_workers": _int(0), "runtime.logging_steps": _int(1),
    "screen_replies": _bool, "safety.patterns_only": _bool, "safety.middle_windows": _bool, "safety.bf16": _bf16,
    "safety.pooling": _choice(("mean", "mean_max")),  # safety/encoder.py POOLINGS (a layer above this one)
    "safety.seeker_turns": _int(1), "safety.logistic_c": _number(0, inclusive=False),
    **{f"safety.{key}_threshold": _number(0) for key in ("seeker", "reply", "acknowledgement")},  # above 1: off
    "safety.max_length": _int(1), "safety.batch_size": _int(1), "safety.everyday_seeker": _int(0),
    "safety.everyday_replies": _int(0), "safety.everyday_seed": _int(0),
    "safety_encoder.size_bytes": _int(1),
}


def validate(cfg: DictConfig) -> None:
    """Check every key of `cfg` that has a rule; then the rules between keys."""
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        ok, expected = rule(value)
        if not ok:
            raise MhsError(f"config key {key}={value!r}: expected {expected} (set it on the command line, "
                           f"e.g. {key}={_example(expected)})")
    generator = cfg.get("generator")
    if generator is not None and generator.get("trainable") == "top_layers" and generator.get("top_layers", 1) < 1:
        raise MhsError("generator.trainable=top_layers needs generator.top_layers >= 1 (or generator.trainable=all)")
    if generator is not None and generator.get("trainable") == "lora" and generator.get("tag_lr_scale", 1) != 1:
        raise MhsError("generator.tag_lr_scale applies to the embedding rows of trainable=all|top_layers; "
                       "with trainable=lora the tag rows are peft's trainable tokens: set generator.tag_lr_scale=1")
    if generator is not None and generator.get("trainable") == "lora" and generator.get("tag_contrast_weight", 0) > 0:
        raise MhsError("generator.tag_contrast_weight trains trainable=all|top_layers models; with trainable=lora "
                       "set generator.tag_contrast_weight=0")
    if generator is not None and generator.get("tag_format", "token") != "token":
        if generator.get("tag_lr_scale", 1) != 1:
            raise MhsError(f"generator.tag_lr_scale acts on tag tokens; generator.tag_format={generator.tag_format} "
                           "writes the strategy in words: set generator.tag_lr_scale=1 (or tag_format=token)")
        if generator.get("tag_format") == "instruction" and generator.get("tag_contrast_weight", 0) > 0:
            raise MhsError("generator.tag_contrast_weight contrasts the openings of a reply (tag_format token or words); "
                           "an instruction is part of the prompt: set generator.tag_contrast_weight=0")
        _check_strategy_words(cfg)
    data = cfg.get("data")
    if data is not None and "esconv_split_fractions" in data:
        fractions = data.esconv_split_fractions
        if fractions.train + fractions.valid >= 1:
            raise MhsError(f"data.esconv_split_fractions: train {fractions.train} + valid {fractions.valid} must be < 1 "
                           "(the rest is test), e.g. data.esconv_split_fractions.valid=0.15")
    if data is not None and "epitome_bucket_bounds" in data:
        bounds = data.epitome_bucket_bounds
        if not 0 < bounds.train < bounds.valid < 100:
            raise MhsError(f"data.epitome_bucket_bounds: expected 0 < train < valid < 100 (buckets of 100; the rest "
                           f"is test), got train={bounds.train} valid={bounds.valid}")
    for model, width, heads in (("generator", "n_embd", "n_head"), ("classifier", "hidden_size", "num_heads")):
        architecture = (cfg.get(model) or {}).get("architecture")
        if architecture is not None and architecture[width] % architecture[heads]:
            raise MhsError(f"{model}.architecture.{width}={architecture[width]} must be a multiple of "
                           f"{model}.architecture.{heads}={architecture[heads]} (each head gets an equal share)")
    if cfg.get("tag_set") == "strategy" and cfg.get("dataset", "esconv") != "esconv":
        raise MhsError("tag_set=strategy (the 8 ESConv strategies) needs dataset=esconv: EPITOME has no such "
                       "labels (use --dataset esconv)")



def _check_strategy_words(cfg: DictConfig) -> None:
    """Every label of the tag set has words, and the templates name only {label} and {description}."""
    words = cfg.get("strategy_words")
    taxonomy = cfg.get("taxonomy")
    if words is None or taxonomy is None:
        return
    labels = taxonomy.categories if cfg.get("tag_set", "category") == "category" else taxonomy.esconv_strategies
    missing = [label for label in labels if not words.get(label)]
    if missing:
        raise MhsError(f"strategy_words: no words for {missing} (configs/strategy_words/*.yaml; "
                       f"e.g. 'strategy_words.{missing[0]}=ask them a question')")
    for key in ("strategy_opening", "strategy_instruction"):
        template = cfg.generator.get(key, "")
        try:
            template.format(label="x", description="y")
        except (KeyError, IndexError, ValueError) as err:
            raise MhsError(f"generator.{key}={template!r}: a template may name only {{label}} and {{description}} "
                           f"({type(err).__name__}: {err})") from None


def _example(expected: str) -> str:
    if expected.startswith("one of "):
        return expected[len("one of "):].split(",")[0]
    if "list" in expected:
        return "[0]"
    if expected == "true or false":
        return "true"
    return "1"
