"""Hugging Face cards: the prepare-data run as a dataset (`load_dataset(run_dir, "unified")`),
generators and classifiers as models (YAML metadata, how to use them), and `mhs export`."""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData, upload_folder

from mhsupport.errors import MhsError
from mhsupport.data.examples_io import DATASETS, EXAMPLE_SCHEMA, examples_path
from mhsupport.modeling.formatting import FormatterSettings, generator_tags, tag_token
from mhsupport.data.splits import SPLITS

# Our split names -> Hugging Face's (`datasets.Split.VALIDATION` is "validation").
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
ESCONV_HUB_ID = "thu-coai/esconv"
EPITOME_SOURCE = "https://github.com/behavioral-data/Empathy-Mental-Health"
LICENCES = f"""- **ESConv** (Liu et al., ACL 2021; [{ESCONV_HUB_ID}](https://huggingface.co/datasets/{ESCONV_HUB_ID})):
  CC BY-NC 4.0, non-commercial, attribution required.
- **EPITOME** Reddit (Sharma et al., EMNLP 2020; [{EPITOME_SOURCE.removeprefix('https://')}]({EPITOME_SOURCE})):
  released for academic research; attribution required. Real, unedited Reddit posts, including
  self-harm and suicidal ideation."""
INTENDED_USE = """Research only: reproducing and extending Song & Yuan, "Synthesized Strategy for Mental
Health Support". **Not a substitute for professional care**, not for deployment to people in
distress, not a crisis service."""
def profile_warning(profile) -> str:
    """The profile's own warning (configs/*/tiny.yaml), in bold, or nothing."""
    return f"\n**{profile.warning}**\n" if profile.get("warning") else ""


FIELDS = {
    "source": "`esconv` or `epitome`",
    "conversation_id": "ESConv conversation or EPITOME seeker-post id",
    "split": "`train`, `valid` or `test` (our names; the Hugging Face split `validation` holds `valid`)",
    "turn_index": "index of the response turn in its conversation (0 for a Reddit pair)",
    "context": "earlier turns, most recent last: `speaker` (seeker/supporter), `text`, `strategy`, `category`",
    "response": "the supporter's turn to predict",
    "strategy": "ESConv strategy, or EPITOME levels as `emotional_reactions=2,explorations=0,interpretations=1`",
    "category": "one of the four support categories (the label models train on)",
    "situation": "ESConv's situation text (empty for Reddit pairs)",
}


# --- the dataset ----------------------------------------------------------------------------

def split_sizes(stats: dict) -> dict[str, dict[str, int]]:
    """Examples per config and split, from prepare-data's stats (unified = ESConv + EPITOME)."""
    esconv = {s: sum(stats["esconv"][s]["examples"].values()) for s in SPLITS}
    return {"esconv": esconv, "unified": {s: esconv[s] + sum(stats["epitome"][s].values()) for s in SPLITS}}


def dataset_card(cfg, stats: dict) -> DatasetCard:
    """The card of a prepare-data run: one config per dataset with its parquet files per split,
    and features and split sizes that `load_dataset` checks on load."""
    # Imported here: `datasets` takes most of a second to import, longer than the rest of prepare-data's start.
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict

    sizes = split_sizes(stats)
    rows = sum(sizes["unified"].values())
    size_category = next(label for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                                                    (float("inf"), "100K<n<1M")) if rows < bound)
    configs = [{"config_name": name, "default": name == "unified",
                "data_files": [{"split": HF_SPLITS[s], "path": str(examples_path(Path(), name, s))} for s in SPLITS]}
               for name in ("unified", "esconv")]
    data = DatasetCardData(language="en", license="other", license_name="esconv-cc-by-nc-4.0-and-epitome-research-only",
                           pretty_name="Unified ESConv + EPITOME support categories",
                           task_categories=["text-generation", "text-classification"], size_categories=size_category,
                           tags=["mental-health", "emotional-support", "dialogue"], configs=configs)
    DatasetInfosDict({
        name: DatasetInfo(features=Features.from_arrow_schema(EXAMPLE_SCHEMA), config_name=name,
                          splits=SplitDict({HF_SPLITS[s]: SplitInfo(HF_SPLITS[s], num_examples=sizes[name][s])
                                            for s in SPLITS}))
        for name in DATASETS}).to_dataset_card_data(data)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{dataset_body(cfg, stats, sizes)}")


