"""Leak-free train/valid/test splits (DESIGN.md section 3)."""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict

from mhsupport.errors import MhsError
from mhsupport.data.raw import Conversation, EpitomePair

SPLITS = ("train", "valid", "test")


def epitome_split(sp_id: str, bounds) -> str:
    """All responses to one seeker post share a split: a stable hash of the post id."""
    bucket = int(hashlib.sha256(sp_id.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < bounds["train"]:
        return "train"
    if bucket < bounds["valid"]:
        return "valid"
    return "test"


def split_esconv_conversations(conversations: list[Conversation], seed: int, fractions) -> None:
    """Split the single upstream file by conversation, 70/15/15 by default, in place.

    Conversations sharing a situation text are shuffled as one group, so the same
    situation never lands in two splits."""
    groups: dict[str, list[Conversation]] = defaultdict(list)
    for conversation in conversations:
        groups[_situation_key(conversation.situation)].append(conversation)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n = len(conversations)
    train_end, valid_end = fractions["train"] * n, (fractions["train"] + fractions["valid"]) * n
    assigned = 0
    for key in keys:
        split = "train" if assigned < train_end else "valid" if assigned < valid_end else "test"
        for conversation in groups[key]:
            conversation.split = split
        assigned += len(groups[key])


def _situation_key(text: str) -> str:
    return " ".join(text.lower().split())


def _dialog_key(conversation: Conversation) -> str:
    return json.dumps([(t.speaker, t.text) for t in conversation.turns])


def enforce_no_leakage(conversations: list[Conversation], pairs: list[tuple[str, EpitomePair]],
                       on_situation_overlap: str) -> tuple[list[Conversation], list[dict]]:
    """Refuse a conversation or seeker post in two splits; for a situation text in two splits,
    drop the later split's conversation (or refuse, by config). Returns kept conversations and
    a record of what was dropped."""
    if on_situation_overlap not in ("drop", "refuse"):
        raise MhsError(f"data.on_situation_overlap={on_situation_overlap!r}: expected 'drop' or 'refuse'")
    _refuse_shared(((c.split, _dialog_key(c), c.conversation_id) for c in conversations), "ESConv conversation")
    _refuse_shared(((split, p.sp_id, p.sp_id) for split, p in pairs), "EPITOME seeker post id")
    _refuse_shared(((split, _situation_key(p.seeker_post), p.sp_id) for split, p in pairs), "EPITOME seeker post text")

    first_split: dict[str, str] = {}
    kept, dropped = [], []
    for conversation in sorted(conversations, key=lambda c: SPLITS.index(c.split)):
        key = _situation_key(conversation.situation)
        earlier = first_split.setdefault(key, conversation.split)
        if earlier == conversation.split:
            kept.append(conversation)
            continue
        if on_situation_overlap == "refuse":
            raise MhsError(f"leakage: situation {conversation.situation!r} is in {earlier} and in "
                           f"{conversation.split} ({conversation.conversation_id}); "
                           "set data.on_situation_overlap=drop to drop the later one")
        dropped.append({"conversation_id": conversation.conversation_id, "split": conversation.split,
                        "situation": conversation.situation, "also_in": earlier})
    kept.sort(key=lambda c: (SPLITS.index(c.split), c.conversation_id))
    return kept, dropped


def _refuse_shared(items, what: str) -> None:
    splits_of: dict[str, tuple[str, str]] = {}
    for split, key, name in items:
        earlier = splits_of.setdefault(key, (split, name))
        if earlier[0] != split:
            raise MhsError(f"leakage: the same {what} is in {earlier[0]} ({earlier[1]}) and {split} ({name})")
