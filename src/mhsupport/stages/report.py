"""`mhs report`: the paper's Table 1, Table 2 and Table 4 from this profile's runs, with
bootstrap intervals, the paper's numbers beside ours, paired tests of the paper's orderings,
and figures (the jobs themselves are in reporting/)."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from mhsupport.errors import MhsError
from mhsupport.evaluation import judge_results
from mhsupport.evaluation.jsonl_io import read_checked_lines
from mhsupport.evaluation.reply_safety import FLAGGED
from mhsupport.evaluation.metric_protocols import metric_names
from mhsupport.modeling import devices
from mhsupport.reporting.figures import bleu_figure, confusion_figure, counterfactual_figure
from mhsupport.reporting.paper import DATASET_NAMES, PAPER_TABLE2, PAPER_TABLE4, TABLE2_SYSTEMS, systems
from mhsupport.reporting.render import report_markdown, write_csv
from mhsupport.reporting.tables import (classifier_baseline_rows, counterfactual_rows, over_seeds, perplexity,
                                       pooled_likelihoods, reply_safety_rows, row, significance, tag_use_rows)
from mhsupport.runs import artifacts
from mhsupport.settings.config import (classifier_config, eval_config, generation_config, judge_config, likelihood_config,
                                      prepare_data_config)

log = logging.getLogger(__name__)
STAGE = "report"
COMMAND = "mhs report"
PROFILE_GROUPS = ("generator", "classifier")
REPORT = "report.md"

# Metrics scored beside the protocols' text-overlap metrics (see metrics.GenerationScores).
OTHER_METRICS = ("ppl", "length", "strategy_accuracy", "tag_adherence")


def check(cfg: DictConfig) -> None:
    """The paired tests may only name metrics the evals score: checked before any eval is built."""
    known = [*metric_names(cfg.metrics.protocols), *OTHER_METRICS]
    unknown = [m for m in cfg.significance_metrics if m not in known]
    if unknown or not cfg.significance_metrics:
        raise MhsError(f"significance_metrics={list(cfg.significance_metrics)}: expected a non-empty list of metrics "
                       f"the protocols {list(cfg.metrics.protocols)} score, from {known}")


def training_seeds(cfg: DictConfig) -> list[int]:
    return list(cfg.seeds) if cfg.get("seeds") else [cfg.seed]


def requires(cfg: DictConfig) -> dict:
    needs = {"prepare_data": ("prepare_data", prepare_data_config(cfg))}
    for seed in training_seeds(cfg):
        needs.update({f"{key}@{seed}": ("eval", eval_config(cfg, {**values, "seed": seed}))
                      for key, values in systems(cfg.table4_samplers).items()})
        needs.update({f"likelihood/{name}@{seed}": likelihood_source(eval_config(cfg, {**values, "seed": seed}))
                      for name, values in TABLE2_SYSTEMS.items()})
        needs.update({f"generation/{dataset}@{seed}": ("generate", generation_config(eval_config(
            cfg, {"dataset": dataset, "strategy_tag": True, "seed": seed}))) for dataset in DATASET_NAMES})
    needs["classifier"] = ("train_classifier", classifier_config(eval_config(cfg, {}), "next_category"))
    if cfg.judge.backend != "none":  # the judge's Tables 3, 5 and 6, on the evals of the first training seed
        needs.update({f"judge/{table}": ("judge", judge_config(cfg, table, training_seeds(cfg)[0]))
                      for table in cfg.judge.report_tables})
    return needs


def likelihood_source(system: DictConfig) -> tuple[str, DictConfig]:
    """The run whose `likelihoods.jsonl` gives a Table 2 system's tag use and perplexity, read where its
    replies were generated when they were generated for the test examples `mhs likelihood` would score:
    a tagged generator's generation pass (the run the report's steering reads) or an untagged system's
    eval (its Table 2 row); else the system's likelihood run."""
    scored = likelihood_config(system)
    if system.generator_source == "finetuned" and system.strategy_tag:
        generation = generation_config(system)
        if generation.test_subset == scored.test_subset:
            return "generate", generation
    elif system.test_subset == scored.test_subset:
        return "eval", system
    return "likelihood", scored


