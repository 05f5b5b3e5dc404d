"""`mhs reproduce` (`make reproduce-paper`): every stage from raw data to the paper's tables for
one profile, skipping what is up to date, with each stage's wall time."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mhsupport import models, upstream
from mhsupport.config import load_config
from mhsupport.stages import evaluate, prepare_data, report, train_classifier, train_generator

log = logging.getLogger(__name__)
GENERATOR_VARIANTS = [("esconv", False), ("unified", False), ("esconv", True), ("unified", True)]


@dataclass
class ReproduceResult:
    report: report.ReportResult
    timings: list[dict]
    timings_file: Path


def run(cfg: DictConfig) -> ReproduceResult:
    timings = []

    def timed(name: str, work):
        started = time.time()
        log.info("== %s", name)
        result = work()
        timings.append({"stage": name, "seconds": round(time.time() - started, 1),
                        "skipped": bool(getattr(result, "skipped", False))})
        return result

    timed("prepare-data", lambda: prepare_data.run(upstream.derived_config("prepare_data", cfg, {})))
    if cfg.generator.source == "gguf" or cfg.classifier.source == "local":
        timed("models fetch", lambda: models.fetch_wheels(load_config("models", [
            f"paths.models_dir={cfg.paths.models_dir}"])))
    for dataset, tagged in GENERATOR_VARIANTS:
        values = {"dataset": dataset, "strategy_tag": tagged}
        gcfg = evaluate.generator_config(report.eval_config(cfg, values))
        timed(f"train dialogpt {dataset}{'+tag' if tagged else ''}", lambda gcfg=gcfg: train_generator.run(gcfg))
    for mode in ("next_category", "response"):
        ccfg = evaluate.classifier_config(cfg, mode)
        timed(f"train classifier ({mode})", lambda ccfg=ccfg: train_classifier.run(ccfg))
    for key, values in report.systems(cfg).items():
        ecfg = report.eval_config(cfg, values)
        timed(f"eval {key}", lambda ecfg=ecfg: evaluate.run(ecfg))
    result = timed("report", lambda: report.run(cfg))

    total = sum(t["seconds"] for t in timings)
    timings_dir = Path(cfg.paths.artifacts_dir) / "reproduce"
    timings_dir.mkdir(parents=True, exist_ok=True)
    timings_file = timings_dir / f"timings-{cfg.generator.profile}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    timings_file.write_text(json.dumps({"profile": cfg.generator.profile, "report": str(result.run.path),
                                        "total_seconds": round(total, 1), "stages": timings}, indent=2) + "\n")
    return ReproduceResult(result, timings, timings_file)


def timings_markdown(timings: list[dict]) -> str:
    total = sum(t["seconds"] for t in timings) or 1.0
    lines = ["| stage | seconds | share | |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {t['stage']} | {t['seconds']:.1f} | {100 * t['seconds'] / total:.1f}% "
              f"| {'up to date' if t['skipped'] else ''} |" for t in timings]
    lines.append(f"| total | {total:.1f} | 100% | |")
    return "\n".join(lines)
