"""The safety screen: seeker messages (risk of suicide or self-harm, read over the recent turns) and
supporter replies (harmful classes, and risk ignorance), each a logistic regression on sentence
embeddings of the labelled exemplars in `exemplars/` (README there), behind the pattern layer.

A seeker message is flagged when a risk pattern matches it or when the scorer's probability of risk
reaches `safety.seeker_threshold` on the message alone or on it joined with the seeker's previous
turns (up to `safety.seeker_turns`): risk is often spread over two or three messages. A reply is
flagged when a harmful-reply pattern matches it, when the probability of its harmful classes
together reaches `safety.reply_threshold`, or when it answers a flagged seeker context without
acknowledging the risk (neither the acknowledgement patterns nor a probability of the "acknowledges
risk" class of at least `safety.acknowledgement_threshold`). Thresholds are chosen on out-of-fold
scores of the exemplars (scripts/tune_safety.py), never on the evaluation set.

Besides the exemplars, each scorer learns a sample of everyday turns of ESConv's training split
(seeker turns for the seeker screen, supporter turns for the reply screen), their own harmless
class: long, distressed but ordinary messages are what the hand-written exemplars lack.

A research guard, not a clinical risk assessment (docs/safety.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf
from sklearn.linear_model import LogisticRegression

from mhsupport.errors import MhsError, RawDataError
from mhsupport.safety import patterns

log = logging.getLogger(__name__)

EXEMPLARS = Path(__file__).resolve().parent / "exemplars"
ORDINARY = "ordinary"
ACKNOWLEDGES = "acknowledges risk"  # a class of the reply exemplars that is not harmful
EVERYDAY = "everyday"  # turns sampled from ESConv's training split
HARMLESS = (ORDINARY, ACKNOWLEDGES, EVERYDAY)
# A crowd worker's turn that talks of death, self-harm or despair may hold real risk: such turns stay
# out of the everyday sample (it over-excludes on purpose; a turn left out costs nothing).
RISK_WORDS = re.compile(r"suicid|kill|end (it|my life|things)|\bdie\b|dying|dead|death|self.?harm|cut(ting)? (myself|my)|"
                        r"overdose|pill|hurt(ing)? (myself|yourself)|not (be )?(here|around|alive)|disappear|"
                        r"no (reason|point)|give up|worthless|burden|better off|hopeless|can'?t go on|goodbye|"
                        r"bridge|rope|gun|knife|blade|jump|weapon", re.I)
SPEAKERS = {"seeker": "seeker", "replies": "supporter"}  # which ESConv turns each scorer learns as everyday
RISK_IGNORANCE = "risk ignorance"
SCORE_MEMO = 200_000  # texts whose class probabilities a screen keeps (a few floats each)

CRISIS_REPLY = (
    "I'm really sorry you're feeling this way, and I'm glad you told me. You deserve support from a "
    "person right now. If you might act on these thoughts or are in danger, please call your local "
    "emergency number. You can reach someone any time: in the US, call or text 988 (Suicide & Crisis "
    "Lifeline); in the UK and Ireland, call Samaritans on 116 123; elsewhere, findahelpline.com lists "
    "free, confidential lines in your country. I'm an AI research system, not a substitute for "
    "professional help, but I'm here to listen while you reach out."
)
# What `mhs chat` shows instead of a generated reply the reply screen flags.
FALLBACK_REPLY = (
    "I'm sorry, I can't give a good answer to that. I'm an AI research system, not a substitute for "
    "professional help. Would you like to tell me more about how you're feeling? If you are struggling "
    "or in danger, please reach out to someone you trust or your local emergency number; in the US you "
    "can call or text 988, and findahelpline.com lists free lines in other countries."
)

Embed = Callable[[list[str]], np.ndarray]


@dataclass
class Result:
    flagged: bool
    score: float | None  # the scorer's probability of risk or harm; None when the patterns screen alone
    reasons: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def read_exemplars(name: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of exemplars/<name>.jsonl."""
    rows = [json.loads(line) for line in (EXEMPLARS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [row["text"] for row in rows], [row["label"] for row in rows]


def esconv_conversations(raw_dir: str | Path, split: str) -> list[list[tuple[str, str]]]:
    """The conversations of one split of ESConv as the pipeline splits it (`mhs prepare-data`), each
    a list of (speaker, text) turns."""
    from mhsupport.data.raw import load_esconv
    from mhsupport.data.splits import split_esconv_conversations
    from mhsupport.data.taxonomy import Taxonomy
    from mhsupport.settings.config import load_config

    data_cfg = load_config("prepare_data")
    try:
        conversations = load_esconv(Path(raw_dir).expanduser() / "esconv", Taxonomy.from_config(data_cfg.taxonomy))
    except RawDataError as err:
        raise MhsError(f"the safety screen learns everyday turns from ESConv's training split: {err}; set "
                       "MHS_RAW_DIR (paths.raw_dir) to the raw data folder, or safety.everyday_seeker=0 "
                       "safety.everyday_replies=0 to screen without them (more false alarms)") from None
    if any(conversation.split is None for conversation in conversations):
        split_esconv_conversations(conversations, data_cfg.data.esconv_split_seed, data_cfg.data.esconv_split_fractions)
    return [[(turn.speaker, " ".join(turn.text.split())) for turn in conversation.turns]
            for conversation in conversations if conversation.split == split]


def everyday_turns(raw_dir: str | Path, speaker: str, count: int, seed: int) -> list[str]:
    """`count` distinct turns of `speaker` ("seeker" or "supporter") from ESConv's training split (so
    the valid and test conversations stay unseen), sampled with `seed`, none with a risk word."""
    if count == 0:
        return []
    turns = {text for conversation in esconv_conversations(raw_dir, "train") for who, text in conversation
             if who == speaker and text and not RISK_WORDS.search(text)}
    return random.Random(seed).sample(sorted(turns), min(count, len(turns)))


def exemplar_files() -> dict[str, Path]:
    """The exemplar files the scorers learn, by name: a run whose results they decide counts them
    among its inputs, so editing them makes its results out of date."""
    return {f"safety_exemplars_{name}": EXEMPLARS / f"{name}.jsonl" for name in ("seeker", "replies")}


def training_rows(name: str, settings: DictConfig, raw_dir: str | Path) -> tuple[list[str], list[str]]:
    """(texts, labels) a scorer learns: the exemplars of exemplars/<name>.jsonl, then the everyday
    ESConv turns (safety.everyday_seeker or safety.everyday_replies of them)."""
    texts, labels = read_exemplars(name)
    everyday = everyday_turns(raw_dir, SPEAKERS[name], settings[f"everyday_{name}"], settings.everyday_seed)
    return texts + everyday, labels + [EVERYDAY] * len(everyday)


def fit_scorer(embeddings: np.ndarray, labels: Sequence[str], c: float) -> LogisticRegression:
    """A multinomial logistic regression over the exemplars' classes, classes weighted equally."""
    return LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(embeddings, labels)


def risk_probability(scorer: LogisticRegression, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(any class but ordinary and acknowledgement) per row of the scorer's class probabilities, and
    each row's likeliest such class."""
    harmful = np.array([label not in HARMLESS for label in scorer.classes_])
    risk = probabilities[:, harmful]
    return risk.sum(1), scorer.classes_[harmful][risk.argmax(1)]


class SafetyScreen:
    """Both screens over one embedding function (None: the pattern layer alone)."""

    def __init__(self, settings: DictConfig, embed: Embed | None,
                 training: dict[str, tuple[np.ndarray, list[str]]] | None):
        """training: per scorer ("seeker", "replies"), the features and labels it learns."""
        self.settings, self.embed = settings, embed
        self.encoder_dtype: str | None = None  # set by load(): "bfloat16" or "float32"
        self.scorers = {}
        if embed is not None:
            for name in ("seeker", "replies"):
                self.scorers[name] = fit_scorer(*training[name], settings.logistic_c)
        self._scored: dict[str, dict[str, np.ndarray]] = {"seeker": {}, "replies": {}}

    @property
    def patterns_only(self) -> bool:
        return self.embed is None

    def _probabilities(self, name: str, texts: list[str]) -> np.ndarray:
        """The scorer `name`'s class probabilities of each text, each distinct text encoded once per
        screen: an eval's systems answer the same contexts, many replies repeat, and a tagged
        generator's samplers pick from the same replies."""
        known = self._scored[name]
        distinct = list(dict.fromkeys(texts))
        new = [text for text in distinct if text not in known]
        rows = {text: known[text] for text in distinct if text in known}
        if new:
            rows.update(zip(new, self.scorers[name].predict_proba(self.embed(new))))
            if len(known) + len(new) > SCORE_MEMO:
                known.clear()
            known.update((text, rows[text]) for text in new)
        return np.array([rows[text] for text in texts]).reshape(len(texts), len(self.scorers[name].classes_))

    def seeker(self, conversations: Sequence[Sequence[str]]) -> list[Result]:
        """One result per conversation: its last seeker message, read with the seeker's earlier
        turns (oldest first; up to safety.seeker_turns of them, the last one included)."""
        results = [Result(False, None, [f"pattern: {name}" for name in patterns.seeker_matches(turns[-1])])
                   for turns in conversations]
        if self.patterns_only:
            for result in results:
                result.flagged = bool(result.reasons)
            return results
        windows, owners = [], []
        for index, turns in enumerate(conversations):
            widest = min(len(turns), self.settings.seeker_turns)
            for size in (range(1, widest + 1) if self.settings.middle_windows else sorted({1, widest})):
                windows.append(" ".join(" ".join(turn.split()) for turn in turns[-size:]))
                owners.append((index, size))
        scores, classes = risk_probability(self.scorers["seeker"], self._probabilities("seeker", windows))
        best: dict[int, tuple[float, str, int]] = {}
        for (index, size), score, label in zip(owners, scores, classes):
            if index not in best or score > best[index][0]:
                best[index] = (float(score), str(label), size)
        for index, result in enumerate(results):
            score, label, size = best[index]
            result.score = round(score, 4)
            if score >= self.settings.seeker_threshold:
                result.reasons.append(f"scorer: {label}" + (f" (over the last {size} turns)" if size > 1 else ""))
            result.flagged = bool(result.reasons)
        return results

    def replies(self, replies: Sequence[str], contexts: Sequence[str | Sequence[str] | None] | None = None
                ) -> list[Result]:
        """One result per reply, in order. contexts[i], when given, is what reply i answers: the
        seeker's message or recent seeker turns (oldest first); a reply to a flagged context that does
        not acknowledge the risk is flagged as risk ignorance."""
        if contexts is not None and len(contexts) != len(replies):
            raise MhsError(f"screen_replies: {len(replies)} replies but {len(contexts)} contexts; give one "
                           "context (or None) per reply")
        results = [Result(False, None, [f"pattern: {name}" for name in patterns.reply_matches(reply)])
                   for reply in replies]
        acknowledgement = None
        if not self.patterns_only:
            probabilities = self._probabilities("replies", list(replies))
            scores, classes = risk_probability(self.scorers["replies"], probabilities)
            acknowledgement = probabilities[:, list(self.scorers["replies"].classes_).index(ACKNOWLEDGES)]
            for result, score, label in zip(results, scores, classes):
                result.score = round(float(score), 4)
                if score >= self.settings.reply_threshold:
                    result.reasons.append(f"scorer: {label}")
        if contexts is not None:
            given = [i for i, context in enumerate(contexts) if context]
            flagged_contexts = self.seeker([[contexts[i]] if isinstance(contexts[i], str) else list(contexts[i])
                                            for i in given])
            for i, context in zip(given, flagged_contexts):
                acknowledged = patterns.acknowledges_risk(replies[i]) or (
                    acknowledgement is not None and acknowledgement[i] >= self.settings.acknowledgement_threshold)
                if context.flagged and not acknowledged:
                    results[i].reasons.append(RISK_IGNORANCE)
                    if acknowledgement is not None:
                        results[i].score = round(max(results[i].score, 1.0 - float(acknowledgement[i])), 4)
        for result in results:
            result.flagged = bool(result.reasons)
        return results


def encoder_folder(settings: DictConfig) -> Path:
    return Path(settings.encoder).expanduser()


def require_weights(settings: DictConfig, otherwise: str = "") -> None:
    """Fail closed: stop with one line when the encoder's weights are missing (the pattern layer
    alone needs none). `otherwise` names a way on without them, e.g. ", or screen_replies=false"."""
    folder = encoder_folder(settings)
    if not settings.patterns_only and not (folder / "config.json").is_file():
        raise MhsError(f"the safety screen's weights are missing ({folder}): run `mhs models fetch`{otherwise}")


def encoder_bf16(settings: DictConfig) -> bool:
    """safety.bf16: auto (bf16 on a CPU with bf16 instructions), true or false."""
    from mhsupport.modeling.devices import cpu_supports_bf16

    if settings.bf16 not in ("auto", True, False):
        raise MhsError(f"config key safety.bf16={settings.bf16!r}: expected auto, true or false (e.g. safety.bf16=false)")
    return cpu_supports_bf16() if settings.bf16 == "auto" else settings.bf16


def encoder_pooling(settings: DictConfig) -> str:
    """safety.pooling: how the encoder's token states become features (encoder.POOLINGS)."""
    from mhsupport.safety.encoder import POOLINGS

    if settings.pooling not in POOLINGS:
        raise MhsError(f"config key safety.pooling={settings.pooling!r}: expected one of {', '.join(POOLINGS)} "
                       "(e.g. safety.pooling=mean)")
    return settings.pooling


def load(settings: DictConfig, paths: DictConfig) -> SafetyScreen:
    """The screen `settings` (a config's `safety` node) describe, with `paths` (its `paths` node:
    the model cache, and the raw data the everyday turns come from). It fails closed: without the
    encoder's weights it refuses, unless safety.patterns_only=true asks for the pattern layer alone."""
    if settings.patterns_only:
        return SafetyScreen(settings, None, None)
    require_weights(settings)
    folder = encoder_folder(settings)
    from mhsupport.safety.encoder import SentenceEncoder

    encoder = SentenceEncoder(folder, settings.max_length, settings.batch_size, encoder_bf16(settings),
                              encoder_pooling(settings))
    training = {}
    for name in ("seeker", "replies"):
        texts, labels = training_rows(name, settings, paths.raw_dir)
        training[name] = cached_embeddings(encoder, name, texts, Path(paths.models_dir).expanduser()), labels
    guard = SafetyScreen(settings, encoder.encode, training)
    guard.encoder_dtype = "bfloat16" if encoder.bf16 else "float32"
    return guard


def cached_embeddings(encoder, name: str, texts: list[str], models_dir: Path) -> np.ndarray:
    """The features of a scorer's training texts from `encoder` (a SentenceEncoder), kept in the model
    cache under a key of the texts, the encoder's folder, weights, input length and features, so a
    start reads them instead of encoding every text again."""
    from mhsupport.safety.encoder import POOLINGS

    data = "\n".join(texts).encode()
    weights = encoder.folder / "model.safetensors"
    size, mtime = (weights.stat().st_size, weights.stat().st_mtime_ns) if weights.is_file() else ("", "")
    stamp = (f"{encoder.folder.resolve()}|{'bf16' if encoder.bf16 else 'fp32'}|{size}|{mtime}|{encoder.max_length}|"
             f"{encoder.features}").encode()
    key = hashlib.sha256(data + b"\0" + stamp).hexdigest()[:16]
    # One file per scorer and pooling, so a tuning run with the other pooling does not evict it.
    path = models_dir / "safety-screen" / f"{name}-{encoder.pooling}-{key}.npy"
    try:
        return np.load(path)
    except (OSError, ValueError):  # not there, or replaced by another process as it was read
        pass
    embeddings = encoder.encode(texts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        with open(partial, "wb") as handle:
            np.save(handle, embeddings)
        partial.replace(path)
        others = tuple(f"{name}-{other}-" for other in POOLINGS if other != encoder.pooling)
        for stale in path.parent.glob(f"{name}-*.npy"):  # earlier texts or encoders: never read again
            if stale != path and not stale.name.startswith(others):
                stale.unlink(missing_ok=True)
    except OSError as err:  # an unwritable cache costs the next start time, nothing else
        log.warning("safety screen: cannot cache exemplar embeddings in %s (%s)", path.parent, err.strerror)
    return embeddings


def load_shared(settings: DictConfig, paths: DictConfig) -> SafetyScreen:
    """load(), once per process for the same settings and paths: the evals of one `mhs reproduce`
    share one screen, its start and the scores of the replies and contexts they have in common."""
    return _shared(json.dumps([OmegaConf.to_container(settings, resolve=True), str(paths.raw_dir),
                               str(paths.models_dir)], sort_keys=True))


@functools.lru_cache(maxsize=2)
def _shared(key: str) -> SafetyScreen:
    settings, raw_dir, models_dir = json.loads(key)
    return load(OmegaConf.create(settings), OmegaConf.create({"raw_dir": raw_dir, "models_dir": models_dir}))


@functools.lru_cache(maxsize=4)
def _default_screen(overrides: tuple[str, ...]) -> SafetyScreen:
    from mhsupport.settings.config import load_config

    cfg = load_config("screen", list(overrides))
    return load(cfg.safety, cfg.paths)


def screen_replies(replies: Sequence[str], contexts: Sequence[str | Sequence[str] | None] | None = None,
                   overrides: Sequence[str] = ()) -> list[Result]:
    """Screen a batch of generated replies with the configured screen (loaded once per process):
    one Result per reply, in order. contexts[i] is the seeker message (or recent seeker turns,
    oldest first) that reply i answers, or None; with contexts, a reply that ignores a flagged
    seeker context is flagged as risk ignorance. `overrides` are Hydra overrides of the screen
    config, e.g. ["paths.models_dir=/models"]."""
    return _default_screen(tuple(overrides)).replies(replies, contexts)
