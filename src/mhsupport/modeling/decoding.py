"""Batched response generation: left padding, a KV cache, greedy by default.

The decoding loop is ours rather than `model.generate`'s for three reasons: a row that has written
EOS leaves the batch (its KV cache rows are dropped), so a batch costs as much as its live rows,
not as much as its longest reply; the tokens every prompt starts with (a chat model's system
prompt: 21 of the cpu profile's 53 prompt tokens on average) are encoded once per call, and their
KV cache is shared by every row of every batch; and one context's replies under several tags
(`generate_under_tags`) share the context's KV cache, so the context is encoded once for all of
them. Each step is the model's own forward pass with a transformers DynamicCache, and sampling uses
transformers' temperature and top-p warpers with one seeded generator per row, so that a row's
reply does not depend on its batch; greedy outputs equal `model.generate`'s (tests/test_generation.py)."""

from __future__ import annotations

import copy
import json
import math
import zlib

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from mhsupport.modeling.scoring import (can_share_prefix, continue_prefix, encode_prefix, left_padded, positions_of,
                                        right_padded, shared_prefix_length)


def row_seed(seed: int, context: list[dict], tag: str | None) -> int:
    """The sampling seed of one reply: the decoding seed and what the reply is conditioned on, so the
    same context and tag draw the same reply in any batch, alone or beside the other tags."""
    return zlib.crc32(json.dumps([seed, context, tag], sort_keys=True).encode()) & 0x7FFFFFFF


def sampling_warpers(do_sample: bool, top_p: float, temperature: float) -> LogitsProcessorList | None:
    return LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]) if do_sample else None


@torch.no_grad()
def generate(model, tokenizer, formatter, contexts: list[list[dict]], forced_tags: list[str | None],
             batch_size: int = 16, max_new_tokens: int = 40, do_sample: bool = False, top_p: float = 0.9,
             temperature: float = 0.7, seed: int = 0, progress: bool = True, batches=None,
             name: str = "generate", references: list[list[int]] | None = None) -> list[dict]:
    """One {"tag", "response", "tokens"} per context. A forced tag is given in the model's tag format
    (its instruction in the prompt, or its opening forced after the prompt: the reply is what follows).
    Without one, a model whose tag opens the reply writes its own, read back from its opening.
    With `references` (per context, a reply's scored tokens: formatter.response_ids), each result also
    holds "reference_nll", their summed NLL after the prompt (and forced opening), read from the
    prompt's cache before decoding, and "reference_tokens", their count.
    With `batches` (a run's finished batches: get/put by name), a batch stored under `name` (with the
    batch size and its first row) is read back instead of generated, and each generated batch is stored."""
    model.eval()
    prompts = [formatter.prompt_ids(context, tag) + formatter.opening_ids(tag)
               for context, tag in zip(contexts, forced_tags)]
    pad = pad_id(tokenizer)
    warpers = sampling_warpers(do_sample, top_p, temperature)
    shared = shared_prefix_length(prompts) if can_share_prefix(model) else 0
    prefix = encode_prefix(model, prompts[0][:shared]) if shared else None
    prompts = [ids[shared:] for ids in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[dict | None] = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=name, disable=not progress):
        batch = order[start:start + batch_size]
        key = f"{name}-{batch_size}-{start}"  # a batch is the same rows only at the same batch size
        stored = batches.get(key) if batches is not None else None
        if stored is not None:
            for i, result in zip(batch, stored):
                results[i] = result
            continue
        input_ids, attention = left_padded([prompts[i] for i in batch], pad, model.device)
        seeds = [row_seed(seed, contexts[i], forced_tags[i]) for i in batch] if do_sample else None
        cache, logits, cache_mask, last_positions = prefill(model, input_ids, attention, prefix)
        if references is not None:
            nll = continuation_nll(model, cache, logits, cache_mask, last_positions, [references[i] for i in batch], pad)
        new_tokens = decode_from(model, cache, logits, cache_mask, last_positions, max_new_tokens,
                                 tokenizer.eos_token_id, warpers, seeds, input_ids)
        for row, i in enumerate(batch):
            results[i] = reply(formatter, new_tokens[row], forced_tags[i])
            if references is not None:
                results[i].update(reference_nll=nll[row], reference_tokens=len(references[i]))
        if batches is not None:
            batches.put(key, [results[i] for i in batch])
    return results


