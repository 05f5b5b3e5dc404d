"""`mhs report`: the paper's Table 1, Table 2 and Table 4 from this profile's runs, with
bootstrap intervals, the paper's numbers beside ours, paired tests of the paper's orderings,
and figures."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig
from sklearn.metrics import ConfusionMatrixDisplay

from mhsupport.runs import artifacts
from mhsupport.evaluation import judge_results, tag_use
from mhsupport.settings.config import eval_config, judge_config, likelihood_config, prepare_data_config
from mhsupport.errors import MhsError
from mhsupport.evaluation.generations_io import read_generations, scores_from_generations
from mhsupport.evaluation.metric_protocols import metric_names
from mhsupport.evaluation.generation_metrics import paired_bootstrap, paired_randomisation
from mhsupport.evaluation.statistics import binomial_p, holm

log = logging.getLogger(__name__)
STAGE = "report"
COMMAND = "mhs report"
PROFILE_GROUPS = ("generator", "classifier")
REPORT = "report.md"

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
COLUMNS = ("bleu", "bleu_2", "bleu_4", "rouge_l", "distinct_2", "ppl", "length", "strategy_accuracy", "tag_adherence",
           "esconv_bleu_1", "esconv_bleu_2", "esconv_bleu_3", "esconv_bleu_4", "esconv_rouge_l", "esconv_distinct_1",
           "esconv_distinct_2")
# The ESConv paper's automatic evaluation (Liu et al., ACL 2021) under the esconv protocol:
# other models (DialoGPT with strategy tokens: Joint predicts the strategy, Oracle is given the gold
# one), all of ESConv, its own random split.
LITERATURE = [
    {"system": "Liu et al. 2021: DialoGPT-Joint (other model, data, split)", "esconv_bleu_2": 5.00,
     "esconv_rouge_l": 15.09},
    {"system": "Liu et al. 2021: DialoGPT-Oracle (other model, data, split)", "esconv_bleu_2": 5.52,
     "esconv_rouge_l": 15.82},
]
DATASET_NAMES = {"esconv": "ESConv", "unified": "Unified"}


def systems(cfg: DictConfig) -> dict[str, dict]:
    """Every eval the report reads: Table 2's rows and Table 4's dataset x sampler cells."""
    out = {f"table2/{name}": values for name, values in TABLE2_SYSTEMS.items()}
    for dataset in ("esconv", "unified"):
        for sampler in cfg.table4_samplers:
            out[f"table4/{dataset}/{sampler}"] = {"dataset": dataset, "strategy_tag": True, "sampler": sampler}
    return out


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
                      for key, values in systems(cfg).items()})
        needs.update({f"likelihood/{name}@{seed}": ("likelihood", likelihood_config(eval_config(cfg, {**values, "seed": seed})))
                      for name, values in TABLE2_SYSTEMS.items()})
    if cfg.judge.backend != "none":  # the judge's Tables 3, 5 and 6, on the evals of the first training seed
        needs.update({f"judge/{table}": ("judge", judge_config(cfg, table, training_seeds(cfg)[0]))
                      for table in cfg.judge.report_tables})
    return needs


def label(cfg: DictConfig) -> str:
    return "report"


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    seeds = training_seeds(cfg)
    evals = {key: [inputs[f"{key}@{seed}"] for seed in seeds] for key in systems(cfg)}
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
    judged = {table: inputs[f"judge/{table}"].read_metrics() for table in cfg.judge.report_tables
              if f"judge/{table}" in inputs}
    run_.metrics = {"profile": profile, "table2": table2, "table4": table4, "significance": tests, "tag_use": tag_use,
                    "judge": {table: {"signature": m["signature"], "rows": m["rows"]} for table, m in judged.items()}}

    with run_.build(seed=cfg.seed) as out:
        write_csv(out / "table1.csv", table1)
        write_csv(out / "table2.csv", table2)
        write_csv(out / "table4.csv", table4)
        write_csv(out / "significance.csv", tests)
        write_csv(out / "tag_use.csv", [{k: v for k, v in r.items() if k != "confusion"} for r in tag_use])
        confusion_figure(tag_use, out / "tag_use_confusion", f"Lowest-NLL tag vs gold tag ({profile} profile)")
        bleu_figure({name: metrics[f"table2/{name}"] for name in TABLE2_SYSTEMS},
                    out / "table2_bleu", f"Table 2 ({profile} profile): BLEU with 95% intervals")
        bleu_figure({name: metrics[f"table4/{d}/{s}"] for name, (d, s) in table4_cells.items()},
                    out / "table4_bleu", f"Table 4 ({profile} profile): BLEU with 95% intervals")
        judge_section = ""
        if judged:
            judge_results.write_csv(out / "judge_tables.csv", [r for m in judged.values() for r in judge_results.csv_rows(m)])
            judge_results.figure(list(judged.values()), out / "judge_tables")
            judge_section = judge_results.report_section(judged, training_seeds(cfg)[0])
        (out / REPORT).write_text(report_markdown(cfg, metrics, table1, table2, table4, tests, tag_use)
                                  + ("\n" + judge_section if judge_section else ""))
    log.info("report wrote %s", run_.path)


def over_seeds(per_seed: list[dict]) -> dict:
    """One eval's metrics, or several training seeds' as one: each metric's mean and its sd across
    the seeds (no interval: the seeds' own intervals are in their eval runs), the tags' Q and B
    averaged likewise."""
    if len(per_seed) == 1:
        return per_seed[0]
    first = per_seed[0]
    combined = {**first, "training_seeds": len(per_seed), "metrics": {}}
    for name in first["metrics"]:
        values = [m["metrics"][name]["value"] for m in per_seed]
        combined["metrics"][name] = {"value": None, "ci_low": None, "ci_high": None, "sd": None} \
            if any(v is None for v in values) else \
            {"value": float(np.mean(values)), "ci_low": None, "ci_high": None, "sd": float(np.std(values, ddof=1))}
    predictions = [next(iter(m.get("strategy_prediction", {}).values()), None) for m in per_seed]
    if all(p is not None for p in predictions):
        combined["strategy_prediction"] = {"mean over training seeds": {
            "macro_f1": float(np.mean([p["macro_f1"] for p in predictions])),
            "preference_bias": float(np.mean([p["preference_bias"] for p in predictions])),
            "preference": {label: float(np.mean([p["preference"][label] for p in predictions]))
                           for label in predictions[0]["preference"]}}}
    return combined


def row(name: str, m: dict, paper_bleu: float | None) -> dict:
    out = {"system": name, "paper_bleu": paper_bleu, "examples": m["examples"]}
    for column in COLUMNS:
        if column in m["metrics"]:
            value = m["metrics"][column]
            out[column] = round(value["value"], 3)
            if value["ci_low"] is not None:
                out[f"{column}_ci"] = f"[{value['ci_low']:.2f}, {value['ci_high']:.2f}]"
            if value.get("sd") is not None and "training_seeds" in m:
                out[f"{column}_ci"] = f"± {value['sd']:.2f} (sd, {m['training_seeds']} seeds)"
    prediction = next(iter(m.get("strategy_prediction", {}).values()), None)
    if prediction is not None:  # the tags as predictions of the gold category (first decoding seed)
        out["strategy_q"] = round(100 * prediction["macro_f1"], 2)
        out["strategy_bias"] = round(prediction["preference_bias"], 3)
        out["strategy_preferences"] = " ".join(f"{label[:4]} {p:.2f}" for label, p in prediction["preference"].items())
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


def significance(cfg: DictConfig, evals: dict[str, list[artifacts.Run]]) -> list[dict]:
    """Paired bootstrap and paired approximate-randomisation tests of the paper's orderings on the
    configured metrics, over the examples of every training seed pooled, with Holm-adjusted p-values
    over all the tests of each kind."""
    tests, metrics = [], list(cfg.significance_metrics)
    protocols = list(cfg.metrics.protocols)
    for claim, a, b in ORDERINGS:
        if a not in evals or b not in evals:
            continue
        scores_a, scores_b = (scores_from_generations(pooled_generations(evals[key]), protocols) for key in (a, b))
        unknown = [m for m in metrics if m not in scores_a.metric_names or m not in scores_b.metric_names]
        if unknown:
            raise MhsError(f"significance_metrics={metrics}: {unknown} not scored by these eval runs (protocols "
                           f"{protocols}); expected names from their metrics.json, e.g. bleu, bleu_2, esconv_rouge_l")
        bootstrap = paired_bootstrap(scores_a, scores_b, cfg.significance_resamples, cfg.bootstrap.seed, metrics)
        randomised = paired_randomisation(scores_a, scores_b, cfg.significance_resamples, cfg.bootstrap.seed, metrics)
        for metric in metrics:
            r = bootstrap[metric]
            tests.append({"claim": claim, "metric": metric, "a": round(r["a"], 3), "b": round(r["b"], 3),
                          "delta": round(r["delta"], 3), "ci": f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
                          "p_bootstrap": r["p_value"], "p_randomisation": randomised[metric]["p_value"]})
    for kind in ("bootstrap", "randomisation"):
        for t, p in zip(tests, holm([t[f"p_{kind}"] for t in tests])):
            t[f"p_{kind}_holm"] = p
    for t in tests:
        decided = t["p_bootstrap_holm"] < 0.05 and t["p_randomisation_holm"] < 0.05
        t["holds"] = bool(decided and t["delta"] > 0)
        t["verdict"] = "holds" if t["holds"] else "reversed" if decided and t["delta"] < 0 else "undecided"
        for key in ("p_bootstrap", "p_bootstrap_holm", "p_randomisation", "p_randomisation_holm"):
            t[key] = round(t[key], 4)
    return tests


def orderings_summary(tests: list[dict]) -> str:
    """One line per ordering: on how many metrics it holds, is reversed or stays undecided."""
    lines = []
    for claim in dict.fromkeys(t["claim"] for t in tests):
        verdicts = [t["verdict"] for t in tests if t["claim"] == claim]
        counts = {v: verdicts.count(v) for v in ("holds", "reversed", "undecided") if v in verdicts}
        overall = ("holds" if counts.get("holds") and not counts.get("reversed") else
                   "reversed" if counts.get("reversed") and not counts.get("holds") else
                   "mixed" if counts.get("holds") else "undecided")
        lines.append(f"- **{claim}**: {overall} ({', '.join(f'{k} on {v}' for k, v in counts.items())} "
                     f"of {len(verdicts)} metrics)")
    return "\n".join(lines)


def pooled_generations(runs: list[artifacts.Run]) -> list[dict]:
    """The generations of one system's evals over every training seed, one after another: each seed
    scores the same test examples (test_subset_seed), so two systems pair row by row."""
    pooled = []
    for run in runs:
        lines = read_generations(run.path)
        if pooled and [(l["conversation_id"], l["turn_index"]) for l in lines] != \
                [(l["conversation_id"], l["turn_index"]) for l in pooled[:len(lines)]]:
            raise MhsError(f"{run.path}: scored other test examples than {runs[0].path}; the seeds of one report "
                           "must share test_subset_seed")
        pooled += lines
    return pooled


def pooled_likelihoods(runs: list[artifacts.Run]) -> dict:
    """One system's likelihood runs over every training seed as one set of examples (each seed scores
    the same test examples, so two systems pair row by row): nll[i, tag], tokens[i], gold[i]."""
    lines = [line for run in runs for line in tag_use.read_likelihoods(run.path)]
    first = runs[0].read_metrics()
    return {"nll": np.array([line["nll"] for line in lines]), "tokens": np.array([line["tokens"] for line in lines]),
            "gold": [line["gold_label"] for line in lines], "labels": first["labels"],
            "keys": [(line["conversation_id"], line["turn_index"]) for line in lines], "examples": first["examples"]}


def perplexity(scored: dict, cfg) -> tuple[float, str]:
    """The reference perplexity of a system (tagged: given the gold tag), with its interval."""
    if scored["labels"]:
        gold = [scored["labels"].index(g) for g in scored["gold"]]
        nll = scored["nll"][np.arange(len(gold)), gold]
    else:
        nll = scored["nll"][:, 0]
    value = tag_use.tag_use_scores(nll[:, None], scored["tokens"], None, None, cfg.bootstrap.resamples,
                                      cfg.bootstrap.seed)["metrics"]["ppl"]
    return round(value["value"], 3), f"[{value['low']:.2f}, {value['high']:.2f}]"


def tag_use_rows(likelihoods: dict, cfg, oracle_evals: dict | None = None) -> list[dict]:
    """"Does the generator use its tag?": for each tagged generator, tag discrimination against chance
    (one-sided binomial test), the most-chosen tag, NLL under the gold and the wrong tags, its
    gold-tag perplexity against the untagged generator of the same data (paired permutation test),
    and, where the oracle eval was run, its replies' adherence to the gold tag beside the
    recogniser's accuracy on the human references of the same examples."""
    rows = []
    for dataset, tagged, untagged in (("esconv", "ESConv+tag", "ESConv"), ("unified", "Unified+tag", "Unified")):
        t, u = likelihoods[tagged], likelihoods[untagged]
        if t["keys"] != u["keys"]:
            raise MhsError(f"likelihood runs of {tagged} and {untagged} scored different test examples; they must "
                           "share test_subset_seed and test_subset")
        scores = tag_use.tag_use_scores(t["nll"], t["tokens"], t["gold"], t["labels"], cfg.bootstrap.resamples,
                                           cfg.bootstrap.seed)
        m = scores["metrics"]
        gold = [t["labels"].index(g) for g in t["gold"]]
        gold_nll = t["nll"][np.arange(len(gold)), gold]
        versus = tag_use.paired_nll_test(gold_nll, u["nll"][:, 0], t["tokens"], cfg.significance_resamples,
                                            cfg.bootstrap.seed)
        untagged_ppl = perplexity(u, cfg)
        hits = int(round(m["tag_discrimination"]["value"] * len(gold)))
        above_chance = binomial_p(hits, len(gold), scores["chance"], alternative="greater")

        def interval(value):
            return f"[{value['low']:.3f}, {value['high']:.3f}]"

        rows.append({
            "system": tagged, "examples": len(gold), "chance": round(scores["chance"], 3),
            "tag_discrimination": round(m["tag_discrimination"]["value"], 3),
            "tag_discrimination_ci": interval(m["tag_discrimination"]), "p_above_chance": float(f"{above_chance:.3g}"),
            "most_chosen_tag": scores["most_chosen_tag"], "most_chosen_share": round(m["most_chosen_share"]["value"], 3),
            "nll_gold_tag": round(m["nll_gold_tag"]["value"], 4), "nll_wrong_tags": round(m["nll_wrong_tags"]["value"], 4),
            "ppl_gold_tag": round(m["ppl_gold_tag"]["value"], 3),
            "ppl_gold_tag_ci": f"[{m['ppl_gold_tag']['low']:.2f}, {m['ppl_gold_tag']['high']:.2f}]",
            "ppl_untagged": untagged_ppl[0], "ppl_untagged_ci": untagged_ppl[1],
            "nll_gold_minus_untagged": round(versus["value"], 4), "nll_gold_minus_untagged_ci": interval(versus),
            "p_gold_vs_untagged": round(versus["p"], 4),
            "tag_helps": bool(versus["value"] < 0 and versus["p"] < 0.05),
            "tag_used": bool(m["tag_discrimination"]["value"] > scores["chance"] and above_chance < 0.05),
            **oracle_adherence((oracle_evals or {}).get(dataset)),
            "confusion": scores["confusion"]})
    return rows


