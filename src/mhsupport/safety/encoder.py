"""Sentence features for the safety screen from a BERT-style encoder folder (all-mpnet-base-v2 from
`mhs models fetch`): for every transformer layer, the mean of its hidden states over the tokens
(and, with pooling "mean_max", each dimension's largest value over the tokens), each L2-normalised,
side by side. The last layer alone (the sentence embedding) mostly says what a message is about;
the lower layers keep more of how it says it (person, tense, negation), and the maxima keep a word
that a mean over a long message dilutes (docs/safety.md has the figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

# What each pooling gives (part of the exemplar cache key): per layer the mean over tokens, and with
# "mean_max" also the largest value of each dimension over tokens, each L2-normalised.
POOLINGS = {"mean": "mean-pooled hidden states of every layer, each L2-normalised",
            "mean_max": "mean- and max-pooled hidden states of every layer, each L2-normalised"}


class SentenceEncoder:
    def __init__(self, folder: str | Path, max_length: int, batch_size: int, bf16: bool = False,
                 pooling: str = "mean"):
        """bf16: run under CPU bf16 autocast (on CPUs with bf16 instructions about 1.8 times faster
        here, features within 2e-3 of fp32). pooling: a key of POOLINGS."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.folder, self.bf16, self.pooling = Path(folder), bf16, pooling
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        # A window of recent turns longer than max_length keeps its end: the newest turn.
        self.tokenizer.truncation_side = "left"
        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # no loading bar on the stderr of `mhs screen` or a chat turn
        try:
            self.model = AutoModel.from_pretrained(self.folder).eval()
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
        self.max_length, self.batch_size = max_length, batch_size
        self.width = self.model.config.hidden_size * self.model.config.num_hidden_layers * (1 + (pooling == "mean_max"))

    @property
    def features(self) -> str:
        return POOLINGS[self.pooling]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """One row per text, in the order given. Texts are batched by length, so a batch pads to
        similar lengths (most of the time saved on a batch of replies)."""
        features = np.zeros((len(texts), self.width), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                layers = self.model(**batch, output_hidden_states=True).hidden_states[1:]  # [0]: the input embeddings
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = [(hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9) for hidden in layers]
            if self.pooling == "mean_max":  # padding must never be a token's largest value
                pooled += [hidden.float().masked_fill(mask == 0, float("-inf")).amax(1) for hidden in layers]
            features[chunk] = torch.cat([torch.nn.functional.normalize(p, dim=-1) for p in pooled], -1).numpy()
        return features
