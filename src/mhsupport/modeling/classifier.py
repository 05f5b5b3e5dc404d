"""The next-category classifier and the response recogniser as models: their inputs, batched
probabilities over their labels, saving and loading (the small API the samplers call)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from mhsupport.modeling import devices

SETTINGS_FILE = "classifier.json"
SPEAKER_NAMES = {"seeker": "Seeker", "supporter": "Supporter"}


@dataclass
class ClassifierSettings:
    mode: str  # next_category | response
    labels: list[str]
    label_key: str  # "category" | "strategy"
    context_turns: int
    history_categories: bool
    max_length: int

    def text(self, item, separator: str = " | ") -> str:
        """The classifier's input: the last turns of a context, or a response."""
        if self.mode == "response":
            return item if isinstance(item, str) else item["response"]
        context = item if isinstance(item, list) else item["context"]
        return context_text(context, self.context_turns, separator,
                            self.label_key if self.history_categories else None)


def context_text(context: list[dict], turns: int, separator: str, label_key: str | None = None) -> str:
    parts = []
    for turn in context[-turns:] if turns else context:
        speaker = SPEAKER_NAMES[turn["speaker"]]
        if label_key and turn["speaker"] == "supporter" and turn.get(label_key):
            speaker += f" ({turn[label_key]})"
        parts.append(f"{speaker}: {turn['text']}")
    return separator.join(parts)


class Classifier:
    """A trained classifier run's model, for batched probabilities over its labels."""

    def __init__(self, model, tokenizer, settings: ClassifierSettings):
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.tokenizer.truncation_side = "left"  # keep the most recent context

    @property
    def labels(self) -> list[str]:
        return self.settings.labels

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (Path(path) / SETTINGS_FILE).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    @torch.no_grad()
    def predict_proba(self, items: list, batch_size: int = 64) -> np.ndarray:
        """Probabilities, shape (len(items), len(labels)), rows summing to 1. Items are contexts
        (lists of {speaker, text[, category]}), examples, or responses (recogniser)."""
        was_training = self.model.training  # the Trainer's epoch-end validation calls this mid-training
        self.model.eval()
        separator = f" {self.tokenizer.sep_token} " if self.tokenizer.sep_token else " | "
        texts = [self.settings.text(item, separator) for item in items]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            encoded = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                     max_length=self.settings.max_length, return_tensors="pt").to(self.model.device)
            logits = self.model(**encoded).logits.float()
            out[batch] = torch.softmax(logits, dim=-1).cpu().numpy()
        self.model.train(was_training)
        return out

    def predict(self, items: list, batch_size: int = 64) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(items, batch_size).argmax(axis=1)]


def load(path: str | Path, runtime=None) -> Classifier:
    """A classifier from a run's `model/` folder (or the run folder itself), placed by the device
    rule for inference (`runtime`: a config's runtime node; None: the defaults, auto)."""
    path = Path(path)
    if (path / "model" / SETTINGS_FILE).is_file():
        path = path / "model"
    settings = ClassifierSettings(**json.loads((path / SETTINGS_FILE).read_text()))
    model = devices.place(AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32),
                          devices.inference(runtime))
    return Classifier(model, AutoTokenizer.from_pretrained(path), settings)
