"""`mhs chat`: an interactive session with a trained generator and a tag sampler. Each seeker
message passes the safety screen first (with the seeker's recent turns); a risk message gets the
fixed crisis reply, flagged. Each generated reply passes the reply screen; a flagged one is replaced
with a safe fallback, and the log says so."""

from __future__ import annotations

import json
import logging
import sys

from omegaconf import DictConfig
from transformers import set_seed

from mhsupport.settings import options
from mhsupport.evaluation import reply_safety, sampling
from mhsupport.modeling import classifier as classifier_api, devices, loading, tag_likelihood
from mhsupport.settings.config import classifier_config, generator_config
from mhsupport.errors import MhsError
from mhsupport.modeling.formatting import build_formatter, generator_tags
from mhsupport.modeling.decoding import generate
from mhsupport.pipeline import Pipeline
from mhsupport import safety
from mhsupport.data.taxonomy import Taxonomy

log = logging.getLogger(__name__)
WEAKER_SCREEN = ("mhs chat: warning: the pattern layer alone screens this chat (safety.patterns_only=true), a weaker "
                 "screen that misses most risk worded unlike its patterns")


def resolve_sampler(cfg: DictConfig) -> str:
    sampler = cfg.sampler
    if sampler == options.CHAT_DEFAULT_SAMPLER:
        sampler = "classifier" if cfg.strategy_tag else "none"
    if sampler == "oracle":
        raise MhsError("sampler=oracle needs gold labels, which a live chat does not have")
    sampling.check_sampler(sampler, tagged=bool(cfg.strategy_tag))
    return sampler


def requires(cfg: DictConfig, sampler: str) -> dict:
    needs = {"generator": ("train_generator", generator_config(cfg))}
    if sampler == "classifier":
        needs["classifier"] = ("train_classifier", classifier_config(cfg, "next_category"))
    return needs


def run(cfg: DictConfig, lines=sys.stdin, out=sys.stdout, json_mode: bool = False) -> int:
    options.validate(cfg)
    guard = safety.load(cfg.safety, cfg.paths)  # before any model: without its weights, no chat
    sampler = resolve_sampler(cfg)
    gcfg = generator_config(cfg)
    runs = Pipeline().upstream(requires(cfg, sampler))
    generator_run = runs["generator"]
    classifier = classifier_api.load(runs["classifier"].path, cfg.runtime) if "classifier" in runs else None
    model, tokenizer = loading.load_saved_causal_lm(generator_run.path / "model", devices.inference(cfg.runtime))
    formatter = build_formatter(gcfg, tokenizer)
    labels = generator_tags(gcfg) or []
    label_key = Taxonomy.label_key(cfg.tag_set)
    set_seed(cfg.seed)

    if not json_mode:
        print(f"mhs chat: {generator_run.path} ({sampler} sampler). Research only: not a substitute for "
              "professional help. Ctrl-D to end.", file=sys.stderr)
    history: list[dict] = []
    replies = 0
    for turn, line in enumerate(iter(lambda: _read(lines, json_mode), None)):
        message = line.strip()
        if not message:
            continue
        history.append({"speaker": "seeker", "text": message})
        if guard.patterns_only:
            print(WEAKER_SCREEN, file=sys.stderr)
        (check,) = guard.seeker([reply_safety.seeker_turns(history, cfg.safety.seeker_turns)])
        reply_check = None
        if check.flagged:
            reply, category = safety.CRISIS_REPLY, None
        else:
            context = history[-cfg.max_context_turns:]
            own = (tag_likelihood.opening_probabilities(model, formatter, [context])
                   if sampler == "none" and formatter.model_writes_tag else None)
            (tag,) = sampling.choose_tags(sampler, [{"context": context}], labels, "category", cfg.seed + turn,
                                          classifier=classifier, classifier_sampling=cfg.classifier_sampling,
                                          own_probabilities=own, own_strategy=cfg.own_strategy)
            (output,) = generate(model, tokenizer, formatter, [context], [tag], batch_size=1,
                                 max_new_tokens=cfg.max_new_tokens, progress=False)
            reply, category = output["response"], output["tag"]
            (reply_check,) = guard.replies([reply])  # its seeker turns were not flagged: no risk to ignore
            if reply_check.flagged:
                log.warning("mhs chat: the reply screen flagged the generated reply (%s): replaced with the safe "
                            "fallback", ", ".join(reply_check.reasons))
                reply = safety.FALLBACK_REPLY
        history.append({"speaker": "supporter", "text": reply, label_key: category})  # where the models read tags
        replies += 1
        if json_mode:
            out.write(json.dumps({"turn": replies, "message": message, "reply": reply, "category": category,
                                  "flagged": check.flagged, "safety_reasons": check.reasons,
                                  "reply_flagged": bool(reply_check and reply_check.flagged),
                                  "reply_reasons": reply_check.reasons if reply_check else [],
                                  "weaker_screen": guard.patterns_only}) + "\n")
        else:
            label = "safety" if check.flagged or (reply_check and reply_check.flagged) else (category or "-")
            out.write(f"supporter [{label}]> {reply}\n")
        out.flush()
    return replies


def _read(lines, json_mode: bool):
    """The next seeker line, or None at the end of input. Bytes that are not UTF-8 become U+FFFD
    with a one-line warning, so no input ends the session with a traceback."""
    if lines is None:  # Python sets sys.stdin to None when file descriptor 0 is closed
        raise MhsError("standard input is closed: pipe seeker messages in (one per line, e.g. "
                       "`echo 'I feel low' | mhs chat --json`) or run `mhs chat` in a terminal")
    if not json_mode and lines is sys.stdin and sys.stdin.isatty():
        sys.stdin.reconfigure(errors="replace")
        try:
            return input("you> ")
        except EOFError:
            return None
    line = lines.buffer.readline() if hasattr(lines, "buffer") else lines.readline()
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            print(f"mhs chat: warning: a stdin line is not UTF-8 (byte 0x{line[err.start]:02x} at offset "
                  f"{err.start}); such bytes are read as U+FFFD", file=sys.stderr)
            line = line.decode("utf-8", errors="replace")
    return line if line else None
