"""`mhs train dialogpt`: fine-tune a causal LM on prepare-data's examples, in the paper's four
variants ({esconv, unified} x strategy tag on/off), with the Hugging Face Trainer."""

from __future__ import annotations

import json
import logging

from datasets import Dataset
from omegaconf import DictConfig
from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

from mhsupport import artifacts, models, training
from mhsupport.config import prepare_data_config
from mhsupport.examples_io import read_examples
from mhsupport.formatting import build_formatter, generator_tags, tag_token
from mhsupport.taxonomy import Taxonomy

log = logging.getLogger(__name__)
STAGE = "train_generator"
COMMAND = "mhs train dialogpt"
PROFILE_GROUPS = ("generator",)


def requires(cfg: DictConfig) -> dict:
    return {"prepare_data": ("prepare_data", prepare_data_config(cfg))}


def label(cfg: DictConfig) -> str:
    return f"train dialogpt {cfg.dataset}{'+tag' if cfg.strategy_tag else ''}"


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    data_run = inputs["prepare_data"].path
    g = cfg.generator
    train_examples = training.seeded_subset(read_examples(data_run, cfg.dataset, "train"), g.train_subset, cfg.seed)
    valid_examples = training.seeded_subset(read_examples(data_run, "esconv", "valid"), g.valid_subset, cfg.seed)

    set_seed(cfg.seed)
    model, tokenizer = models.load_causal_lm(g, train_texts=models.tokenizer_texts(train_examples))
    labels = generator_tags(cfg)
    if labels:
        models.add_tag_tokens(model, tokenizer, {tag_token(label): label for label in labels})
    if g.trainable == "top_layers":
        models.freeze_all_but_top(model, g.top_layers)
    formatter = build_formatter(cfg, tokenizer)
    key = Taxonomy.label_key(cfg.tag_set)
    train_features = [formatter.training_features(e, key) for e in train_examples]
    valid_features = [formatter.training_features(e, key) for e in valid_examples]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def validate(m):
        return training.teacher_forced_loss(m, valid_features, collator, g.eval_batch_size)

    def make_trainer(checkpoints):
        args = training.training_arguments(checkpoints, g, cfg.runtime, cfg.seed, g.save_steps)
        return Trainer(model=model, args=args, data_collator=collator, train_dataset=Dataset.from_list(train_features),
                       processing_class=tokenizer, callbacks=[training.ValidationCallback(validate)])

    def finish(trainer, out, result, resume, train_seconds):
        steps_this_session = trainer.state.global_step - (int(resume.rsplit("-", 1)[1]) if resume else 0)
        final_valid = validate(model)
        final_train = training.teacher_forced_loss(model, training.seeded_subset(train_features, g.train_eval_subset,
                                                                                 cfg.seed), collator, g.eval_batch_size)
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
        if training.is_main_process():
            tokenizer.save_pretrained(str(out / "model"))
            (out / "model" / "README.md").write_text(model_card(cfg, run_.metrics))
            (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")

    training.train_resumable(run_, cfg.seed, bool(cfg.force), make_trainer, finish)
    if training.is_main_process():
        log.info("train dialogpt wrote %s", run_.path)


def padded_tokens(trainer) -> int:
    """Pad positions in one epoch of the trainer's own (length-grouped) batches."""
    return sum(int((batch["attention_mask"] == 0).sum()) for batch in trainer.get_train_dataloader())


def model_card(cfg: DictConfig, metrics: dict) -> str:
    g = cfg.generator
    tags = generator_tags(cfg)
    tiny_warning = f"\n**{g.warning}**\n" if g.get("warning") else ""
    return f"""# mhsupport generator ({g.profile} profile, {cfg.dataset}, {'tagged' if tags else 'untagged'})
{tiny_warning}
A causal language model fine-tuned to write the supporter's next turn in an emotional-support
conversation, after Song & Yuan, "Synthesized Strategy for Mental Health Support".

## Intended use
Research only: reproducing and extending the paper's experiments. **Not a substitute for
professional care**, not for deployment to people in distress, not a crisis service.

## Data
- Training: `{cfg.dataset}` train split of the prepare-data run named in the run's `manifest.json`
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
