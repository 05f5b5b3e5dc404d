"""The pattern layer of the safety screen: one regular expression per kind of risk signal in a
seeker message, and a few for replies. It is the high-precision first layer in front of the learned
scorer (`safety.screen`), and the whole screen only when `safety.patterns_only=true`.

Seeker patterns: first-person statements of intent, plan or wish to die or to harm oneself, their
euphemisms ("end it all", "better off without me", "can't go on living", "don't want to be here
anymore"), methods, and plans with a time ("... tonight"). Accidents and idioms are left out where
a word marks them ("cut myself while cooking", "shot myself in the foot", "not suicidal", "don't
want to live with my parents"). Patterns fit the phrases they were written from: on independently
written messages they miss most preparations, farewells, dangerous places and plans without a
risk word (docs/safety.md), which is what the learned scorer is for.

Reply patterns: a reply telling the seeker to kill themselves, and the words by which a reply
acknowledges risk (a crisis line, an emergency number, asking about safety or suicide).
"""

from __future__ import annotations

import re

_SELF = r"(?:i|i'm|im|i am|i've|ive|i have|i'll|ill|i will|i'd|id|i would|me|myself|my)"
_MYSELF = r"my\s?(?:(?:fucking|fuckin|freaking|damn|own)\s)?self"  # "kill my self" is a common spelling
_NEG = r"(?<!n't )(?<!dont )(?<!not )(?<!never )"  # "don't want to die", "not suicidal"
_ANY_MORE = r"(?:any\s?more|any longer|now)"
_WHEN = (r"(?:tonight|today|tomorrow|tmrw|tmr|this (?:weekend|week|evening|morning|afternoon)|next week|"
         r"on (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)|soon)")
_ACT = (rf"(?:kill(?:ing)?\s+{_MYSELF}|end(?:ing)?\s+(?:it(?!\s+with)|it all|everything|"
        rf"my (?:own )?life)|take (?:my (?:own )?life|all (?:my|the) pills)|overdose|hang(?:ing)?\s+{_MYSELF})")
