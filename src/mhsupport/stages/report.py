"""`mhs report`: the paper's Table 1, Table 2 and Table 4 from this profile's runs, with
bootstrap intervals, the paper's numbers beside ours, paired tests of the paper's orderings,
and figures."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from omegaconf import DictConfig, OmegaConf

from mhsupport import artifacts, upstream
from mhsupport.errors import MhsError
from mhsupport.generations_io import read_generations
from mhsupport.metrics import paired_bootstrap
from mhsupport.stages import evaluate

log = logging.getLogger(__name__)
STAGE = "report"

# The paper's BLEU (scale unstated, probably 0-1; DESIGN.md section 1).
PAPER_TABLE2 = {"Pretrained": 0.073, "ESConv": 0.226, "Unified": 0.229, "ESConv+tag": 0.293, "Unified+tag": 0.300}
PAPER_TABLE4 = {("esconv", "none"): 0.293, ("esconv", "random"): 0.271, ("esconv", "classifier"): 0.313,
                ("unified", "none"): 0.300, ("unified", "random"): 0.278, ("unified", "classifier"): 0.331}
TABLE2_SYSTEMS = {
    "Pretrained": {"generator_source": "base", "dataset": "esconv", "strategy_tag": False, "sampler": "none"},
    "ESConv": {"dataset": "esconv", "strategy_tag": False, "sampler": "none"},
    "Unified": {"dataset": "unified", "strategy_tag": False, "sampler": "none"},
    "ESConv+tag": {"dataset": "esconv", "strategy_tag": True, "sampler": "none"},
    "Unified+tag": {"dataset": "unified", "strategy_tag": True, "sampler": "none"},
}
COLUMNS = ("bleu", "bleu_2", "bleu_4", "rouge_l", "distinct_2", "ppl", "length", "strategy_accuracy", "tag_adherence")
DATASET_NAMES = {"esconv": "ESConv", "unified": "Unified"}


@dataclass
class ReportResult:
    run: artifacts.Run
    report: Path
    skipped: bool


def eval_config(cfg: DictConfig, values: dict) -> DictConfig:
    derived = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("table4_samplers", "significance_resamples")])
    OmegaConf.set_struct(derived, False)
    derived.generator_source = "finetuned"
    for key, value in values.items():
        derived[key] = value
    derived.force = False
    return derived


def systems(cfg: DictConfig) -> dict[str, dict]:
    """Every eval the report reads: Table 2's rows and Table 4's dataset x sampler cells."""
    out = {f"table2/{name}": values for name, values in TABLE2_SYSTEMS.items()}
    for dataset in ("esconv", "unified"):
        for sampler in cfg.table4_samplers:
            out[f"table4/{dataset}/{sampler}"] = {"dataset": dataset, "strategy_tag": True, "sampler": sampler}
    return out


def eval_command(values: dict, profile: str) -> str:
    parts = [f"mhs eval --profile {profile} --dataset {values['dataset']}"]
    parts += ["--base"] if values.get("generator_source") == "base" else []
    parts += ["--strategy-tag", f"--sampler {values['sampler']}"] if values["strategy_tag"] else []
    return " ".join(parts)


def plan(cfg: DictConfig) -> tuple[artifacts.Run, dict[str, artifacts.Run]]:
    runs, missing = {}, []
    for key, values in systems(cfg).items():
        try:
            run = evaluate.plan(eval_config(cfg, values))
        except MhsError as err:  # an upstream training run is missing
            missing.append(f"{key}: {err}")
            continue
        if not run.complete:
            missing.append(f"{key}: run `{eval_command(values, cfg.generator.profile)}`")
        runs[key] = run
    if missing:
        raise MhsError("the report needs eval runs that are not there (or `mhs reproduce` builds them all):\n  "
                       + "\n  ".join(missing))
    data_run = upstream.prepare_data_run(cfg)
    return artifacts.plan_run(STAGE, cfg, {"prepare_data": data_run, **runs}), runs


def run(cfg: DictConfig) -> ReportResult:
    run_, evals = plan(cfg)
    if run_.up_to_date(cfg.force):
        return ReportResult(run_, run_.path / "report.md", skipped=True)
    metrics = {key: run.read_metrics() for key, run in evals.items()}
    profile = cfg.generator.profile
    stats = json.loads((Path(run_.inputs["prepare_data"]["run"]) / "stats.json").read_text())

    table1 = [{"category": c, "paper": stats["table1"]["paper"][c], "ours_membership": stats["table1"]["membership"][c],
               "ours_primary": stats["table1"]["primary"][c]} for c in stats["table1"]["paper"]]
    table2 = [row(name, metrics[f"table2/{name}"], PAPER_TABLE2[name]) for name in TABLE2_SYSTEMS]
    table4 = [row(f"{DATASET_NAMES[d]}+tag / {s}", metrics[f"table4/{d}/{s}"], PAPER_TABLE4.get((d, s)))
              for d in ("esconv", "unified") for s in cfg.table4_samplers]
    tests = significance(cfg, evals)
    run_.metrics = {"profile": profile, "table2": table2, "table4": table4, "significance": tests}

    with run_.build(seed=cfg.seed) as out:
        write_csv(out / "table1.csv", table1)
        write_csv(out / "table2.csv", table2)
        write_csv(out / "table4.csv", table4)
        write_csv(out / "significance.csv", tests)
        bleu_figure(table2, out / "table2_bleu.png", f"Table 2 ({profile} profile): BLEU with 95% intervals")
        bleu_figure(table4, out / "table4_bleu.png", f"Table 4 ({profile} profile): BLEU with 95% intervals")
        (out / "report.md").write_text(report_markdown(cfg, metrics, table1, table2, table4, tests))
    log.info("report wrote %s", run_.path)
    return ReportResult(run_, run_.path / "report.md", skipped=False)


def row(name: str, m: dict, paper_bleu: float | None) -> dict:
    out = {"system": name, "paper_bleu": paper_bleu, "examples": m["examples"]}
    for column in COLUMNS:
        if column in m["metrics"]:
            value = m["metrics"][column]
            out[column] = round(value["value"], 3)
            if value["ci_low"] is not None:
                out[f"{column}_ci"] = f"[{value['ci_low']:.2f}, {value['ci_high']:.2f}]"
    return out


ORDERINGS = [  # (claim, system A, system B): B should beat A
    ("tag > no tag (ESConv)", "table2/ESConv", "table2/ESConv+tag"),
    ("tag > no tag (Unified)", "table2/Unified", "table2/Unified+tag"),
    ("unified > ESConv (tagged)", "table2/ESConv+tag", "table2/Unified+tag"),
    ("classifier > none (ESConv)", "table4/esconv/none", "table4/esconv/classifier"),
    ("classifier > none (Unified)", "table4/unified/none", "table4/unified/classifier"),
    ("none > random (ESConv)", "table4/esconv/random", "table4/esconv/none"),
    ("none > random (Unified)", "table4/unified/random", "table4/unified/none"),
    ("oracle > classifier (ESConv)", "table4/esconv/classifier", "table4/esconv/oracle"),
    ("oracle > classifier (Unified)", "table4/unified/classifier", "table4/unified/oracle"),
]


def significance(cfg: DictConfig, evals: dict[str, artifacts.Run]) -> list[dict]:
    """Paired bootstrap tests of the paper's orderings on BLEU and BLEU-2."""
    tests = []
    for claim, a, b in ORDERINGS:
        if a not in evals or b not in evals:
            continue
        result = paired_bootstrap(evaluate.scores_from_generations(read_generations(evals[a].path)),
                                  evaluate.scores_from_generations(read_generations(evals[b].path)),
                                  cfg.significance_resamples, cfg.bootstrap.seed)
        for metric in ("bleu", "bleu_2"):
            r = result[metric]
            tests.append({"claim": claim, "metric": metric, "a": round(r["a"], 3), "b": round(r["b"], 3),
                          "delta": round(r["delta"], 3), "ci": f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
                          "p_value": round(r["p_value"], 4), "holds": bool(r["delta"] > 0 and r["p_value"] < 0.05)})
    return tests


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for r in rows:
        cells = []
        for key, _ in columns:
            value = r.get(key)
            cells.append("" if value is None else f"{value:,}" if isinstance(value, int) and not isinstance(value, bool)
                         else f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generation_columns(rows) -> list[tuple[str, str]]:
    columns = [("system", "System"), ("paper_bleu", "Paper BLEU (0-1?)"), ("bleu", "BLEU"), ("bleu_ci", "95% CI"),
               ("bleu_2", "B-2"), ("bleu_4", "B-4"), ("rouge_l", "ROUGE-L"), ("distinct_2", "Dist-2"),
               ("ppl", "PPL"), ("length", "Len"), ("strategy_accuracy", "Strategy acc. %"),
               ("tag_adherence", "Tag adherence %")]
    return [c for c in columns if any(c[0] in r for r in rows)]


def report_markdown(cfg, metrics, table1, table2, table4, tests) -> str:
    profile = cfg.generator.profile
    n = next(iter(metrics.values()))["examples"]
    warning = ("\n> **tiny profile: a plumbing check. Models trained from scratch for seconds; every number "
               "below means nothing.**\n" if profile == "tiny" else "")
    return f"""# Reproduction report ({profile} profile)
{warning}
Generators: `{cfg.generator.get('name_or_path') or cfg.generator.get('gguf_file') or 'GPT-2 from scratch'}`
({profile} profile); classifier: `{cfg.classifier.get('name_or_path') or 'BERT from scratch'}`.
Scored on {n:,} ESConv test examples (seeded subset: {cfg.test_subset is not None}), greedy decoding,
{cfg.bootstrap.resamples} bootstrap resamples. BLEU is sacrebleu corpus BLEU (0-100); B-n are
cumulative, smoothed, lowercased; the paper's BLEU is on an unstated scale, probably 0-1, with its own
split and tokenisation: compare orderings, not values.

## Table 1: category counts

{markdown_table(table1, [("category", "Category"), ("paper", "Paper"), ("ours_membership", "Ours, Table-1 membership"),
                         ("ours_primary", "Ours, primary label")])}

## Table 2: fine-tuning data and tags (no tag sampling)

{markdown_table(table2, generation_columns(table2))}

## Table 4: tag samplers (tagged generators)

{markdown_table(table4, generation_columns(table4))}

## Do the paper's orderings hold? (paired bootstrap, B - A)

{markdown_table(tests, [("claim", "Claim (B > A)"), ("metric", "Metric"), ("a", "A"), ("b", "B"), ("delta", "B - A"),
                        ("ci", "95% CI"), ("p_value", "p"), ("holds", "Holds (p < 0.05)")])}

Figures: `table2_bleu.png`, `table4_bleu.png`. CSV: `table1.csv`, `table2.csv`, `table4.csv`, `significance.csv`.
"""


def bleu_figure(rows: list[dict], path: Path, title: str) -> None:
    names = [r["system"] for r in rows]
    values = [r["bleu"] for r in rows]
    bounds = [tuple(float(x) for x in r["bleu_ci"].strip("[]").split(", ")) for r in rows]
    errors = [[v - lo for v, (lo, _) in zip(values, bounds)], [hi - v for v, (_, hi) in zip(values, bounds)]]
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.2))
    axes.bar(range(len(rows)), values, yerr=errors, capsize=4, color="#4C72B0")
    axes.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    axes.set_ylabel("sacrebleu BLEU (0-100)")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
