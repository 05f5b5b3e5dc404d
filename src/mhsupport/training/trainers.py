"""The generator's Trainers and callbacks: the LM head run only on labelled positions, the
tag-contrast loss, and the tag rows' own step size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, Trainer, TrainerCallback

from mhsupport.modeling.formatting import IGNORE_INDEX
from mhsupport.modeling.scoring import Scored, can_share_prefix, token_nll


class LabelledPositionsTrainer(Trainer):
    """A causal-LM Trainer whose LM head runs only where a label is scored. In a supporter reply
    after a long context most positions carry no label, and the head (vocabulary x width: a fifth
    of SmolLM2-135M's compute) is the costliest part to run on them. The leading tokens every row
    of a batch shares (a chat model's system prompt: a fifth of a cpu-profile example) are encoded
    once and their keys and values given to every row; the rows' gradients flow back through that
    one copy, so loss and gradients are the model's own. Same loss as the model's own: summed token
    cross-entropy over the shifted labels, divided by the labelled tokens."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model is not self.model:  # wrapped (DDP, FSDP): only its own forward synchronises gradients
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        targets = inputs["labels"][:, 1:]
        scored = targets != IGNORE_INDEX
        shared = shared_batch_prefix(model, ids, attention, scored)
        decoder = model.get_decoder()
        # the Trainer's bf16 autocast wraps only the model's own forward, which this loss bypasses
        with self.accelerator.autocast():
            if shared:
                prefix = DynamicCache(config=model.config)
                decoder(input_ids=ids[:1, :shared], cache=prefix, use_cache=True)
                rows = len(ids)
                cache = DynamicCache(ddp_cache_data=[(layer.keys.expand(rows, -1, -1, -1),
                                                      layer.values.expand(rows, -1, -1, -1)) for layer in prefix.layers],
                                     config=model.config)
                # positions follow the cache: right padding leaves every row's tokens where they were
                hidden = decoder(input_ids=ids[:, shared:], attention_mask=attention, cache=cache,
                                 use_cache=True).last_hidden_state
            else:
                hidden = decoder(input_ids=ids, attention_mask=attention).last_hidden_state
            scored, targets = scored[:, shared:], targets[:, shared:]
            logits = model.get_output_embeddings()(hidden[:, :-1][scored])
        loss = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else scored.sum()).to(loss.device)
        return (loss, {"logits": logits}) if return_outputs else loss


def shared_batch_prefix(model, ids: torch.Tensor, attention: torch.Tensor, scored: torch.Tensor) -> int:
    """How many leading tokens every row of a right-padded training batch shares, all real and none
    of them predicting a label (`scored`: which positions predict one); 0 where sharing does not
    apply: one row, a cache that is not plain keys and values, or gradient checkpointing (which
    recomputes layers without a cache)."""
    if len(ids) < 2 or not can_share_prefix(model) or getattr(model, "is_activation_checkpointing", False):
        return 0
    same = ((ids == ids[:1]) & (attention == 1)).all(dim=0)
    length = int(same.int().cumprod(dim=0).sum())
    first_scored = int(scored.int().argmax(dim=1).min())  # a row without labels gives 0: nothing shared
    return min(length, first_scored)


class TagContrastTrainer(LabelledPositionsTrainer):
    """Trains a tagged generator to need its tag. Beside the language-model loss (the same as
    LabelledPositionsTrainer's), each reference reply is scored after its gold tag's opening and
    after `negatives` other tags' openings drawn at random, and a cross-entropy over those tags, with
    each tag's logit the reply's per-token log-likelihood under it, asks the gold tag to explain the
    reply best: the hybrid generative-discriminative loss of class-conditional LMs (GeDi, Krause et
    al., 2021), `loss = lm + weight * contrast`. An opening is the tag token or the strategy's words
    (the tag formats that open the reply). The context is encoded once per example and its KV cache is
    shared by the tags, so a negative costs only its opening and the reply's tokens."""

    def __init__(self, *args, openings: list[list[int]], weight: float, negatives: int, **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= negatives < len(openings):
            raise ValueError(f"negatives must be in 1..{len(openings) - 1}, got {negatives}")
        # the longest first, so that an opening that begins another is not read in its place
        self.openings = sorted((list(o) for o in openings), key=len, reverse=True)
        self.weight, self.negatives = weight, negatives

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model is not self.model:  # two forward passes per step would break DDP/FSDP gradient sync
            raise RuntimeError("generator.tag_contrast_weight > 0 trains in one process only; "
                               "set generator.tag_contrast_weight=0 to train with torchrun")
        with self.accelerator.autocast():  # as in LabelledPositionsTrainer: the model's forward is bypassed
            return self._contrast_loss(model, inputs, return_outputs, num_items_in_batch)

    def _gold_opening(self, labelled: list[int]) -> int:
        for k, opening in enumerate(self.openings):
            if labelled[:len(opening)] == opening:
                return k
        raise ValueError("a training reply opens with none of the tags' openings")

    def _contrast_loss(self, model, inputs, return_outputs, num_items_in_batch):
        device = inputs["input_ids"].device
        groups, opening_tokens, reply_tokens = [], [], []
        for ids, labels, mask in zip(inputs["input_ids"], inputs["labels"], inputs["attention_mask"]):
            ids, labels = ids[mask == 1].tolist(), labels[mask == 1]
            start = int((labels != IGNORE_INDEX).int().argmax())  # where the opening starts
            gold = self._gold_opening(ids[start:])
            opening = self.openings[gold]
            prompt, reply = ids[:start], ids[start + len(opening):]
            wrong = [k for k in range(len(self.openings)) if k != gold]
            drawn = [wrong[i] for i in torch.randperm(len(wrong))[:self.negatives].tolist()]
            # the gold opening and its reply are scored (the LM term); a wrong opening is input, its reply scored
            groups.append([Scored(prompt + opening + reply, start)]
                          + [Scored(prompt + self.openings[k] + reply, start + len(self.openings[k])) for k in drawn])
            opening_tokens.append(len(opening))
            reply_tokens.append(len(reply))
        nll, scored = token_nll(model, groups)
        per_example = 1 + self.negatives
        sums = nll.sum(dim=1).view(len(groups), per_example)
        # the gold rows' opening NLL: their first scored tokens
        gold_rows, gold_scored = nll.view(len(groups), per_example, -1)[:, 0], scored.view(len(groups), per_example, -1)[:, 0]
        rank = gold_scored.int().cumsum(dim=1)
        in_opening = gold_scored & (rank <= torch.tensor(opening_tokens, device=device)[:, None])
        opening_nll = (gold_rows * in_opening).sum(dim=1)
        reply_nll = torch.cat([(sums[:, 0] - opening_nll)[:, None], sums[:, 1:]], dim=1)

        labelled = num_items_in_batch if num_items_in_batch is not None else sum(
            o + r for o, r in zip(opening_tokens, reply_tokens))
        lm = sums[:, 0].sum() / torch.as_tensor(labelled, device=device)
        # per-token log-likelihoods as the tags' logits, so the two losses act on one scale
        logits = -reply_nll / torch.tensor(reply_tokens, device=device)[:, None]
        contrast = F.cross_entropy(logits, torch.zeros(len(groups), dtype=torch.long, device=device))
        if num_items_in_batch is not None:
            # the Trainer then leaves the loss of each accumulated micro-batch undivided: the LM term is
            # already over the whole accumulated batch's tokens, the contrast (a mean per micro-batch) is not
            contrast = contrast / getattr(self, "current_gradient_accumulation_steps", 1)  # set once training runs
        loss = lm + self.weight * contrast
        return (loss, {"lm_loss": lm, "contrast_loss": contrast}) if return_outputs else loss


class RowStepScaleCallback(TrainerCallback):
    """Multiplies each optimizer step of some rows of the input embedding matrix by `factor`: the
    tag rows, which must move far from their initial values for a short fine-tuning to learn to
    condition on them, train at factor x the learning rate of everything else. (The rows share one
    tensor with the vocabulary, so an optimizer parameter group cannot give them their own rate.)"""

    def __init__(self, rows: list[int], factor: float):
        self.rows, self.factor, self.before = torch.tensor(rows), factor, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before = model.get_input_embeddings().weight.detach()[self.rows.to(model.device)].clone()

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        weight = model.get_input_embeddings().weight
        rows = self.rows.to(weight.device)
        weight[rows] = self.before + self.factor * (weight[rows] - self.before)