def label(cfg: DictConfig) -> str:
    return "report"


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    seeds = training_seeds(cfg)
    evals = {key: [inputs[f"{key}@{seed}"] for seed in seeds] for key in systems(cfg.table4_samplers)}
    metrics = {key: over_seeds([run.read_metrics() for run in runs]) for key, runs in evals.items()}
    profile = cfg.generator.profile
    stats = json.loads((inputs["prepare_data"].path / "stats.json").read_text())

    table1 = [{"category": c, "paper": stats["table1"]["paper"][c], "ours_membership": stats["table1"]["membership"][c],
               "ours_primary": stats["table1"]["primary"][c]} for c in stats["table1"]["paper"]]
    table2 = [row(name, metrics[f"table2/{name}"], PAPER_TABLE2[name]) for name in TABLE2_SYSTEMS]
    likelihoods = {name: pooled_likelihoods([inputs[f"likelihood/{name}@{seed}"] for seed in seeds])
                   for name in TABLE2_SYSTEMS}
    for r in table2:  # perplexity from the likelihood runs: more examples, one per generator
        r["ppl"], r["ppl_ci"] = perplexity(likelihoods[r["system"]], cfg)
    tag_use = tag_use_rows(likelihoods, cfg, {d: metrics.get(f"table4/{d}/oracle") for d in ("esconv", "unified")})
    table4_cells = {f"{DATASET_NAMES[d]}+tag / {s}": (d, s) for d in ("esconv", "unified") for s in cfg.table4_samplers}
    table4 = [row(name, metrics[f"table4/{d}/{s}"], PAPER_TABLE4.get((d, s))) for name, (d, s) in table4_cells.items()]
    tests = significance(cfg, evals)
    # steering and the classifier's baselines: the first training seed's runs
    steering = counterfactual_rows({f"{DATASET_NAMES[d]}+tag": inputs[f"generation/{d}@{seeds[0]}"].read_metrics()
                                    for d in DATASET_NAMES})
    baselines = classifier_baseline_rows(inputs["classifier"].read_metrics())
    named_evals = {**{name: evals[f"table2/{name}"] for name in TABLE2_SYSTEMS},
                   **{name: evals[f"table4/{d}/{s}"] for name, (d, s) in table4_cells.items()}}
    reply_safety = reply_safety_rows(named_evals)
    judged = {table: inputs[f"judge/{table}"].read_metrics() for table in cfg.judge.report_tables
              if f"judge/{table}" in inputs}
    run_.metrics = {"profile": profile, "table2": table2, "table4": table4, "significance": tests, "tag_use": tag_use,
                    "steering": [{k: v for k, v in r.items() if k not in ("confusion", "labels")} for r in steering],
                    "classifier_baselines": baselines, "reply_safety": reply_safety,
                    "judge": {table: {"signature": m["signature"], "rows": m["rows"]} for table, m in judged.items()}}
    run_.device = devices.describe(cfg.runtime, {})  # the machine the report was built on (its CPU), for docs/results.md

    with run_.build(seed=cfg.seed) as out:
        write_csv(out / "table1.csv", table1)
        write_csv(out / "table2.csv", table2)
        write_csv(out / "table4.csv", table4)
        write_csv(out / "significance.csv", tests)
        write_csv(out / "tag_use.csv", [{k: v for k, v in r.items() if k != "confusion"} for r in tag_use])
        confusion_figure(tag_use, out / "tag_use_confusion", f"Lowest-NLL tag vs gold tag ({profile} profile)")
        write_csv(out / "classifier_baselines.csv", baselines)
        if reply_safety:
            write_csv(out / "reply_safety.csv", reply_safety)
            (out / FLAGGED).write_text("".join(json.dumps({"system": r["system"], "eval_run": run.run_id, **line}) + "\n"
                                               for r in reply_safety for run in named_evals[r["system"]]
                                               for line in read_checked_lines(run.path / FLAGGED, ("response", "reasons"),
                                                                              f"rebuild it with {run.rebuild_hint}")))
        if steering:
            write_csv(out / "steering.csv", [{k: v for k, v in r.items() if k not in ("confusion", "labels")}
                                             for r in steering])
            write_csv(out / "steering_confusion.csv", [{"system": r["system"], "forced": forced, **counts}
                                                       for r in steering for forced, counts in r["confusion"].items()])
            counterfactual_figure(steering, out / "steering_confusion",
                                  f"Replies under every forced category, as the recogniser reads them ({profile} profile)")
        bleu_figure({name: metrics[f"table2/{name}"] for name in TABLE2_SYSTEMS},
                    out / "table2_bleu", f"Table 2 ({profile} profile): BLEU with 95% intervals")
        bleu_figure({name: metrics[f"table4/{d}/{s}"] for name, (d, s) in table4_cells.items()},
                    out / "table4_bleu", f"Table 4 ({profile} profile): BLEU with 95% intervals")
        judge_section = ""
        if judged:
            write_csv(out / "judge_tables.csv", [r for m in judged.values() for r in judge_results.csv_rows(m)])
            judge_results.figure(list(judged.values()), out / "judge_tables")
            judge_section = judge_results.report_section(judged, training_seeds(cfg)[0])
        (out / REPORT).write_text(report_markdown(cfg, metrics, table1, table2, table4, tests, tag_use, seeds,
                                                  judge_section, steering, baselines, reply_safety))
    log.info("report wrote %s", run_.path)
