"""Turning examples into token ids, one formatter per model family (DESIGN.md section 4).

Both families: the context is truncated from the left (the most recent tokens are kept),
the response is capped, and the loss covers only the tag and the response tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from mhsupport.modeling.scoring import Scored
from mhsupport.data.taxonomy import Taxonomy

IGNORE_INDEX = -100
SETTINGS_FILE = "generator.json"


def tag_token(label: str) -> str:
    """The special token of a category or strategy: 'Providing Suggestions' -> '<|providing_suggestions|>'."""
    return "<|" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") + "|>"


TAG_FORMATS = ("token", "words", "instruction")


class Formatter:
    """Shared parts; subclasses build the prompt.

    How a tag reaches the model (`tag_format`): `token`, a special token opening the reply (the
    paper's); `words`, the strategy written in words opening the reply (`words[label]["opening"]`);
    `instruction`, a note in words right before the reply (`words[label]["instruction"]`, a system
    message for chat models), placed after the conversation so every strategy shares its encoding.
    The opening (token or words) is trained like the reply, so a model can write its own; it is
    never scored as part of the reply, shown with it, or counted in its metrics."""

    def __init__(self, tokenizer, max_context_tokens: int, max_response_tokens: int, labels: list[str] | None,
                 tags_in_history: bool = False, system_prompt: str | None = None, label_key: str = "category",
                 tag_format: str = "token", words: dict[str, dict[str, str]] | None = None):
        self.tokenizer = tokenizer
        self.label_key = label_key  # the turn field holding a tag: "category" or "strategy"
        self.max_context_tokens = max_context_tokens
        self.max_response_tokens = max_response_tokens
        self.labels = labels  # None: untagged model
        self.tags_in_history = tags_in_history
        self.system_prompt = system_prompt
        self.tag_format = tag_format
        self.words = words or {}
        if labels and tag_format != "token" and set(labels) - set(self.words):
            raise ValueError(f"tag_format={tag_format}: no words for {sorted(set(labels) - set(self.words))}")
        self.tag_ids = ({label: tokenizer.convert_tokens_to_ids(tag_token(label)) for label in labels or ()}
                        if tag_format == "token" else {})

    @property
    def tagged(self) -> bool:
        return self.labels is not None

    @property
    def model_writes_tag(self) -> bool:
        """Whether the tag opens the reply, so that the model can choose its own (token, words)."""
        return self.tagged and self.tag_format != "instruction"

    def turn_text(self, turn: dict) -> str:
        label = turn.get(self.label_key)
        if self.tags_in_history and self.tagged and turn["speaker"] == "supporter" and label:
            return (tag_token(label) if self.tag_format == "token" else self.words[label]["opening"]) + turn["text"]
        return turn["text"]

    def opening_ids(self, tag: str | None) -> list[int]:
        """The tokens that open the reply for a tag (the tag token, or its words); none for an
        instruction-format or untagged model, or without a tag."""
        if tag is None or not self.model_writes_tag:
            return []
        if self.tag_format == "token":
            return [self.tag_ids[tag]]
        return self.tokenizer(self.words[tag]["opening"], add_special_tokens=False)["input_ids"]

    def instruction(self, tag: str | None) -> str | None:
        return self.words[tag]["instruction"] if tag is not None and self.tag_format == "instruction" else None

    def prompt_ids(self, context: list[dict], tag: str | None = None) -> list[int]:
        """The prompt before the reply (with a tag's instruction where the format has one)."""
        raise NotImplementedError

    def response_ids(self, response: str) -> list[int]:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"][: self.max_response_tokens]
        return ids + [self.tokenizer.eos_token_id]

    def scored_reply(self, context: list[dict], tag: str | None, response: str) -> Scored:
        """Prompt, the tag's opening and the reply, with only the reply (and its end token) scored."""
        head = self.prompt_ids(context, tag) + self.opening_ids(tag)
        return Scored(head + self.response_ids(response), len(head))

    def training_features(self, example: dict) -> dict:
        tag = example[self.label_key] if self.tagged else None
        prompt = self.prompt_ids(example["context"], tag)
        target = self.opening_ids(tag) + self.response_ids(example["response"])
        return {"input_ids": prompt + target, "attention_mask": [1] * (len(prompt) + len(target)),
                "labels": [IGNORE_INDEX] * len(prompt) + target}


class EosJoinedFormatter(Formatter):
    """DialoGPT: the turns joined by the EOS token, then the (tag and) response."""

    def prompt_ids(self, context, tag=None):
        texts = [self.turn_text(t) for t in context]
        eos = self.tokenizer.eos_token_id
        ids = [i for encoded in self.tokenizer(texts, add_special_tokens=False)["input_ids"] for i in encoded + [eos]]
        ids = ids[-self.max_context_tokens:]
        instruction = self.instruction(tag)
        if instruction is not None:  # one more segment after the conversation, outside its token budget
            ids = ids + self.tokenizer(instruction, add_special_tokens=False)["input_ids"] + [eos]
        return ids


class ChatTemplateFormatter(Formatter):
    """Chat models: the tokenizer's chat template, seeker = user, supporter = assistant."""

    ROLES = {"seeker": "user", "supporter": "assistant"}

    def _encode(self, messages, instruction: str | None = None) -> list[int]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        note = [{"role": "system", "content": instruction}] if instruction is not None else []
        encoded = self.tokenizer.apply_chat_template(system + messages + note, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def prompt_ids(self, context, tag=None):
        messages = self._kept_messages(context)
        ids, extra = self._encode(messages), 0
        instruction = self.instruction(tag)
        if instruction is not None:
            noted = self._encode(messages, instruction)
            ids, extra = noted, len(noted) - len(ids)
        budget = self.max_context_tokens + extra  # the note is outside the conversation's token budget
        return ids[-budget:] if len(ids) > budget else ids

    def _kept_messages(self, context) -> list[dict]:
        """The most recent turns that fit the token budget; a single turn longer than the budget
        keeps its most recent tokens."""
        messages = [{"role": self.ROLES[t["speaker"]], "content": self.turn_text(t)} for t in context]
        # the oldest turn to keep: the first whose suffix fits (dropping a turn never lengthens the
        # encoding), else the last turn alone; found by bisection, as each try renders the template
        low, high = 0, max(len(messages) - 1, 0)
        while low < high:
            middle = (low + high) // 2
            if len(self._encode(messages[middle:])) <= self.max_context_tokens:
                high = middle
            else:
                low = middle + 1
        messages = messages[low:]
        overflow = len(self._encode(messages)) - self.max_context_tokens if messages else 0
        if overflow > 0:
            text_ids = self.tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"]
            messages = [{"role": messages[0]["role"], "content": self.tokenizer.decode(text_ids[overflow + 1:])}]
        return messages


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
    tag_format: str = "token"  # saved before tag formats existed: the special token
    words: dict[str, dict[str, str]] | None = None  # label -> {"opening", "instruction"}: the strategy in words

    @classmethod
    def from_config(cls, cfg) -> FormatterSettings:
        g = cfg.generator
        labels = generator_tags(cfg)
        words = None
        if labels and g.tag_format != "token":
            described = {label: cfg.strategy_words[label] for label in labels}
            words = {label: {"opening": g.strategy_opening.format(label=label, description=description),
                             "instruction": g.strategy_instruction.format(label=label, description=description)}
                     for label, description in described.items()}
        return cls(g.family, g.max_context_tokens, g.max_response_tokens, labels, bool(cfg.tags_in_history),
                   g.system_prompt, cfg.tag_set, g.tag_format if labels else "token", words)

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
                                       self.tags_in_history, self.system_prompt, Taxonomy.label_key(self.tag_set),
                                       self.tag_format, self.words)


LONG_REPLIES = ("truncate", "whole_sentences")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def whole_sentences(text: str, tokenizer, max_tokens: int) -> str:
    """A training reply longer than `max_tokens` cut after its last whole sentence that fits, so that
    its end token follows the end of a sentence, never the middle of one; a reply whose first sentence
    does not fit is returned whole (the formatter then truncates it)."""
    def length(piece: str) -> int:
        return len(tokenizer(piece, add_special_tokens=False)["input_ids"])

    if length(text) <= max_tokens:
        return text
    sentences = SENTENCE_END.split(text.strip())
    kept = ""
    for count in range(1, len(sentences)):
        candidate = " ".join(sentences[:count])
        if length(candidate) > max_tokens:
            break
        kept = candidate
    return kept or text


def generator_tags(cfg) -> list[str] | None:
    """The tag vocabulary of a generator config: None for an untagged model."""
    return Taxonomy.from_config(cfg.taxonomy).labels(cfg.tag_set) if cfg.strategy_tag else None


def build_formatter(cfg, tokenizer) -> Formatter:
    return FormatterSettings.from_config(cfg).build(tokenizer)