def oracle_adherence(oracle_eval: dict | None) -> dict:
    """The recogniser's agreement with the gold tag on replies generated under it (oracle sampler),
    and on the human references of the same examples."""
    if not oracle_eval or "tag_adherence" not in oracle_eval["metrics"]:
        return {}
    adherence = oracle_eval["metrics"]["tag_adherence"]
    out = {"oracle_adherence": round(adherence["value"], 2)}
    if adherence.get("ci_low") is not None:
        out["oracle_adherence_ci"] = f"[{adherence['ci_low']:.1f}, {adherence['ci_high']:.1f}]"
    if oracle_eval.get("recogniser_on_references"):
        out["recogniser_on_references"] = round(oracle_eval["recogniser_on_references"]["accuracy"], 2)
    return out


def confusion_figure(rows: list[dict], stem: Path, title: str) -> None:
    """The gold x lowest-NLL-tag confusion matrix of each tagged generator, side by side."""
    figure, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 4.2), squeeze=False)
    for axis, r in zip(axes[0], rows):
        labels = r["confusion"]["labels"]
        ConfusionMatrixDisplay(np.array(r["confusion"]["rows_gold_cols_predicted"]),
                               display_labels=[label[:5] for label in labels]).plot(ax=axis, colorbar=False)
        axis.set_title(f"{r['system']}: {100 * r['tag_discrimination']:.1f}% (chance {100 * r['chance']:.0f}%)")
        axis.set_xlabel("tag giving the reference the lowest NLL")
        axis.set_ylabel("gold tag")
    figure.suptitle(title)
    save_figure(figure, stem)


