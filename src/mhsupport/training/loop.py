"""The one training sequence of both training stages: Trainer arguments from a profile, the runtime
settings and the `trainer` node, resuming from the newest sound checkpoint, the W&B run, and saving
the model into the run."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import secrets
import signal
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from mhsupport import preemption
from mhsupport.errors import MhsError
from mhsupport.modeling import devices
from mhsupport.training import curves
from mhsupport.training.processes import is_main_process, world_size
from mhsupport.training.validation import ValidationCallback

log = logging.getLogger(__name__)
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WANDB_ID_FILE = "wandb_run_id"  # in the checkpoints folder: the W&B run a resumed training continues

# TrainingArguments that the `trainer` node may not set, and why. Set from the model profile:
PROFILE_ARGUMENTS = {"num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
                     "gradient_accumulation_steps": "grad_accum", "learning_rate": "learning_rate",
                     "warmup_steps": "warmup_ratio", "weight_decay": "weight_decay", "save_steps": "save_steps",
                     "per_device_eval_batch_size": "eval_batch_size"}
# set from the run's seed (its labels and cards name it):
CONFIG_ARGUMENTS = {"seed": "seed", "data_seed": "seed"}
# fixed by the pipeline:
PIPELINE_ARGUMENTS = {"output_dir": "checkpoints go to the run's own folder",
                      "resume_from_checkpoint": "the same command resumes from the newest checkpoint by itself",
                      "eval_strategy": "validation runs at every epoch end, in the pipeline's own callback",
                      "remove_unused_columns": "the data collators need every column"}


def trainer_argument_names() -> list[str]:
    """The arguments the installed transformers' TrainingArguments takes."""
    return [f.name for f in dataclasses.fields(TrainingArguments) if f.init]


def check_trainer(cfg, group: str) -> None:
    """Every key of the `trainer` node must be a TrainingArguments argument that no other key sets;
    one line naming the key and what to set instead (the nearest valid keys for a typo)."""
    valid = trainer_argument_names()
    for key in cfg.get("trainer") or {}:
        if key in PROFILE_ARGUMENTS:
            raise MhsError(f"trainer.{key} is set by the model profile: use {group}.{PROFILE_ARGUMENTS[key]}=... "
                           f"instead of trainer.{key}")
        if key in CONFIG_ARGUMENTS:
            raise MhsError(f"trainer.{key} is set by {CONFIG_ARGUMENTS[key]}: use {CONFIG_ARGUMENTS[key]}=... "
                           f"instead of trainer.{key}")
        if key in PIPELINE_ARGUMENTS:
            raise MhsError(f"trainer.{key} cannot be set: {PIPELINE_ARGUMENTS[key]}; remove trainer.{key}")
        if key not in valid:
            nearest = difflib.get_close_matches(key, valid, n=3)
            hint = f"; nearest valid keys: {', '.join(f'trainer.{k}' for k in nearest)}" if nearest else ""
            raise MhsError(f"trainer.{key}: not an argument of TrainingArguments in transformers "
                           f"{transformers.__version__}{hint}")
    if "report_to" in (cfg.get("trainer") or {}):  # checked here too, so an up-to-date run does not hide a typo
        curves.report_to(cfg.trainer.report_to, "trainer.report_to")


def training_arguments(output_dir: Path, profile, runtime, seed: int, save_steps: int, trainer=None,
                       run_name: str | None = None) -> TrainingArguments:
    """The Trainer's arguments: the profile's recipe, the runtime's device and loggers, then the `trainer`
    node's arguments (checked by check_trainer) over the pipeline's defaults and the runtime's settings
    (trainer.logging_steps wins over runtime.logging_steps)."""
    device = devices.resolve(runtime)
    devices.check_training_device(device)
    on_gpu = device.type == "cuda"
    bf16 = devices.uses_bf16(device, runtime)
    backend = runtime.ddp_backend or (None if on_gpu else ("gloo" if world_size() > 1 else None))
    arguments = dict(
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
        run_name=run_name,
    )
    chosen = OmegaConf.to_container(trainer, resolve=True) if trainer is not None else {}
    arguments.update(chosen)
    if "report_to" in chosen:
        arguments["report_to"] = curves.report_to(chosen["report_to"], key="trainer.report_to")
    elif runtime.report_to == "auto" and not arguments["report_to"]:
        log.info("runtime.report_to=auto: TensorBoard is not installed, so no logger gets the curves "
                 "(`pip install 'mhsupport[tensorboard]'`); log_history.json and loss_curve.png are written either way")
    try:
        return TrainingArguments(**arguments)
    except (ValueError, TypeError) as err:  # TrainingArguments checks its values as it is made
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        settings = ", ".join(f"trainer.{k}={v!r}" for k, v in chosen.items()) or "no trainer.* keys"
        raise MhsError(f"TrainingArguments refused the arguments ({settings}): {detail}") from None


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