@torch.no_grad()
def generate_under_tags(model, tokenizer, formatter, contexts: list[list[dict]], tags: list[str | None],
                        batch_size: int = 16, max_new_tokens: int = 40, do_sample: bool = False, top_p: float = 0.9,
                        temperature: float = 0.7, seed: int = 0, progress: bool = True, batches=None,
                        name: str = "generate under tags", references: list[list[int]] | None = None,
                        guidance_scale: float = 0.0, guidance_tokens: int = 0) -> list[dict]:
    """For each context, one reply under each of `tags` (None: no tag), decoded from one encoding of
    the context: {"replies": [{"tag", "response", "tokens"} per tag], "own": log P(tag's opening |
    prompt) per tag, or None where the tag does not open the reply}. Without guidance each reply
    equals what `generate` gives for that context and tag (same seed), so a tag sampler is a choice
    among them. With `guidance_scale` > 0 the first `guidance_tokens` tokens of the replies under the
    tags (not None) are guided towards their own tag and away from the others (`Guidance`).
    With `references` (per context, the reference reply's scored tokens: formatter.response_ids), each
    result also holds "reference_nll", the summed NLL of those tokens after the prompt and opening of
    each tag (what tag_likelihood.reference_nll gives), read from the same cache before decoding, and
    "reference_tokens", their count.
    `batch_size` counts contexts; a batch decodes batch_size x len(tags) rows."""
    model.eval()
    pad = pad_id(tokenizer)
    warpers = sampling_warpers(do_sample, top_p, temperature)
    openings = [formatter.opening_ids(tag) for tag in tags]
    prompts = [tag_prompts(formatter, context, tags) for context in contexts]
    sequences = [[prompt + opening for prompt, opening in zip(group, openings)] for group in prompts]
    # where each tag's opening starts: the tokens from there on are the model's own choice of tag
    opening_from = [[len(prompt) if opening else None for prompt, opening in zip(group, openings)] for group in prompts]
    flat = [ids for group in sequences for ids in group]
    limit = min(min(s for s in starts if s is not None) if any(s is not None for s in starts) else len(group[0])
                for starts, group in zip(opening_from, sequences)) - 1
    shared = shared_prefix_length(flat, limit) if can_share_prefix(model) else 0
    prefix = encode_prefix(model, flat[0][:shared]) if shared else None
    order = sorted(range(len(contexts)), key=lambda i: len(sequences[i][0]))
    results: list[dict | None] = [None] * len(contexts)
    k = len(tags)
    for start in tqdm(range(0, len(order), batch_size), desc=name, disable=not progress):
        batch = order[start:start + batch_size]
        key = f"{name}-{batch_size}-{start}"
        stored = batches.get(key) if batches is not None else None
        if stored is not None:
            for i, result in zip(batch, stored):
                results[i] = result
            continue
        # each context's head (what all its tags' prompts share, up to before the first opening
        # token's predecessor) once; then one row per (context, tag) continues it
        heads, continuations, scored_from = [], [], []
        for i in batch:
            rest = [ids[shared:] for ids in sequences[i]]
            starts = [s for s in opening_from[i] if s is not None]
            bound = (min(starts) if starts else min(map(len, rest)) + shared) - 1 - shared
            head = shared_prefix_length(rest, bound)
            heads.append(rest[0][:head])
            for ids, opening in zip(rest, opening_from[i]):
                continuations.append(ids[head:])
                scored_from.append(None if opening is None else opening - shared - head)
        head_ids, head_mask = left_padded(heads, pad, model.device)
        cache, head_mask, head_positions = continue_prefix(model, prefix, head_mask, positions_of(head_mask))
        if head_ids.shape[1]:
            model(input_ids=head_ids, attention_mask=head_mask, position_ids=head_positions, cache=cache,
                  use_cache=True, logits_to_keep=1)
        rows = torch.arange(len(batch), device=model.device).repeat_interleave(k)
        if head_ids.shape[1] or prefix is not None:
            cache.batch_select_indices(rows)  # each context's cache once per tag
        head_mask = head_mask[rows]
        cont_ids, cont_mask = left_padded(continuations, pad, model.device)
        attention = torch.cat([head_mask, cont_mask], dim=1)
        positions = positions_of(cont_mask, head_mask.sum(dim=1, keepdim=True))
        hidden = model.get_decoder()(input_ids=cont_ids, attention_mask=attention, position_ids=positions, cache=cache,
                                     use_cache=True).last_hidden_state
        head_output = model.get_output_embeddings()
        own = opening_log_probabilities(head_output, hidden, cont_ids, cont_mask, scored_from)
        first_logits = head_output(hidden[:, -1]).float()
        if references is not None:
            reference_sums = continuation_nll(model, cache, first_logits, attention, positions[:, -1:],
                                              [references[i] for i in batch for _ in tags], pad)
        seeds = [row_seed(seed, contexts[i], tag) for i in batch for tag in tags] if do_sample else None
        last_positions = positions[:, -1:]
        guidance = None
        if guidance_scale > 0 and guidance_tokens > 0 and sum(tag is not None for tag in tags) > 1:
            guidance = tag_guidance(guidance_scale, guidance_tokens, tags, len(batch))
            extra = torch.tensor(guidance.sources, device=model.device)
            cache.batch_select_indices(torch.cat([torch.arange(len(first_logits), device=model.device), extra]))
            first_logits, attention = torch.cat([first_logits, first_logits[extra]]), torch.cat([attention, attention[extra]])
            last_positions = torch.cat([last_positions, last_positions[extra]])
        new_tokens = decode_from(model, cache, first_logits, attention, last_positions, max_new_tokens,
                                 tokenizer.eos_token_id, warpers, seeds, guidance=guidance)
        for b, i in enumerate(batch):
            results[i] = {"replies": [reply(formatter, new_tokens[b * k + j], tag) for j, tag in enumerate(tags)],
                          "own": None if own is None else own[b * k:(b + 1) * k]}
            if references is not None:
                results[i].update(reference_nll=reference_sums[b * k:(b + 1) * k],
                                  reference_tokens=len(references[i]))
        if batches is not None:
            batches.put(key, [results[i] for i in batch])
    return results