def save_figure(figure, stem: Path) -> None:
    """A report figure as PNG and PDF."""
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=120)
    figure.savefig(stem.with_suffix(".pdf"))
    plt.close(figure)


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


PROTOCOL_TITLES = {
    "default": "default protocol: sacrebleu BLEU and B-n, rouge-score ROUGE-L, Distinct over 13a tokens",
    "esconv": "esconv protocol: the ESConv papers' metric code (nltk tokens, nltk BLEU method 3, ROUGE-L beta 1.2)",
}


def generation_columns(rows, protocol: str) -> list[tuple[str, str]]:
    if protocol == "default":
        columns = [("system", "System"), ("paper_bleu", "Paper BLEU (0-1?)"), ("bleu", "BLEU [default]"),
                   ("bleu_ci", "95% CI"), ("bleu_2", "B-2 [default]"), ("bleu_4", "B-4 [default]"),
                   ("rouge_l", "ROUGE-L [default]"), ("rouge_l_ci", "95% CI"), ("distinct_2", "Dist-2 [default]"),
                   ("ppl", "PPL"), ("length", "Len"), ("strategy_accuracy", "Strategy acc. %"),
                   ("tag_adherence", "Tag adherence %"), ("strategy_q", "Q (macro-F1 %)"),
                   ("strategy_bias", "Preference bias B"), ("strategy_preferences", "Preferences")]
    else:
        columns = [("system", "System"), ("esconv_bleu_1", "B-1 [esconv]"), ("esconv_bleu_2", "B-2 [esconv]"),
                   ("esconv_bleu_2_ci", "95% CI"), ("esconv_bleu_3", "B-3 [esconv]"), ("esconv_bleu_4", "B-4 [esconv]"),
                   ("esconv_rouge_l", "ROUGE-L [esconv]"), ("esconv_rouge_l_ci", "95% CI"),
                   ("esconv_distinct_1", "Dist-1 [esconv]"), ("esconv_distinct_2", "Dist-2 [esconv]")]
    return [c for c in columns if any(c[0] in r for r in rows)]