def dataset_body(cfg, stats: dict, sizes: dict) -> str:
    d = cfg.data
    rows = "\n".join(f"| `{name}` | " + " | ".join(f"{sizes[name][s]:,}" for s in SPLITS) + " |"
                     for name in ("unified", "esconv"))
    categories = list(stats["esconv"]["train"]["examples"])
    counts = "\n".join(f"| {c} | " + " | ".join(f"{stats['esconv'][s]['examples'][c]:,}" for s in SPLITS)
                       + " | " + " | ".join(f"{stats['epitome'][s][c]:,}" for s in SPLITS) + " |"
                       for c in categories)
    fields = "\n".join(f"| `{name}` | {FIELDS[name]} |" for name in EXAMPLE_SCHEMA.names)
    dropped = stats["dropped_for_leakage"]
    dropped_lines = "\n".join(f"- `{x['conversation_id']}` ({x['split']}; its situation also occurs in "
                              f"{x['also_in']}): {x['situation']!r}" for x in dropped) or "- none"
    buckets = d.epitome_bucket_bounds
    return f"""
# Unified ESConv + EPITOME support categories

Emotional-support conversations (ESConv) and Reddit seeker post / response pairs (EPITOME),
one example per supporter response, each labelled with one of four support categories, in
leak-free train / validation / test splits. Built by `mhs prepare-data` (mhsupport).

## Intended use

{INTENDED_USE}

## Loading

```python
from datasets import load_dataset

unified = load_dataset("path/to/this/folder", "unified")  # the default: ESConv + EPITOME
esconv = load_dataset("path/to/this/folder", "esconv")    # ESConv only
```

| config | train | validation | test |
| --- | ---: | ---: | ---: |
{rows}

`unified` holds every `esconv` example plus one per EPITOME pair; load one config, not the
folder's parquet files together (that would count ESConv twice).

## Fields

| field | meaning |
| --- | --- |
{fields}

## Categories per split

| category | ESConv train | ESConv valid | ESConv test | EPITOME train | EPITOME valid | EPITOME test |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{counts}

## Splits and leakage

- ESConv keeps its given train/valid/test split by conversation (or, from the single upstream file,
  a seeded 70/15/15 split by conversation); contexts hold at most {d.max_context_turns} earlier turns.
- EPITOME is split by seeker post: `sha256(sp_id) % 100` below {buckets.train} is train, below
  {buckets.valid} validation, the rest test, so all responses to one post share a split.
- No conversation or seeker post is in two splits. A later-split conversation whose situation text
  also occurs in an earlier split is handled by `data.on_situation_overlap={d.on_situation_overlap}`
  (`drop`: removed from the later split; `refuse`: stop). Dropped here:

{dropped_lines}

## Licences

{LICENCES}

This folder's `license: other` stands for both terms: the stricter applies to `unified`.
"""


# --- models ---------------------------------------------------------------------------------

def _datasets(dataset: str) -> list[str]:
    return [ESCONV_HUB_ID] if dataset == "esconv" else [ESCONV_HUB_ID, "epitome"]