def tag_guidance(scale: float, steps: int, tags: list[str | None], contexts: int) -> Guidance:
    """The guidance of a batch of `contexts` x len(tags) reply rows (row b * k + j: context b, tag j):
    each row under a tag is read under every other tag by an extra row copied from that tag's row."""
    k = len(tags)
    labelled = [j for j, tag in enumerate(tags) if tag is not None]
    members: list[list[int] | None] = [None] * (contexts * k)
    sources: list[int] = []
    for b in range(contexts):
        for j in labelled:
            members[b * k + j] = [b * k + j]
            for other in labelled:
                if other != j:
                    members[b * k + j].append(contexts * k + len(sources))
                    sources.append(b * k + other)
    return Guidance(scale, steps, members, sources)


def tag_prompts(formatter, context: list[dict], tags: list[str | None]) -> list[list[int]]:
    """The prompt before each tag's reply. A prompt differs between tags only by the tag's
    instruction (none where the tag opens the reply), so it is encoded once per instruction: fitting
    a context to its token budget renders the chat template several times."""
    encoded: dict[str | None, list[int]] = {}
    for tag in tags:
        if formatter.instruction(tag) not in encoded:
            encoded[formatter.instruction(tag)] = formatter.prompt_ids(context, tag)
    return [encoded[formatter.instruction(tag)] for tag in tags]


