"""`mhs train classifier`: the next-category classifier (or, mode=response, the response
recogniser), evaluated on ESConv valid and test beside the baselines of DESIGN.md section 6."""

from __future__ import annotations

import logging
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig
from sklearn.metrics import ConfusionMatrixDisplay
from transformers import DataCollatorWithPadding, Trainer, set_seed

from mhsupport.runs import artifacts, cards
from mhsupport.modeling import devices, loading
from mhsupport.training import curves, loop, processes, validation
from mhsupport.evaluation.baselines import majority_label, previous_supporter_label, tfidf_logistic_regression
from mhsupport.evaluation.classification import bootstrap_systems, calibration, classification_scores
from mhsupport.modeling.classifier import Classifier, ClassifierSettings, context_text
from mhsupport.settings.config import prepare_data_config
from mhsupport.data.examples_io import read_examples
from mhsupport.data.subsets import seeded_subset
from mhsupport.data.taxonomy import Taxonomy

log = logging.getLogger(__name__)
STAGE = "train_classifier"
COMMAND = "mhs train classifier"
PROFILE_GROUPS = ("classifier",)
EVAL_SPLITS = ("valid", "test")


def requires(cfg: DictConfig) -> dict:
    return {"prepare_data": ("prepare_data", prepare_data_config(cfg))}


def label(cfg: DictConfig) -> str:
    return f"train classifier ({cfg.mode}, seed {cfg.seed})"


def settings_for(cfg: DictConfig) -> ClassifierSettings:
    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    return ClassifierSettings(mode=cfg.mode, labels=taxonomy.labels(cfg.tag_set), label_key=Taxonomy.label_key(cfg.tag_set),
                              context_turns=cfg.context_turns, history_categories=bool(cfg.history_categories),
                              max_length=cfg.classifier.max_length)


def tfidf_settings(cfg: DictConfig) -> DictConfig:
    """The TF-IDF baseline's settings for this run's mode and tag set."""
    return cfg.tfidf_baseline_by_task[cfg.mode][cfg.tag_set]


def check(cfg: DictConfig) -> None:
    loop.check_trainer(cfg, "classifier")


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    data_run = inputs["prepare_data"].path
    p = cfg.classifier
    args = loop.run_arguments(run_, cfg, p, label(cfg))  # before any work: a refused argument stops here
    settings = settings_for(cfg)
    label_id = {label: i for i, label in enumerate(settings.labels)}
    train_examples = seeded_subset(read_examples(data_run, cfg.dataset, "train"), p.train_subset, cfg.subset_seed)
    # Model selection (scripts/ablate_classifier.py) reads ESConv valid alone: test stays untouched.
    splits = ("valid",) if cfg.model_selection else EVAL_SPLITS
    evaluation = {split: read_examples(data_run, "esconv", split) for split in splits}

    set_seed(cfg.seed)
    texts = [t["text"] for e in train_examples for t in e["context"][-cfg.context_turns:]] + \
            [e["response"] for e in train_examples]
    model, tokenizer = loading.load_sequence_classifier(p, len(settings.labels), devices.training(cfg.runtime),
                                                       train_texts=texts)
    model.config.id2label = dict(enumerate(settings.labels))
    model.config.label2id = label_id
    classifier = Classifier(model, tokenizer, settings)
    separator = f" {tokenizer.sep_token} " if tokenizer.sep_token else " | "
    encoded = tokenizer([settings.text(e, separator) for e in train_examples], truncation=True, max_length=p.max_length)
    train_data = Dataset.from_dict({**encoded, "labels": [label_id[e[settings.label_key]] for e in train_examples]})

    counts = Counter(e[settings.label_key] for e in train_examples)
    loss_function = None
    if cfg.class_weighting:
        weights = torch.tensor([len(train_examples) / (len(settings.labels) * max(counts[l], 1)) for l in settings.labels])

        def loss_function(outputs, labels, num_items_in_batch=None):
            return torch.nn.functional.cross_entropy(outputs.logits.float(), labels, weight=weights.to(labels.device))

    def validate(m):
        gold = [e[settings.label_key] for e in evaluation["valid"]]
        probabilities = classifier.predict_proba(evaluation["valid"], p.eval_batch_size)
        scores = classification_scores(gold, [settings.labels[i] for i in probabilities.argmax(axis=1)], settings.labels)
        return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "probabilities": probabilities}

    validation_callback = validation.ValidationCallback(validate)

    def make_trainer():
        return Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer),
                       train_dataset=train_data, processing_class=tokenizer, compute_loss_func=loss_function,
                       callbacks=[validation_callback])

    def split_probabilities(split: str, step: int):
        """The final model's probabilities on a split; valid's from the last epoch's validation when
        it scored this model."""
        final_validation = validation_callback.result_at(step) if split == "valid" else None
        if final_validation is not None:
            return final_validation["probabilities"]
        return classifier.predict_proba(evaluation[split], p.eval_batch_size)

    def finish(trainer, out, result, resume, train_seconds):
        classifier.model = trainer.model.eval()
        metrics = {"profile": p.profile, "dataset": cfg.dataset, "mode": cfg.mode, "labels": settings.labels,
                   "train_examples": len(train_examples), "train_label_counts": dict(counts),
                   "epochs": validation.epoch_history(trainer.state.log_history),
                   "checkpoint": "last (the model after the final epoch)",
                   "session": {"train_seconds": round(result.metrics["train_runtime"], 2), "resumed_from": resume,
                               "processes": processes.world_size()}}
        run_.device = devices.describe(cfg.runtime, {"classifier": trainer.model}, "bf16" if trainer.args.bf16 else None)
        if cfg.model_selection:
            gold = [e[settings.label_key] for e in evaluation["valid"]]
            probabilities = split_probabilities("valid", trainer.state.global_step)
            metrics["valid"] = {"model": classification_scores(
                gold, [settings.labels[i] for i in probabilities.argmax(axis=1)], settings.labels)}
            run_.metrics = metrics
            return
        baselines = baseline_predictions(cfg, settings, train_examples, evaluation)
        for split, examples in evaluation.items():
            gold = [e[settings.label_key] for e in examples]
            probabilities = split_probabilities(split, trainer.state.global_step)
            systems = {"model": [settings.labels[i] for i in probabilities.argmax(axis=1)], **baselines[split]}
            metrics[split] = {name: classification_scores(gold, predicted, settings.labels)
                              for name, predicted in systems.items()}
            # beside the split's systems (consumers iterate over metrics[split] as systems)
            metrics.setdefault("significance", {})[split] = bootstrap_systems(
                gold, systems, settings.labels, "model", cfg.bootstrap.resamples, cfg.bootstrap.seed)
            metrics[split]["model"]["calibration"] = calibration(gold, probabilities, settings.labels)
        run_.metrics = metrics
        if processes.is_main_process():
            classifier.save(out / "model")
            cards.classifier_card(cfg, metrics, data_run.name).save(out / "model" / "README.md")
            note = f" - {p.warning}" if p.get("warning") else ""
            title = f"{cfg.mode} classifier ({p.profile}{note}), ESConv test"
            plot_confusion(metrics["test"]["model"], out / "confusion_test.png", title)
            plot_reliability(metrics["test"]["model"]["calibration"], out / "reliability_test.png", title)
            curves.save(trainer.state.log_history, out, f"{cfg.mode} classifier ({p.profile}{note})")

    loop.train_resumable(run_, cfg.seed, bool(cfg.force), make_trainer, finish)
    if processes.is_main_process():
        log.info("train classifier wrote %s", run_.path)


