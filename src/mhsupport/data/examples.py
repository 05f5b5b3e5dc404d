"""Training/eval examples: one per supporter turn with a turn before it, one per Reddit pair
(DESIGN.md section 4). Model-specific formatting happens later, in the formatters."""

from __future__ import annotations

from mhsupport.data.raw import Conversation, EpitomePair
from mhsupport.data.taxonomy import Taxonomy


def esconv_examples(conversation: Conversation, taxonomy: Taxonomy, max_context_turns: int) -> list[dict]:
    examples = []
    history = [
        {"speaker": t.speaker, "text": t.text, "strategy": t.strategy,
         "category": taxonomy.primary(t.strategy) if t.strategy else None}
        for t in conversation.turns
    ]
    for index, turn in enumerate(conversation.turns):
        if turn.speaker != "supporter" or index == 0:
            continue
        examples.append({
            "source": "esconv",
            "conversation_id": conversation.conversation_id,
            "split": conversation.split,
            "turn_index": index,
            "context": history[max(0, index - max_context_turns):index],
            "response": turn.text,
            "strategy": turn.strategy,
            "category": history[index]["category"],
            "situation": conversation.situation,
        })
    return examples


def epitome_strategy(levels: dict[str, int]) -> str:
    """EPITOME's 'strategy' field: the mechanism levels, e.g. 'emotional_reactions=2,explorations=0,...'."""
    return ",".join(f"{key}={level}" for key, level in levels.items())


def epitome_example(pair: EpitomePair, split: str, taxonomy: Taxonomy) -> dict:
    return {
        "source": "epitome",
        "conversation_id": pair.sp_id,
        "split": split,
        "turn_index": 1,
        "context": [{"speaker": "seeker", "text": pair.seeker_post, "strategy": None, "category": None}],
        "response": pair.response_post,
        "strategy": epitome_strategy(pair.levels),
        "category": taxonomy.epitome_category(pair.levels),
        "situation": None,
    }
