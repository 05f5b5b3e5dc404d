"""The statistics of a pairwise judge's verdicts and how they are shown: win / loss / tie shares with
Wilson 95% intervals, a two-sided sign test, position consistency and first-position preference,
length bias (the longer reply's share of decided verdicts, win rate by length difference, the
verdict on length-matched pairs), agreement with human raters (accuracy, Cohen's kappa), and the
tables (Markdown, CSV) and figures of a judge run and of the report."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score

from mhsupport.evaluation.judge import ORDERS, OUTCOMES
from mhsupport.evaluation.statistics import binomial_p, wilson_interval

LENGTH_BINS = ("B shorter", "length-matched", "B longer")
SIGNIFICANCE = 0.05


def share(count: int, total: int) -> dict:
    """A count as a percentage of `total` with its Wilson 95% interval."""
    if not total:
        return {"count": count, "pct": None, "ci": None}
    low, high = wilson_interval(count, total)
    return {"count": count, "pct": 100 * count / total, "ci": [100 * low, 100 * high]}


def sign_test(wins: int, losses: int) -> float | None:
    """Two-sided sign test of wins against losses (ties left out); None without a decided pair."""
    return binomial_p(wins, wins + losses) if wins + losses else None


def tally(records: list[dict]) -> dict:
    n = len(records)
    counts = {o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}
    return {"n": n, **{o: share(counts[o], n) for o in OUTCOMES},
            "sign_test_p": sign_test(counts["win"], counts["loss"])}


def preference(stats: dict) -> str:
    """"b", "a" or "none": the system the sign test prefers at the 5% level."""
    p = stats["sign_test_p"]
    if p is None or p >= SIGNIFICANCE:
        return "none"
    return "b" if stats["win"]["count"] > stats["loss"]["count"] else "a"


def length_bin(record: dict, ratio: float) -> str:
    a, b = record["length_a"], record["length_b"]
    if abs(b - a) <= ratio * max(a, b):
        return "length-matched"
    return "B longer" if b > a else "B shorter"


def dimension_stats(records: list[dict], length_match_ratio: float) -> dict:
    """Everything reported for one row and dimension."""
    asked = [r for r in records if not r["identical"]]
    both_parsed = [r for r in asked if r["consistent"] is not None]
    single = [(r, order, r["verdicts"][order]) for r in asked for order in ORDERS]
    decided = [(r, order, v) for r, order, v in single if v in ("A", "B")]
    first_chosen = sum(v == "A" for _, _, v in decided)
    # Verbosity: of the decided single verdicts between replies of different lengths, how many chose the longer one.
    unequal = [(r, order, v) for r, order, v in decided if r["length_a"] != r["length_b"]]
    longer = sum(_chosen_length(r, order, v) > _other_length(r, order, v) for r, order, v in unequal)
    valid = [r for r in records if r["outcome"] != "unparseable"]
    bins = {name: tally([r for r in valid if length_bin(r, length_match_ratio) == name]) for name in LENGTH_BINS}
    scores = [{"win": 1, "tie": 0, "loss": -1}[r["outcome"]] for r in valid]
    differences = [r["length_b"] - r["length_a"] for r in valid]
    rho = None
    if len(valid) >= 3 and len(set(scores)) > 1 and len(set(differences)) > 1:
        result = spearmanr(differences, scores)
        rho = {"rho": float(result.statistic), "p": float(result.pvalue), "n": len(valid)}
    stats = tally(records)
    return {
        **stats, "preferred": preference(stats), "identical_pairs": len(records) - len(asked),
        "answers": len(single), "unparseable_answers": share(sum(v is None for _, _, v in single), len(single)),
        "position_consistent": share(sum(r["consistent"] for r in both_parsed), len(both_parsed)),
        "first_position_chosen": {**share(first_chosen, len(decided)),
                                  "p": binomial_p(first_chosen, len(decided)) if decided else None},
        "longer_chosen": {**share(longer, len(unequal)),
                          "p": binomial_p(longer, len(unequal)) if unequal else None},
        "win_rate_by_length": bins, "length_matched": bins["length-matched"],
        "length_difference_vs_outcome": rho,
        "mean_length_a": float(np.mean([r["length_a"] for r in records])) if records else None,
        "mean_length_b": float(np.mean([r["length_b"] for r in records])) if records else None,
    }


def _chosen_length(record, order, verdict):
    side = order[0] if verdict == "A" else order[1]
    return record[f"length_{side}"]


def _other_length(record, order, verdict):
    side = order[1] if verdict == "A" else order[0]
    return record[f"length_{side}"]


def human_agreement(records: list[dict], human: dict[str, dict[tuple[str, int], str]]) -> dict:
    """The judge's final verdict ("a", "b" or "tie") against each rater's on the items both judged:
    accuracy and Cohen's kappa over (rater, item) comparisons (MT-Bench's agreement counts votes)."""
    judged = {(r["conversation_id"], r["turn_index"]): {"win": "b", "loss": "a", "tie": "tie"}.get(r["outcome"])
              for r in records}
    pairs, unparseable, items = [], 0, set()
    for answers in human.values():
        for key, outcome in answers.items():
            if key not in judged:
                continue
            items.add(key)
            if judged[key] is None:
                unparseable += 1
                continue
            pairs.append((outcome, judged[key]))
    if not pairs:
        return {"items": len(items), "comparisons": 0, "raters": len(human), "accuracy": None, "cohen_kappa": None,
                "judge_unparseable": unparseable}
    humans, judges = zip(*pairs)
    kappa = cohen_kappa_score(humans, judges, labels=["a", "b", "tie"])
    return {"items": len(items), "comparisons": len(pairs), "raters": len(human),
            "accuracy": float(np.mean([h == j for h, j in pairs])),
            "cohen_kappa": None if np.isnan(kappa) else float(kappa), "judge_unparseable": unparseable}


# --- tables ---------------------------------------------------------------------------------

def _pct(entry: dict | None, interval: bool = False) -> str:
    if not entry or entry.get("pct") is None:
        return "n/a"
    text = f"{entry['pct']:.1f}"
    return f"{text} [{entry['ci'][0]:.1f}, {entry['ci'][1]:.1f}]" if interval else text


def _p(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _paper(row: dict) -> str:
    if row.get("paper_win_pct") is None:
        return "not available"
    return f"{row['paper_win_pct']:.1f} / {row['paper_loss_pct']:.1f}"


def verdict_sentence(row: dict, dimension: str = "overall") -> str:
    """The judge's answer for one row in words, and whether it differs from the paper's (which prefers
    system B in every row of Tables 3, 5 and 6)."""
    s = row["dimensions"][dimension]
    said = {"b": f"prefers {row['system_b']}", "a": f"prefers {row['system_a']}",
            "none": "shows no significant preference"}[s["preferred"]]
    figures = (f"win {_pct(s['win'])}%, loss {_pct(s['loss'])}%, tie {_pct(s['tie'])}%, unparseable "
               f"{_pct(s['unparseable'])}%, sign test p = {_p(s['sign_test_p'])}, n = {s['n']}")
    differs = s["preferred"] != "b"
    size = ""
    if row.get("paper_win_pct") is not None and s["win"]["ci"] is not None:
        inside = s["win"]["ci"][0] <= row["paper_win_pct"] <= s["win"]["ci"][1]
        size = (f"; the paper's win rate {row['paper_win_pct']:.1f}% is "
                f"{'inside' if inside else 'outside'} the judge's 95% interval")
        differs = differs or not inside
    answer = "**differs from the paper**, which prefers " + row["system_b"] if differs else "agrees with the paper"
    if s["sign_test_p"] is None:  # every pair a tie or unparseable: no answer to set against the paper's
        answer, size = "it decided no pair, so there is nothing to set against the paper", ""
    return f"- {row['name']}: the judge {said} ({figures}): {answer}{size}."


def overall_table(rows: list[dict]) -> str:
    lines = ["| B vs A | n | Win % [95% CI] | Loss % [95% CI] | Tie % | identical | Unparseable % | sign test p "
             "| position-consistent % | Paper win / loss % |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        s = row["dimensions"]["overall"]
        lines.append(f"| {row['name']} | {s['n']} | {_pct(s['win'], True)} | {_pct(s['loss'], True)} | {_pct(s['tie'])} "
                     f"| {s['identical_pairs']} | {_pct(s['unparseable'])} | {_p(s['sign_test_p'])} "
                     f"| {_pct(s['position_consistent'])} | {_paper(row)} |")
    return "\n".join(lines)


def dimensions_table(rows: list[dict], dimensions: list[str]) -> str:
    lines = ["| B vs A | " + " | ".join(f"{d}: win / loss / tie % (n)" for d in dimensions) + " |",
             "| --- | " + " | ".join("---" for _ in dimensions) + " |"]
    for row in rows:
        cells = []
        for d in dimensions:
            s = row["dimensions"].get(d)
            cells.append("not judged" if not s or not s["n"] else
                         f"{_pct(s['win'])} / {_pct(s['loss'])} / {_pct(s['tie'])} ({s['n']}; p {_p(s['sign_test_p'])})")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bias_table(rows: list[dict]) -> str:
    lines = ["| B vs A (overall) | position-consistent % [95% CI] | first position chosen % (p) "
             "| longer reply chosen % (p) | B win % when B shorter / matched / longer (n) "
             "| length-matched: win / loss / tie % (n, p) | Spearman rho (length difference, outcome) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        s = row["dimensions"]["overall"]
        bins = s["win_rate_by_length"]
        by_length = " / ".join(f"{_pct(bins[b]['win'])} ({bins[b]['n']})" for b in LENGTH_BINS)
        matched = s["length_matched"]
        rho = s["length_difference_vs_outcome"]
        rho_text = "n/a" if rho is None else f"{rho['rho']:+.2f} (p {_p(rho['p'])})"
        lines.append(f"| {row['name']} | {_pct(s['position_consistent'], True)} "
                     f"| {_pct(s['first_position_chosen'])} ({_p(s['first_position_chosen']['p'])}) "
                     f"| {_pct(s['longer_chosen'])} ({_p(s['longer_chosen']['p'])}) | {by_length} "
                     f"| {_pct(matched['win'])} / {_pct(matched['loss'])} / {_pct(matched['tie'])} "
                     f"({matched['n']}, {_p(matched['sign_test_p'])}) "
                     f"| {rho_text} |")
    return "\n".join(lines)


def agreement_table(rows: list[dict]) -> str:
    agreed = [row for row in rows if row.get("human_agreement")]
    if not agreed:
        return ""
    lines = ["| B vs A (overall) | items | rater x item comparisons | raters | accuracy % | Cohen's kappa "
             "| judge unparseable |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in agreed:
        h = row["human_agreement"]
        accuracy = "n/a" if h["accuracy"] is None else f"{100 * h['accuracy']:.1f}"
        kappa = "n/a" if h["cohen_kappa"] is None else f"{h['cohen_kappa']:.3f}"
        lines.append(f"| {row['name']} | {h['items']} | {h['comparisons']} | {h['raters']} | {accuracy} | {kappa} "
                     f"| {h['judge_unparseable']} |")
    return "\n".join(lines)


def validity_verdict(validity: dict) -> str:
    """One line: the judge's accuracy and position consistency on the known pairs, and whether its
    tables count as evidence."""
    o, bars = validity["overall"], validity["bars"]
    figures = (f"accuracy {_pct(o['accuracy'], True)}%, position consistency {_pct(o['position_consistent'], True)}% "
               f"on {o['n']} known pairs of the ESConv {validity['split']} split")
    if validity["evidence"]:
        return f"Judge validity: {figures}: above the bars ({bars['accuracy']}%, {bars['position_consistency']}%)."
    return (f"**Judge validity: {figures}: below the bars ({bars['accuracy']}% accuracy, "
            f"{bars['position_consistency']}% position consistency), so this run's tables are not evidence.**")


def validity_table(validity: dict) -> str:
    lines = ["| known pair: the human reply vs | n | accuracy % [95% CI] | tie % | position-consistent % [95% CI] "
             "| first position chosen % | longer reply chosen % |",
             "| --- | ---: | --- | ---: | --- | ---: | ---: |"]
    for figures in [*validity["kinds"].values(), {**validity["overall"], "row": "all known pairs"}]:
        name = figures["row"].split(" vs ", 1)[-1]
        lines.append(f"| {name} | {figures['n']} | {_pct(figures['accuracy'], True)} | {_pct(figures['ties'])} "
                     f"| {_pct(figures['position_consistent'], True)} | {_pct(figures['first_position_chosen'])} "
                     f"| {_pct(figures['longer_chosen'])} |")
    return "\n".join(lines)


def timing_sentence(timing: dict, what: str) -> str:
    if not timing["sent"]:
        return f"{what}: {timing['requests']} requests, all answered from the cache."
    return (f"{what}: {timing['requests']} requests ({timing['sent']} asked) in {timing['seconds']:.0f} s, "
            f"{timing['seconds_per_pair']:.2f} s per pair (both orders).")


def run_markdown(metrics: dict, heading: str = "##") -> str:
    """A judge run's tables: its validity on known pairs, the paper's question beside the paper's
    figures, the skills, the biases, agreement with raters, and the judge's answer in words."""
    rows = metrics["rows"]
    dims = metrics["judge"]["dimensions"]
    agreement = agreement_table(rows)
    validity = metrics["validity"]
    parts = [f"{heading} {metrics['title']}", "",
             f"Judge: `{metrics['signature']}`.", "",
             *([metrics["note"], ""] if metrics.get("note") else []),
             validity_verdict(validity), "",
             f"{heading}# Validity on known pairs", "", validity_table(validity), "",
             "The human reply is system B of every known pair; accuracy is its share of wins (a tie counts as "
             "wrong). Longer reply chosen: single-order verdicts on replies from another conversation, whose "
             "lengths vary freely. " + timing_sentence(validity["timing"], "Known pairs"), ""]
    if not rows:
        return "\n".join(parts) + "\n"
    rule = ("Each pair was scored in both orders; the two orders' margins for system B are averaged and a mean "
            "within the tie band is a tie (position consistency: both orders' own verdicts agree)."
            if metrics["judge"]["backend"] == "local" else
            "Each pair was judged in both orders; a verdict counts only when both orders agree, otherwise it is a tie.")
    parts += [timing_sentence(metrics["timing"], "This run's pairs"), "",
              rule + " Win / loss are system B's against system A; intervals are Wilson 95%; the sign test is "
             "two-sided with ties left out. Pairs with an unparseable answer are counted, not dropped; identical "
             "replies are ties without asking (counted under \"identical\"). "
             f"Requests: {metrics['requests']['asked']} ({metrics['requests']['from_cache']} from the cache); "
             f"unparseable answers: {metrics['requests']['unparseable']}.", "",
             f"{heading}# Which reply is more helpful and supportive for this seeker?", "", overall_table(rows), "",
             "\n".join(verdict_sentence(row) for row in rows), ""]
    skills = [d for d in dims if d != "overall"]
    if skills:
        parts += [f"{heading}# Helping skills and strategy adherence", "", dimensions_table(rows, skills), "",
                  "Adherence is judged only where a system was given a tag (a system without one is judged against "
                  "the other's tag).", ""]
    parts += [f"{heading}# Position and length bias (overall question)", "", bias_table(rows), "",
              "Length in words. \"longer reply chosen\": of the single-order verdicts that picked a reply of two of "
              "different lengths, the share that picked the longer (a judge without verbosity bias sits near 50% "
              "unless longer replies are better). Length-matched: word counts within "
              f"{100 * metrics['length_match_ratio']:.0f}% of the longer reply.", ""]
    if agreement:
        parts += [f"{heading}# Agreement with human raters (`mhs human-eval`)", "", agreement, ""]
    return "\n".join(part for part in parts if part is not None) + "\n"