def signature_notes(signatures: dict, rows: list[dict], protocol: str) -> str:
    """One line per metric shown in the table: how it was computed."""
    lines = []
    for key, _ in generation_columns(rows, protocol):
        sig = signatures.get(key)
        if sig is None:
            continue
        if "signature" in sig:
            lines.append(f"- `{key}`: {sig['library']}, signature `{sig['signature']}`")
        else:
            lines.append(f"- `{key}`: {sig['library']}; tokenizer: {sig['tokenizer']}; case: {sig['case']}; "
                         f"smoothing: {sig['smoothing']}; n-gram order: {sig['ngram_order']}")
    return "Signatures:\n\n" + "\n".join(lines) if lines else ""


def protocol_tables(title: str, rows: list[dict], signatures: dict, protocols, literature=()) -> str:
    """The table once per computed protocol, each with its signatures below it."""
    parts = []
    for protocol in protocols:
        shown = rows + list(literature) if protocol == "esconv" else rows
        table = markdown_table(shown, generation_columns(shown, protocol))
        notes = signature_notes(signatures, rows, protocol)
        parts.append(f"### {title} ({PROTOCOL_TITLES[protocol]})\n\n{table}\n\n{notes}")
    return "\n\n".join(parts)


def tag_use_markdown(rows: list[dict], pretrained_ppl: float) -> str:
    n = rows[0]["examples"] if rows else 0
    table = markdown_table(rows, [
        ("system", "System"), ("tag_discrimination", "Tag discrimination"), ("tag_discrimination_ci", "95% CI"),
        ("chance", "Chance"), ("p_above_chance", "p (> chance)"), ("most_chosen_tag", "Most-chosen tag"),
        ("most_chosen_share", "its share"), ("nll_gold_tag", "NLL gold tag"), ("nll_wrong_tags", "NLL wrong tags"),
        ("ppl_gold_tag", "PPL gold tag"), ("ppl_gold_tag_ci", "95% CI"), ("ppl_untagged", "PPL untagged (same data)"),
        ("ppl_untagged_ci", "95% CI"), ("nll_gold_minus_untagged", "Gold-tag - untagged NLL/token"),
        ("nll_gold_minus_untagged_ci", "95% CI"), ("p_gold_vs_untagged", "p (paired)"),
        ("oracle_adherence", "Oracle adherence %"), ("oracle_adherence_ci", "95% CI"),
        ("recogniser_on_references", "Recogniser on the references %")])
    claims = []
    for r in rows:
        claims.append(f"- **{r['system']}**: the tag is {'used' if r['tag_used'] else 'not shown to be used'} "
                      f"(the gold tag makes the reference likeliest for {100 * r['tag_discrimination']:.1f}% of examples, "
                      f"chance {100 * r['chance']:.0f}%, binomial p = {r['p_above_chance']:.3g}); "
                      f"\"tag > no tag\" in likelihood terms {'holds' if r['tag_helps'] else 'does not hold'}: "
                      f"gold-tag PPL {r['ppl_gold_tag']:.2f} vs untagged {r['ppl_untagged']:.2f} "
                      f"({r['nll_gold_minus_untagged']:+.4f} nats/token, paired permutation p = {r['p_gold_vs_untagged']:.4f})"
                      + (f"; replies generated under the gold tag are recognised as it {r['oracle_adherence']:.1f}% of the "
                         f"time, the human references of the same examples {r['recogniser_on_references']:.1f}%"
                         if "recogniser_on_references" in r else "") + ".")
    return f"""## Does the generator use its tag?

Each of {n:,} ESConv test references (the same seeded examples for every system) is scored under every tag:
*tag discrimination* is the share of examples whose gold tag gives the reference the lowest NLL (chance: one
over the number of tags); NLL is per reference token (end token included, tag excluded). The untagged
generator trained on the same data with the same budget scores the same references without a tag; the
pretrained model's reference perplexity is {pretrained_ppl:.2f}.

{table}

{chr(10).join(claims)}

Figure: `tag_use_confusion.png` (gold tag x lowest-NLL tag). CSV: `tag_use.csv`.
"""