def _card(data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _tag_text(settings: FormatterSettings) -> str:
    """How a tagged generator is given its strategy, for its card."""
    own = (" Give one to ask for a category; without one, the model's own is drawn from its probabilities of "
           "the openings (`own_strategy`), and they are never part of the reply.")
    if settings.tag_format == "token":
        tags = ", ".join(f"`{tag_token(label)}` ({label})" for label in settings.labels)
        return (f"Tags: {tags}. A tag is one special token placed right after the prompt, as the first token "
                "of the supporter's turn; the response follows it." + own)
    if settings.tag_format == "words":
        openings = "; ".join(f"{label}: `{settings.words[label]['opening'].strip()}`" for label in settings.labels)
        return ("The strategy is written in words at the start of the supporter's turn, then the response "
                f"follows on the next line. Openings: {openings}." + own)
    notes = "; ".join(f"{label}: \"{settings.words[label]['instruction']}\"" for label in settings.labels)
    return ("The strategy is given in words as a note right before the supporter's turn (a system message "
            f"after the conversation): {notes} Without a tag the note is left out.")


def generator_card(cfg, metrics: dict, data_run_id: str) -> ModelCard:
    g = cfg.generator
    labels = generator_tags(cfg)
    name = f"mhsupport-generator-{g.profile}-{cfg.dataset}{'-tagged' if labels else ''}"
    data = ModelCardData(
        model_name=name, base_model=g.base_model, datasets=_datasets(cfg.dataset), language="en",
        license="other", license_name="research-only-cc-by-nc-4.0-data",
        library_name="peft" if g.trainable == "lora" and g.lora.save == "adapter" else "transformers",
        pipeline_tag="text-generation", metrics=["perplexity"],
        tags=["mhsupport", "emotional-support", "dialogue"] + (["strategy-tags"] if labels else [])
        + (["lora"] if g.trainable == "lora" else []),
        eval_results=[EvalResult(task_type="text-generation", dataset_type=ESCONV_HUB_ID, dataset_name="ESConv",
                                 dataset_split="validation", metric_type="perplexity", metric_name="token perplexity",
                                 metric_value=round(metrics["valid_ppl"], 4))])
    example_tag = f', tag="{labels[0]}"' if labels else ""
    if labels:
        tag_text = _tag_text(FormatterSettings.from_config(cfg))
        if cfg.tags_in_history:
            tag_text += " Earlier supporter turns carried their gold tag in training (`tags_in_history`)."
    else:
        tag_text = "Untagged: the prompt is followed directly by the response."
    prompt = ("the context turns, each followed by the EOS token (DialoGPT style), the last "
              f"{g.max_context_tokens} tokens kept" if g.family == "eos_joined" else
              "the tokenizer's chat template (seeker = user, supporter = assistant"
              + (", with a system prompt" if g.system_prompt else "") + f") with the generation prompt, "
              f"the oldest turns dropped to fit {g.max_context_tokens} tokens")
    adapter = g.trainable == "lora" and g.lora.save == "adapter"
    targets = g.lora.target_modules if isinstance(g.lora.target_modules, str) else ", ".join(g.lora.target_modules)
    trainable = {"all": "all weights", "top_layers": f"the top {g.top_layers} layers and the embeddings",
                 "lora": f"LoRA (r={g.lora.r}, alpha={g.lora.alpha}, on {targets}) and the tag embeddings, "
                         + ("kept as a peft adapter" if adapter else "merged into the weights")}[g.trainable]
    loading = ("The folder is a peft adapter: `PeftModel.from_pretrained` over the base model that "
               "`base_model.json` names, its embeddings resized to the tokenizer's vocabulary" if adapter else
               "The folder loads with `AutoModelForCausalLM.from_pretrained`")
    body = f"""
# {name}
{profile_warning(g)}
A causal language model fine-tuned to write the supporter's next turn in an emotional-support
conversation, after Song & Yuan, "Synthesized Strategy for Mental Health Support".

## Intended use

{INTENDED_USE}

## How to use

```python
from mhsupport import generator

g = generator.load("path/to/this/folder")
g.respond([{{"speaker": "seeker", "text": "I lost my job and I can't sleep."}}]{example_tag})
```

Prompt: {prompt}. {tag_text} {loading};
`generator.json` holds the prompt settings.

## Data

- Training: `{cfg.dataset}` train ({metrics['train_examples']:,} examples) of prepare-data run `{data_run_id}`;
  validation: ESConv valid ({metrics['valid_examples']:,} examples).
{LICENCES}

## Training

- Base: {g.base_model or 'a GPT-2 trained from scratch with its own byte-level BPE tokenizer'}; formatter `{g.family}`{f"; strategy given as `{g.tag_format}`" if labels else ""}.
- Context <= {g.max_context_tokens} tokens (truncated from the left); response <= {g.max_response_tokens} tokens;
  loss on the tag and response tokens only (an instruction is prompt).
- Trained: {trainable}; {metrics['trainable_parameters']:,} of {metrics['parameters']:,} parameters.
- {g.epochs} epoch(s), batch {g.batch_size} x {g.grad_accum}, learning rate {g.learning_rate}, seed {cfg.seed};
  saved: {metrics['checkpoint']}.

## Metrics

- Train loss (teacher-forced, up to {g.train_eval_subset} training examples): {metrics['train_loss']:.4f}
- ESConv valid loss: {metrics['valid_loss']:.4f}; token-level perplexity: {metrics['valid_ppl']:.2f}
"""
    return _card(data, body)


def classifier_card(cfg, metrics: dict, data_run_id: str) -> ModelCard:
    p = cfg.classifier
    labels = metrics["labels"]
    what = "response-recogniser" if cfg.mode == "response" else "next-category"
    name = f"mhsupport-{what}-{p.profile}-{cfg.dataset}-{len(labels)}-way"
    test = metrics["test"]
    data = ModelCardData(
        model_name=name, base_model=p.base_model, datasets=_datasets(cfg.dataset), language="en",
        license="other", license_name="research-only-cc-by-nc-4.0-data", library_name="transformers",
        pipeline_tag="text-classification", metrics=["accuracy", "f1"],
        tags=["mhsupport", "emotional-support", "dialogue", what],
        eval_results=[EvalResult(task_type="text-classification", dataset_type=ESCONV_HUB_ID, dataset_name="ESConv",
                                 dataset_split="test", metric_type=metric, metric_name=label,
                                 metric_value=round(test["model"][key], 4))
                      for metric, label, key in (("accuracy", "accuracy", "accuracy"),
                                                 ("f1", "macro-F1", "macro_f1"))])
    if cfg.mode == "response":
        task = "recognises the support category of a supporter's response"
        inputs = "the response text"
        example = 'clf.predict(["Have you thought about talking to someone you trust?"])'
    else:
        task = "predicts the support category of the supporter's next turn from the conversation so far"
        inputs = (f"the last {cfg.context_turns} context turns as `Seeker: ...` / `Supporter: ...` joined by the "
                  "separator token, truncated from the left"
                  + ("; earlier supporter turns carry their gold label" if cfg.history_categories else ""))
        example = 'clf.predict_proba([[{"speaker": "seeker", "text": "I lost my job"}]])  # (n, labels)'
    baselines = "\n".join(f"| {system} | {scores['accuracy']:.3f} | {scores['macro_f1']:.3f} |"
                          for system, scores in test.items())
    body = f"""
# {name}
{profile_warning(p)}
A sequence classifier that {task}; labels: {', '.join(labels)}.

## Intended use

{INTENDED_USE}

## How to use

```python
from mhsupport import classifier

clf = classifier.load("path/to/this/folder")
{example}
```

Input: {inputs}, at most {p.max_length} tokens. `classifier.json` holds the input settings.

## Data

- Training: `{cfg.dataset}` train ({metrics['train_examples']:,} examples) of prepare-data run `{data_run_id}`;
  evaluation: ESConv valid and test.
{LICENCES}

## Training

Base: {p.base_model or 'a small BERT trained from scratch with its own byte-level BPE tokenizer'};
{p.epochs} epoch(s), batch {p.batch_size} x {p.grad_accum}, learning rate {p.learning_rate}, seed {cfg.seed}
{'(inverse-frequency class weights)' if cfg.class_weighting else ''}; saved: {metrics['checkpoint']}.

## Metrics (ESConv test, {test['model']['n']:,} examples)

| system | accuracy | macro-F1 |
| --- | ---: | ---: |
{baselines}
"""
    return _card(data, body)


# --- export ---------------------------------------------------------------------------------

def export(run_dir: Path, to: Path) -> Path:
    """Copy a training run's model folder (weights, tokenizer, settings, card) to a new folder."""
    model_dir = Path(run_dir) / "model"
    if not (model_dir / "README.md").is_file():
        raise MhsError(f"{run_dir}: not a training run with a model card (expected {model_dir / 'README.md'}); "
                       "give a train_generator or train_classifier run folder")
    if Path(to).exists():
        raise MhsError(f"{to} already exists: give a new folder to export into")
    shutil.copytree(model_dir, to)
    return Path(to)


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload an exported folder to a Hub model repository (created beforehand, token from the environment)."""
    try:
        return str(upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model"))
    except Exception as err:  # network, authentication and repository errors alike: one line for the user
        raise MhsError(f"push to {repo_id} failed: {str(err).splitlines()[0]} (the model was exported to "
                       f"{folder}; check the Hub is reachable and HF_TOKEN is set)") from None
