"""Batched response generation: left padding, KV cache (model.generate), greedy by default."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def generate(model, tokenizer, formatter, contexts: list[list[dict]], forced_tags: list[str | None],
             batch_size: int = 16, max_new_tokens: int = 40, do_sample: bool = False, top_p: float = 0.9,
             temperature: float = 0.7, seed: int = 0, progress: bool = True) -> list[dict]:
    """One {"tag", "response"} per context. A forced tag is placed after the prompt; without one,
    a tagged model writes its own, read back from its first generated token."""
    model.eval()
    prompts = []
    for context, tag in zip(contexts, forced_tags):
        ids = formatter.prompt_ids(context)
        if tag is not None:
            ids = ids + [formatter.tag_ids[tag]]
        prompts.append(ids)
    label_of = {token_id: label for label, token_id in formatter.tag_ids.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[dict | None] = [None] * len(prompts)
    generator_seed = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention[row, width - len(prompts[i]):] = 1
        if do_sample:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                                max_new_tokens=max_new_tokens, do_sample=do_sample,
                                top_p=top_p if do_sample else None, temperature=temperature if do_sample else None,
                                top_k=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, use_cache=True)
        for row, i in enumerate(batch):
            new = output[row, width:].tolist()
            tag = forced_tags[i]
            if tag is None and formatter.tagged and new and new[0] in label_of:
                tag = label_of[new[0]]
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            results[i] = {"tag": tag, "response": " ".join(text.split())}
    return results
