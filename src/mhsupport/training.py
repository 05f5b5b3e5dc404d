"""Plumbing shared by the training stages: Trainer arguments, resume, per-epoch validation,
teacher-forced loss, the W&B run, and process roles under torchrun."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import random
import secrets
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from mhsupport import curves, devices
from mhsupport.artifacts import CHECKPOINTS
from mhsupport.errors import MhsError
from mhsupport.formatting import IGNORE_INDEX
from mhsupport.scoring import Scored, sequence_nll, token_nll

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
    """The Trainer's arguments of a training run: checkpoints in the run's temporary folder (where
    train_resumable builds it), named by the stage's label and the run id (W&B's run name)."""
    return training_arguments(run.partial_path / CHECKPOINTS, profile, cfg.runtime, cfg.seed, profile.save_steps,
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
        resume = last_complete_checkpoint(out / CHECKPOINTS)
        if resume:
            log.info("resuming from %s", resume)
        with wandb_run(trainer.args, run, out / CHECKPOINTS, resume) as wandb_id:
            started = time.time()
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
        self.evaluate = evaluate
        self.prefix = prefix
        self.trainer = None

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        result = self.evaluate(model)
        self.trainer.log({f"{self.prefix}_{k}": v for k, v in result.items()})
        return self.trainer.control


def connect_loggers(trainer, run_dir: Path) -> None:
    """Give the validation callback its trainer, and point TensorBoard at `run_dir/tensorboard`
    (its default, under the checkpoints folder, is deleted when training ends)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ValidationCallback):
            callback.trainer = trainer
        elif isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(Path(run_dir) / curves.TENSORBOARD_DIR)


def epoch_history(log_history: list[dict], prefix: str = "valid") -> list[dict]:
    return [entry for entry in log_history if any(k.startswith(prefix + "_") for k in entry)]


class LabelledPositionsTrainer(Trainer):
    """A causal-LM Trainer whose LM head runs only where a label is scored. In a supporter reply
    after a long context most positions carry no label, and the head (vocabulary x width: a fifth
    of SmolLM2-135M's compute) is the costliest part to run on them. Same loss as the model's own:
    summed token cross-entropy over the shifted labels, divided by the labelled tokens."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model is not self.model:  # wrapped (DDP, FSDP): only its own forward synchronises gradients
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        # the Trainer's bf16 autocast wraps only the model's own forward, which this loss bypasses
        with self.accelerator.autocast():
            hidden = model.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
            targets = labels[:, 1:]
            scored = targets != IGNORE_INDEX
            logits = model.get_output_embeddings()(hidden[:, :-1][scored])
        loss = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else scored.sum()).to(loss.device)
        return (loss, {"logits": logits}) if return_outputs else loss


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
