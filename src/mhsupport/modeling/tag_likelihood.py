"""A generator's likelihood of replies under its tags, read through its formatter: the reference
reply's NLL under every tag (the likelihood stage; DESIGN.md section 8, "Tag use, by likelihood"),
and the model's own distribution over its tags after a context (what the "none" sampler draws
from). Each example's context is encoded once and its KV cache shared by the tags
(scoring.sequence_nll)."""

from __future__ import annotations

import numpy as np
import torch

from mhsupport.modeling.scoring import Scored, sequence_nll


@torch.no_grad()
def reference_nll(model, formatter, examples: list[dict], labels: list[str] | None, batch_size: int = 16,
                  progress: bool = True, batches=None) -> tuple[np.ndarray, np.ndarray]:
    """(nll, tokens): nll[i, k] is the summed NLL of example i's reference response (and its end
    token) after the prompt given tag k (the tag, in whatever form, is input, not scored); tokens[i]
    the number of scored tokens. An untagged model (labels None) gives one column. Each example's
    context is encoded once and shared by its K tags (scoring.sequence_nll)."""
    groups = [[formatter.scored_reply(e["context"], label, e["response"]) for label in (labels or [None])]
              for e in examples]
    sums, counts = sequence_nll(model, groups, batch_size, pad=formatter.tokenizer.pad_token_id or 0,
                                progress=progress, desc="reference nll", batches=batches)
    return np.stack(sums), np.array([c[0] for c in counts])


@torch.no_grad()
def opening_probabilities(model, formatter, contexts: list[list[dict]], batch_size: int = 16,
                          progress: bool = False, batches=None) -> np.ndarray:
    """(n, K): the model's own distribution over its tags after each context, for a model whose tag
    opens the reply (token or words): each tag's opening scored after the prompt, normalised over
    the tags (the tag token's probability renormalised; the words' joint probability)."""
    labels = formatter.labels
    groups = []
    for context in contexts:
        prompt = formatter.prompt_ids(context)
        groups.append([Scored(prompt + formatter.opening_ids(label), len(prompt)) for label in labels])
    sums, _ = sequence_nll(model, groups, batch_size, pad=formatter.tokenizer.pad_token_id or 0, progress=progress,
                           desc="own strategy", batches=batches)
    log_probabilities = -np.stack(sums)
    log_probabilities -= log_probabilities.max(axis=1, keepdims=True)
    probabilities = np.exp(log_probabilities)
    return probabilities / probabilities.sum(axis=1, keepdims=True)
