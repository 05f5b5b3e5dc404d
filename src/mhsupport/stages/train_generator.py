"""`mhs train dialogpt`: fine-tune a causal LM on prepare-data's examples, in the paper's four
variants ({esconv, unified} x strategy tag on/off), with the Hugging Face Trainer."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from datasets import Dataset
from omegaconf import DictConfig
from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

from mhsupport import artifacts, cards, curves, models, training, upstream
from mhsupport.errors import MhsError
from mhsupport.examples_io import read_examples
from mhsupport.formatting import FORMATTERS, FormatterSettings, build_formatter, tag_labels, tag_token

log = logging.getLogger(__name__)
STAGE = "train_generator"


def check_options(cfg: DictConfig) -> None:
    upstream.check_dataset_and_tag_set(cfg)
    if cfg.generator.family not in FORMATTERS:
        raise MhsError(f"generator.family={cfg.generator.family!r}: expected one of {sorted(FORMATTERS)}")
    if cfg.generator.trainable not in ("all", "top_layers", "lora"):
        raise MhsError(f"generator.trainable={cfg.generator.trainable!r}: expected all, top_layers or lora")
    curves.report_to(cfg.runtime.report_to)  # an unknown or missing logger fails before anything is written


def tokenizer_texts(examples: list[dict]) -> list[str]:
    """The texts a from-scratch tokenizer is trained on: every context turn and response."""
    return [t["text"] for e in examples for t in e["context"]] + [e["response"] for e in examples]


def label_key(cfg: DictConfig) -> str:
    return "category" if cfg.tag_set == "category" else "strategy"


def plan(cfg: DictConfig) -> artifacts.Run:
    check_options(cfg)
    return artifacts.plan_run(STAGE, cfg, {"prepare_data": upstream.prepare_data_run(cfg)})


def run(cfg: DictConfig) -> artifacts.StageResult:
    run_ = plan(cfg)
    if run_.up_to_date(cfg.force):
        return artifacts.StageResult(run_, run_.read_metrics(), skipped=True)
    data_run = run_.inputs["prepare_data"]["run"]
    g = cfg.generator
    train_examples = training.seeded_subset(read_examples(data_run, cfg.dataset, "train"), g.train_subset, cfg.seed)
    valid_examples = training.seeded_subset(read_examples(data_run, "esconv", "valid"), g.valid_subset, cfg.seed)

    set_seed(cfg.seed)
    model, tokenizer = models.load_causal_lm(g, train_texts=tokenizer_texts(train_examples))
    labels = tag_labels(cfg)
    if labels:
        models.add_tag_tokens(model, tokenizer, {tag_token(label): label for label in labels})
    if g.trainable == "top_layers":
        models.freeze_all_but_top(model, g.top_layers)
    parameters = sum(p.numel() for p in model.parameters())
    if g.trainable == "lora":
        tag_ids = [tokenizer.convert_tokens_to_ids(tag_token(label)) for label in labels or ()]
        model = models.add_lora(model, g.lora, tag_ids)
    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    formatter = build_formatter(cfg, tokenizer)
    key = label_key(cfg)
    train_features = [formatter.training_features(e, key) for e in train_examples]
    valid_features = [formatter.training_features(e, key) for e in valid_examples]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def validate(m):
        return training.teacher_forced_loss(m, valid_features, collator, g.eval_batch_size)

    is_main = training.is_main_process()
    with run_.build(seed=cfg.seed, is_main=is_main, resumable=True) as out:
        args = training.training_arguments(out / "checkpoints", g, cfg.runtime, cfg.seed, g.save_steps)
        trainer = Trainer(model=model, args=args, data_collator=collator,
                          train_dataset=Dataset.from_list(train_features), processing_class=tokenizer,
                          callbacks=[training.ValidationCallback(validate)])
        training.connect_loggers(trainer, out)
        resume = training.last_complete_checkpoint(out / "checkpoints")
        if resume:
            log.info("resuming from %s", resume)
        started = time.time()
        result = trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.time() - started
        steps_this_session = trainer.state.global_step - (int(resume.rsplit("-", 1)[1]) if resume else 0)
        if g.trainable == "lora":  # scored and saved as a plain model, loadable with from_pretrained
            model = trainer.model = models.merge_lora(model)

        final_valid = validate(model)
        final_train = training.teacher_forced_loss(model, training.seeded_subset(train_features, g.train_eval_subset, cfg.seed),
                                                   collator, g.eval_batch_size)
        tokens_per_epoch = sum(len(f["input_ids"]) for f in train_features)
        padded = padded_tokens(trainer)
        run_.metrics = {
            "profile": g.profile, "dataset": cfg.dataset, "strategy_tag": bool(cfg.strategy_tag),
            "train_examples": len(train_features), "valid_examples": len(valid_features),
            "train_loss": final_train["loss"], "valid_loss": final_valid["loss"], "valid_ppl": final_valid["ppl"],
            "epochs": training.epoch_history(trainer.state.log_history),
            "checkpoint": "last (the model after the final epoch)",
            "tokens_seen": tokens_per_epoch * g.epochs,
            "parameters": parameters,
            "trainable_parameters": trainable_parameters,
            "padding_share": padded / (padded + tokens_per_epoch),
            # What differs between an uninterrupted and a resumed run, or between machines.
            "session": {
                "train_seconds": round(train_seconds, 2),
                "tokens_per_s": round(tokens_per_epoch * g.epochs * steps_this_session
                                      / max(trainer.state.max_steps, 1) / max(train_seconds, 1e-9), 1),
                "resumed_from": resume,
                "processes": training.world_size(),
                "trainer_train_loss": result.training_loss,
            },
        }
        trainer.save_model(str(out / "model"))  # every process: it synchronises them
        if is_main:
            tokenizer.save_pretrained(str(out / "model"))
            FormatterSettings.from_config(cfg).save(out / "model")
            cards.generator_card(cfg, run_.metrics, Path(data_run).name).save(out / "model" / "README.md")
            curves.save(trainer.state.log_history, out, f"generator ({g.profile}, {cfg.dataset}"
                        f"{', tagged' if labels else ''})")
        trainer.accelerator.wait_for_everyone()
        if is_main:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if is_main:
        log.info("train dialogpt wrote %s", run_.path)
    return artifacts.StageResult(run_, run_.metrics, skipped=False)


def padded_tokens(trainer) -> int:
    """Pad positions in one epoch of the trainer's own (length-grouped) batches."""
    return sum(int((batch["attention_mask"] == 0).sum()) for batch in trainer.get_train_dataloader())

