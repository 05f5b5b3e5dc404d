"""`mhs chat`: an interactive session with a trained generator and a tag sampler. Each seeker
message passes the safety screen first; a risk message gets the fixed crisis reply, flagged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig
from transformers import set_seed

from mhsupport import classifier as classifier_api, devices, models, sampling, upstream
from mhsupport.errors import MhsError
from mhsupport.generation import generate
from mhsupport.safety import CRISIS_REPLY, screen
from mhsupport.stages import evaluate, train_generator


def resolve_sampler(cfg: DictConfig) -> str:
    sampler = cfg.sampler
    if sampler == "classifier if_tagged":
        sampler = "classifier" if cfg.strategy_tag else "none"
    if sampler == "oracle":
        raise MhsError("sampler=oracle needs gold labels, which a live chat does not have")
    sampling.check_sampler(sampler, tagged=bool(cfg.strategy_tag))
    return sampler


def run(cfg: DictConfig, lines=sys.stdin, out=sys.stdout, json_mode: bool = False) -> int:
    sampler = resolve_sampler(cfg)
    gcfg = evaluate.generator_config(cfg)
    generator_run = upstream.require_complete(train_generator.plan(gcfg), evaluate.train_generator_command(cfg))
    classifier = None
    if sampler == "classifier":
        ccfg = evaluate.classifier_config(cfg, "next_category")
        classifier = classifier_api.load(upstream.require_complete(
            evaluate.train_classifier.plan(ccfg), evaluate.train_classifier_command(ccfg)).path, cfg.runtime)
    model, tokenizer = models.load_saved_causal_lm(Path(generator_run.path) / "model", devices.inference(cfg.runtime))
    formatter = train_generator.build_formatter(gcfg, tokenizer)
    labels = train_generator.tag_labels(gcfg) or []
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
        check = screen(message)
        if check.flagged:
            reply, category = CRISIS_REPLY, None
        else:
            context = history[-cfg.max_context_turns:]
            (tag,) = sampling.choose_tags(sampler, [{"context": context}], labels, "category", cfg.seed + turn,
                                          classifier=classifier, classifier_sampling=cfg.classifier_sampling)
            (output,) = generate(model, tokenizer, formatter, [context], [tag], batch_size=1,
                                 max_new_tokens=cfg.max_new_tokens, progress=False)
            reply, category = output["response"], output["tag"]
        history.append({"speaker": "supporter", "text": reply, "category": category})
        replies += 1
        if json_mode:
            out.write(json.dumps({"turn": replies, "message": message, "reply": reply, "category": category,
                                  "flagged": check.flagged, "safety_reasons": check.reasons}) + "\n")
        else:
            label = "safety" if check.flagged else (category or "-")
            out.write(f"supporter [{label}]> {reply}\n")
        out.flush()
    return replies


def _read(lines, json_mode: bool):
    if not json_mode and lines is sys.stdin and sys.stdin.isatty():
        try:
            return input("you> ")
        except EOFError:
            return None
    line = lines.readline()
    return line if line else None
