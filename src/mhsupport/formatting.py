"""Turning examples into token ids, one formatter per model family (DESIGN.md section 4).

Both families: the context is truncated from the left (the most recent tokens are kept),
the response is capped, and the loss covers only the tag and the response tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from mhsupport.taxonomy import Taxonomy

IGNORE_INDEX = -100
SETTINGS_FILE = "generator.json"


def tag_token(label: str) -> str:
    """The special token of a category or strategy: 'Providing Suggestions' -> '<|providing_suggestions|>'."""
    return "<|" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") + "|>"


class Formatter:
    """Shared parts; subclasses build the prompt."""

    def __init__(self, tokenizer, max_context_tokens: int, max_response_tokens: int, labels: list[str] | None,
                 tags_in_history: bool = False, system_prompt: str | None = None, label_key: str = "category"):
        self.tokenizer = tokenizer
        self.label_key = label_key  # the turn field holding a tag: "category" or "strategy"
        self.max_context_tokens = max_context_tokens
        self.max_response_tokens = max_response_tokens
        self.labels = labels  # None: untagged model
        self.tags_in_history = tags_in_history
        self.system_prompt = system_prompt
        self.tag_ids = {label: tokenizer.convert_tokens_to_ids(tag_token(label)) for label in labels or ()}

    @property
    def tagged(self) -> bool:
        return self.labels is not None

    def turn_text(self, turn: dict) -> str:
        if self.tags_in_history and self.tagged and turn["speaker"] == "supporter" and turn.get(self.label_key):
            return tag_token(turn[self.label_key]) + turn["text"]
        return turn["text"]

    def prompt_ids(self, context: list[dict]) -> list[int]:
        raise NotImplementedError

    def response_ids(self, response: str) -> list[int]:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"][: self.max_response_tokens]
        return ids + [self.tokenizer.eos_token_id]

    def training_features(self, example: dict) -> dict:
        prompt = self.prompt_ids(example["context"])
        target = self.response_ids(example["response"])
        if self.tagged:
            target = [self.tag_ids[example[self.label_key]]] + target
        return {"input_ids": prompt + target, "attention_mask": [1] * (len(prompt) + len(target)),
                "labels": [IGNORE_INDEX] * len(prompt) + target}


class EosJoinedFormatter(Formatter):
    """DialoGPT: the turns joined by the EOS token, then the (tag and) response."""

    def prompt_ids(self, context):
        texts = [self.turn_text(t) for t in context]
        eos = self.tokenizer.eos_token_id
        ids = [i for encoded in self.tokenizer(texts, add_special_tokens=False)["input_ids"] for i in encoded + [eos]]
        return ids[-self.max_context_tokens:]


class ChatTemplateFormatter(Formatter):
    """Chat models: the tokenizer's chat template, seeker = user, supporter = assistant."""

    ROLES = {"seeker": "user", "supporter": "assistant"}

    def _encode(self, messages) -> list[int]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        encoded = self.tokenizer.apply_chat_template(system + messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def prompt_ids(self, context):
        messages = [{"role": self.ROLES[t["speaker"]], "content": self.turn_text(t)} for t in context]
        while True:
            ids = self._encode(messages)
            if len(ids) <= self.max_context_tokens or not messages:
                return ids
            if len(messages) > 1:
                messages = messages[1:]  # drop the oldest turn
                continue
            # One turn longer than the budget: keep its most recent tokens.
            overflow = len(ids) - self.max_context_tokens
            text_ids = self.tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"]
            kept = self.tokenizer.decode(text_ids[overflow + 1:])
            messages = [{"role": messages[0]["role"], "content": kept}]
            ids = self._encode(messages)
            return ids[-self.max_context_tokens:] if len(ids) > self.max_context_tokens else ids


FORMATTERS = {"eos_joined": EosJoinedFormatter, "chat_template": ChatTemplateFormatter}


@dataclass
class FormatterSettings:
    """What turns a context into a trained generator's prompt, saved beside its model
    (`generator.json`) so the model can be used without the run's config."""
    family: str
    max_context_tokens: int
    max_response_tokens: int
    labels: list[str] | None  # the tag vocabulary; None for an untagged model
    tags_in_history: bool
    system_prompt: str | None
    tag_set: str = "category"

    @classmethod
    def from_config(cls, cfg) -> FormatterSettings:
        g = cfg.generator
        return cls(g.family, g.max_context_tokens, g.max_response_tokens, generator_tags(cfg), bool(cfg.tags_in_history),
                   g.system_prompt, cfg.tag_set)

    @classmethod
    def load(cls, model_dir: Path) -> FormatterSettings:
        saved = json.loads((Path(model_dir) / SETTINGS_FILE).read_text())
        if "tag_set" not in saved:  # saved before the tag set was recorded: the paper taxonomy's 4 categories or 8 strategies
            saved["tag_set"] = "strategy" if len(saved.get("labels") or ()) > 4 else "category"
        return cls(**saved)

    def save(self, model_dir: Path) -> None:
        (Path(model_dir) / SETTINGS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def build(self, tokenizer) -> Formatter:
        return FORMATTERS[self.family](tokenizer, self.max_context_tokens, self.max_response_tokens, self.labels,
                                       self.tags_in_history, self.system_prompt, Taxonomy.label_key(self.tag_set))


def generator_tags(cfg) -> list[str] | None:
    """The tag vocabulary of a generator config: None for an untagged model."""
    return Taxonomy.from_config(cfg.taxonomy).labels(cfg.tag_set) if cfg.strategy_tag else None


def build_formatter(cfg, tokenizer) -> Formatter:
    return FormatterSettings.from_config(cfg).build(tokenizer)
