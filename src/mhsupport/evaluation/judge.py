"""Pairwise judging of two systems' replies by an LLM (MT-Bench's pairwise judge, Zheng et al. 2023;
ESC-Judge's Exploration / Insight / Action skills; ESConv-SRA's strategy adherence).

Every pair is shown to the judge in both orders. A judge that writes (the openai backend): a
verdict counts only when both orders pick the same system (or both say tie); otherwise the pair is
a tie, and it is not position-consistent. An answer without a verdict (`[[A]]`, `[[B]]` or `[[C]]`)
makes the pair unparseable: it is counted and reported, never dropped. A judge that scores (the
local backend, judge_scoring.py): each order gives a margin log P(A) - log P(B); the two orders'
margins for system B are averaged (a constant preference for one position cancels) and a mean
within the tie band is a tie; an order's own verdict (its margin outside the band) gives position
consistency. Identical replies are a tie without asking.

Requests are kept in a cache file keyed by (model, parameters, messages), one JSON line per answer
(or margin) as it arrives, so an interrupted or repeated run asks nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mhsupport.errors import MhsError
from mhsupport.data.subsets import seeded_subset

log = logging.getLogger(__name__)

DIMENSIONS = ("overall", "exploration", "insight", "action", "adherence")
ORDERS = ("ab", "ba")  # which system is shown as Reply A: a first, then b first
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
OUTCOMES = ("win", "loss", "tie", "unparseable")  # of system B against system A
JUDGEMENTS = "judgements.jsonl"
REQUESTS = "requests.jsonl"


def parse_verdict(answer: str) -> str | None:
    """The verdict on the answer's last `[[A]]`/`[[B]]`/`[[C]]` ("A", "B" or "tie"); None without one."""
    found = VERDICT.findall(answer or "")
    if not found:
        return None
    letter = found[-1].upper()
    return "tie" if letter == "C" else letter


def system_of(verdict: str, order: str) -> str:
    """The system ("a", "b" or "tie") a verdict on the shown slots picks, in this order of showing."""
    if verdict == "tie":
        return "tie"
    first, second = order
    return first if verdict == "A" else second


def margin_verdict(margin: float, tie_band: float) -> str:
    """A scoring judge's verdict on the shown slots in one order ("A", "B" or "tie")."""
    return "A" if margin > tie_band else "B" if margin < -tie_band else "tie"


def margins_outcome(margin_ab: float, margin_ba: float, tie_band: float) -> str:
    """Outcome of system B against system A from both orders' margins, averaged: in order "ab" a
    positive margin favours system A, in order "ba" system B."""
    for_b = (margin_ba - margin_ab) / 2
    return "win" if for_b > tie_band else "loss" if for_b < -tie_band else "tie"


def combine(first: str | None, second: str | None) -> tuple[str, bool | None]:
    """(outcome of system B against system A, position-consistent?) from the two orders' verdicts
    (in system terms, None: unparseable). Disagreeing orders make a tie."""
    if first is None or second is None:
        return "unparseable", None
    if first != second:
        return "tie", False
    return {"b": "win", "a": "loss", "tie": "tie"}[first], True


@dataclass
class Pair:
    """One test example as two systems answered it."""
    key: tuple[str, int]
    context: list[dict]
    reply: dict[str, str]  # "a" / "b" -> reply text
    tag: dict[str, str | None]  # the tag each system was given (None: it chose or had none)


def paired_examples(lines_a: list[dict], lines_b: list[dict], name_a: str, name_b: str, size: int | None,
                    seed: int) -> list[Pair]:
    """The examples both eval runs scored, a seeded subset of `size` of them (None: all), in the runs'
    order. Two runs of different examples are refused with one line naming both."""
    def key(line):
        return line["conversation_id"], line["turn_index"]
    by_key_b = {key(line): line for line in lines_b}
    keys_a = [key(line) for line in lines_a]
    if sorted(keys_a) != sorted(by_key_b):
        only_a, only_b = len(set(keys_a) - set(by_key_b)), len(set(by_key_b) - set(keys_a))
        raise MhsError(f"{name_a} and {name_b} scored different test examples ({only_a} only in the first, {only_b} "
                       "only in the second): a pairwise judge compares replies to the same examples; use eval runs "
                       "with the same test_subset and test_subset_seed")
    pairs = []
    for line in seeded_subset(lines_a, size, seed):
        other = by_key_b[key(line)]
        pairs.append(Pair(key(line), line["context"], {"a": line["response"], "b": other["response"]},
                          {"a": line.get("chosen_tag"), "b": other.get("chosen_tag")}))
    return pairs


