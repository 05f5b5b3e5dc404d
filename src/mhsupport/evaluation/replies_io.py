"""A generation pass's replies (`mhs generate`): `replies.jsonl`, one JSON object per decoding seed,
test example and tag. Reading checks every line and that every reply an eval asks for is there, so a
damaged or partial pass is one message naming the file, the line and the command that rebuilds it."""

from __future__ import annotations

from mhsupport.errors import MhsError
from mhsupport.evaluation.jsonl_io import read_checked_lines

REPLIES = "replies.jsonl"
LINE_KEYS = ("seed", "conversation_id", "turn_index", "tag", "response", "tokens", "own_logprob", "recognised")


def read_replies(run, examples: list[dict], tags: list[str | None], seeds: list[int]) -> dict:
    """A generation pass's replies by (seed, conversation_id, turn_index, tag), checked to cover every
    example, tag and seed an eval asks for: a damaged or partial file is one line naming the run and
    the command that rebuilds it."""
    path = run.path / REPLIES
    fix = f"rebuild it with {run.rebuild_hint}"
    replies = {(line["seed"], line["conversation_id"], line["turn_index"], line["tag"]): line
               for line in read_checked_lines(path, LINE_KEYS, fix)}
    wanted = [(seed, e["conversation_id"], e["turn_index"], tag) for seed in seeds for e in examples for tag in tags]
    absent = [key for key in wanted if key not in replies]
    if absent:
        seed, conversation, turn, tag = absent[0]
        raise MhsError(f"{path}: no reply for conversation {conversation}, turn {turn}, tag {tag!r}, seed {seed} "
                       f"({len(absent)} of {len(wanted)} missing: the pass was made for other examples or is "
                       f"partial); {fix}")
    return replies