def report_markdown(cfg, metrics, table1, table2, table4, tests, tag_use) -> str:
    profile = cfg.generator.profile
    first = next(iter(metrics.values()))
    n = first["examples"]
    signatures, protocols = first.get("signatures", {}), list(cfg.metrics.protocols)
    tested_metrics = max(len(cfg.significance_metrics), 1)
    warning = f"\n> **{cfg.generator.warning}**\n" if cfg.generator.get("warning") else ""
    literature = ("\nThe rows \"Liu et al. 2021\" are the ESConv paper's own B-2 and ROUGE-L, for other models "
                  "(DialoGPT), all of ESConv and its own random split: a scale reference, not a comparison. The "
                  "esconv protocol is the metric code of the group's later releases (codes_zcj); that the 2021 "
                  "numbers were computed the same way is assumed, not checked.\n" if "esconv" in protocols else "")
    seeds = training_seeds(cfg)
    seeded = (f"\nTraining seeds {', '.join(map(str, seeds))}: every system was trained and evaluated once per seed, "
              "on the same test examples. Each value is the mean over the seeds, with its sd across them in the "
              "interval column; the paired tests pool the seeds' examples.\n" if len(seeds) > 1 else "")
    return f"""# Reproduction report ({profile} profile)
{warning}{seeded}
Generators: `{cfg.generator.get('name_or_path') or cfg.generator.get('gguf_file') or 'GPT-2 from scratch'}`
({profile} profile); classifier: `{cfg.classifier.get('name_or_path') or 'BERT from scratch'}`.
Scored on {n:,} ESConv test examples (seeded subset: {cfg.test_subset is not None}), greedy decoding,
{cfg.bootstrap.resamples} bootstrap resamples. Metric protocols: {", ".join(protocols)}. Under the default
protocol BLEU is sacrebleu corpus BLEU (0-100) and B-n are cumulative, smoothed, lowercased; the paper's BLEU
is on an unstated scale, probably 0-1, with its own split and tokenisation: compare orderings, not values.
{literature}
## Table 1: category counts

{markdown_table(table1, [("category", "Category"), ("paper", "Paper"), ("ours_membership", "Ours, Table-1 membership"),
                         ("ours_primary", "Ours, primary label")])}

## Table 2: fine-tuning data and tags (no tag sampling)

{protocol_tables("Table 2", table2, signatures, protocols, LITERATURE)}

PPL is the reference perplexity from `mhs likelihood` (tagged systems: given the gold tag), on the
likelihood runs' examples.

{tag_use_markdown(tag_use, next(r["ppl"] for r in table2 if r["system"] == "Pretrained"))}
## Table 4: tag samplers (tagged generators)

{protocol_tables("Table 4", table4, signatures, protocols)}

Q and B score the tags used as predictions of the gold category: Q is macro-F1 and B the preference bias of
Kang et al. (2024): the spread (standard deviation) of per-category Bradley-Terry preferences fitted on the
gold x predicted counts, preferences scaled to mean 1 (0: no category favoured; sqrt(3) = 1.73: one category
always predicted). Preferences are listed per category.

## Do the paper's orderings hold? (paired tests, B - A)

{markdown_table(tests, [("claim", "Claim (B > A)"), ("metric", "Metric"), ("a", "A"), ("b", "B"), ("delta", "B - A"),
                        ("ci", "95% CI (bootstrap)"), ("p_bootstrap", "p bootstrap"), ("p_bootstrap_holm", "Holm"),
                        ("p_randomisation", "p approx. rand."), ("p_randomisation_holm", "Holm"),
                        ("verdict", "Verdict")])}

{orderings_summary(tests)}

{len(tests)} comparisons ({len(tests) // tested_metrics} orderings x {tested_metrics} metrics),
each by a paired bootstrap and by paired approximate randomisation ({cfg.significance_resamples} resamples or
trials, two-sided); "Holm" is the p-value Holm-adjusted over all {len(tests)} tests of its kind (statsmodels
`multipletests`). An ordering holds on a metric when B - A > 0 and both Holm-adjusted p < 0.05, is reversed
when B - A < 0 with both Holm-adjusted p < 0.05, and is undecided otherwise.

Figures: `table2_bleu.png`, `table4_bleu.png`, `tag_use_confusion.png` (and `.pdf`). CSV: `table1.csv`,
`table2.csv`, `table4.csv`, `significance.csv`, `tag_use.csv`.
"""


def bleu_figure(systems: dict[str, dict], stem: Path, title: str) -> None:
    """BLEU bars with whiskers from each eval's stored interval (unrounded), or +- sd across training
    seeds when there are several, as PNG and PDF."""
    names = list(systems)
    bleu = [systems[name]["metrics"]["bleu"] for name in names]
    values = [b["value"] for b in bleu]
    if all(b.get("sd") is not None and b["ci_low"] is None for b in bleu):
        errors = [[b["sd"] for b in bleu], [b["sd"] for b in bleu]]
        title += " (whiskers: sd across training seeds)"
    else:
        errors = [[b["value"] - b["ci_low"] for b in bleu], [b["ci_high"] - b["value"] for b in bleu]]
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4.2))
    axes.bar(range(len(names)), values, yerr=errors, capsize=4, color="#4C72B0")
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_ylabel("sacrebleu BLEU (0-100), default protocol")
    axes.set_title(title)
    save_figure(figure, stem)
