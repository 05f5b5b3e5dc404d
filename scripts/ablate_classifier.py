"""Choose the next-category classifier's settings on ESConv valid, never test (issue 12).

  python scripts/ablate_classifier.py model  --out DIR [--budget-s S] [--groups category,cpu | strategy]
                                             [--start chosen_strategy.json --factors class_weighting,...]
  python scripts/ablate_classifier.py tfidf  --out DIR [--tag-set category|strategy] [--history-categories ...]
  python scripts/ablate_classifier.py project-cpu --rows DIR/model_rows.jsonl --anchor RUN --out FILE
  python scripts/ablate_classifier.py table --rows FILE --tfidf DIR/tfidf_rows.jsonl ...

`model` trains each row through the real train_classifier stage (model_selection=true: ESConv valid
only, no baselines) in a greedy search: factors are tried one at a time, in order, each value on top
of the best settings so far, and the best valid accuracy is kept. It writes one JSON line per row as
soon as the row is done (a budget-limited device run loses nothing it finished). `tfidf` grid-searches
the TF-IDF + logistic regression baseline on valid. `project-cpu` projects every row's CPU training
time from a run measured on the CPU (seconds per token read) and the tokens the row reads (the
rows' times on a GPU say nothing about the 2-core CPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path


from mhsupport import pipeline
from mhsupport.evaluation.baselines import tfidf_logistic_regression
from mhsupport.modeling.classifier import context_text
from mhsupport.settings.config import load_config
from mhsupport.data.examples_io import read_examples
from mhsupport.evaluation.classification import classification_scores
from mhsupport.stages import train_classifier
from mhsupport.data.subsets import seeded_subset

# Fixed for every model row: the offline backbone; no checkpoints or loggers (nothing to resume).
ROW_BASE = ["model_selection=true", "classifier.save_steps=1000000",
            "runtime.report_to=none", "runtime.bf16=false"]
# (factor, values); the first value of a factor is the setting it starts from. Ordered by the
# expected effect, so that a budget-limited run measures what matters first.
CATEGORY_FACTORS = [
    ("history_categories", ["false", "true"]),
    ("classifier.epochs", ["1", "2", "3"]),
    ("context_turns", ["3", "1", "5", "8"]),
    ("classifier.learning_rate", ["5e-5", "3e-5", "1e-4"]),
    ("class_weighting", ["false", "true"]),
    ("classifier.max_length", ["128", "64", "256"]),
    ("dataset", ["unified", "esconv"]),
]
# The 8 strategies: ESConv only (EPITOME has no strategies); its own search, so that it can run
# beside the category search on one device.
STRATEGY_FACTORS = [factor for factor in CATEGORY_FACTORS if factor[0] != "dataset"]
# The cpu profile: the category choice at sizes near a 3-minute CPU budget; cpu-throughput projects
# which fit. (train_subset, epochs, max_length)
CPU_SIZES = [(4000, 1, 96), (6000, 1, 96), (3000, 2, 96), (6000, 1, 128), (8000, 1, 96)]


def run_row(name: str, overrides: list[str]) -> dict:
    cfg = load_config("train_classifier", ROW_BASE + overrides)
    started = time.time()
    result = pipeline.run("train_classifier", cfg)
    m = result.metrics
    valid = m["valid"]["model"]
    return {"row": name, "overrides": overrides, "valid_accuracy": valid["accuracy"],
            "valid_macro_f1": valid["macro_f1"], "valid_weighted_f1": valid["weighted_f1"],
            "valid_per_class_f1": {k: v["f1"] for k, v in valid["per_class"].items()},
            "valid_preference_bias": valid["preference_bias"],
            "epochs": m["epochs"], "train_examples": m["train_examples"],
            "device_train_seconds": m["session"]["train_seconds"], "wall_seconds": round(time.time() - started, 1),
            "skipped": result.skipped}


def greedy(group: str, factors, start: dict, out, deadline: float) -> dict:
    """Coordinate search: each factor's values on top of the best so far; returns the best settings."""
    best = dict(start)
    best_row = None
    for factor, values in factors:
        if values is None:
            values = [best[factor], "false" if best[factor] == "true" else "true"]
        for value in values:
            if best_row is not None and value == best[factor]:
                continue  # the best-so-far row already has it
            if time.time() > deadline:
                print(f"[{group}] budget spent before {factor}={value}", flush=True)
                return best
            settings = {**best, factor: value}
            row = run_row(f"{group}: {factor}={value}", [f"{k}={v}" for k, v in settings.items()])
            row.update(group=group, factor=factor, value=value, settings=settings)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"[{group}] {factor}={value}: valid acc {row['valid_accuracy']:.4f} macro-F1 "
                  f"{row['valid_macro_f1']:.4f} ({row['device_train_seconds']:.0f} s)", flush=True)
            if best_row is None or row["valid_accuracy"] > best_row["valid_accuracy"]:
                best, best_row = settings, row
    return best


