"""The one training sequence of both training stages: Trainer arguments from a profile and the
runtime settings, resuming from the newest sound checkpoint, and saving the model into the run."""

from __future__ import annotations

import json
import logging
import signal
import time
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from mhsupport import preemption
from mhsupport.modeling import devices
from mhsupport.training import curves
from mhsupport.training.processes import is_main_process, world_size
from mhsupport.training.validation import ValidationCallback

log = logging.getLogger(__name__)
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


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
        report_to=curves.report_to(runtime.report_to),
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def last_complete_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest checkpoint holding everything needed to resume. A kill can cut one short and a
    disk can damage one: such a checkpoint is skipped, with a message, for the one before it."""
    if not checkpoints_dir.is_dir():
        return None
    candidates = sorted(checkpoints_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        log.warning("skipping %s: %s", candidate, problem)
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None. Cheap checks: the trainer state parses,
    and every torch file is a whole zip archive (a truncated one has lost its closing directory)."""
    for name in CHECKPOINT_FILES:
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            return "trainer_state.json has no global_step"
    except (OSError, ValueError) as err:
        return f"trainer_state.json is unreadable ({err})"
    for file in checkpoint.glob("*.pt"):
        if not zipfile.is_zipfile(file):
            return f"{file.name} is truncated or damaged"
    weights = list(checkpoint.glob("*.safetensors")) + list(checkpoint.glob("pytorch_model*.bin"))
    if not weights:
        return "no model weights"
    for file in weights:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as err:  # safetensors raises its own error types for every kind of damage
                return f"{file.name} is damaged ({err})"
        elif not zipfile.is_zipfile(file):
            return f"{file.name} is truncated or damaged"
    return None


def train_resumable(run, seed: int, fresh: bool, make_trainer, finish, before_save=None):
    """The one training sequence of both trainers: build the run's temporary folder -> resume from
    its newest sound checkpoint -> train -> save the model on every process (it synchronises them)
    -> `finish` (metrics and extra files; writes on the main process) -> wait for every process.
    The checkpoints stay until the run is in place, so a kill at any point loses no training.

    make_trainer(checkpoints_dir) -> Trainer; before_save(trainer) (optional) changes the trained model
    before it is saved; finish(trainer, out_dir, train_output, resumed_from, train_seconds) fills
    run.metrics."""
    is_main = is_main_process()
    with run.build(seed=seed, is_main=is_main, resumable=True, fresh=fresh) as out:
        trainer = make_trainer(run.checkpoints_path)
        connect_loggers(trainer, out)
        resume = last_complete_checkpoint(run.checkpoints_path)
        if resume:
            log.info("resuming from %s", resume)
        started = time.time()
        trainer.add_callback(PreemptionCallback())
        with preemption.deferred():  # a SIGTERM or SIGUSR1 saves a checkpoint at the next step and stops
            output = trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.time() - started
        if before_save:
            before_save(trainer)
        trainer.save_model(str(out / "model"))
        finish(trainer, out, output, resume, train_seconds)
        trainer.accelerator.wait_for_everyone()


class PreemptionCallback(TrainerCallback):
    """After the step in progress when SIGTERM or SIGUSR1 came: save a checkpoint and stop training
    (`train_resumable` then raises preemption.Preempted). Under torchrun the processes agree first,
    so that all of them stop after the same step."""

    def on_step_end(self, args, state, control, **kwargs):
        stop = preemption.requested()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and not preemption.requested():  # a peer was signalled: this process stops as well
                preemption.request(signal.SIGTERM)
        if stop:
            control.should_save = True
            control.should_training_stop = True
        return control


def connect_loggers(trainer, run_dir: Path) -> None:
    """Give the validation callback its trainer, and point TensorBoard at `run_dir/tensorboard`
    (its default, under the checkpoints folder, is deleted when training ends)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ValidationCallback):
            callback.trainer = trainer
        elif isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(Path(run_dir) / curves.TENSORBOARD_DIR)
