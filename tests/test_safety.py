"""The chat safety screen: true positives must be flagged, everyday idioms must not."""

import pytest

from mhsupport.safety import CRISIS_REPLY, screen

RISKY = [
    "I want to kill myself",
    "i'm going to end my life tonight",
    "Sometimes I think about suicide",
    "I've been cutting myself again",
    "I feel suicidal",
    "I just want to die",
    "Honestly I'd be better off dead",
    "I have nothing to live for anymore",
    "I've been self-harming since June",
    "I keep thinking about taking an overdose",
    "I wish I was dead",
    "I don't want to wake up tomorrow",
    "I\u2019m planning to take my own life",
]
HARMLESS = [
    "this homework is killing me",
    "I'm dying to see the new movie",
    "My boss will kill me if I'm late again",
    "That joke killed me",
    "I'm so tired I could die laughing at this",
    "My phone battery died",
    "I lost my job and I feel awful",
    "I feel lonely since I moved to a new city",
    "We watched a documentary about a killer whale",
    "I cut my hair short yesterday",
]


@pytest.mark.parametrize("message", RISKY)
def test_risk_messages_are_flagged(message):
    assert screen(message).flagged, message


@pytest.mark.parametrize("message", HARMLESS)
def test_everyday_idioms_are_not_flagged(message):
    assert not screen(message).flagged, (message, screen(message).reasons)


def test_the_fixed_reply_points_to_help_and_says_what_it_is_not():
    assert "988" in CRISIS_REPLY and "116 123" in CRISIS_REPLY and "emergency" in CRISIS_REPLY
    assert "not a substitute for professional help" in CRISIS_REPLY
