"""Measure the safety screen on its frozen evaluation set (tests/data/safety_eval) and on ESConv:
recall and false-alarm rate with Wilson 95% intervals for seeker messages and supporter replies
(the whole screen, and the pattern layer alone for comparison), recall per kind of wording, and the
share of ESConv seeker turns flagged (every turn alone, and a seeded sample read with the seeker's
previous turns, as `mhs chat` reads them). Writes one JSON file and prints Markdown.

    python scripts/eval_safety.py --out results/safety/eval.json [--threads 1] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from statsmodels.stats.proportion import proportion_confint

from mhsupport import safety
from mhsupport.safety import screen as screen_module
from mhsupport.modeling.devices import cpu_description
from mhsupport.settings.config import load_config

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "tests" / "data" / "safety_eval"


def rate(hits: int, total: int) -> dict:
    low, high = proportion_confint(hits, total, alpha=0.05, method="wilson")
    return {"hits": hits, "total": total, "rate": hits / total, "low": low, "high": high}


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (EVAL / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line]


def measure(results: list, rows: list[dict], positive: str) -> dict:
    flagged = [r.flagged for r in results]
    pos = [f for f, row in zip(flagged, rows) if row["label"] == positive]
    neg = [f for f, row in zip(flagged, rows) if row["label"] != positive]
    kinds = defaultdict(list)
    for f, row in zip(flagged, rows):
        kinds[(row["label"], row["kind"])].append(f)
    return {"recall": rate(sum(pos), len(pos)), "false_alarms": rate(sum(neg), len(neg)),
            "flagged_by_kind": {f"{label}: {kind}": f"{sum(v)}/{len(v)}" for (label, kind), v in kinds.items()}}


def esconv_seeker_conversations(raw_dir: Path) -> list[list[str]]:
    """The seeker turns of each test conversation of ESConv: the screen learns everyday turns from the
    training split only."""
    return [[text for who, text in conversation if who == "seeker"]
            for conversation in screen_module.esconv_conversations(raw_dir, "test")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--esconv-sample", type=int, default=2000, help="turns read with their previous turns")
    parser.add_argument("--raw-dir", type=Path, default=Path(os.environ.get("MHS_RAW_DIR", REPO.parent / "shared" / "data")))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("screen", args.overrides)
    started = time.perf_counter()
    screen = safety.load(cfg.safety, cfg.paths)
    patterns = safety.load(load_config("screen", [*args.overrides, "safety.patterns_only=true"]).safety, cfg.paths)
    load_s = time.perf_counter() - started

    seekers, replies = read("seeker"), read("replies")
    conversations = [[*row.get("context", []), row["text"]] for row in seekers]
    reply_texts, contexts = [row["text"] for row in replies], [row.get("context") for row in replies]
    machine = {**cpu_description(), "encoder_dtype": "bfloat16" if screen_module.encoder_bf16(cfg.safety) else "float32"}
    out = {"settings": {k: v for k, v in cfg.safety.items() if k != "encoder"}, "machine": machine,
           "load_s": round(load_s, 1), "seeker": {}, "replies": {}}
    out["machine"]["torch_threads"] = torch.get_num_threads()
    for name, guard in (("screen", screen), ("patterns only", patterns)):
        out["seeker"][name] = measure(guard.seeker(conversations), seekers, "risk")
        out["seeker"][name + ", last message only"] = measure(guard.seeker([[c[-1]] for c in conversations]),
                                                              seekers, "risk")
        out["replies"][name] = measure(guard.replies(reply_texts, contexts), replies, "harmful")

    esconv = esconv_seeker_conversations(args.raw_dir)
    turns = [turn for conversation in esconv for turn in conversation]
    started = time.perf_counter()
    alone = screen.seeker([[turn] for turn in turns])
    alone_s = time.perf_counter() - started
    windows = [conversation[max(0, i + 1 - cfg.safety.seeker_turns):i + 1]
               for conversation in esconv for i in range(len(conversation))]
    sample = random.Random(0).sample(windows, min(args.esconv_sample, len(windows)))
    with_turns = screen.seeker(sample)
    out["esconv"] = {"turns": len(turns), "alone": rate(sum(r.flagged for r in alone), len(turns)),
                     "alone_s": round(alone_s, 1),
                     "alone_pattern_flags": sum(bool(r.reasons) and r.reasons[0].startswith("pattern") for r in alone),
                     "with_turns_sample": rate(sum(r.flagged for r in with_turns), len(sample))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(out))


def fmt(r: dict) -> str:
    return f"{r['hits']}/{r['total']} = {100 * r['rate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def markdown(out: dict) -> str:
    lines = ["| screen | on | recall [95% Wilson] | false alarms [95% Wilson] |", "| --- | --- | --- | --- |"]
    for role in ("seeker", "replies"):
        for name, m in out[role].items():
            lines.append(f"| {name} | {role} | {fmt(m['recall'])} | {fmt(m['false_alarms'])} |")
    e = out["esconv"]
    lines.append(f"\nESConv seeker turns flagged: alone {fmt(e['alone'])} ({e['alone_s']} s); with the previous "
                 f"turns, seeded sample: {fmt(e['with_turns_sample'])}")
    for role in ("seeker", "replies"):
        lines.append(f"\n{role} flagged by kind (screen): " +
                     "; ".join(f"{k} {v}" for k, v in out[role]["screen"]["flagged_by_kind"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