@dataclass
class Prompts:
    """The judge's prompt templates (configs/judge.yaml `judge.prompts`) and the strategy descriptions
    that the adherence question shows."""
    system: str
    user: str
    empty_reply: str
    questions: dict[str, str]
    descriptions: dict[str, str] = field(default_factory=dict)
    context_turns: int | None = None  # the last turns of the conversation shown (None: all)
    reply_context: str = "{conversation}"  # what a reply-scoring judge reads before each reply
    reply_neutral: str = ""  # what it reads before each reply scored without the conversation
    reply_context_turns: int | None = None  # the last turns a reply-scoring judge reads (None: context_turns)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Prompts:
        p = cfg.judge.prompts
        return cls(p.system.strip(), p.user, p.empty_reply, dict(p.questions), dict(cfg.strategy_words),
                   p.context_turns, p.reply_context, p.reply_neutral, p.reply_context_turns)

    def sha256(self) -> str:
        """A hash of everything a judge is shown besides the data: in the signature (the run id covers
        the config they come from)."""
        return hashlib.sha256(json.dumps([self.system, self.user, self.empty_reply, self.questions,
                                          self.descriptions, self.context_turns, self.reply_context,
                                          self.reply_neutral, self.reply_context_turns],
                                         sort_keys=True).encode()).hexdigest()

    def strategy(self, tag: str) -> str:
        description = self.descriptions.get(tag)
        return f"{tag} ({description})" if description else tag

    def messages(self, pair: Pair, dimension: str, order: str) -> list[dict]:
        first, second = order
        question = self.questions[dimension]
        if dimension == "adherence":
            # A system that was given no tag is judged against the other's (ESConv-SRA: "which reply
            # follows strategy S better?"); when both were given one, each against its own.
            tags = {side: pair.tag[side] or pair.tag[other] for side, other in (("a", "b"), ("b", "a"))}
            question = question.format(strategy_a=self.strategy(tags[first]), strategy_b=self.strategy(tags[second]))
        user = self.user.format(conversation=conversation_text(self.shown_context(pair)),
                                reply_a=pair.reply[first] or self.empty_reply,
                                reply_b=pair.reply[second] or self.empty_reply, question=question.strip())
        # An empty system prompt is left out (the model's chat template then uses its own default).
        return [*([{"role": "system", "content": self.system}] if self.system else []), {"role": "user", "content": user}]


    def shown_context(self, pair: Pair) -> list[dict]:
        return pair.context[-self.context_turns:] if self.context_turns else pair.context

    def reply_messages(self, pair: Pair, side: str, neutral: bool = False) -> list[dict]:
        """One system's reply as the assistant's turn after the conversation (a reply-scoring judge),
        or (`neutral`) after `reply_neutral`, which shows no conversation."""
        turns = self.reply_context_turns or self.context_turns
        user = self.reply_neutral if neutral else self.reply_context.format(
            conversation=conversation_text(pair.context[-turns:] if turns else pair.context))
        return [{"role": "user", "content": user}, {"role": "assistant", "content": pair.reply[side] or self.empty_reply}]


def conversation_text(context: list[dict]) -> str:
    return "\n".join(f"{'Seeker' if turn['speaker'] == 'seeker' else 'Supporter'}: {turn['text']}" for turn in context)


def applies(dimension: str, pair: Pair) -> bool:
    """Adherence is judged where a system was given a tag; the other dimensions everywhere."""
    return dimension != "adherence" or any(pair.tag.values())