def csv_rows(metrics: dict) -> list[dict]:
    out = []
    for row in metrics["rows"]:
        for dimension, s in row["dimensions"].items():
            entry = {"table": metrics.get("table") or "pair", "row": row["name"], "system_a": row["system_a"],
                     "system_b": row["system_b"], "dimension": dimension, "n": s["n"]}
            for outcome in ("win", "loss", "tie", "unparseable"):
                entry[f"{outcome}_pct"] = None if s[outcome]["pct"] is None else round(s[outcome]["pct"], 2)
                entry[f"{outcome}_ci"] = None if s[outcome]["ci"] is None else \
                    f"[{s[outcome]['ci'][0]:.1f}, {s[outcome]['ci'][1]:.1f}]"
            entry.update(sign_test_p=s["sign_test_p"], preferred=s["preferred"],
                         position_consistent_pct=s["position_consistent"]["pct"],
                         first_position_chosen_pct=s["first_position_chosen"]["pct"],
                         longer_chosen_pct=s["longer_chosen"]["pct"], length_matched_n=s["length_matched"]["n"],
                         length_matched_win_pct=s["length_matched"]["win"]["pct"],
                         length_matched_loss_pct=s["length_matched"]["loss"]["pct"],
                         paper_win_pct=row.get("paper_win_pct"), paper_loss_pct=row.get("paper_loss_pct"),
                         signature=metrics["signature"],
                         validity_accuracy_pct=metrics["validity"]["overall"]["accuracy"]["pct"],
                         validity_position_consistent_pct=metrics["validity"]["overall"]["position_consistent"]["pct"],
                         evidence=metrics["validity"]["evidence"])
            out.append(entry)
    return out