def model_command(args) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    groups = args.groups.split(",")
    start = {factor: values[0] for factor, values in CATEGORY_FACTORS}
    start.update({"tag_set": "category", "classifier": "offline"})
    if args.tiny:
        start.update({"classifier": "tiny", "classifier.train_subset": "200"})
    chosen = {}  # --start: a search resumed from earlier choices (chosen_<group>.json)
    if args.start:
        chosen = json.loads(Path(args.start).read_text())
    wanted = lambda factors: [f for f in factors if not args.factors or f[0] in args.factors.split(",")]  # noqa: E731
    with open(out_dir / f"model_rows_{'_'.join(groups)}.jsonl", "a") as out:
        if "category" in groups:
            category = greedy("category", wanted(CATEGORY_FACTORS), {**start, **chosen}, out, deadline)
            (out_dir / "chosen_category.json").write_text(json.dumps(category, indent=2))
        if "cpu" in groups:
            category = json.loads((out_dir / "chosen_category.json").read_text())
            for subset, epochs, max_length in CPU_SIZES:
                if time.time() > deadline:
                    break
                settings = {**category, "classifier.train_subset": str(subset), "classifier.epochs": str(epochs),
                            "classifier.max_length": str(max_length)}
                row = run_row(f"cpu: {subset} examples x {epochs} epochs, max_length {max_length}",
                              [f"{k}={v}" for k, v in settings.items()])
                row.update(group="cpu", settings=settings)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"[cpu] {row['row']}: valid acc {row['valid_accuracy']:.4f}", flush=True)
        if "strategy" in groups:
            strategy = greedy("strategy", wanted(STRATEGY_FACTORS),
                              {**start, "dataset": "esconv", "tag_set": "strategy", **chosen}, out, deadline)
            (out_dir / "chosen_strategy.json").write_text(json.dumps(strategy, indent=2))


# --- the TF-IDF baseline -------------------------------------------------------------------

def tfidf_command(args) -> None:
    """Grid over C, n-gram order and context turns (history categories as given) on ESConv valid."""
    cfg = load_config("train_classifier", [f"tag_set={args.tag_set}",
                                           f"dataset={'esconv' if args.tag_set == 'strategy' else args.dataset}"])
    data_run = pipeline.Pipeline().upstream(train_classifier.requires(cfg))["prepare_data"].path
    settings = train_classifier.settings_for(cfg)
    key = settings.label_key
    train = read_examples(data_run, cfg.dataset, "train")
    valid = read_examples(data_run, "esconv", "valid")
    gold = [e[key] for e in valid]
    out_path = Path(args.out) / f"tfidf_{args.tag_set}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a") as out:
        for history, turns, ngram_max, C in itertools.product(args.history_categories, args.context_turns,
                                                                args.ngram_max, args.C):
            history_key = key if history else None
            text = lambda e: context_text(e["context"], turns, " | ", history_key)  # noqa: E731
            started = time.time()
            predicted = tfidf_logistic_regression([text(e) for e in train], [e[key] for e in train],
                                                  {"valid": [text(e) for e in valid]}, ngram_max,
                                                  cfg.tfidf_baseline_by_task[cfg.mode][cfg.tag_set].max_iter, cfg.seed, C)["valid"]
            scores = classification_scores(gold, predicted, settings.labels)
            row = {"tag_set": args.tag_set, "dataset": cfg.dataset, "history_categories": history,
                   "context_turns": turns, "ngram_max": ngram_max, "C": C, "valid_accuracy": scores["accuracy"],
                   "valid_macro_f1": scores["macro_f1"], "seconds": round(time.time() - started, 1)}
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row), flush=True)


# --- projected CPU training time --------------------------------------------------------------

def token_counts(cfg, tokenizer) -> tuple[int, int]:
    """Tokens the model reads in one epoch: its training examples and the ESConv valid examples of
    the epoch-end validation, as the stage encodes them (truncated at max_length)."""
    data_run = pipeline.Pipeline().upstream(train_classifier.requires(cfg))["prepare_data"].path
    settings = train_classifier.settings_for(cfg)
    separator = f" {tokenizer.sep_token} "
    train = seeded_subset(read_examples(data_run, cfg.dataset, "train"), cfg.classifier.train_subset, cfg.subset_seed)
    valid = read_examples(data_run, "esconv", "valid")
    count = lambda rows: sum(len(ids) for ids in tokenizer([settings.text(e, separator) for e in rows], truncation=True,  # noqa: E731
                                                           max_length=cfg.classifier.max_length)["input_ids"])
    return count(train), count(valid)


