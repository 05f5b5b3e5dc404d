"""Batched response generation: left padding, a KV cache, greedy by default.

The decoding loop is ours rather than `model.generate`'s for two reasons: a row that has written
EOS leaves the batch (its KV cache rows are dropped), so a batch costs as much as its live rows,
not as much as its longest reply; and the tokens every prompt starts with (a chat model's system
prompt: 21 of the cpu profile's 53 prompt tokens on average) are encoded once per call, and their
KV cache is shared by every row of every batch. Each step is the model's own forward pass with a transformers
DynamicCache, and sampling uses transformers' temperature and top-p warpers; greedy outputs equal
`model.generate`'s (tests/test_generation.py)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from mhsupport.modeling.scoring import can_share_prefix, continue_prefix, encode_prefix, shared_prefix_length


@torch.no_grad()
def generate(model, tokenizer, formatter, contexts: list[list[dict]], forced_tags: list[str | None],
             batch_size: int = 16, max_new_tokens: int = 40, do_sample: bool = False, top_p: float = 0.9,
             temperature: float = 0.7, seed: int = 0, progress: bool = True, batches=None,
             name: str = "generate") -> list[dict]:
    """One {"tag", "response"} per context. A forced tag is given in the model's tag format (its
    instruction in the prompt, or its opening forced after the prompt: the reply is what follows).
    Without one, a model whose tag opens the reply writes its own, read back from its opening.
    With `batches` (a run's finished batches: get/put by name), a batch stored under `name` (with the
    batch size and its first row) is read back instead of generated, and each generated batch is stored."""
    model.eval()
    prompts = [formatter.prompt_ids(context, tag) + formatter.opening_ids(tag)
               for context, tag in zip(contexts, forced_tags)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]) if do_sample else None
    shared = shared_prefix_length(prompts) if can_share_prefix(model) else 0
    prefix = encode_prefix(model, prompts[0][:shared]) if shared else None
    prompts = [ids[shared:] for ids in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[dict | None] = [None] * len(prompts)
    generator_seed = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        batch = order[start:start + batch_size]
        batch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)) if do_sample else None
        key = f"{name}-{batch_size}-{start}"  # a batch is the same rows only at the same batch size
        stored = batches.get(key) if batches is not None else None
        if stored is not None:
            for i, result in zip(batch, stored):
                results[i] = result
            continue
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention[row, width - len(prompts[i]):] = 1
        if do_sample:
            torch.manual_seed(batch_seed)
        new_tokens = decode(model, input_ids.to(model.device), attention.to(model.device), max_new_tokens,
                            tokenizer.eos_token_id, warpers, prefix)
        for row, i in enumerate(batch):
            written, text = read_opening(formatter, new_tokens[row])
            tag = forced_tags[i] if forced_tags[i] is not None else written
            results[i] = {"tag": tag, "response": " ".join(text.split())}
        if batches is not None:
            batches.put(key, [results[i] for i in batch])
    return results


def read_opening(formatter, new_tokens: list[int]) -> tuple[str | None, str]:
    """(the tag a generated reply opens with, or None; the reply without it). The strategy's token or
    words are never part of the reply, also where a model writes them after a forced opening."""
    tag = None
    if formatter.tag_format == "token" and new_tokens:
        tag = {token_id: label for label, token_id in formatter.tag_ids.items()}.get(new_tokens[0])
    text = formatter.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    if formatter.tagged and formatter.tag_format != "token":
        openings = sorted(((formatter.words[label]["opening"].strip(), label) for label in formatter.labels),
                          key=lambda item: -len(item[0]))
        for opening, label in openings:
            if text.startswith(opening):
                tag, text = label, text[len(opening):].strip()
                break
    return tag, text


def decode(model, input_ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int, eos_id: int,
           warpers: LogitsProcessorList | None = None,
           prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[list[int]]:
    """The new tokens of each left-padded row (EOS included where it was written), greedy or, with
    `warpers`, sampled from the warped distribution (torch's global generator). With `prefix` (from
    `encode_prefix`), every row continues that prefix: the rows hold only what follows it."""
    new_tokens: list[list[int]] = [[] for _ in range(len(input_ids))]
    live = torch.arange(len(input_ids), device=input_ids.device)  # batch row of each live row
    # positions count real tokens only, so a left-padded prompt is positioned as if unpadded
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache, attention, positions = continue_prefix(model, prefix, attention, positions)
    tokens = input_ids
    for step in range(max_new_tokens):
        logits = model(input_ids=tokens, attention_mask=attention, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
        if warpers is None:
            chosen = logits.argmax(dim=-1)
        else:
            probabilities = torch.softmax(warpers(tokens, logits), dim=-1)
            chosen = torch.multinomial(probabilities, num_samples=1).squeeze(1)
        for row, token in zip(live.tolist(), chosen.tolist()):
            new_tokens[row].append(token)
        going = chosen != eos_id
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():  # finished rows leave the batch, and their cache rows with them
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, attention, positions, chosen = live[keep], attention[keep], positions[keep], chosen[keep]
        attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
        positions = positions[:, -1:] + 1
        tokens = chosen[:, None]
    return new_tokens
