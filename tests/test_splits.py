import hashlib

import pytest

from mhsupport.errors import MhsError
from mhsupport.data.raw import Conversation, EpitomePair, Turn
from mhsupport.data.splits import enforce_no_leakage, epitome_split, split_esconv_conversations

BOUNDS = {"train": 80, "valid": 90}


def conversation(cid, split, situation, text="hello"):
    return Conversation(cid, situation, None, None,
                        [Turn("seeker", text, None), Turn("supporter", "hi " + cid, "Question")], split)


@pytest.mark.parametrize("sp_id", ["65m92s", "9ezsfi", "abc", "z", "ü-post"])
def test_epitome_split_is_the_sha256_bucket_rule(sp_id):
    bucket = int(hashlib.sha256(sp_id.encode("utf-8")).hexdigest(), 16) % 100
    expected = "train" if bucket < 80 else "valid" if bucket < 90 else "test"
    assert epitome_split(sp_id, BOUNDS) == expected


def test_epitome_split_fractions_are_close_to_80_10_10():
    splits = [epitome_split(f"post{i}", BOUNDS) for i in range(5000)]
    assert 0.77 < splits.count("train") / 5000 < 0.83
    assert 0.08 < splits.count("test") / 5000 < 0.12


def test_single_file_split_is_seeded_70_15_15_and_keeps_situations_together():
    conversations = [conversation(f"c{i}", None, f"situation {i // 2}") for i in range(200)]
    split_esconv_conversations(conversations, seed=7, fractions={"train": 0.7, "valid": 0.15})
    counts = {s: sum(c.split == s for c in conversations) for s in ("train", "valid", "test")}
    assert abs(counts["train"] - 140) <= 2 and abs(counts["valid"] - 30) <= 2
    for a, b in zip(conversations[::2], conversations[1::2]):
        assert a.split == b.split  # same situation, same split
    again = [conversation(f"c{i}", None, f"situation {i // 2}") for i in range(200)]
    split_esconv_conversations(again, seed=7, fractions={"train": 0.7, "valid": 0.15})
    assert [c.split for c in again] == [c.split for c in conversations]
    other = [conversation(f"c{i}", None, f"situation {i // 2}") for i in range(200)]
    split_esconv_conversations(other, seed=8, fractions={"train": 0.7, "valid": 0.15})
    assert [c.split for c in other] != [c.split for c in conversations]


def test_situation_in_two_splits_is_dropped_from_the_later_split():
    kept, dropped = enforce_no_leakage([conversation("a", "test", "Daily  stresses"),
                                        conversation("b", "train", "daily stresses", text="other"),
                                        conversation("c", "valid", "something else", text="x")], [], "drop")
    assert [c.conversation_id for c in kept] == ["b", "c"]
    assert dropped == [{"conversation_id": "a", "split": "test", "situation": "Daily  stresses", "also_in": "train"}]


def test_situation_in_two_splits_can_be_refused():
    with pytest.raises(MhsError, match="situation 'x' is in train and in valid"):
        enforce_no_leakage([conversation("a", "train", "x"), conversation("b", "valid", "x", text="y")], [], "refuse")


def test_same_conversation_in_two_splits_is_refused():
    with pytest.raises(MhsError, match="same ESConv conversation is in train"):
        enforce_no_leakage([conversation("a", "train", "s1"), conversation("a", "test", "s2")], [], "drop")


def test_same_seeker_post_text_in_two_splits_is_refused():
    pairs = [("train", EpitomePair("p1", "r1", "I feel  alone", "x")), ("test", EpitomePair("p2", "r2", "i feel alone", "y"))]
    with pytest.raises(MhsError, match="EPITOME seeker post text is in train"):
        enforce_no_leakage([], pairs, "drop")
