"""`mhs prepare-data`: raw ESConv + EPITOME -> unified, leak-free examples and their counts."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mhsupport.runs import artifacts, cards
from mhsupport.data import download
from mhsupport.data.examples import epitome_example, esconv_examples
from mhsupport.data.examples_io import write_examples
from mhsupport.data.raw import ESCONV_SINGLE_FILE, ESCONV_SPLIT_FILES, esconv_layout, load_epitome, load_esconv
from mhsupport.data.splits import SPLITS, enforce_no_leakage, epitome_split, split_esconv_conversations
from mhsupport.data.taxonomy import Taxonomy

log = logging.getLogger(__name__)
STAGE = "prepare_data"
COMMAND = "mhs prepare-data"
PROFILE_GROUPS = ()

# The paper's Table 1 (Song & Yuan); not re-derivable from its own description (DESIGN.md section 1).
PAPER_TABLE1 = {"Comforting": 10429, "Exploration": 10445, "Action": 11674, "Others": 3661}


def raw_inputs(raw_dir: Path, taxonomy: Taxonomy) -> dict[str, Path]:
    esconv_dir = raw_dir / "esconv"
    names = ESCONV_SPLIT_FILES.values() if esconv_layout(esconv_dir) == "split" else [ESCONV_SINGLE_FILE]
    inputs = {f"esconv/{name}": esconv_dir / name for name in names}
    inputs.update({f"epitome/{name}": raw_dir / "epitome" / name for name in taxonomy.epitome_files.values()})
    return inputs


def requires(cfg: DictConfig) -> dict:
    return {}


def file_inputs(cfg: DictConfig) -> dict[str, Path]:
    """The raw files as they are now (fetching missing ones): their hashes are part of the run id."""
    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    raw_dir = Path(cfg.paths.raw_dir)
    download.fetch_missing(raw_dir, cfg.download, taxonomy.epitome_files.values())
    return raw_inputs(raw_dir, taxonomy)


def recorded_run(cfg: DictConfig) -> artifacts.Run | None:
    """The newest complete prepare-data run made from this config, found by its recorded config: what
    downstream commands use when the raw files are not at hand (their hashes make the run id)."""
    wanted = artifacts.result_config(cfg)
    found = []
    for manifest in (Path(cfg.paths.artifacts_dir).resolve() / STAGE).glob("*/" + artifacts.MANIFEST):
        try:
            recorded = artifacts.result_config(OmegaConf.load(manifest.parent / artifacts.CONFIG))
            inputs = json.loads(manifest.read_text())["inputs"]
        except (OSError, ValueError, KeyError, OmegaConfBaseException):
            continue
        if recorded == wanted:
            found.append((manifest.stat().st_mtime, manifest.parent, inputs))
    if not found:
        return None
    _, path, inputs = max(found)
    return artifacts.Run(STAGE, path.name, path, cfg, inputs)


def label(cfg: DictConfig) -> str:
    return "prepare-data"


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    # Everything is read and checked before anything is written.
    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    raw_dir = Path(cfg.paths.raw_dir)
    conversations = load_esconv(raw_dir / "esconv", taxonomy)
    if conversations[0].split is None:
        split_esconv_conversations(conversations, cfg.data.esconv_split_seed, cfg.data.esconv_split_fractions)
    pairs = [(epitome_split(p.sp_id, cfg.data.epitome_bucket_bounds), p)
             for p in load_epitome(raw_dir / "epitome", taxonomy)]
    raw_totals = {
        "esconv_conversations": len(conversations),
        "esconv_supporter_turns": sum(t.speaker == "supporter" for c in conversations for t in c.turns),
        "esconv_strategies": dict(Counter(t.strategy for c in conversations for t in c.turns if t.strategy)
                                  .most_common()),
        "epitome_pairs": len(pairs),
        "epitome_seeker_posts": len({p.sp_id for _, p in pairs}),
    }
    table1 = table1_counts(conversations, [p for _, p in pairs], taxonomy)
    conversations, dropped = enforce_no_leakage(conversations, pairs, cfg.data.on_situation_overlap)

    examples = {"esconv": {s: [] for s in SPLITS}, "epitome": {s: [] for s in SPLITS}}
    for conversation in conversations:
        examples["esconv"][conversation.split] += esconv_examples(conversation, taxonomy, cfg.data.max_context_turns)
    for split, pair in pairs:
        examples["epitome"][split].append(epitome_example(pair, split, taxonomy))

    stats = split_stats(conversations, examples, taxonomy)
    stats.update(table1=table1, raw_totals=raw_totals, dropped_for_leakage=dropped)
    run_.metrics = {
        "examples": {d: {s: len(examples[d][s]) for s in SPLITS} for d in examples},
        "esconv_supporter_turns": raw_totals["esconv_supporter_turns"],
        "epitome_pairs": raw_totals["epitome_pairs"],
        "dropped_for_leakage": len(dropped),
    }
    with run_.build(seed=cfg.data.esconv_split_seed) as out:
        for split in SPLITS:
            write_examples(out, "esconv", split, examples["esconv"][split])
            write_examples(out, "unified", split, examples["esconv"][split] + examples["epitome"][split])
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (out / "stats.md").write_text(stats_markdown(stats, taxonomy))
        cards.dataset_card(cfg, stats).save(out / "README.md")
    log.info("prepare-data wrote %s", run_.path)


def _by_category(categories, taxonomy: Taxonomy) -> dict[str, int]:
    counts = Counter(categories)
    return {c: counts.get(c, 0) for c in taxonomy.categories}


def split_stats(conversations, examples, taxonomy: Taxonomy) -> dict:
    stats = {"esconv": {}, "epitome": {}}
    for split in SPLITS:
        turns = [taxonomy.primary(t.strategy) for c in conversations if c.split == split
                 for t in c.turns if t.speaker == "supporter"]
        stats["esconv"][split] = {
            "turns": _by_category(turns, taxonomy),
            "examples": _by_category((e["category"] for e in examples["esconv"][split]), taxonomy),
        }
        stats["epitome"][split] = _by_category((e["category"] for e in examples["epitome"][split]), taxonomy)
    return stats


def table1_counts(conversations, pairs, taxonomy: Taxonomy) -> dict:
    """Category counts over all ESConv supporter turns and EPITOME pairs, two ways: Table-1
    membership (a strategy counts for every category listing it; a pair for the categories of
    each mechanism with level > 0, all zero -> Others) and the primary, one-label mapping."""
    membership, primary = Counter(), Counter()
    for conversation in conversations:
        for turn in conversation.turns:
            if turn.strategy:
                membership.update(taxonomy.members(turn.strategy))
                primary[taxonomy.primary(turn.strategy)] += 1
    for pair in pairs:
        present = {c for key, level in pair.levels.items() if level > 0
                   for c in taxonomy.members(taxonomy.epitome_mechanisms[key])}
        membership.update(present or {taxonomy.fallback})
        primary[taxonomy.epitome_category(pair.levels)] += 1
    return {
        "membership": {c: membership.get(c, 0) for c in taxonomy.categories},
        "primary": {c: primary.get(c, 0) for c in taxonomy.categories},
        "paper": PAPER_TABLE1,
    }


def stats_markdown(stats: dict, taxonomy: Taxonomy) -> str:
    t1 = stats["table1"]
    lines = [
        "# Unified dataset: category counts (the paper's Table 1 beside ours)",
        "",
        "| Category | Paper Table 1 | Ours, Table-1 membership | Ours, primary label |"
        " ESConv examples train / valid / test | EPITOME pairs train / valid / test |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in taxonomy.categories:
        esconv = " / ".join(f"{stats['esconv'][s]['examples'][c]:,}" for s in SPLITS)
        epitome = " / ".join(f"{stats['epitome'][s][c]:,}" for s in SPLITS)
        lines.append(f"| {c} | {t1['paper'][c]:,} | {t1['membership'][c]:,} | {t1['primary'][c]:,} "
                     f"| {esconv} | {epitome} |")
    totals = stats["raw_totals"]
    lines += [
        f"| Total | {sum(t1['paper'].values()):,} | {sum(t1['membership'].values()):,} "
        f"| {sum(t1['primary'].values()):,} | | |",
        "",
        f"Sources: {totals['esconv_supporter_turns']:,} ESConv supporter turns in "
        f"{totals['esconv_conversations']:,} conversations and {totals['epitome_pairs']:,} EPITOME pairs "
        f"over {totals['epitome_seeker_posts']:,} seeker posts.",
        "",
        "The paper's counts cannot be re-derived from its own description: its totals exceed the",
        "sources under one label per turn, and its membership rule is not stated for EPITOME.",
        "*Membership* counts a strategy once for every category whose Table-1 list holds it, and an",
        "EPITOME pair once for each category of a mechanism rated above 0 (all 0 -> Others).",
        "*Primary* gives each turn or pair exactly one category (DESIGN.md section 2): these are the",
        "labels the models train on. ESConv examples are supporter turns with a turn before them.",
    ]
    if stats["dropped_for_leakage"]:
        lines += ["", "Dropped from later splits because their situation text also occurs in an earlier split:", ""]
        lines += [f"- {d['conversation_id']} ({d['split']}, also in {d['also_in']}): {d['situation']!r}"
                  for d in stats["dropped_for_leakage"]]
    return "\n".join(lines) + "\n"
