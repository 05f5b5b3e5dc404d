"""Whether a judge's verdicts mean anything, measured on pairs whose answer is known without a judge:
an ESConv reply against a reply from another conversation, against its own first few words, and
against itself with its sentences shuffled. The human reply should win each. Every judge run
judges them with the same model, scoring and prompts as its own pairs, and a judge below the bars
has its tables marked as not evidence."""

from __future__ import annotations

import random

from mhsupport.evaluation.judge import Pair, Row
from mhsupport.evaluation.judge_results import dimension_stats
from mhsupport.evaluation.metric_protocols import sentences

HUMAN = "the human reply"
KINDS = {  # kind -> the impostor the human reply is set against
    "other_conversation": "a human reply from another conversation",
    "truncated": "the same reply cut to its first words",
    "shuffled": "the same reply, its sentences shuffled",
}


def known_pair_rows(examples: list[dict], per_kind: int, seed: int, truncate_words: int, min_words: int) -> list[Row]:
    """One row per kind of known pair, each of up to `per_kind` seeded examples whose reply has at
    least `min_words` words (shuffling also needs two sentences). System A is the impostor, system B
    the human reply: a right verdict is a win."""
    rng = random.Random(seed)
    long_enough = [e for e in examples if len(e["response"].split()) >= min_words]
    rows = []
    for kind, impostor_name in KINDS.items():
        pool = long_enough
        if kind == "shuffled":
            pool = [e for e in long_enough if len(set(sentences(e["response"]))) >= 2]
        chosen = rng.sample(pool, min(per_kind, len(pool)))
        pairs = [Pair((e["conversation_id"], e["turn_index"]), e["context"],
                      {"a": impostor(kind, e, examples, truncate_words, rng), "b": e["response"]},
                      {"a": None, "b": None}) for e in chosen]
        rows.append(Row(f"{HUMAN} vs {impostor_name}", impostor_name, HUMAN, f"known:{kind}", "known:human", pairs))
    return rows


def impostor(kind: str, example: dict, examples: list[dict], truncate_words: int, rng: random.Random) -> str:
    reply = example["response"]
    if kind == "other_conversation":
        while True:
            other = rng.choice(examples)
            if other["conversation_id"] != example["conversation_id"] and other["response"] != reply:
                return other["response"]
    if kind == "truncated":
        return " ".join(reply.split()[:truncate_words])
    parts = sentences(reply)
    shuffled = parts[:]
    while shuffled == parts:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def summary(records: list[dict], rows: list[Row], length_match_ratio: float, bars: dict) -> dict:
    """Accuracy (the human reply's wins; ties and losses count as wrong) and position consistency,
    each with its Wilson 95% interval, per kind and over all known pairs; length bias (the longer
    reply's share of decided single-order verdicts) where lengths vary freely (another conversation's
    reply); and whether the judge clears both bars (percent)."""
    def figures(stats: dict) -> dict:
        return {"n": stats["n"], "accuracy": stats["win"], "ties": stats["tie"],
                "position_consistent": stats["position_consistent"], "longer_chosen": stats["longer_chosen"],
                "first_position_chosen": stats["first_position_chosen"]}
    kinds = {kind: {"row": row.name, **figures(dimension_stats([r for r in records if r["row"] == row.name],
                                                                length_match_ratio))}
             for kind, row in zip(KINDS, rows)}
    overall = figures(dimension_stats(records, length_match_ratio))
    overall["longer_chosen"] = kinds["other_conversation"]["longer_chosen"]
    evidence = all(overall[key]["pct"] is not None and overall[key]["pct"] >= bars[bar]
                   for key, bar in (("accuracy", "accuracy"), ("position_consistent", "position_consistency")))
    return {"overall": overall, "kinds": kinds, "bars": dict(bars), "evidence": evidence}
