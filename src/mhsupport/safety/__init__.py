"""The safety screen of `mhs chat` and `mhs screen`: seeker messages and supporter replies
(`screen.py`), a pattern layer (`patterns.py`), sentence embeddings (`encoder.py`) and the labelled
exemplars the scorers learn from (`exemplars/`)."""

from mhsupport.safety.screen import (CRISIS_REPLY, FALLBACK_REPLY, Result, SafetyScreen, load,
                                     screen_replies)

__all__ = ["CRISIS_REPLY", "FALLBACK_REPLY", "Result", "SafetyScreen", "load", "screen_replies"]
