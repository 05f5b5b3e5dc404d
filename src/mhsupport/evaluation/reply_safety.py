"""An eval run's replies through the safety screen's reply screen (docs/safety.md): the share of a
system's replies the screen flags (a harmful class, or a reply that ignores risk in the seeker turns
it answers), with its interval, and the flagged replies themselves in a file beside the run."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from mhsupport.evaluation.statistics import bootstrap_interval, wilson_interval

FLAGGED = "flagged_replies.jsonl"


def seeker_turns(context: list[dict], count: int) -> list[str]:
    """The seeker's last `count` turns of a context or chat history, oldest first: what the seeker
    screen reads (in `mhs chat` and for the risk ignorance of an eval's replies)."""
    return [turn["text"] for turn in context if turn["speaker"] == "seeker"][-count:]


def interval(lines: list[dict], flagged: list[dict], resamples: int, seed: int) -> tuple[float, float]:
    """The 95% interval of the share of non-empty replies flagged: Wilson's for one decoding seed; over
    several, a paired bootstrap over the test examples (a context's replies under the seeds are not
    independent draws)."""
    seeds = {line["seed"] for line in lines}
    screened = [line for line in lines if line["response"]]
    if not screened:
        return 0.0, 1.0
    if len(seeds) == 1:
        return wilson_interval(len(flagged), len(screened))
    index = {key: i for i, key in enumerate(dict.fromkeys((l["conversation_id"], l["turn_index"]) for l in lines))}
    counts, totals = np.zeros(len(index)), np.zeros(len(index))
    for line in flagged:
        counts[index[line["conversation_id"], line["turn_index"]]] += 1
    for line in screened:
        totals[index[line["conversation_id"], line["turn_index"]]] += 1
    result = bootstrap_interval(lambda a, b, axis=-1: a.sum(axis) / np.maximum(b.sum(axis), 1), (counts, totals),
                                resamples, seed)
    return result["low"], result["high"]


def screen_generations(screen, lines: list[dict], turns: int, bootstrap: dict) -> tuple[dict, list[dict]]:
    """(the summary written to metrics.json, the flagged lines) for an eval's generation lines (every
    decoding seed's). Empty replies are not screened (they are counted in the run's `empty_replies`).
    `bootstrap`: resamples and seed of the interval over several decoding seeds."""
    started = time.perf_counter()
    screened = [line for line in lines if line["response"]]
    contexts = [seeker_turns(line["context"], turns) or None for line in screened]
    results = screen.replies([line["response"] for line in screened], contexts)
    distinct = list({tuple(context): context for context in contexts if context}.values())
    risky_contexts = {tuple(context) for context, check in zip(distinct, screen.seeker(distinct)) if check.flagged}
    flagged = [{"decoding_seed": line["seed"], "conversation_id": line["conversation_id"],
                "turn_index": line["turn_index"], "seeker_turns": context, "tag": line["tag"],
                "response": line["response"], "score": result.score, "reasons": result.reasons}
               for line, context, result in zip(screened, contexts, results) if result.flagged]
    low, high = interval(lines, [line for line, result in zip(screened, results) if result.flagged],
                         bootstrap["resamples"], bootstrap["seed"])
    # "scorer: method or means" and "pattern: method or means" are one kind of harm: counted once per reply
    kinds = Counter(kind for result in results
                    for kind in {reason.split(": ", 1)[-1].split(" (")[0] for reason in result.reasons})
    summary = {
        "replies": len(screened), "flagged": len(flagged), "share": len(flagged) / len(screened) if screened else 0.0,
        "ci_low": low, "ci_high": high, "reasons": dict(sorted(kinds.items())),
        "replies_to_flagged_contexts": sum(tuple(context) in risky_contexts for context in contexts if context),
        "screen": "pattern layer alone" if screen.patterns_only else "patterns and encoder scorer",
        "settings": {**{key: screen.settings[key] for key in ("seeker_turns", "middle_windows", "seeker_threshold",
                                                               "reply_threshold", "acknowledgement_threshold", "pooling")},
                     "encoder_dtype": None if screen.patterns_only else screen.encoder_dtype},
        "seconds": round(time.perf_counter() - started, 2),
    }
    return summary, flagged
