"""The report's rows from the runs it reads: one system's evals over its training seeds as one,
Table 2 and 4 rows, reference perplexity, and the "does the generator use its tag?" rows; every
interval and p-value from evaluation/statistics (through the metric modules)."""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.stats import norm

from mhsupport.errors import MhsError
from mhsupport.evaluation import tag_use
from mhsupport.evaluation.generation_metrics import paired_bootstrap, paired_randomisation
from mhsupport.evaluation.generations_io import read_generations, scores_from_generations
from mhsupport.evaluation.statistics import binomial_p, holm
from mhsupport.reporting.paper import ORDERINGS

COLUMNS = ("bleu", "bleu_2", "bleu_4", "rouge_l", "distinct_2", "ppl", "length", "strategy_accuracy", "tag_adherence",
           "esconv_bleu_1", "esconv_bleu_2", "esconv_bleu_3", "esconv_bleu_4", "esconv_rouge_l", "esconv_distinct_1",
           "esconv_distinct_2", "flagged_replies")

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

def significance(cfg, evals: dict[str, list]) -> list[dict]:
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
                          "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                          "p_bootstrap": r["p_value"], "p_randomisation": randomised[metric]["p_value"]})
    for t in tests:
        t["detectable"] = round(detectable_effect(t.pop("ci_low"), t.pop("ci_high"), len(tests)), 3)
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

def pooled_generations(runs: list) -> list[dict]:
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

def pooled_likelihoods(runs: list) -> dict:
    """One system's likelihood runs over every training seed as one set of examples (each seed scores
    the same test examples, so two systems pair row by row): nll[i, tag], tokens[i], gold[i]."""
    lines = [line for run in runs for line in tag_use.read_likelihoods(run.path, f"rebuild it with {run.rebuild_hint}")]
    first = runs[0].read_metrics()
    return {"nll": np.array([line["nll"] for line in lines]), "tokens": np.array([line["tokens"] for line in lines]),
            "gold": [line["gold_label"] for line in lines], "labels": first.get("labels"),
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

def counterfactual_rows(generations: dict[str, dict]) -> list[dict]:
    """Steering, from each tagged generator's generation pass (name -> its metrics): tag following
    (the mean over categories of the share of replies recognised as the category they were generated
    under) beside the recogniser's accuracy on the human replies of the same contexts, their paired
    difference, and each category's following rate."""
    rows = []
    for name, made in generations.items():
        c = made.get("counterfactual")
        if not c:
            continue
        following, references, difference = c["tag_following"], c["recogniser_on_references"], \
            c["following_minus_references"]
        rows.append({
            "system": name, "contexts": c["contexts"], "tag_following": round(following["value"], 1),
            "tag_following_ci": f"[{following['low']:.1f}, {following['high']:.1f}]",
            "recogniser_on_references": round(references["value"], 1),
            "recogniser_on_references_ci": f"[{references['low']:.1f}, {references['high']:.1f}]",
            "following_minus_references": round(difference["value"], 1),
            "following_minus_references_ci": f"[{difference['low']:.1f}, {difference['high']:.1f}]",
            "p_following_vs_references": round(difference["p_value"], 4),
            **{f"following_{label}": round(rate["rate"], 1) for label, rate in c["per_category"].items()},
            "confusion": c["confusion"], "labels": c["labels"]})
    return rows


def classifier_baseline_rows(classifier: dict) -> list[dict]:
    """The next-category classifier beside its baselines on the same ESConv test rows (from its
    training run): accuracy and macro-F1 with 95% bootstrap intervals, and the paired bootstrap of
    the classifier against each baseline."""
    test = classifier["significance"]["test"]
    rows = []
    for name, scores in test["intervals"].items():
        accuracy, macro_f1 = scores["accuracy"], scores["macro_f1"]
        row_ = {"system": "classifier" if name == test["reference"] else name,
                "examples": classifier["test"][name]["n"],
                "accuracy": round(100 * accuracy["value"], 1),
                "accuracy_ci": f"[{100 * accuracy['ci_low']:.1f}, {100 * accuracy['ci_high']:.1f}]",
                "macro_f1": round(100 * macro_f1["value"], 1),
                "macro_f1_ci": f"[{100 * macro_f1['ci_low']:.1f}, {100 * macro_f1['ci_high']:.1f}]"}
        paired = test["paired_vs_reference"].get(name)
        if paired:
            row_["classifier_minus_accuracy"] = round(100 * paired["accuracy"]["delta"], 1)
            row_["classifier_minus_accuracy_ci"] = (f"[{100 * paired['accuracy']['ci_low']:.1f}, "
                                                    f"{100 * paired['accuracy']['ci_high']:.1f}]")
            row_["p_accuracy"] = round(paired["accuracy"]["p_value"], 4)
        rows.append(row_)
    return rows


def detectable_effect(ci_low: float, ci_high: float, tests: int, power: float = 0.8) -> float:
    """The smallest difference a two-sided test at Holm's strictest level (0.05 / tests) detects with
    the given power, from the paired bootstrap's 95% interval of the difference (its width / 3.92 is
    the difference's standard error): (z_{1 - alpha/2} + z_power) x SE."""
    standard_error = (ci_high - ci_low) / (2 * norm.ppf(0.975))
    return float((norm.ppf(1 - 0.05 / tests / 2) + norm.ppf(power)) * standard_error)


def reply_safety_rows(named_runs: dict[str, list]) -> list[dict]:
    """Per system (named; its eval runs over the training seeds, each system once however many tables
    show it): the replies the safety screen flagged and the kinds of harm; one run's share with its
    interval, several training seeds' mean share with their sd (as the other tables). Systems whose
    evals were not screened (screen_replies=false) have no row."""
    rows, seen = [], set()
    for name, runs in named_runs.items():
        paths = tuple(str(run.path) for run in runs)
        summaries = [run.read_metrics().get("safety") for run in runs]
        if paths in seen or any(summary is None for summary in summaries):
            continue
        seen.add(paths)
        replies, flagged = sum(s["replies"] for s in summaries), sum(s["flagged"] for s in summaries)
        shares = [100 * s["share"] for s in summaries]
        kinds = Counter()
        for summary in summaries:
            kinds.update(summary["reasons"])
        rows.append({"system": name, "replies": replies, "flagged": flagged, "flagged_pct": round(np.mean(shares), 2),
                     "flagged_ci": (f"[{100 * summaries[0]['ci_low']:.2f}, {100 * summaries[0]['ci_high']:.2f}]"
                                    if len(summaries) == 1 else
                                    f"± {np.std(shares, ddof=1):.2f} (sd, {len(summaries)} seeds)"),
                     "kinds": "; ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())) or "-",
                     "replies_to_flagged_contexts": sum(s["replies_to_flagged_contexts"] for s in summaries),
                     "screen": summaries[0]["screen"] if summaries else ""})
    return rows
