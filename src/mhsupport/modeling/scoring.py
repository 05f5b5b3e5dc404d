"""Teacher-forced scoring of token sequences that share their beginnings: the one scoring loop of
the likelihood stage, validation loss, a model's choice of its own strategy, the llm eval's
reference NLL and the tag-contrast training loss (with gradients), and the prompt-prefix cache
that generation shares.

Sequences come in groups (an example's reference reply under each of K strategies, say). The
tokens every sequence starts with (a chat model's system prompt) are encoded once per call; each
group's common head (the example's context) once per group, left-padded with the other groups of
its batch, and its KV cache is repeated for the group's continuations, which run right-padded as
one batch. Only scored tokens reach the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, DynamicLayer


@dataclass(frozen=True)
class Scored:
    """A token sequence whose tokens from `scored_from` on are scored; the earlier ones are input only."""
    ids: list[int]
    scored_from: int

    def __post_init__(self):
        if not 1 <= self.scored_from <= len(self.ids):
            raise ValueError(f"scored_from={self.scored_from} must be in 1..{len(self.ids)} (the first token "
                             "has nothing to predict it)")


# --- the prompt prefix every sequence shares ------------------------------------------------

def shared_prefix_length(sequences: list[list[int]], limit: int | None = None) -> int:
    """How many leading tokens all sequences share, at most `limit` (default: each sequence keeps at
    least one token of its own, whose logits start what follows)."""
    if not sequences:
        return 0
    bound = min(map(len, sequences)) - 1 if limit is None else limit
    first = sequences[0]
    for position in range(max(bound, 0)):
        if any(ids[position] != first[position] for ids in sequences):
            return position
    return max(bound, 0)


def can_share_prefix(model) -> bool:
    """Whether every layer keeps its whole past (plain attention): a sliding-window or linear-attention
    layer's cache is not the prefix's keys and values, so it cannot be copied to every row."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def encode_prefix(model, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of each layer for one copy of `prefix_ids`."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix_ids], device=model.device), cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def continue_prefix(model, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, attention: torch.Tensor,
                    positions: torch.Tensor) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """A KV cache holding `prefix` (or nothing) for each row of a left-padded batch, and the batch's
    attention mask and positions widened and shifted to follow it. The padding then sits between
    the shared prefix and each row's own tokens, masked out."""
    if prefix is None:
        return DynamicCache(config=model.config), attention, positions
    rows, shared = len(attention), prefix[0][0].shape[-2]
    cache = DynamicCache(ddp_cache_data=[(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
                                         for keys, values in prefix], config=model.config)
    return cache, torch.cat([attention.new_ones((rows, shared)), attention], dim=1), positions + shared


def positions_of(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids that skip padding: 0, 1, ... over each row's real tokens, from `offset`."""
    return (offset + mask.cumsum(dim=1) - 1).clamp(min=0)


def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        if tokens:
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
    return ids.to(device), mask.to(device)


def right_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids.to(device), mask.to(device)


# --- the scoring loop -----------------------------------------------------------------------

def token_nll(model, groups: list[list[Scored]], prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
              prefix_length: int = 0, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll, mask) of one batch of groups, one row per sequence (group-major): nll[r, j] is the NLL of
    the j-th scored token of sequence r (0 where mask is 0). Gradients flow when enabled by the caller.
    With `prefix` (from `encode_prefix`), every sequence starts with those `prefix_length` tokens."""
    device = next(model.parameters()).device
    heads, continuations, skips = [], [], []
    for group in groups:
        rest = [s.ids[prefix_length:] for s in group]
        # the head stops before each sequence's first scored token's predecessor, whose output predicts it
        head = shared_prefix_length(rest, min(s.scored_from for s in group) - 1 - prefix_length)
        heads.append(rest[0][:head])
        for sequence, tokens in zip(group, rest):
            continuations.append(tokens[head:])
            skips.append(sequence.scored_from - prefix_length - head)  # continuation tokens before the scored ones
    head_ids, head_mask = left_padded(heads, pad, device)
    cache, head_mask, head_positions = continue_prefix(model, prefix, head_mask, positions_of(head_mask))
    if head_ids.shape[1]:
        model(input_ids=head_ids, attention_mask=head_mask, position_ids=head_positions, cache=cache, use_cache=True,
              logits_to_keep=1)
    rows = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=device)
    if len(rows) != len(groups) or not torch.equal(rows, torch.arange(len(groups), device=device)):
        cache.batch_select_indices(rows)  # each group's cache once per continuation
    head_mask = head_mask[rows]
    cont_ids, cont_mask = right_padded(continuations, pad, device)
    hidden = model.get_decoder()(input_ids=cont_ids, attention_mask=torch.cat([head_mask, cont_mask], dim=1),
                                 position_ids=positions_of(cont_mask, head_mask.sum(dim=1, keepdim=True)),
                                 cache=cache, use_cache=True).last_hidden_state
    # position j predicts token j + 1; scored tokens are those at or after each row's skip
    positions = torch.arange(cont_ids.shape[1] - 1, device=device)[None, :]
    scored = (positions + 1 >= torch.tensor(skips, device=device)[:, None]) & (cont_mask[:, 1:] == 1)
    logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()
    values = F.cross_entropy(logits, cont_ids[:, 1:][scored], reduction="none")
    nll = torch.zeros(scored.shape, dtype=values.dtype, device=device).masked_scatter(scored, values)
    return nll, scored


@torch.no_grad()
def sequence_nll(model, groups: list[list[Scored]], batch_size: int, pad: int = 0, progress: bool = False,
                 desc: str = "score", batches=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(nll, tokens) per group: the summed NLL of each sequence's scored tokens, and their count.
    Groups are batched `batch_size` at a time, in order of head length (similar lengths share a batch).
    With `batches` (a run's finished batches: get/put by name), a batch stored under `desc` (with the
    batch size and its first group) is read back instead of scored, and each scored batch is stored."""
    was_training = model.training
    model.eval()
    flat = [s.ids for group in groups for s in group]
    limit = min(s.scored_from for group in groups for s in group) - 1 if flat else 0
    shared = shared_prefix_length(flat, limit) if flat and can_share_prefix(model) else 0
    prefix = encode_prefix(model, flat[0][:shared]) if shared else None
    order = sorted(range(len(groups)), key=lambda g: min(s.scored_from for s in groups[g]))
    sums: list[np.ndarray | None] = [None] * len(groups)
    counts: list[np.ndarray | None] = [None] * len(groups)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        batch = order[start:start + batch_size]
        key = f"{desc}-{batch_size}-{start}"  # a batch is the same groups only at the same batch size
        stored = batches.get(key) if batches is not None else None
        if stored is not None:
            row_sums, row_counts = np.array(stored["sums"], dtype=np.float64), np.array(stored["counts"], dtype=np.int64)
        else:
            nll, scored = token_nll(model, [groups[g] for g in batch], prefix, shared, pad)
            row_sums, row_counts = nll.sum(dim=1).cpu().numpy(), scored.sum(dim=1).cpu().numpy()
            if batches is not None:
                batches.put(key, {"sums": row_sums.astype(np.float64).tolist(),
                                                "counts": row_counts.tolist()})
        row = 0
        for g in batch:
            k = len(groups[g])
            sums[g], counts[g] = row_sums[row:row + k].astype(np.float64), row_counts[row:row + k]
            row += k
    if was_training:
        model.train()
    return sums, counts
