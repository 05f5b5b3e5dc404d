"""Plumbing shared by the training stages: Trainer arguments, resume, per-epoch validation,
teacher-forced loss, and process roles under torchrun."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainingArguments

from mhsupport import devices
from mhsupport.formatting import IGNORE_INDEX

CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def seeded_subset(items: list, size: int | None, seed: int) -> list:
    """A reproducible sample of `size` items (all of them when size is None or too large), in order."""
    if size is None or size >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[i] for i in keep]


def training_arguments(output_dir: Path, profile, runtime, seed: int, save_steps: int) -> TrainingArguments:
    device = devices.resolve(runtime)
    devices.check_training_device(device)
    on_gpu = device.type == "cuda"
    bf16 = devices.uses_bf16(device, runtime)
    backend = runtime.ddp_backend or (None if on_gpu else ("gloo" if world_size() > 1 else None))
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=profile.epochs,
        per_device_train_batch_size=profile.batch_size,
        gradient_accumulation_steps=profile.grad_accum,
        learning_rate=profile.learning_rate,
        warmup_steps=profile.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=profile.weight_decay,
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",  # dynamic padding over length-grouped batches
        eval_strategy="no",  # validation runs in ValidationCallback, token-level
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=runtime.logging_steps,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_cpu=not on_gpu,  # runtime.device=cpu keeps the Trainer off a visible GPU
        ddp_backend=backend,
        fsdp=runtime.fsdp or "",
        dataloader_num_workers=runtime.dataloader_workers,
        dataloader_pin_memory=on_gpu,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def last_complete_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest checkpoint holding everything needed to resume (a kill can cut one short)."""
    if not checkpoints_dir.is_dir():
        return None
    candidates = sorted(checkpoints_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for candidate in candidates:
        if all((candidate / name).is_file() for name in CHECKPOINT_FILES):
            return str(candidate)
    return None


@torch.no_grad()
def per_example_nll(model, features: list[dict], collator, batch_size: int) -> tuple[list[float], list[int]]:
    """Summed negative log-likelihood and count of each example's labelled tokens under teacher forcing."""
    was_training = model.training
    model.eval()
    nll, counts = [0.0] * len(features), [0] * len(features)
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collator([{k: features[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in rows])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        for row, i in enumerate(rows):
            nll[i] = token_nll[row].sum().item()
            counts[i] = int((labels[row] != IGNORE_INDEX).sum())
    if was_training:
        model.train()
    return nll, counts


def teacher_forced_loss(model, features: list[dict], collator, batch_size: int) -> dict:
    """Token-level loss and perplexity of the labelled tokens (tag and response) under teacher forcing."""
    nll, counts = per_example_nll(model, features, collator, batch_size)
    loss = sum(nll) / max(sum(counts), 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": sum(counts)}


class ValidationCallback(TrainerCallback):
    """Validation at every epoch end, kept in the trainer state so a resumed run still has it."""

    def __init__(self, evaluate, prefix: str = "valid"):
        self.evaluate = evaluate
        self.prefix = prefix

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        result = self.evaluate(model)
        entry = {"epoch": round(state.epoch, 4), "step": state.global_step}
        entry.update({f"{self.prefix}_{k}": v for k, v in result.items()})
        state.log_history.append(entry)
        return control


def epoch_history(log_history: list[dict], prefix: str = "valid") -> list[dict]:
    return [entry for entry in log_history if any(k.startswith(prefix + "_") for k in entry)]
