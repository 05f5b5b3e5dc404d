"""`mhs train dialogpt`: fine-tune a causal LM on prepare-data's examples, in the paper's four
variants ({esconv, unified} x strategy tag on/off), with the Hugging Face Trainer."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import DictConfig
from transformers import DataCollatorForSeq2Seq, set_seed

from mhsupport.runs import artifacts, cards
from mhsupport.modeling import devices, edits, loading
from mhsupport.training import curves, loop, processes, trainers, validation
from mhsupport.settings.config import prepare_data_config
from mhsupport.errors import MhsError
from mhsupport.data.examples_io import read_examples
from mhsupport.data.subsets import seeded_subset
from mhsupport.modeling.formatting import FormatterSettings, build_formatter, generator_tags, tag_token, whole_sentences

log = logging.getLogger(__name__)
STAGE = "train_generator"
COMMAND = "mhs train dialogpt"
PROFILE_GROUPS = ("generator",)


def requires(cfg: DictConfig) -> dict:
    return {"prepare_data": ("prepare_data", prepare_data_config(cfg))}


def label(cfg: DictConfig) -> str:
    return f"train dialogpt {cfg.dataset}{'+tag' if cfg.strategy_tag else ''} (seed {cfg.seed})"


def check(cfg: DictConfig) -> None:
    loop.check_trainer(cfg, "generator")


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    data_run = inputs["prepare_data"].path
    g = cfg.generator
    args = loop.run_arguments(run_, cfg, g, label(cfg))  # before any work: a refused argument stops here
    train_examples = seeded_subset(read_examples(data_run, cfg.dataset, "train"), g.train_subset, cfg.subset_seed)
    valid_examples = seeded_subset(read_examples(data_run, "esconv", "valid"), g.valid_subset, cfg.subset_seed)

    set_seed(cfg.seed)
    model, tokenizer = loading.load_causal_lm(g, devices.training(cfg.runtime),
                                             train_texts=loading.tokenizer_texts(train_examples))
    labels = generator_tags(cfg)
    tag_tokens = bool(labels) and g.tag_format == "token"  # the other formats write the strategy in words
    if tag_tokens:
        edits.add_tag_tokens(model, tokenizer, {tag_token(label): label for label in labels})
    if g.trainable == "top_layers":
        edits.freeze_all_but_top(model, g.top_layers)
    parameters = sum(p.numel() for p in model.parameters())
    adapter = g.trainable == "lora" and g.lora.save == "adapter"
    if adapter:
        base_record = loading.adapter_base_record(g, model.get_input_embeddings().num_embeddings)
        scratch_base = copy.deepcopy(model) if g.source == "scratch" else None  # before peft changes it in place
    if g.trainable == "lora":
        tag_ids = [tokenizer.convert_tokens_to_ids(tag_token(label)) for label in labels] if tag_tokens else []
        model = edits.add_lora(model, g.lora, tag_ids)
    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    formatter = build_formatter(cfg, tokenizer)
    if g.long_replies == "whole_sentences":  # the end token after a whole sentence (docs/ablations.md, loops)
        train_examples = [{**e, "response": whole_sentences(e["response"], tokenizer, g.max_response_tokens)}
                          for e in train_examples]
    train_features = [formatter.training_features(e) for e in train_examples]
    valid_features = [formatter.training_features(e) for e in valid_examples]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def validate(m):
        return validation.teacher_forced_loss(m, valid_features, g.eval_batch_size, tokenizer.pad_token_id or 0)

    validation_callback = validation.ValidationCallback(validate)
    callbacks = [validation_callback]
    if tag_tokens and g.tag_lr_scale != 1:
        tag_rows = [tokenizer.convert_tokens_to_ids(tag_token(label)) for label in labels]
        callbacks.append(trainers.RowStepScaleCallback(tag_rows, g.tag_lr_scale))

    contrast = {}
    if labels and g.tag_contrast_weight > 0:
        several_gpus = devices.resolve(cfg.runtime).type == "cuda" and torch.cuda.device_count() > 1  # DataParallel
        if processes.world_size() > 1 or cfg.runtime.fsdp or several_gpus:
            raise MhsError("generator.tag_contrast_weight > 0 trains one unwrapped model (two forward passes per step, "
                           "which DDP, FSDP and DataParallel cannot synchronise): run one process on one device "
                           "(no torchrun or runtime.fsdp; CUDA_VISIBLE_DEVICES=0), or add generator.tag_contrast_weight=0")
        contrast = {"openings": [formatter.opening_ids(label) for label in labels],
                    "weight": g.tag_contrast_weight, "negatives": min(g.tag_contrast_negatives, len(labels) - 1)}

    def make_trainer():
        trainer_class = trainers.TagContrastTrainer if contrast else trainers.LabelledPositionsTrainer
        return trainer_class(model=model, args=args, data_collator=collator, train_dataset=Dataset.from_list(train_features),
                             processing_class=tokenizer, callbacks=callbacks, **contrast)

    def merge_lora(trainer):  # generator.lora.save=merged: scored and saved as a plain model
        nonlocal model
        if g.trainable == "lora" and not adapter:
            model = trainer.model = edits.merge_lora(model)

    def save_adapter(trainer, folder):
        """Save as peft keeps a LoRA run: adapter_config.json and adapter_model.safetensors (the adapters and
        the tag tokens' trained rows), with base_model.json naming the base to load them over."""
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            trainer.save_model(folder)  # sharded weights: the Trainer gathers them first
        elif trainer.args.should_save:
            # Every other embedding row is the base model's: only the trainable tokens' rows are saved.
            trainer.model.save_pretrained(folder, save_embedding_layers=False)
        if trainer.args.should_save:
            (Path(folder) / loading.ADAPTER_BASE).write_text(json.dumps(base_record, indent=2) + "\n")
            if scratch_base is not None:
                scratch_base.save_pretrained(Path(folder) / loading.SCRATCH_BASE_DIR)

    def finish(trainer, out, result, resume, train_seconds):
        steps_this_session = trainer.state.global_step - (int(resume.rsplit("-", 1)[1]) if resume else 0)
        final_valid = validation_callback.result_at(trainer.state.global_step) or validate(model)
        final_train = validation.teacher_forced_loss(model, seeded_subset(train_features, g.train_eval_subset,
                                                                                 cfg.subset_seed),
                                                   g.eval_batch_size, tokenizer.pad_token_id or 0)
        tokens_per_epoch = sum(len(f["input_ids"]) for f in train_features)
        tokens_seen = round(tokens_per_epoch * trainer.state.epoch)  # epochs done, a fraction under trainer.max_steps
        padded = padded_tokens(trainer)
        run_.metrics = {
            "profile": g.profile, "dataset": cfg.dataset, "strategy_tag": bool(cfg.strategy_tag),
            "train_examples": len(train_features), "valid_examples": len(valid_features),
            "train_loss": final_train["loss"], "valid_loss": final_valid["loss"], "valid_ppl": final_valid["ppl"],
            "epochs": validation.epoch_history(trainer.state.log_history),
            "checkpoint": "last (the model after the final epoch)",
            "tokens_seen": tokens_seen,
            "parameters": parameters,
            "trainable_parameters": trainable_parameters,
            "padding_share": padded / (padded + tokens_per_epoch),
            # What differs between an uninterrupted and a resumed run, or between machines.
            "session": {
                "train_seconds": round(train_seconds, 2),
                "tokens_per_s": round(tokens_seen * steps_this_session / max(trainer.state.max_steps, 1)
                                      / max(train_seconds, 1e-9), 1),
                "resumed_from": resume,
                "processes": processes.world_size(),
                "trainer_train_loss": result.training_loss,
            },
        }
        run_.device = devices.describe(cfg.runtime, {"generator": trainer.model}, "bf16" if trainer.args.bf16 else None)
        if processes.is_main_process():
            tokenizer.save_pretrained(str(out / "model"))
            FormatterSettings.from_config(cfg).save(out / "model")
            cards.generator_card(cfg, run_.metrics, data_run.name).save(out / "model" / "README.md")
            curves.save(trainer.state.log_history, out, f"generator ({g.profile}, {cfg.dataset}"
                        f"{', tagged' if labels else ''})")

    loop.train_resumable(run_, cfg.seed, bool(cfg.force), make_trainer, finish, before_save=merge_lora,
                             save_model=save_adapter if adapter else None)
    if processes.is_main_process():
        log.info("train dialogpt wrote %s", run_.path)


def padded_tokens(trainer) -> int:
    """Pad positions in one epoch of the trainer's own (length-grouped) batches."""
    return sum(int((batch["attention_mask"] == 0).sum()) for batch in trainer.get_train_dataloader())