def continuation_nll(model, cache, first_logits: torch.Tensor, attention: torch.Tensor, last_positions: torch.Tensor,
                     continuations: list[list[int]], pad: int, rows_per_group: int = 64) -> list[float]:
    """Per row, the summed NLL of `continuations[row]` (at least one token each) read after what the
    cache holds, whose next-token logits are `first_logits`; the cache is left as it was, ready to
    decode from. Rows of similar continuation length are read together, `rows_per_group` at a time,
    each group right-padded after its rows' last tokens from its own copy of their cache rows (so
    little is spent on padding), and only real tokens reach the LM head."""
    sums = F.cross_entropy(first_logits, torch.tensor([c[0] for c in continuations], device=first_logits.device),
                           reduction="none").tolist()
    order = sorted(range(len(continuations)), key=lambda r: len(continuations[r]))
    order = [r for r in order if len(continuations[r]) > 1]
    for start in range(0, len(order), rows_per_group):
        group = order[start:start + rows_per_group]
        rows = torch.tensor(group, device=first_logits.device)
        ids, mask = right_padded([continuations[r] for r in group], pad, first_logits.device)
        steps = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
        hidden = model.get_decoder()(input_ids=ids[:, :-1], attention_mask=torch.cat([attention[rows], mask[:, :-1]], dim=1),
                                     position_ids=last_positions[rows] + steps, cache=cache_rows(model, cache, rows),
                                     use_cache=True).last_hidden_state
        scored = mask[:, 1:] == 1
        logits = model.get_output_embeddings()(hidden[scored]).float()
        values = F.cross_entropy(logits, ids[:, 1:][scored], reduction="none")
        row_sums = torch.zeros(scored.shape, dtype=values.dtype, device=ids.device).masked_scatter(scored, values).sum(1)
        for r, value in zip(group, row_sums.tolist()):
            sums[r] += value
    return sums


def cache_rows(model, cache, rows: torch.Tensor):
    """A new cache holding the given rows of `cache` (which is left as it was)."""
    if can_share_prefix(model):  # every layer is a plain (keys, values) pair
        return DynamicCache(ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in cache.layers],
                            config=model.config)
    selected = copy.deepcopy(cache)
    selected.batch_select_indices(rows)
    return selected


def opening_log_probabilities(head_output, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                              scored_from: list[int | None]) -> list[float] | None:
    """Per row, the summed log-probability of its tokens from `scored_from` on (a tag's opening),
    read from the hidden states of its left-padded continuation; None where no row has an opening."""
    if all(s is None for s in scored_from):
        return None
    width = ids.shape[1]
    lengths = mask.sum(dim=1).tolist()
    scored = torch.zeros((len(ids), width - 1), dtype=torch.bool, device=ids.device)
    for row, (start, length) in enumerate(zip(scored_from, lengths)):
        if start is not None:  # left-padded: the row's token t sits at column width - length + t
            scored[row, width - length + start - 1:] = True
    logits = head_output(hidden[:, :-1][scored]).float()
    values = -F.cross_entropy(logits, ids[:, 1:][scored], reduction="none")
    sums = torch.zeros(scored.shape, dtype=values.dtype, device=ids.device).masked_scatter(scored, values).sum(dim=1)
    return [float(v) if s is not None else None for v, s in zip(sums.tolist(), scored_from)]


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def reply(formatter, new_tokens: list[int], forced_tag: str | None) -> dict:
    written, text = read_opening(formatter, new_tokens)
    return {"tag": forced_tag if forced_tag is not None else written, "response": " ".join(text.split()),
            "tokens": len(new_tokens)}


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