def baseline_predictions(cfg, settings: ClassifierSettings, train_examples, evaluation) -> dict:
    """Majority class, previous supporter label (next_category only) and TF-IDF + logistic
    regression, trained on the same training examples. TF-IDF reads the earlier supporter turns'
    labels whenever the model does (history_categories), so the model's margin is not the labels'."""
    key = settings.label_key
    train_labels = [e[key] for e in train_examples]
    majority = majority_label(train_labels)
    tfidf = tfidf_settings(cfg)
    history_key = key if settings.history_categories else None

    def text(example):
        if settings.mode == "response":
            return example["response"]
        return context_text(example["context"], tfidf.context_turns, " | ", history_key)

    # With no earlier supporter turn, "previous category" falls back to the commonest label of such
    # opening turns in the training conversations (mostly greetings and questions), not the overall
    # majority. Reddit pairs are left out: they have no conversation to open.
    openings = [e[key] for e in train_examples if e["source"] == "esconv"
                and not any(t["speaker"] == "supporter" for t in e["context"])]
    opening_label = majority_label(openings) if openings else majority
    tfidf_predicted = tfidf_logistic_regression(
        [text(e) for e in train_examples], train_labels,
        {split: [text(e) for e in examples] for split, examples in evaluation.items()},
        tfidf.ngram_max, tfidf.max_iter, cfg.seed, tfidf.C)
    out = {}
    for split, examples in evaluation.items():
        out[split] = {"majority": [majority] * len(examples)}
        if settings.mode == "next_category":
            out[split]["previous_category"] = previous_supporter_label(examples, key, opening_label)
        out[split]["tfidf_lr"] = tfidf_predicted[split]
    return out


def plot_reliability(calibration_scores: dict, path, title: str) -> None:
    """The reliability diagram: top-label confidence against accuracy (with its expected calibration
    error), and each class's one-vs-rest curve: the probabilities a classifier sampler draws from."""
    figure, axes = plt.subplots(figsize=(6.5, 6))
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    top = calibration_scores["top_label"]
    axes.plot(top["mean_confidence"], top["accuracy"], marker="o", linewidth=2, color="black",
              label=f"top label (ECE {calibration_scores['expected_calibration_error']:.3f})")
    for label, curve in calibration_scores["per_class"].items():
        axes.plot(curve["mean_probability"], curve["fraction_gold"], marker=".", linewidth=1, alpha=0.7,
                  label=f"{label} (one-vs-rest)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("predicted probability (bin mean)")
    axes.set_ylabel("observed frequency")
    axes.set_title(f"Reliability: {title}", fontsize=9)
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_confusion(scores: dict, path, title: str) -> None:
    labels = scores["confusion"]["labels"]
    figure, axes = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.1 * len(labels) + 2.5))
    ConfusionMatrixDisplay(np.array(scores["confusion"]["rows_gold_cols_predicted"]), display_labels=labels).plot(ax=axes, cmap="Blues", colorbar=False,
                                                       xticks_rotation=45 if len(labels) > 4 else 0)
    axes.set_title(f"{title}\naccuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