def run_arguments(run, cfg, profile, label: str) -> TrainingArguments:
    """The Trainer's arguments of a training run: checkpoints where the run keeps them while it is
    built, named by the stage's label and the run id (W&B's run name)."""
    return training_arguments(run.checkpoints_path, profile, cfg.runtime, cfg.seed, profile.save_steps,
                              trainer=cfg.trainer, run_name=f"{label} [{run.stage}/{run.run_id}]")


def train_resumable(run, seed: int, fresh: bool, make_trainer, finish, before_save=None, save_model=None):
    """The one training sequence of both trainers: build the run's temporary folder -> resume from
    its newest sound checkpoint -> train -> save the model on every process (it synchronises them)
    -> `finish` (metrics and extra files; writes on the main process) -> wait for every process.
    The checkpoints stay until the run is in place, so a kill at any point loses no training.

    make_trainer() -> Trainer (with run_arguments(run, ...)); before_save(trainer) (optional) changes the
    trained model before it is saved; save_model(trainer, folder) (optional) saves it instead of
    Trainer.save_model; finish(trainer, out_dir, train_output, resumed_from, train_seconds) fills run.metrics."""
    is_main = is_main_process()
    with run.build(seed=seed, is_main=is_main, resumable=True, fresh=fresh) as out:
        trainer = make_trainer()
        connect_loggers(trainer, out)
        resume = last_complete_checkpoint(run.checkpoints_path)
        if resume:
            log.info("resuming from %s", resume)
        with wandb_run(trainer.args, run, run.checkpoints_path, resume) as wandb_id:
            started = time.time()
            trainer.add_callback(PreemptionCallback())
            with preemption.deferred():  # a SIGTERM or SIGUSR1 saves a checkpoint at the next step and stops
                output = trainer.train(resume_from_checkpoint=resume)
            train_seconds = time.time() - started
            if before_save:
                before_save(trainer)
            if save_model:
                save_model(trainer, str(out / "model"))
            else:
                trainer.save_model(str(out / "model"))
            finish(trainer, out, output, resume, train_seconds)
        if wandb_id:
            run.metrics.setdefault("session", {})["wandb_run_id"] = wandb_id
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


@contextmanager
def wandb_run(args: TrainingArguments, run, checkpoints: Path, resume: str | None):
    """When the Trainer reports to W&B, the W&B run it reports to (its id is yielded; None without W&B):
    in project $WANDB_PROJECT (default mhsupport), named by `args.run_name` (the stage's label and the
    run id), with the run's resolved config as its config (the Trainer adds its arguments). The id is
    kept beside the checkpoints, so a resumed training continues the W&B run its first session opened;
    a fresh start (no checkpoint, or --force) opens a new one."""
    if "wandb" not in args.report_to or not is_main_process():
        yield None
        return
    import wandb  # the `wandb` extra; curves.report_to has checked that it is installed

    id_file = checkpoints / WANDB_ID_FILE
    if resume and id_file.is_file():
        wandb_id = id_file.read_text().strip()
    else:
        wandb_id = f"{run.run_id}-{secrets.token_hex(4)}"
        checkpoints.mkdir(parents=True, exist_ok=True)
        id_file.write_text(wandb_id + "\n")
    current = wandb.init(project=os.environ.get("WANDB_PROJECT", "mhsupport"), id=wandb_id, resume="allow",
                         name=args.run_name, job_type=run.stage, config=OmegaConf.to_container(run.cfg, resolve=True))
    finished = False
    try:
        yield wandb_id
        finished = True
    finally:
        current.finish(exit_code=0 if finished else 1)


def connect_loggers(trainer, run_dir: Path) -> None:
    """Give the validation callback its trainer, and point TensorBoard at `run_dir/tensorboard`
    (its default, under the checkpoints folder, is deleted when training ends)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ValidationCallback):
            callback.trainer = trainer
        elif isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(Path(run_dir) / curves.TENSORBOARD_DIR)