def prefill(model, input_ids: torch.Tensor, attention: torch.Tensor,
            prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Encode left-padded prompts (after `prefix`, from `encode_prefix`, if given): (the filled cache,
    each row's next-token logits, the cache's attention mask, each row's last position (rows, 1))."""
    # positions count real tokens only, so a left-padded prompt is positioned as if unpadded
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache, attention, positions = continue_prefix(model, prefix, attention, positions)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
    return cache, logits, attention, positions[:, -1:]


class Guidance:
    """Strategy guidance for the first `steps` tokens of replies decoded under several tags of one
    context: a reply's next-token log-probabilities under its own tag t are pushed away from their
    mean over all the context's tags, `log p_t + scale * (log p_t - log mean_s p_s)`, given the same
    reply so far. The second term is log p(t | reply so far) - log(1/K): how much a token says "t"
    rather than any strategy (classifier-free guidance with the other strategies as the negative,
    after GeDi's Bayes rule over class-conditional LMs). Reading a reply under another tag takes a
    cache row of that tag's prompt fed the reply's tokens: `members[r]` lists, for reply row r, the
    cache rows of its tags (its own first; None: the row is decoded unguided), where rows past the
    replies' are those extra rows, copied from `sources` (cache rows of the other tags' prompts)."""

    def __init__(self, scale: float, steps: int, members: list[list[int] | None], sources: list[int]):
        self.scale, self.steps, self.sources = scale, steps, sources
        guided = [r for r, m in enumerate(members) if m is not None]
        self.rows = len(members)
        self.guided = torch.tensor(guided, dtype=torch.long)
        self.groups = torch.tensor([members[r] for r in guided], dtype=torch.long)
        # the reply row each extra row follows
        owner = [0] * len(sources)
        for r in guided:
            for extra in members[r][1:]:
                owner[extra - self.rows] = r
        self.owner = torch.tensor(owner, dtype=torch.long)

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """(reply rows, vocab) next-token scores: guided rows' from all the cache rows' `logits`."""
        out = logits[:self.rows].clone()
        if len(self.guided):
            guided, groups = self.guided.to(logits.device), self.groups.to(logits.device)
            log_p = torch.log_softmax(logits, dim=-1)
            own = log_p[guided]
            mean = torch.logsumexp(log_p[groups], dim=1) - math.log(groups.shape[1])
            out[guided] = own + self.scale * (own - mean)
        return out


def decode_from(model, cache, logits: torch.Tensor, attention: torch.Tensor, last_positions: torch.Tensor,
                max_new_tokens: int, eos_id: int, warpers: LogitsProcessorList | None = None,
                seeds: list[int] | None = None, input_ids: torch.Tensor | None = None,
                guidance: Guidance | None = None) -> list[list[int]]:
    """Decoding from a filled cache: `logits` (rows, vocab) are each row's next-token logits after its
    prompt, `attention` the mask of what the cache holds and `last_positions` (rows, 1) the position of
    each row's last token. `input_ids` (what the warpers see as the prompt) only matters to warpers
    that read it; temperature and top-p do not. With `guidance`, the cache holds its extra rows after
    the replies' rows (the arguments' rows are all of them); they are read for the guided steps and
    then dropped, and until then no row leaves the batch."""
    rows = len(logits) if guidance is None else guidance.rows
    new_tokens: list[list[int]] = [[] for _ in range(rows)]
    live = torch.arange(rows, device=logits.device)  # batch row of each live row
    generators = ([torch.Generator(device=logits.device).manual_seed(s) for s in seeds]
                  if warpers is not None and seeds is not None else None)
    tokens = input_ids if input_ids is not None else torch.zeros((rows, 1), dtype=torch.long, device=logits.device)
    positions = last_positions
    guided_steps = guidance.steps if guidance is not None else 0
    finished = torch.zeros(rows, dtype=torch.bool, device=logits.device)  # rows ended inside the guided steps
    for step in range(max_new_tokens):
        guided = step < guided_steps
        scores = guidance.combine(logits) if guided else logits
        if warpers is None:
            chosen = scores.argmax(dim=-1)
        else:
            probabilities = torch.softmax(warpers(tokens, scores), dim=-1)
            if generators is None:
                chosen = torch.multinomial(probabilities, num_samples=1).squeeze(1)
            else:
                chosen = torch.cat([torch.multinomial(probabilities[r], 1, generator=generators[row])
                                    for r, row in enumerate(live.tolist())])
        ended = finished.tolist() if guided else None
        for row, token in zip(live.tolist(), chosen.tolist()):
            if ended is None or not ended[row]:
                new_tokens[row].append(token)
        going = chosen != eos_id
        if guided:
            finished |= ~going
            going = ~finished
        if step == max_new_tokens - 1 or not going.any():
            break
        feed = chosen
        if guided and step < guided_steps - 1:  # every row stays; an extra row reads its reply's token
            feed = torch.cat([chosen, chosen[guidance.owner.to(chosen.device)]])
        elif guided or not going.all():  # the extra rows and finished rows leave the batch, with their cache rows
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, attention, positions, chosen = live[keep], attention[keep], positions[keep], chosen[keep]
            feed = chosen
        attention = torch.cat([attention, attention.new_ones((len(attention), 1))], dim=1)
        positions = positions + 1
        tokens = chosen[:, None]
        logits = model(input_ids=feed[:, None], attention_mask=attention, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
    return new_tokens