def request_key(model: str, parameters: dict, messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps({"model": model, "parameters": parameters, "messages": messages},
                                     sort_keys=True).encode()).hexdigest()


class RequestCache:
    """Judge answers by request key, kept in a JSON-lines file that grows by one flushed line per
    answer (a kill loses at most the line being written, which is skipped when read back)."""

    def __init__(self, path: Path, seed_files: tuple[Path, ...] = ()):
        self.path = path
        self.answers: dict[str, dict] = {}
        for source in (*seed_files, path):
            self._load(source)
        self.loaded = len(self.answers)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def _load(self, path: Path) -> None:
        if not path.is_file():
            return
        for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            try:
                entry = json.loads(raw)
                self.answers[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):
                log.warning("%s, line %d: not a complete cache entry (a write cut short); asked again", path, number)

    def get(self, key: str) -> dict | None:
        return self.answers.get(key)

    def put(self, key: str, answer: str | float, model: str) -> None:
        entry = {"key": key, "model": model, "answer": answer}
        self.answers[key] = entry
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass
class Row:
    """One comparison of a judge run: system B against system A, each an eval run."""
    name: str
    system_a: str
    system_b: str
    run_a: str
    run_b: str
    pairs: list[Pair]
    paper_win_pct: float | None = None
    paper_loss_pct: float | None = None


def judge_rows(rows: list[Row], dimensions: list[str], prompts: Prompts, backend, model_id: str, parameters: dict,
               cache: RequestCache, max_tokens: int, batch_size: int, progress: bool,
               tie_band: float | None = None) -> list[dict]:
    """Every (row, example, dimension) judged in both orders: one record each, with both answers (texts,
    or margins from a scoring backend, whose verdicts use `tie_band`), both verdicts, the outcome and
    the replies' lengths. Answers come from the cache where it has them. A reply-scoring backend with
    a `neutral_weight` w also scores each reply without the conversation: its score is then
    score(reply | conversation) - w * score(reply | no conversation)."""
    planned, requests, keys, pending = [], [], [], set()
    weight = getattr(backend, "neutral_weight", 0.0) if scores_replies(backend) else 0.0

    def ask(messages: list[dict]) -> str:
        key = request_key(model_id, parameters, messages)
        if cache.get(key) is None and key not in pending:
            pending.add(key)
            keys.append(key)
            requests.append(messages)
        return key

    for row in rows:
        for pair in row.pairs:
            for dimension in dimensions:
                if not applies(dimension, pair):
                    continue
                if pair.reply["a"] == pair.reply["b"]:
                    planned.append((row, pair, dimension, None))
                    continue
                order_keys = {}
                # A reply-scoring judge reads each reply alone (keyed by side); the others both orders.
                for slot in ("a", "b") if scores_replies(backend) else ORDERS:
                    order_keys[slot] = ask(prompts.reply_messages(pair, slot) if scores_replies(backend) else
                                           prompts.messages(pair, dimension, slot))
                    if weight:
                        order_keys[f"{slot}_neutral"] = ask(prompts.reply_messages(pair, slot, neutral=True))
                planned.append((row, pair, dimension, order_keys))
    asked = sum(len(order_keys) for *_, order_keys in planned if order_keys is not None)
    log.info("judge: %d requests (both orders or sides), %d answered by the cache, %d to send", asked, asked - len(requests),
             len(requests))
    if requests and scores_replies(backend):
        backend.reply_scores(requests, batch_size, progress=progress,
                             on_score=lambda i, score: cache.put(keys[i], score, model_id))
    elif requests and scores(backend):
        backend.margins(requests, batch_size, progress=progress,
                        on_score=lambda i, margin: cache.put(keys[i], margin, model_id))
    elif requests:
        backend.complete(requests, max_tokens, batch_size, progress=progress,
                         on_answer=lambda i, answer: cache.put(keys[i], answer, model_id), answer_every=batch_size * 4)
    records = []
    for row, pair, dimension, order_keys in planned:
        record = {"row": row.name, "conversation_id": pair.key[0], "turn_index": pair.key[1], "dimension": dimension,
                  "length_a": len(pair.reply["a"].split()), "length_b": len(pair.reply["b"].split()),
                  "tag_a": pair.tag["a"], "tag_b": pair.tag["b"]}
        if order_keys is None:
            record.update(identical=True, outcome="tie", consistent=None, answers=None, verdicts=None,
                          request_keys=None)
        else:
            answers = {slot: cache.get(key)["answer"] for slot, key in order_keys.items()}
            if scores_replies(backend):  # as margins for the reply shown first, so both kinds read alike
                score = {side: answers[side] - weight * answers[f"{side}_neutral"] if weight else answers[side]
                         for side in ("a", "b")}
                answers = {"ab": score["a"] - score["b"], "ba": score["b"] - score["a"]}
            if scores(backend):
                verdicts = {order: margin_verdict(answers[order], tie_band) for order in ORDERS}
            else:
                verdicts = {order: parse_verdict(answers[order]) for order in ORDERS}
            systems = [None if verdicts[order] is None else system_of(verdicts[order], order) for order in ORDERS]
            outcome, consistent = combine(*systems)
            if scores(backend):
                outcome = margins_outcome(answers["ab"], answers["ba"], tie_band)
            record.update(identical=False, outcome=outcome, consistent=consistent, answers=answers, verdicts=verdicts,
                          request_keys=order_keys)
        records.append(record)
    return records