def project_cpu_command(args) -> None:
    """Each row's CPU training time (validation included, as the stage's train_seconds) projected
    from a measured CPU run of the same backbone: its seconds per token read, times the tokens the
    row reads (training at 3x the cost of a validation token: forward + backward vs forward).
    Time is close to linear in tokens here: inputs are at most 256 tokens, where the layers'
    matrix products, not attention, dominate."""
    from transformers import AutoTokenizer

    anchor_dir = Path(args.anchor)
    anchor_cfg = load_config("train_classifier", [f"{k}={v}" for k, v in _leaf_overrides(anchor_dir).items()])
    anchor_seconds = json.loads((anchor_dir / "metrics.json").read_text())["session"]["train_seconds"]
    tokenizer = AutoTokenizer.from_pretrained(anchor_cfg.classifier.name_or_path)

    def cost(cfg):
        train_tokens, valid_tokens = token_counts(cfg, tokenizer)
        return cfg.classifier.epochs * (3 * train_tokens + valid_tokens), train_tokens

    anchor_cost, _ = cost(anchor_cfg)
    per_unit = anchor_seconds / anchor_cost
    out = []
    for line in Path(args.rows).read_text().splitlines():
        row = json.loads(line)
        cfg = load_config("train_classifier", ROW_BASE + row["overrides"])
        row_cost, train_tokens = cost(cfg)
        row["cpu_projected_train_seconds"] = round(per_unit * row_cost, 1)
        row["train_tokens_per_epoch"] = train_tokens
        out.append(row)
        print(f"{row['row']}: {row['cpu_projected_train_seconds']:.0f} s projected", flush=True)
    Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in out))
    print(f"anchor {anchor_dir}: {anchor_seconds} s, {per_unit * 1e6:.2f} s per million token units")


def _leaf_overrides(run_dir: Path) -> dict:
    """The anchor run's settings that decide its cost, from its recorded config."""
    from omegaconf import OmegaConf

    recorded = OmegaConf.load(run_dir / "config.yaml")
    keys = ["dataset", "tag_set", "mode", "context_turns", "history_categories", "subset_seed",
            "classifier.max_length", "classifier.train_subset", "classifier.epochs"]
    values = {key: OmegaConf.select(recorded, key) for key in keys}
    values = {key: ("null" if value is None else str(value).lower() if isinstance(value, bool) else value)
              for key, value in values.items()}
    return {"classifier": recorded.classifier.profile, **values}


# --- the README tables ------------------------------------------------------------------------

def table_command(args) -> None:
    """Markdown tables of the model rows (valid figures, device seconds, projected CPU seconds) and of
    the best TF-IDF settings per tag set and history setting."""
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    print("| tag set | row (on top of the best so far) | valid acc. | valid macro-F1 | GPU s | CPU s (projected) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['group']} | {row['factor']}={row['value']} | {100 * row['valid_accuracy']:.1f} | "
              f"{100 * row['valid_macro_f1']:.1f} | {row['device_train_seconds']:.0f} | "
              f"{row.get('cpu_projected_train_seconds', float('nan')):.0f} |")
    tfidf = [json.loads(line) for path in args.tfidf for line in Path(path).read_text().splitlines() if line.strip()]
    print("\n| tag set | history categories | best context turns / n-grams / C | valid acc. | valid macro-F1 | fits |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for tag_set in ("category", "strategy"):
        for history in (False, True):
            fits = [r for r in tfidf if r["tag_set"] == tag_set and r["history_categories"] == history]
            if fits:
                best = max(fits, key=lambda r: r["valid_accuracy"])
                print(f"| {tag_set} | {str(history).lower()} | {best['context_turns']} / 1-{best['ngram_max']} / "
                      f"{best['C']} | {100 * best['valid_accuracy']:.1f} | {100 * best['valid_macro_f1']:.1f} | "
                      f"{len(fits)} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model")
    model.add_argument("--out", required=True)
    model.add_argument("--budget-s", type=float, default=1e9, help="start no row after this many seconds")
    model.add_argument("--groups", default="category,cpu,strategy", help="run in this order; cpu needs category's choice")
    model.add_argument("--tiny", action="store_true", help="a plumbing check: the tiny profile on 200 examples")
    model.add_argument("--start", help="settings to start from: a chosen_<group>.json of an earlier search")
    model.add_argument("--factors", help="comma-separated factors to search (default: all), e.g. "
                                         "classifier.learning_rate,class_weighting")
    tfidf = commands.add_parser("tfidf")
    tfidf.add_argument("--out", required=True)
    tfidf.add_argument("--tag-set", default="category", choices=("category", "strategy"))
    tfidf.add_argument("--dataset", default="unified")
    tfidf.add_argument("--history-categories", type=lambda v: v == "true", nargs="+", default=[False, True])
    tfidf.add_argument("--context-turns", type=int, nargs="+", default=[1, 3, 5])
    tfidf.add_argument("--ngram-max", type=int, nargs="+", default=[1, 2])
    tfidf.add_argument("--C", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    project = commands.add_parser("project-cpu")
    project.add_argument("--rows", required=True, help="model_rows.jsonl of a model search")
    project.add_argument("--anchor", required=True, help="a train classifier run trained on this CPU (its folder)")
    project.add_argument("--out", required=True, help="the rows with cpu_projected_train_seconds (JSON lines)")
    table = commands.add_parser("table")
    table.add_argument("--rows", required=True, help="model rows (with projected CPU seconds)")
    table.add_argument("--tfidf", nargs="+", required=True, help="tfidf rows files")
    args = parser.parse_args(argv)
    {"model": model_command, "tfidf": tfidf_command, "project-cpu": project_cpu_command,
     "table": table_command}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