COLOURS = {"win": "#4C72B0", "tie": "#BBBBBB", "loss": "#DD8452", "unparseable": "#555555"}


def figure(metrics_list: list[dict], stem: Path) -> None:
    """For each judge run (a table), two panels: system B's win / tie / loss / unparseable shares per
    row on the paper's question (whiskers: the win share's 95% interval; a black mark: the paper's win
    rate where known), and B's win rate by the length difference of the two replies. PNG and PDF."""
    figure_, axes = plt.subplots(len(metrics_list), 2, figsize=(12, sum(1.8 + 0.9 * max(len(m["rows"]), 2)
                                                                        for m in metrics_list)), squeeze=False)
    for (bars, lengths), metrics in zip(axes, metrics_list):
        rows = metrics["rows"]
        names = [row["name"] for row in rows]
        left = np.zeros(len(rows))
        for outcome in OUTCOMES:
            values = np.array([row["dimensions"]["overall"][outcome]["pct"] or 0.0 for row in rows])
            bars.barh(names, values, left=left, color=COLOURS[outcome], label=outcome)
            if outcome == "win":
                low = [values[i] - (row["dimensions"]["overall"]["win"]["ci"] or [values[i]])[0]
                       for i, row in enumerate(rows)]
                high = [(row["dimensions"]["overall"]["win"]["ci"] or [0, values[i]])[1] - values[i]
                        for i, row in enumerate(rows)]
                # clipped at 0: the shares and their intervals are rounded separately
                bars.errorbar(values, names, xerr=np.clip([low, high], 0, None), fmt="none", ecolor="black", capsize=3)
            left += values
        for i, row in enumerate(rows):
            if row.get("paper_win_pct") is not None:
                bars.plot(row["paper_win_pct"], i, marker="|", markersize=18, color="black")
        bars.set_xlim(0, 100)
        bars.invert_yaxis()
        bars.set_xlabel("% of pairs, system B against system A (the paper's question)")
        bars.set_title(metrics["title"], fontsize=9)
        bars.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
        for i, row in enumerate(rows):
            bins = row["dimensions"]["overall"]["win_rate_by_length"]
            rates = [bins[b]["win"]["pct"] if bins[b]["n"] else np.nan for b in LENGTH_BINS]
            lengths.plot(range(len(LENGTH_BINS)), rates, marker="o", label=row["name"])
        lengths.set_xticks(range(len(LENGTH_BINS)), LENGTH_BINS)
        lengths.set_xlim(-0.3, len(LENGTH_BINS) - 0.7)
        lengths.set_ylim(-2, 102)
        lengths.set_ylabel("B win %")
        lengths.set_title("B's win rate by reply length difference", fontsize=9)
        lengths.legend(fontsize=7)
    figure_.tight_layout()
    figure_.savefig(stem.with_suffix(".png"), dpi=120)
    figure_.savefig(stem.with_suffix(".pdf"))
    plt.close(figure_)


def report_section(runs: dict[str, dict], seed: int) -> str:
    """The report's section of the judge's Tables 3, 5 and 6 (table name -> judge run metrics), judged
    on the evals of training seed `seed`."""
    intro = ("## An LLM judge's Tables 3, 5 and 6\n\n"
             "The paper's human preference tables, answered by an LLM judge (`mhs judge --table`) on the same "
             f"eval runs as the tables above (training seed {seed}), beside the paper's figures. The paper's per-row win / loss % are not "
             "available to this project (DESIGN.md gives only \"human pairwise wins of 63-77% for tag + classifier "
             "sampling\"), so the comparison is of directions: the paper prefers system B in every row. "
             "An LLM judge is not a human rater: its figures are evidence only as far as its agreement with humans "
             "(below, where a human study exists) and its position consistency allow.\n\n"
             "Figures: `judge_tables.png` (and `.pdf`). CSV: `judge_tables.csv`.\n")
    return intro + "\n" + "\n".join(run_markdown(metrics, heading="###") for metrics in runs.values())
