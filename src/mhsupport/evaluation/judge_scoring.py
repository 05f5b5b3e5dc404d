"""Local judges that score instead of writing, so a small model that would ramble still answers
every request and the score's size says how sure it is:

- `OptionScorer`: after the judge's prompt (and an answer prefix, e.g. "[["), the margin
  log P(first option) - log P(second option) of the next token;
- `ReplyScorer`: each reply alone, as the assistant's turn after the conversation: the mean
  log-probability of its tokens (the chat template's end of turn included, so a reply cut short
  pays for ending where no reply would), less `neutral_weight` times the same without the
  conversation (a pointwise-mutual-information score: a generic reply, likely anywhere, gains
  nothing from fitting this conversation).

The softmax's normaliser cancels in the difference, so the margin is the difference of the two
options' logits; it is computed in fp32 from the model's last hidden state and the two options'
rows of the output embedding, whatever dtype the model runs in (bf16 logits move in steps of
0.125, and most pairs would tie).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from tqdm.auto import tqdm

from mhsupport.errors import MhsError

ScoreCallback = Callable[[int, float], None]


class OptionScorer:
    """Any causal LM with a chat template as a judge: `margins(requests)` gives, per request (chat
    messages), the first option's log-probability minus the second's as the next token after the
    assistant turn opens with `answer_prefix`."""

    def __init__(self, model, tokenizer, options: tuple[str, str], answer_prefix: str, name: str):
        if tokenizer.chat_template is None:
            raise MhsError(f"the local judge needs a chat model: {name}'s tokenizer has no chat template "
                           "(judge.model)")
        self.option_ids = []
        for option in options:
            ids = tokenizer.encode(option, add_special_tokens=False)
            if len(ids) != 1:
                raise MhsError(f"judge.scoring.options: {option!r} is {len(ids)} tokens for {name}; each option must "
                               "be one token (e.g. judge.scoring.options=[A,B])")
            self.option_ids.append(ids[0])
        self.model, self.tokenizer, self.answer_prefix, self.name = model.eval(), tokenizer, answer_prefix, name
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def prompt(self, messages: list[dict]) -> str:
        """The text the judge reads: its chat template with the assistant turn opened, then the prefix."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + \
            self.answer_prefix

    @torch.inference_mode()
    def margins(self, requests: list[list[dict]], batch_size: int, progress: bool = False,
                on_score: ScoreCallback | None = None) -> list[float]:
        """One margin per request (nats), computed in batches of prompts of similar length (less
        padding); `on_score(i, margin)` is called as each batch finishes, so a caller that keeps
        them loses at most one batch when interrupted."""
        prompts = [self.prompt(request) for request in requests]
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        head = self.model.get_output_embeddings()
        option_rows = head.weight[self.option_ids].float()
        option_bias = head.bias[self.option_ids].float() if getattr(head, "bias", None) is not None else None
        device = head.weight.device
        found: list[float | None] = [None] * len(prompts)
        for start in tqdm(range(0, len(order), batch_size), desc=f"judge {self.name}", disable=not progress):
            chunk = order[start:start + batch_size]
            batch = self.tokenizer([prompts[i] for i in chunk], add_special_tokens=False, padding=True,
                                   return_tensors="pt").to(device)
            # Left padding: positions counted from each prompt's first real token, so a padded prompt
            # is read as it would be alone (absolute position embeddings included).
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            hidden = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           position_ids=positions).last_hidden_state[:, -1].float()
            logits = hidden @ option_rows.T
            if option_bias is not None:
                logits = logits + option_bias
            for i, margin in zip(chunk, (logits[:, 0] - logits[:, 1]).tolist()):
                found[i] = margin
                if on_score:
                    on_score(i, margin)
        return found


class ReplyScorer:
    """Any causal LM with a chat template as a judge that reads each reply alone: `reply_scores`
    gives, per request (messages ending with the reply as the assistant's turn), the mean
    log-probability of the reply's tokens after the messages before it. `judge_rows` also asks for
    each reply without the conversation and subtracts `neutral_weight` times that score."""

    def __init__(self, model, tokenizer, name: str, neutral_weight: float = 0.0):
        if tokenizer.chat_template is None:
            raise MhsError(f"the local judge needs a chat model: {name}'s tokenizer has no chat template "
                           "(judge.model)")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.neutral_weight = neutral_weight
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def split(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(the context's tokens, the reply's tokens) of one request."""
        context = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        whole = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not whole.startswith(context):
            raise MhsError(f"{self.name}'s chat template writes the conversation differently once a reply follows; "
                           "judge.scoring.method=options works with any template")
        context_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        return context_ids, self.tokenizer(whole[len(context):], add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def reply_scores(self, requests: list[list[dict]], batch_size: int, progress: bool = False,
                     on_score: ScoreCallback | None = None) -> list[float]:
        """One mean log-probability per request. Requests that share their context (the two replies of
        a pair; every reply scored without the conversation) read it once: its keys and values are
        kept, and each batch of up to `batch_size` of its replies (right-padded) continues from them.
        `on_score(i, score)` as each batch finishes."""
        pieces = [self.split(request) for request in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(pieces):
            groups.setdefault(tuple(context), []).append(i)
        # Batches in the requests' order (a caller's pairs are finished one after another, so an
        # interrupted run keeps whole pairs); a context is read once and kept until its last batch.
        batches = sorted(((context, members[s:s + batch_size]) for context, members in groups.items()
                          for s in range(0, len(members), batch_size)), key=lambda batch: batch[1][0])
        last_batch = {context: n for n, (context, _) in enumerate(batches)}
        head = self.model.get_output_embeddings()
        device = head.weight.device
        # The output layer in fp32 (bf16 logits move in steps of 0.125 and would round the scores).
        weight = head.weight.float()
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        found: list[float | None] = [None] * len(pieces)
        kept = {}  # each context read and still to be continued: its last hidden state, keys and values
        for n, (context, chunk) in enumerate(tqdm(batches, desc=f"judge {self.name}", disable=not progress)):
            if context not in kept:
                out = self.model.base_model(input_ids=torch.tensor([context], device=device), use_cache=True)
                kept[context] = (out.last_hidden_state[0, -1:], out.cache)
            last, past = kept[context] if last_batch[context] > n else kept.pop(context)
            replies = [pieces[i][1] for i in chunk]
            # The context's last position predicts each reply's first token; the reply's own positions
            # (all but its last token) the rest.
            width = max(map(len, replies)) - 1
            if width:
                ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id)
                mask = torch.zeros((len(chunk), len(context) + width), dtype=torch.long)
                mask[:, :len(context)] = 1
                for r, reply in enumerate(replies):
                    ids[r, :len(reply) - 1] = torch.tensor(reply[:-1])
                    mask[r, len(context):len(context) + len(reply) - 1] = 1
                cache = copy.deepcopy(past)  # a forward pass appends to the cache it is given
                cache.batch_repeat_interleave(len(chunk))
                positions = torch.arange(len(context), len(context) + width)[None].expand(len(chunk), -1)
                hidden = self.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                               position_ids=positions.to(device), cache=cache,
                                               use_cache=True).last_hidden_state
            for r, (i, reply) in enumerate(zip(chunk, replies)):
                states = torch.cat([last, hidden[r, :len(reply) - 1]]) if len(reply) > 1 else last
                logits = states.float() @ weight.T
                if bias is not None:
                    logits = logits + bias
                targets = torch.tensor(reply, device=device)
                score = torch.log_softmax(logits, -1).gather(1, targets[:, None]).mean().item()
                found[i] = score
                if on_score:
                    on_score(i, score)
        return found
