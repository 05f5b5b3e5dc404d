"""Does a generator use its tag? The reference response's NLL under every tag (DESIGN.md section 8,
"Tag use, by likelihood"), computed with the context encoded once per example and its KV cache
shared by the tags; for untagged generators, the reference's NLL on the same examples.

A tag carries at most log2(4) = 2 bits about a reply, so its effect is read where it is cheapest
and least noisy: in how likely the human reference becomes under the gold tag versus the others.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from tqdm.auto import tqdm

from mhsupport.generation import can_share_prefix, continue_prefix, encode_prefix, shared_prefix_length
from mhsupport.metrics import classification_scores

LIKELIHOODS = "likelihoods.jsonl"  # a likelihood run's per-example NLL under every tag


def read_likelihoods(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / LIKELIHOODS) as f:
        return [json.loads(line) for line in f]


def _positions(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids that skip padding: 0, 1, ... over each row's real tokens, from `offset`."""
    return (offset + mask.cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def reference_nll(model, formatter, examples: list[dict], labels: list[str] | None, batch_size: int = 16,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(nll, tokens): nll[i, k] is the summed NLL of example i's reference response (and its end
    token) after the prompt and tag k (the tag itself is input, not scored); tokens[i] the number of
    scored tokens. An untagged model (labels None) gives one column.

    The tokens all prompts start with are encoded once; the rest of each batch's prompts, left-padded,
    once per batch; their KV cache is repeated for the K tags and the K continuations (tag + response, right-padded) run as one batch of B x K rows."""
    model.eval()
    device = next(model.parameters()).device
    tag_ids = [formatter.tag_ids[label] for label in labels] if labels else [None]
    k = len(tag_ids)
    pad = formatter.tokenizer.pad_token_id
    prompts = [formatter.prompt_ids(e["context"]) for e in examples]
    # a chat model's system prompt: encoded once for all examples
    shared = shared_prefix_length(prompts) if can_share_prefix(model) else 0
    prefix = encode_prefix(model, prompts[0][:shared]) if shared else None
    prompts = [ids[shared:] for ids in prompts]
    targets = [formatter.response_ids(e["response"]) for e in examples]
    nll = np.zeros((len(examples), k))
    tokens = np.array([len(t) for t in targets])
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    for start in tqdm(range(0, len(order), batch_size), desc="reference nll", disable=not progress):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        prompt_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt_ids)
        for row, i in enumerate(batch):
            prompt_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            prompt_mask[row, width - len(prompts[i]):] = 1
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        cache, prompt_mask, positions = continue_prefix(model, prefix, prompt_mask, _positions(prompt_mask))
        encoded = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(k)
        # Continuation rows: example-major, tag-minor (row r = example r // k, tag r % k).
        continuations = [([tag] if tag is not None else []) + targets[i] for i in batch for tag in tag_ids]
        length = max(len(c) for c in continuations)
        cont_ids = torch.full((len(continuations), length), pad, dtype=torch.long)
        cont_mask = torch.zeros_like(cont_ids)
        for row, ids in enumerate(continuations):
            cont_ids[row, :len(ids)] = torch.tensor(ids)
            cont_mask[row, :len(ids)] = 1
        cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
        prompt_mask_rows = prompt_mask.repeat_interleave(k, dim=0)
        offset = prompt_mask_rows.sum(dim=1, keepdim=True)
        logits = model(input_ids=cont_ids, attention_mask=torch.cat([prompt_mask_rows, cont_mask], dim=1),
                       position_ids=_positions(cont_mask, offset), cache=cache, use_cache=True).logits
        if labels:
            # the tag predicts the first response token: score logits[:, :-1] against cont_ids[:, 1:]
            predicted, wanted, mask = logits[:, :-1], cont_ids[:, 1:], cont_mask[:, 1:]
        else:
            # the prompt's last position predicts the first response token
            first = encoded.logits[:, -1:].repeat_interleave(k, dim=0)
            predicted, wanted, mask = torch.cat([first, logits[:, :-1]], dim=1), cont_ids, cont_mask
        token_nll = F.cross_entropy(predicted.float().transpose(1, 2), wanted, reduction="none") * mask
        sums = token_nll.sum(dim=1).view(len(batch), k).cpu().numpy()
        for row, i in enumerate(batch):
            nll[i] = sums[row]
    return nll, tokens


def _per_token(nll_sum, tokens, axis=-1):
    return np.sum(nll_sum, axis=axis) / np.sum(tokens, axis=axis)


def _interval(statistic, data: tuple, resamples: int, seed: int) -> dict:
    """The statistic on the examples, with a 95% percentile bootstrap interval over examples."""
    value = float(statistic(*data))
    if len(data[0]) < 2:
        return {"value": value, "low": value, "high": value}
    result = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                             method="percentile", random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return {"value": value, "low": float(low), "high": float(high)}


def tag_use_scores(nll: np.ndarray, tokens: np.ndarray, gold: list[str] | None, labels: list[str] | None,
                   resamples: int, seed: int) -> dict:
    """Metrics of a likelihood run. Tagged (labels given): tag_discrimination (gold tag lowest NLL),
    most_chosen_share, nll_gold_tag / nll_wrong_tags (per token), ppl_gold_tag, and the gold x
    lowest-NLL confusion matrix; untagged: nll and ppl. Every value with a bootstrap interval."""
    tokens = tokens.astype(np.float64)
    if not labels:
        column = nll[:, 0]
        scores = {"nll": _interval(_per_token, (column, tokens), resamples, seed)}
        scores["ppl"] = {key: math.exp(value) for key, value in scores["nll"].items()}
        return {"metrics": scores}
    gold_index = np.array([labels.index(g) for g in gold])
    lowest = nll.argmin(axis=1)
    n, k = nll.shape
    gold_nll = nll[np.arange(n), gold_index]
    wrong_nll = (nll.sum(axis=1) - gold_nll) / (k - 1)  # mean over the wrong tags, per example

    def most_chosen_share(choice, axis=-1):
        counts = np.stack([(choice == j).sum(axis=axis) for j in range(k)])
        return counts.max(axis=0) / choice.shape[axis]

    scores = {
        "tag_discrimination": _interval(lambda hit, axis=-1: np.mean(hit, axis=axis),
                                        ((lowest == gold_index).astype(np.float64),), resamples, seed),
        "most_chosen_share": _interval(most_chosen_share, (lowest,), resamples, seed),
        "nll_gold_tag": _interval(_per_token, (gold_nll, tokens), resamples, seed),
        "nll_wrong_tags": _interval(_per_token, (wrong_nll, tokens), resamples, seed),
        "nll_gold_minus_wrong": _interval(lambda a, b, t, axis=-1: _per_token(a - b, t, axis),
                                          (gold_nll, wrong_nll, tokens), resamples, seed),
    }
    scores["ppl_gold_tag"] = {key: math.exp(value) for key, value in scores["nll_gold_tag"].items()}
    chosen = classification_scores(list(gold), [labels[j] for j in lowest], labels)
    return {"metrics": scores, "chance": 1 / k,
            "most_chosen_tag": labels[int(np.bincount(lowest, minlength=k).argmax())],
            "confusion": chosen["confusion"], "per_class": chosen["per_class"]}


def paired_nll_test(a_nll: np.ndarray, b_nll: np.ndarray, tokens: np.ndarray, resamples: int, seed: int) -> dict:
    """Per-token NLL of system a minus system b on the same examples and references: the difference
    with a paired bootstrap interval and a paired permutation test's two-sided p (swapping a and b
    within examples)."""
    tokens = tokens.astype(np.float64)

    def difference(a, b, t, axis=-1):
        return _per_token(a - b, t, axis)

    interval = _interval(difference, (a_nll, b_nll, tokens), resamples, seed)
    test = stats.permutation_test((a_nll, b_nll), lambda a, b, axis=-1: np.sum(a - b, axis=axis),
                                  permutation_type="samples", vectorized=True, n_resamples=resamples,
                                  alternative="two-sided", random_state=np.random.default_rng(seed))
    return {**interval, "p": float(test.pvalue)}