def scores(backend) -> bool:
    """Whether the backend scores (margins, or each reply's likelihood) rather than writes answers."""
    return hasattr(backend, "margins") or scores_replies(backend)


def scores_replies(backend) -> bool:
    """Whether the backend scores each reply alone (no order to show them in)."""
    return hasattr(backend, "reply_scores")


def signature(cfg: DictConfig, model_name: str, prompts: Prompts) -> str:
    """What a judge's figures depend on, in one line (like sacrebleu's signature)."""
    j = cfg.judge
    method = (f"reply_likelihood(neutral_weight {j.scoring.neutral_weight:g})"
              if j.scoring.method == "reply_likelihood" else
              f"margin({'/'.join(j.scoring.options)} after {j.scoring.answer_prefix!r})")
    decoding = (f"scoring:{method}|tie_band:{j.scoring.tie_band:g}|dtype:{j.scoring.dtype}" if j.backend == "local"
                else f"temperature:{j.temperature:g}|max_tokens:{j.max_tokens}|seed:{j.seed}")
    return (f"backend:{j.backend}|model:{model_name}|{decoding}"
            f"|prompt:sha256:{prompts.sha256()[:16]}|orders:both|dimensions:{','.join(judged_dimensions(cfg))}"
            f"|examples:{j.examples if j.examples is not None else 'all'}@{j.example_seed}")


def judged_dimensions(cfg: DictConfig) -> list[str]:
    """The questions a run asks: judge.dimensions, but only overall for a local judge that scores each
    reply's likelihood (it answers no question)."""
    j = cfg.judge
    if j.backend == "local" and j.scoring.method == "reply_likelihood":
        return ["overall"]
    return list(j.dimensions)


def parameters(cfg: DictConfig) -> dict:
    """What an answer depends on besides the model and messages (part of its cache key): the sampling
    parameters of a request, or what a scoring judge compares (the tie band is not: verdicts are
    made from the kept margins)."""
    if cfg.judge.backend == "local" and cfg.judge.scoring.method == "reply_likelihood":
        return {"scoring": "reply_likelihood", "dtype": cfg.judge.scoring.dtype}
    if cfg.judge.backend == "local":
        s = cfg.judge.scoring
        return {"scoring": "margin", "options": list(s.options), "answer_prefix": s.answer_prefix, "dtype": s.dtype}
    return {"temperature": float(cfg.judge.temperature), "max_tokens": int(cfg.judge.max_tokens),
            "seed": int(cfg.judge.seed)}


def table_rows(cfg: DictConfig) -> list[dict]:
    """The rows of the configured paper table, as plain dicts."""
    return OmegaConf.to_container(cfg.judge.tables[cfg.judge.table].rows, resolve=True)
