"""The Python API of a trained generator: `load` a run (or its exported model folder), then
`respond` to a context, with or without a strategy tag.

    from mhsupport import generator
    g = generator.load("artifacts/train_generator/<run_id>")
    g.respond([{"speaker": "seeker", "text": "I lost my job"}], tag="Comforting")
"""

from __future__ import annotations

from pathlib import Path


from mhsupport.modeling import devices, loading
from mhsupport.errors import MhsError
from mhsupport.modeling.formatting import SETTINGS_FILE, FormatterSettings
from mhsupport.modeling.decoding import generate
from mhsupport.modeling.tag_likelihood import opening_probabilities
from mhsupport.evaluation.sampling import choose_tags

SPEAKERS = ("seeker", "supporter")


class Generator:
    """A trained generator with its prompt formatter; greedy decoding unless told to sample."""

    def __init__(self, model, tokenizer, settings: FormatterSettings):
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.formatter = settings.build(tokenizer)

    @property
    def tags(self) -> list[str]:
        """The categories (or strategies) this model takes as tags; empty for an untagged model."""
        return list(self.settings.labels or [])

    def respond(self, context: list[dict], tag: str | None = None, **decoding) -> str:
        """The supporter's next turn after `context` (turns as {"speaker": "seeker"|"supporter", "text"},
        most recent last). `tag` asks a tagged model for a category; without one, a model whose tag
        opens its reply (tag_format token or words) picks its own (`own_strategy`: "sample" from its
        distribution over the tags, seeded by `seed`, or "argmax"), and an instruction-format model
        gets no instruction."""
        return self.respond_many([context], [tag], **decoding)[0]

    @property
    def tag_format(self) -> str | None:
        """How the tag reaches the model (token, words or instruction); None when untagged."""
        return self.settings.tag_format if self.tags else None

    def own_strategy_probabilities(self, contexts: list[list[dict]], batch_size: int = 16):
        """(n, K): the model's own distribution over its tags after each context (token or words formats)."""
        if not self.formatter.model_writes_tag:
            raise MhsError(f"this generator ({self.tag_format or 'untagged'}) does not write its own strategy: only "
                           "tag_format token or words do")
        for i, context in enumerate(contexts):
            check_context(context, i)
        return opening_probabilities(self.model, self.formatter, contexts, batch_size)

    def respond_many(self, contexts: list[list[dict]], tags: list[str | None] | None = None,
                     batch_size: int = 16, max_new_tokens: int = 40, do_sample: bool = False, top_p: float = 0.9,
                     temperature: float = 0.7, seed: int = 0, own_strategy: str = "sample") -> list[str]:
        """`respond` over many contexts in batches; `tags` is one tag (or None) per context."""
        tags = [None] * len(contexts) if tags is None else list(tags)
        if len(tags) != len(contexts):
            raise MhsError(f"respond_many: {len(contexts)} contexts but {len(tags)} tags; give one tag (or None) "
                           "per context")
        for i, context in enumerate(contexts):
            check_context(context, i)
        for tag in tags:
            self.check_tag(tag)
        own = [i for i, tag in enumerate(tags) if tag is None]
        if own and self.formatter.model_writes_tag:
            probabilities = self.own_strategy_probabilities([contexts[i] for i in own], batch_size)
            chosen = choose_tags("none", [{} for _ in own], self.tags, "", seed, own_probabilities=probabilities,
                                 own_strategy=own_strategy)
            for i, tag in zip(own, chosen):
                tags[i] = tag
        outputs = generate(self.model, self.tokenizer, self.formatter, contexts, tags, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, do_sample=do_sample, top_p=top_p,
                           temperature=temperature, seed=seed, progress=False)
        return [o["response"] for o in outputs]

    def check_tag(self, tag: str | None) -> None:
        if tag is None:
            return
        if not self.tags:
            raise MhsError(f"tag={tag!r}: this generator was trained without tags; leave the tag out "
                           "(or load a run trained with --strategy-tag)")
        if tag not in self.tags:
            raise MhsError(f"tag={tag!r}: not one of this generator's tags {self.tags}")


def check_context(context, index: int = 0) -> None:
    if not isinstance(context, list) or not context:
        raise MhsError(f"context {index}: expected a non-empty list of {{'speaker', 'text'}} turns, got {context!r:.80}")
    for turn_index, turn in enumerate(context):
        if not isinstance(turn, dict) or turn.get("speaker") not in SPEAKERS or not isinstance(turn.get("text"), str):
            raise MhsError(f"context {index}, turn {turn_index}: expected {{'speaker': 'seeker' or 'supporter', "
                           f"'text': str}}, got {turn!r:.80}")


def load(path: str | Path, device: str | None = None) -> Generator:
    """A generator from a training run's folder, its `model/` folder, or an exported copy of it, placed
    by the device rule (`device`: auto, cpu, cuda or cuda:N; bf16 where the GPU supports it)."""
    path = Path(path)
    if (path / "model" / SETTINGS_FILE).is_file():
        path = path / "model"
    if not (path / SETTINGS_FILE).is_file():
        raise MhsError(f"{path}: no {SETTINGS_FILE} found; expected a `mhs train dialogpt` run folder, its model/ "
                       "folder or a `mhs export` of it (runs from before generator.json: retrain with --force)")
    model, tokenizer = loading.load_saved_causal_lm(path, devices.inference({"device": device or "auto"}))
    return Generator(model, tokenizer, FormatterSettings.load(path))
