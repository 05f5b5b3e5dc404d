"""The report's text: Markdown tables, the per-protocol tables with their metric signatures, the
orderings' summary, and the report filled in from its templates (reporting/templates/*.md, string.Template);
CSV files of the same rows."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path
from string import Template

from mhsupport.reporting.paper import LITERATURE

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
                   ("tag_adherence", "Tag adherence %"), ("flagged_replies", "Flagged by the safety screen %"),
                   ("flagged_replies_ci", "95% CI"), ("strategy_q", "Q (macro-F1 %)"),
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
    return _template("tag_use.md").substitute(examples=f"{n:,}", pretrained_ppl=f"{pretrained_ppl:.2f}", table=table,
                                              claims="\n".join(claims))


def steering_markdown(rows: list[dict]) -> str:
    """The counterfactual test of steering: one row per tagged generator, then each one's confusion."""
    if not rows:
        return "No generation pass read its replies with the recogniser (tag_adherence=false): no steering test.\n"
    labels = rows[0]["labels"]
    table = markdown_table(rows, [
        ("system", "System"), ("contexts", "Contexts"), ("tag_following", "Tag following %"),
        ("tag_following_ci", "95% CI"), ("recogniser_on_references", "Recogniser on the human replies %"),
        ("recogniser_on_references_ci", "95% CI"), ("following_minus_references", "Difference"),
        ("following_minus_references_ci", "95% CI"), ("p_following_vs_references", "p (paired bootstrap)"),
        *[(f"following_{label}", f"{label} %") for label in labels]])
    confusions = []
    for r in rows:
        columns = list(next(iter(r["confusion"].values())))
        confusion_rows = [{"forced": forced, **{c: counts[c] for c in columns}} for forced, counts in r["confusion"].items()]
        confusions.append(f"**{r['system']}** (rows: the category forced; columns: the recogniser's reading):\n\n"
                          + markdown_table(confusion_rows, [("forced", "Forced"), *[(c, c) for c in columns]]))
    return _template("steering.md").substitute(contexts=f"{rows[0]['contexts']:,}", table=table,
                                               confusions="\n\n".join(confusions))


def reply_safety_markdown(rows: list[dict]) -> str:
    """The report's section on the replies the safety screen flags (empty when no eval was screened)."""
    if not rows:
        return ""
    table = markdown_table(rows, [("system", "System"), ("replies", "Replies"), ("flagged", "Flagged"),
                                  ("flagged_pct", "Flagged %"), ("flagged_ci", "95% CI"), ("kinds", "Kinds"),
                                  ("replies_to_flagged_contexts", "Replies to a flagged seeker context")])
    return _template("reply_safety.md").substitute(table=table, screen=rows[0]["screen"])


def baselines_markdown(rows: list[dict]) -> str:
    return markdown_table(rows, [
        ("system", "System"), ("examples", "Test examples"), ("accuracy", "Accuracy %"), ("accuracy_ci", "95% CI"),
        ("macro_f1", "Macro-F1 %"), ("macro_f1_ci", "95% CI"), ("classifier_minus_accuracy", "Classifier - it (acc.)"),
        ("classifier_minus_accuracy_ci", "95% CI"), ("p_accuracy", "p (paired bootstrap)")])


def report_markdown(cfg, metrics, table1, table2, table4, tests, tag_use, seeds: list[int], judge_section: str,
                    steering: list[dict], baselines: list[dict], reply_safety: list[dict]) -> str:
    """The report's Markdown: the template filled with this profile's tables, tests and notes, and the
    LLM judge's section when a judge ran."""
    profile = cfg.generator.profile
    first = next(iter(metrics.values()))
    signatures, protocols = first.get("signatures", {}), list(cfg.metrics.protocols)
    tested_metrics = max(len(cfg.significance_metrics), 1)
    literature = ("\nThe rows \"Liu et al. 2021\" are the ESConv paper's own B-2 and ROUGE-L, for other models "
                  "(DialoGPT), all of ESConv and its own random split: a scale reference, not a comparison. The "
                  "esconv protocol is the metric code of the group's later releases (codes_zcj); that the 2021 "
                  "numbers were computed the same way is assumed, not checked.\n" if "esconv" in protocols else "")
    seeded = (f"\nTraining seeds {', '.join(map(str, seeds))}: every system was trained and evaluated once per seed, "
              "on the same test examples. Each value is the mean over the seeds, with its sd across them in the "
              "interval column; the paired tests pool the seeds' examples.\n" if len(seeds) > 1 else "")
    text = _template("report.md").substitute(
        profile=profile,
        warning=f"\n> **{cfg.generator.warning}**\n" if cfg.generator.get("warning") else "",
        seeded=seeded,
        generator_model=cfg.generator.get("name_or_path") or cfg.generator.get("gguf_file") or "GPT-2 from scratch",
        classifier_model=cfg.classifier.get("name_or_path") or "BERT from scratch",
        examples=f"{first['examples']:,}", seeded_subset=cfg.test_subset is not None,
        resamples=cfg.bootstrap.resamples, protocols=", ".join(protocols), literature=literature,
        table1=markdown_table(table1, [("category", "Category"), ("paper", "Paper"),
                                       ("ours_membership", "Ours, Table-1 membership"),
                                       ("ours_primary", "Ours, primary label")]),
        table2=protocol_tables("Table 2", table2, signatures, protocols, LITERATURE),
        tag_use=tag_use_markdown(tag_use, next(r["ppl"] for r in table2 if r["system"] == "Pretrained")),
        table4=protocol_tables("Table 4", table4, signatures, protocols),
        tests=markdown_table(tests, [("claim", "Claim (B > A)"), ("metric", "Metric"), ("a", "A"), ("b", "B"),
                                     ("delta", "B - A"), ("ci", "95% CI (bootstrap)"), ("p_bootstrap", "p bootstrap"),
                                     ("p_bootstrap_holm", "Holm"), ("p_randomisation", "p approx. rand."),
                                     ("p_randomisation_holm", "Holm"), ("detectable", "Detectable (80% power)"),
                                     ("verdict", "Verdict")]),
        steering=steering_markdown(steering), classifier_baselines=baselines_markdown(baselines),
        reply_safety=reply_safety_markdown(reply_safety),
        orderings=orderings_summary(tests), comparisons=len(tests), orderings_tested=len(tests) // tested_metrics,
        tested_metrics=tested_metrics, significance_resamples=cfg.significance_resamples)
    return text + ("\n" + judge_section if judge_section else "")


def _template(name: str) -> Template:
    """A Markdown template shipped with the package (reporting/templates/)."""
    return Template(resources.files("mhsupport.reporting").joinpath("templates", name).read_text(encoding="utf-8"))
