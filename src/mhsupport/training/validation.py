"""Validation during and after training: the teacher-forced loss of the labelled tokens (tag and
reply), and the epoch-end callback that logs it through the Trainer."""

from __future__ import annotations

import math

from transformers import TrainerCallback

from mhsupport.modeling.formatting import IGNORE_INDEX
from mhsupport.modeling.scoring import Scored, sequence_nll


def labelled_sequence(feature: dict) -> Scored:
    """A training feature as a scored sequence: its labelled tokens (the tag's opening and the reply)
    form its end."""
    labels = feature["labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return Scored(list(feature["input_ids"]), first)


def per_example_nll(model, features: list[dict], batch_size: int, pad: int = 0) -> tuple[list[float], list[int]]:
    """Summed negative log-likelihood and count of each example's labelled tokens under teacher forcing."""
    sums, counts = sequence_nll(model, [[labelled_sequence(f)] for f in features], batch_size, pad=pad)
    return [float(s[0]) for s in sums], [int(c[0]) for c in counts]


def teacher_forced_loss(model, features: list[dict], batch_size: int, pad: int = 0) -> dict:
    """Token-level loss and perplexity of the labelled tokens (tag and response) under teacher forcing."""
    nll, counts = per_example_nll(model, features, batch_size, pad)
    loss = sum(nll) / max(sum(counts), 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": sum(counts)}


class ValidationCallback(TrainerCallback):
    """Validation at every epoch end, logged through the trainer (`connect_loggers`): every
    reporting callback sees it, and the trainer state keeps it, so a resumed run still has it."""

    def __init__(self, evaluate, prefix: str = "valid"):
        self.evaluate = evaluate  # model -> dict; its numbers are logged, the whole dict kept (result_at)
        self.prefix = prefix
        self.trainer = None
        self.latest: tuple[int, dict] | None = None  # (global step, result) of the last validation

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_training_stop and state.global_step < state.max_steps:
            return control  # stopped inside the epoch (a preemption): the resumed run validates at its end
        result = self.evaluate(model)
        self.latest = (state.global_step, result)
        self.trainer.log({f"{self.prefix}_{k}": v for k, v in result.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return self.trainer.control

    def result_at(self, step: int) -> dict | None:
        """The last validation's result if it scored the model after `step` steps, else None: once
        training ends, the final epoch's validation already scored the final model."""
        return self.latest[1] if self.latest is not None and self.latest[0] == step else None


def epoch_history(log_history: list[dict], prefix: str = "valid") -> list[dict]:
    return [entry for entry in log_history if any(k.startswith(prefix + "_") for k in entry)]
