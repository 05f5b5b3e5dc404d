"""`mhs train dialogpt`: fine-tune a causal LM on prepare-data's examples, in the paper's four
variants ({esconv, unified} x strategy tag on/off), with the Hugging Face Trainer."""

from __future__ import annotations

import json
import logging
import shutil
import time

from datasets import Dataset
from omegaconf import DictConfig
from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

from mhsupport import artifacts, devices, models, training, upstream
from mhsupport.errors import MhsError
from mhsupport.examples_io import read_examples
from mhsupport.formatting import FORMATTERS, tag_token
from mhsupport.taxonomy import Taxonomy

log = logging.getLogger(__name__)
STAGE = "train_generator"


def check_options(cfg: DictConfig) -> None:
    upstream.check_dataset_and_tag_set(cfg)
    if cfg.generator.family not in FORMATTERS:
        raise MhsError(f"generator.family={cfg.generator.family!r}: expected one of {sorted(FORMATTERS)}")
    if cfg.generator.trainable not in ("all", "top_layers"):
        raise MhsError(f"generator.trainable={cfg.generator.trainable!r}: expected all or top_layers")


def tag_labels(cfg: DictConfig) -> list[str] | None:
    """The tag vocabulary of a tagged model, None for an untagged one."""
    if not cfg.strategy_tag:
        return None
    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    return list(taxonomy.categories if cfg.tag_set == "category" else taxonomy.esconv_strategies)


def tokenizer_texts(examples: list[dict]) -> list[str]:
    """The texts a from-scratch tokenizer is trained on: every context turn and response."""
    return [t["text"] for e in examples for t in e["context"]] + [e["response"] for e in examples]


def label_key(cfg: DictConfig) -> str:
    return "category" if cfg.tag_set == "category" else "strategy"


def plan(cfg: DictConfig) -> artifacts.Run:
    check_options(cfg)
    return artifacts.plan_run(STAGE, cfg, {"prepare_data": upstream.prepare_data_run(cfg)})


def build_formatter(cfg: DictConfig, tokenizer):
    g = cfg.generator
    return FORMATTERS[g.family](tokenizer, g.max_context_tokens, g.max_response_tokens, tag_labels(cfg),
                                cfg.tags_in_history, g.system_prompt)


def run(cfg: DictConfig) -> artifacts.StageResult:
    run_ = plan(cfg)
    if run_.up_to_date(cfg.force):
        return artifacts.StageResult(run_, run_.read_metrics(), skipped=True)
    data_run = run_.inputs["prepare_data"]["run"]
    g = cfg.generator
    train_examples = training.seeded_subset(read_examples(data_run, cfg.dataset, "train"), g.train_subset, cfg.seed)
    valid_examples = training.seeded_subset(read_examples(data_run, "esconv", "valid"), g.valid_subset, cfg.seed)

    set_seed(cfg.seed)
    model, tokenizer = models.load_causal_lm(g, devices.training(cfg.runtime),
                                             train_texts=tokenizer_texts(train_examples))
    labels = tag_labels(cfg)
    if labels:
        models.add_tag_tokens(model, tokenizer, {tag_token(label): label for label in labels})
    if g.trainable == "top_layers":
        models.freeze_all_but_top(model, g.top_layers)
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
        resume = training.last_complete_checkpoint(out / "checkpoints")
        if resume:
            log.info("resuming from %s", resume)
        started = time.time()
        result = trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.time() - started
        steps_this_session = trainer.state.global_step - (int(resume.rsplit("-", 1)[1]) if resume else 0)

        final_valid = validate(model)
        final_train = training.teacher_forced_loss(model, training.seeded_subset(train_features, g.train_eval_subset, cfg.seed),
                                                   collator, g.eval_batch_size)
        tokens_per_epoch = sum(len(f["input_ids"]) for f in train_features)
        padded = padded_tokens(trainer)
        parameters = sum(p.numel() for p in model.parameters())
        run_.metrics = {
            "profile": g.profile, "dataset": cfg.dataset, "strategy_tag": bool(cfg.strategy_tag),
            "train_examples": len(train_features), "valid_examples": len(valid_features),
            "train_loss": final_train["loss"], "valid_loss": final_valid["loss"], "valid_ppl": final_valid["ppl"],
            "epochs": training.epoch_history(trainer.state.log_history),
            "checkpoint": "last (the model after the final epoch)",
            "tokens_seen": tokens_per_epoch * g.epochs,
            "parameters": parameters,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
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
        run_.device = devices.describe(cfg.runtime, {"generator": trainer.model}, "bf16" if args.bf16 else None)
        trainer.save_model(str(out / "model"))  # every process: it synchronises them
        if is_main:
            tokenizer.save_pretrained(str(out / "model"))
            (out / "model" / "README.md").write_text(model_card(cfg, run_.metrics, data_run))
            (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        trainer.accelerator.wait_for_everyone()
        if is_main:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if is_main:
        log.info("train dialogpt wrote %s", run_.path)
    return artifacts.StageResult(run_, run_.metrics, skipped=False)


def padded_tokens(trainer) -> int:
    """Pad positions in one epoch of the trainer's own (length-grouped) batches."""
    return sum(int((batch["attention_mask"] == 0).sum()) for batch in trainer.get_train_dataloader())


def model_card(cfg: DictConfig, metrics: dict, data_run) -> str:
    g = cfg.generator
    tags = tag_labels(cfg)
    tiny_warning = ("\n**This is the `tiny` profile: a plumbing check trained from scratch. Its numbers and "
                    "its answers mean nothing.**\n" if g.profile == "tiny" else "")
    return f"""# mhsupport generator ({g.profile} profile, {cfg.dataset}, {'tagged' if tags else 'untagged'})
{tiny_warning}
A causal language model fine-tuned to write the supporter's next turn in an emotional-support
conversation, after Song & Yuan, "Synthesized Strategy for Mental Health Support".

## Intended use
Research only: reproducing and extending the paper's experiments. **Not a substitute for
professional care**, not for deployment to people in distress, not a crisis service.

## Data
- Training: `{cfg.dataset}` train split from prepare-data run `{data_run}`
  ({metrics['train_examples']} examples); validation: ESConv valid ({metrics['valid_examples']} examples).
- ESConv (Liu et al., ACL 2021), CC BY-NC 4.0, academic research use.
- EPITOME Reddit (Sharma et al., EMNLP 2020), academic research use, attribution required; real,
  unedited Reddit posts including self-harm and suicidal ideation.

## Settings
- Base: {g.source} `{g.get('name_or_path') or g.get('gguf_file') or 'GPT-2 from scratch'}`; formatter `{g.family}`.
- Tags: {', '.join(tag_token(t) for t in tags) if tags else 'none'} (placed before the response;
  gold tags in history: {bool(cfg.tags_in_history)}).
- Context <= {g.max_context_tokens} tokens (truncated from the left); response <= {g.max_response_tokens} tokens;
  loss on tag and response tokens only.
- Trainable: {g.trainable}{f' (top {g.top_layers} layers + embeddings)' if g.trainable == 'top_layers' else ''};
  {metrics['trainable_parameters']:,} of {metrics['parameters']:,} parameters.
- {g.epochs} epoch(s), batch {g.batch_size} x {g.grad_accum}, learning rate {g.learning_rate}, seed {cfg.seed}.
- Saved checkpoint: {metrics['checkpoint']}.

## Metrics
- Train loss (teacher-forced, up to {g.train_eval_subset} training examples): {metrics['train_loss']:.4f}
- ESConv valid loss: {metrics['valid_loss']:.4f}; token-level perplexity: {metrics['valid_ppl']:.2f}
"""
