"""The chat safety screen: true positives must be flagged, everyday idioms must not, and its
recall and false-alarm rate on a labelled set of phrases stay where they were measured."""

import json

import pytest

from mhsupport.safety import CRISIS_REPLY, screen

# Written as a person in distress or an ordinary chat user might write them (typos included),
# before the patterns were tuned to them. The hard cases a pattern set misses stay in the list,
# so the measured rates below are honest.
RISK = [
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
    "I'm going to end it all tonight",
    "I want to kill my self",
    "Everyone would be better off without me",
    "I can't go on living like this",
    "I don't want to be here anymore",
    "I've been thinking about ending my life",
    "I took a bunch of pills an hour ago to make it stop",
    "I've written a note for my family and I'm ready",
    "I wish I could go to sleep and never wake up",
    "My family would be better off if I was gone",
    "I have the rope ready",
    "I keep thinking about jumping off the bridge near my house",
    "Tonight is the night I end it",
    "I'm planning to overdose on my sleeping pills this weekend",
    "Nobody would even notice if I died",
    "What's the point of living anymore",
    "I'm tired of being alive",
    "I want to disappear forever",
    "I started cutting again last week",
    "I hurt myself on purpose when I get this angry",
    "I've been thinking of killing myself",
    "I just want it all to end",
    "I can't do this anymore, I'm done with life",
    "I want to end my own life",
    "Life isn't worth living without her",
    "I don't exist for anyone and I don't want to exist anymore",
    "i wanna die",
    "I dont want to live anymore",
    "I wish I had never been born",
    "I'm a burden and everyone would be happier if I were dead",
    "There's no reason for me to keep living",
    "I've been having suicidal thoughts every night",
    "I'm going to jump in front of a train",
    "I bought a gun to end things",
    "This is my last night on earth",
    "I won't be around much longer",
    "I keep scratching my arms until they bleed",
    "im gonna kill myself tmrw",
    "I want to hang myself",
    "I've been burning myself with a lighter",
    "I'd rather be dead than keep feeling this way",
    "kms",
    "I cannot go on any longer",
    "I tried to hurt myself last night",
]
NOT_RISK = [
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
    "I can't go on the trip this weekend",
    "I could kill for a coffee right now",
    "I'm dead tired after the night shift",
    "We ended it all on good terms",
    "My friend died of an overdose last year",
    "I'm not suicidal, just really stressed",
    "I volunteer for a suicide prevention charity",
    "I want to live a happier life",
    "I don't want to live with my parents anymore",
    "I'm done with this semester",
    "I hurt myself playing football yesterday",
    "I cut myself while cooking dinner",
    "I burned myself on the stove",
    "My grandfather passed away last month and I miss him",
    "The movie was about a man who wanted to die in peace",
    "I'm going to end my subscription",
    "I need to end my relationship with him",
    "My dog died and I can't stop crying",
    "I'm scared my mother will die",
    "I'm afraid of dying on the plane",
    "I'm so embarrassed I could die",
    "My plan is to finish my thesis tonight",
    "I'm going to do it tonight, I'll finally tell him how I feel",
    "I'm ready to end this chapter of my life",
    "I'm tired of living paycheck to paycheck",
    "I'm killing it at the gym lately",
    "I drowned myself in work to cope",
    "I want to kill the spider in my bathroom",
    "I'm going to hang out with friends tonight",
    "I shot myself in the foot with that decision",
    "I told myself I wouldn't cry",
    "Everyone would be better off if I quit smoking",
    "They're better off without him",
    "I don't want to be here at this party anymore",
    "Killing time before my interview",
    "I think I'm dying of the flu lol",
    "I'm going to jump off the diving board for the first time",
    "I wish I had never taken that job",
    "I'd rather die than wear that sweater again",
    "I don't want to die, I want things to get better",
    "I hurt my back lifting boxes",
    "The last night of our vacation was amazing",
]
# What a first-person pattern set cannot see: a plan or act with no risk word in it.
KNOWN_MISSES = {"I've written a note for my family and I'm ready", "I have the rope ready",
                "I bought a gun to end things", "I keep scratching my arms until they bleed"}
ISSUE_10 = ["I'm going to end it all tonight", "I want to kill my self", "Everyone would be better off without me",
            "I can't go on living like this"]


@pytest.mark.parametrize("message", [m for m in RISK if m not in KNOWN_MISSES])
def test_risk_messages_are_flagged(message):
    assert screen(message).flagged, message


@pytest.mark.parametrize("message", NOT_RISK)
def test_everyday_idioms_are_not_flagged(message):
    assert not screen(message).flagged, (message, screen(message).reasons)


def test_the_misses_of_issue_10_are_flagged():
    assert all(message in RISK and screen(message).flagged for message in ISSUE_10)


def test_recall_and_false_alarm_rate_on_the_labelled_phrases():
    """Measured: recall 53/57 = 93.0%, false alarms 0/52. A pattern change that moves either
    shows here."""
    assert len(RISK) >= 40 and len(NOT_RISK) >= 40 and not set(RISK) & set(NOT_RISK)
    missed = {m for m in RISK if not screen(m).flagged}
    false_alarms = {m for m in NOT_RISK if screen(m).flagged}
    assert missed == KNOWN_MISSES and not false_alarms
    assert (len(RISK) - len(missed)) / len(RISK) >= 0.9


def test_flag_rate_on_every_esconv_seeker_turn(real_raw_dir):
    """24 of 19,989 seeker turns are flagged; read one by one, 17 are the seeker's own risk and 7
    mention suicide without it (a hotline job, a child's or friend's attempt, "if I am suicidal")."""
    turns = [turn["text"] for split in ("train", "valid", "test")
             for line in (real_raw_dir / "esconv" / f"{split}.json").read_text(encoding="utf-8").splitlines()
             if line.strip() for turn in json.loads(line)["dialog"] if turn["speaker"] == "usr"]
    flagged = [text for text in turns if screen(" ".join(text.split())).flagged]
    assert (len(turns), len(flagged)) == (19989, 24)


def test_curly_apostrophes_and_case_do_not_matter():
    assert screen("I CAN\u2019T GO ON ANYMORE").flagged and screen("I Don\u2019t Want To Be Here Anymore").flagged


def test_reasons_name_the_patterns_that_matched():
    assert screen("I want to kill myself tonight").reasons == ["kill or hurt myself", "plan with a time"]
    assert screen("I feel fine today").reasons == []


def test_the_fixed_reply_points_to_help_and_says_what_it_is_not():
    assert "988" in CRISIS_REPLY and "116 123" in CRISIS_REPLY and "emergency" in CRISIS_REPLY
    assert "not a substitute for professional help" in CRISIS_REPLY
