"""The safety screen in front of `mhs chat`: a message that signals risk of suicide or self-harm
gets a fixed, caring reply with crisis resources instead of model output.

No maintained risk classifier or lexicon ships offline (PyPI wheels with weights for this task
were not found), so this is a documented pattern set: first-person statements of intent, plan or
wish to die or self-harm, and the common words for them. It errs towards flagging; it is a
research-demo screen, not a clinical risk assessment. Its true and false positives are tested in
tests/test_safety.py ("I want to kill myself" vs "this homework is killing me").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CRISIS_REPLY = (
    "I'm really sorry you're feeling this way, and I'm glad you told me. You deserve support from a "
    "person right now. If you might act on these thoughts or are in danger, please call your local "
    "emergency number. You can reach someone any time: in the US, call or text 988 (Suicide & Crisis "
    "Lifeline); in the UK and Ireland, call Samaritans on 116 123; elsewhere, findahelpline.com lists "
    "free, confidential lines in your country. I'm an AI research system, not a substitute for "
    "professional help, but I'm here to listen while you reach out."
)

_SELF = r"(?:i|i'm|im|i am|i've|ive|i have|i'll|ill|i will|i'd|id|i would|me|myself|my)"
RISK_PATTERNS: dict[str, str] = {
    "kill or hurt myself": r"\b(?:kill|killing|hurt|hurting|harm|harming|cut|cutting|burn|burning|hang|hanging|"
                           r"shoot|shooting|poison|poisoning|drown|drowning)\s+myself\b",
    "end my life": r"\b(?:end|ending|take|taking)\s+(?:my|my own)\s+life\b",
    "suicide": r"\bsuicid(?:e|al)\b|\bkill\s*self\b|\bkms\b",
    "self-harm": r"\bself[\s-]?harm(?:ing)?\b|\bself[\s-]?injur(?:y|e|ing)\b",
    "want to die": rf"\b{_SELF}\b[^.!?]{{0,30}}\b(?:want|wanna|wish|going|plan|planning|ready|deserve)\w*\s+(?:to\s+)?die\b",
    "better off dead": r"\b(?:better off dead|no reason to live|nothing to live for|not worth living|"
                       r"don'?t want to (?:live|be alive|wake up)|wish i (?:was|were) dead|wish i had never been born)\b",
    "method": r"\b(?:overdos(?:e|ing)|jump(?:ing)? off (?:a|the) (?:bridge|building|roof)|slit(?:ting)? my wrists?)\b",
}
_COMPILED = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in RISK_PATTERNS.items()}


@dataclass
class Screen:
    flagged: bool
    reasons: list[str]


def screen(message: str) -> Screen:
    """Which risk patterns a seeker message matches (curly apostrophes count as straight ones)."""
    text = message.replace("\u2019", "'")
    reasons = [name for name, pattern in _COMPILED.items() if pattern.search(text)]
    return Screen(bool(reasons), reasons)