RISK_PATTERNS: dict[str, str] = {
    "kill or hurt myself": (
        rf"\b(?:kill|killing|killed|unalive|unaliving|hang|hanging|poison|poisoning|stab|stabbing)\s+{_MYSELF}\b"
        rf"|\b(?:to|gonna|wanna|just|will|might)\s+off\s+{_MYSELF}\b"  # not "take the stress off myself"
        rf"|\b(?:shoot|shooting)\s+{_MYSELF}\b(?!\s+in the foot)|\bdrown(?:ing)?\s+{_MYSELF}\b(?!\s+in\b)"
        # hurt / cut / burn myself: only with intent, repetition or on purpose (not "while cooking")
        rf"|\b(?:want|wanna|going|gonna|urge|urges|tried|try|trying|thinking|thought|think|plan|planning|need|"
        rf"will|might|keep|kept|started|been|stop)\w*\s+(?:to\s+|about\s+|of\s+)?(?:hurt|hurting|harm|harming|"
        rf"cut|cutting|burn|burning|scratch|scratching|starve|starving)\s+{_MYSELF}\b"
        rf"|\b(?:hurt|harm|cut|burn)(?:ing|ed)?\s+{_MYSELF}\s+(?:on purpose|deliberately|again)\b"
        rf"|\bcutting again\b|\bstarted cutting\b|\b(?:cut|cutting|slit|slitting)\s+my\s+wrists?\b"),
    "end my life": (r"\b(?:end|ending|take|taking)\s+(?:my|my own)\s+life\b"
                    r"|\bend(?:ing)?\s+(?:it all|everything)\b"  # not "end things": in ESConv, break-ups
                    r"|\bwant (?:it all|everything|all of this|my life) to (?:end|be over)\b"),
    "suicide": rf"{_NEG}\bsuicid(?:e|al)\b(?!\s+(?:prevention|awareness|research))|\bkill\s*self\b|\bkms\b",
    "self-harm": r"\bself[\s-]?harm(?:ing)?\b|\bself[\s-]?injur(?:y|e|ing)\b",
    "want to die": (
        rf"\b{_SELF}\b[^.!?]{{0,30}}\b{_NEG}(?:want|wanna|wish|going|gonna|plan|planning|ready|deserve)\w*"
        rf"\s+(?:to\s+)?(?:die|be dead)\b"
        r"|\b(?:hope|pray|wish)\s+i\s+(?:could\s+|would\s+|just\s+)?(?:die|was dead|were dead|"
        r"don'?t wake up|never wake up)\b|\bsleep\s+and\s+never\s+wake\s+up\b"),
    "better off dead": (
        r"\b(?:better off dead|rather be dead|no reason (?:for me )?to (?:keep )?(?:live|living|go on|be alive)|"
        r"nothing to live for|(?:not|isn'?t|is not|ain'?t) worth living|"
        r"wish i (?:was|were) dead|wish i had never been born|wish i was never born|"
        r"(?:tired|sick) of (?:being alive|living(?!\s+(?:paycheck|in|with|at|on|under|here|there)\b))|"
        r"done with (?:life|living)|hated? being alive|"
        r"(?:easier|better) (?:to|if i) (?:just )?(?:be dead|die|wasn'?t here)|"
        r"(?:what'?s|what is|no) (?:the )?point (?:of|in) (?:living|life|going on|being alive)|"
        r"disappear forever|stop existing|cease to exist)\b"
        r"|\b(?:don'?t|do not) want to (?:be alive|exist|wake up)\b"
        r"|\b(?:don'?t|do not) want to live\b(?!\s+(?:in|with|near|at|on|there|here|like that)\b(?!\s+this world))"
        rf"|\b(?:don'?t|do not) want to be (?:here|around|alive) {_ANY_MORE}"),
    "better off without me": (
        r"\b(?:better|happier|easier)(?:\s+off)?(?:\s+for (?:everyone|everybody|them|you|all))?\s+"
        r"(?:if i (?:was|were) (?:gone|dead|never born)|if i (?:wasn'?t|weren'?t) (?:here|around|alive)|"
        r"if i died|if i disappeared)\b"
        # "without me" needs a whole group or a "would": "he is now better off without me" is a break-up
        r"|\b(?:everyone|everybody|they|the world|people|my (?:family|kids|children|friends|parents))\b[^.!?]{0,25}"
        r"\b(?:better|happier)(?:\s+off)?\s+without me\b"
        r"|\b(?:would|'d|will)\s+(?:all\s+)?be\s+(?:\w+\s+)?(?:better|happier)(?:\s+off)?\s+without me\b"
        r"|\b(?:nobody|no one|no-one)\s+would\s+(?:even\s+|really\s+)?(?:miss me|(?:notice|care) if i "
        r"(?:died|was gone|were gone|disappeared|was dead|were dead|killed myself))\b"),
    "can't go on": (r"\b(?:(?:can'?t|cannot|can not)|(?:don'?t|do not) (?:feel|think) (?:like |that )?i can)\s+go\s+on\b"
                    r"(?:\s+(?:living|like this|any\s?more|any longer|with (?:my )?life)|\s*(?:[.!,]|$))"),
    "method": (r"\b(?:take|taking|took|taken)\s+(?:an?\s+)?overdose\b|\boverdos(?:e|ing)\s+on\b"
               r"|\b(?:take|taking|took|swallow(?:ed|ing)?)\s+(?:all (?:of )?(?:my|the)|a (?:bunch|handful|bottle) of|"
               r"the whole bottle of)\s+(?:\w+\s+)?(?:pills|tablets|meds|painkillers)\b"
               r"|\bjump(?:ing)?\s+(?:off|from)\s+(?:a|the|my)\s+(?:\w+\s+)?(?:bridge|building|roof|cliff|balcony)\b"
               r"|\b(?:jump(?:ing)?|throw(?:ing)? myself)\s+in front of\s+(?:a|the)\s+(?:train|car|bus|truck)\b"
               r"|\b(?:suicide|goodbye) note\b"),
    "plan with a time": (rf"\b{_ACT}\b[^.!?]{{0,40}}\b{_WHEN}\b|\b{_WHEN}\b[^.!?]{{0,40}}\b{_ACT}\b"
                         r"|\blast (?:night|day) (?:on earth|alive)\b"
                         r"|\bwon'?t be (?:here|around|alive) (?:much longer|for long|any\s?more|any longer)\b"),
}
_COMPILED = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in RISK_PATTERNS.items()}


# A reply that tells the seeker to die: flagged whatever the scorer says.
REPLY_PATTERNS: dict[str, str] = {
    "encouraging self-harm": (r"\b(?:just |go |you should |should just )(?:kill|hurt|off) your\s?self\b|\bkys\b"
                              r"|\b(?:you should|just|go) (?:die|end it|end your life)\b"),
}
# Words by which a reply to a risk message takes the risk up.
ACKNOWLEDGEMENT = re.compile(
    r"\b(?:988|911|999|112|116 123|samaritans|crisis (?:line|service|team|text)|(?:help|hot)line|emergency|"
    r"a&e|ambulance|findahelpline|are you (?:safe|thinking (?:about|of) (?:suicide|killing|ending|hurting))|"
    r"(?:keep|keeping|stay|staying) (?:you )?safe|your safety|safety plan|suicid\w*)\b", re.IGNORECASE)
_REPLY_COMPILED = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in REPLY_PATTERNS.items()}


def _plain(text: str) -> str:
    return text.replace("\u2019", "'")  # curly apostrophes count as straight ones


def seeker_matches(message: str) -> list[str]:
    """The names of the risk patterns a seeker message matches."""
    text = _plain(message)
    return [name for name, pattern in _COMPILED.items() if pattern.search(text)]


def reply_matches(reply: str) -> list[str]:
    """The names of the harmful-reply patterns a reply matches."""
    text = _plain(reply)
    return [name for name, pattern in _REPLY_COMPILED.items() if pattern.search(text)]


def acknowledges_risk(reply: str) -> bool:
    """Whether a reply names help, safety or suicide."""
    return bool(ACKNOWLEDGEMENT.search(_plain(reply)))
