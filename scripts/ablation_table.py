"""Render the rows of `scripts/ablate_generator.py` (JSON lines) as one Markdown table, with the
machine of each row (CPU flags, threads, dtype), for the docs.

    python scripts/ablation_table.py results/generator_steering_valid_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json


def cell_interval(metric: dict, scale: float = 100) -> str:
    return f"{scale * metric['value']:.1f} [{scale * metric['low']:.1f}, {scale * metric['high']:.1f}]"


def machine(row: dict) -> str:
    cpu = row["cpu"]
    flags = " ".join(f for f in cpu["flags"] if f.startswith(("avx512_bf16", "amx_bf16"))) or "no bf16"
    return f"{cpu['name']} ({flags}), {row['torch_threads']} threads, {row['tagged'].get('dtype', '?')}"


def steering_table(rows: list[dict]) -> str:
    """Rows with a steering measurement (replies under every category): tag following, each
    category's rate, oracle adherence, with the likelihood discrimination of the same model."""
    labels = list(rows[0]["steering"]["per_category"])
    lines = ["| recipe | tag discrimination % [95% CI] | gold-tag PPL | tag following % [95% CI] | "
             + " / ".join(labels) + " % | oracle adherence % [95% CI] | recogniser on the references % "
             "| Distinct-2 | replies at the 40-token limit % | generation s | training s |",
             "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        steered = row["steering"]
        following = steered["tag_following"]
        lines.append(" | ".join([
            f"| {row['recipe']}", cell_interval(row["tagged"]["metrics"]["tag_discrimination"]),
            f"{row['tagged']['metrics']['ppl_gold_tag']['value']:.2f}", f"{following['value']:.1f} [{following['low']:.1f}, {following['high']:.1f}]",
            " / ".join(f"{steered['per_category'][label]['rate']:.0f}" for label in labels),
            cell_interval(steered["oracle_adherence"]), f"{steered['recogniser_on_references']['value']:.1f}",
            f"{steered['distinct_2']:.1f}", f"{100 * steered['at_token_limit']:.1f}", f"{steered['generate_seconds']:.0f}",
            f"{row['tagged']['train_seconds']:.0f}"]) + " |")
    machines = sorted({machine(row) for row in rows})
    return ("\n".join(lines) + "\n\nMeasured on: " + "; ".join(machines) + ". Tag discrimination on "
            f"{', '.join(map(str, sorted({row['valid_examples'] for row in rows})))} ESConv valid examples; replies "
            f"under every category for the first {', '.join(map(str, sorted({row['steering']['examples'] for row in rows})))}.")


def table(rows: list[dict]) -> str:
    if all("steering" in row for row in rows):
        return steering_table(rows)
    # the oracle replies' loops, where the rows measured them
    loops = any("at_token_limit" in row.get("adherence", {}) for row in rows)
    lines = ["| recipe | tag discrimination % [95% CI] | most-chosen tag share | gold-tag PPL | untagged PPL "
             "| gold - untagged nats/token (p) | oracle adherence % | recogniser on the references % "
             + ("| oracle replies at the 40-token limit % | their Distinct-2 " if loops else "")
             + "| training s (tagged / untagged) |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | " + ("---: | ---: | " if loops else "") + "--- |"]
    for row in rows:
        tagged, untagged = row["tagged"], row.get("untagged")
        m = tagged["metrics"]
        versus = row.get("gold_minus_untagged")
        adherence = row.get("adherence", {})
        lines.append(" | ".join([
            f"| {row['recipe']}", cell_interval(m["tag_discrimination"]), f"{m['most_chosen_share']['value']:.2f}",
            f"{m['ppl_gold_tag']['value']:.2f}",
            f"{untagged['metrics']['ppl']['value']:.2f}" if untagged else "",
            f"{versus['value']:+.3f} ({versus['p']:.3f})" if versus else "",
            f"{100 * adherence['oracle_adherence']:.1f}" if adherence else "",
            f"{100 * adherence['recogniser_on_references']:.1f}" if adherence else "",
            *([f"{100 * adherence['at_token_limit']:.1f}" if "at_token_limit" in adherence else "",
               f"{adherence['distinct_2']:.1f}" if "distinct_2" in adherence else ""] if loops else []),
            f"{tagged['train_seconds']:.0f} / {untagged['train_seconds']:.0f}" if untagged else
            f"{tagged['train_seconds']:.0f}"]) + " |")
    machines = sorted({machine(row) for row in rows})
    examples = sorted({row.get("valid_examples", 400) for row in rows})
    return ("\n".join(lines) + "\n\nMeasured on: " + "; ".join(machines) + f". ESConv valid examples scored: "
            f"{', '.join(map(str, examples))}; oracle adherence on the first {rows[0].get('adherence', {}).get('examples', 0)}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", help="JSON lines written by scripts/ablate_generator.py")
    args = parser.parse_args()
    with open(args.rows) as f:
        print(table([json.loads(line) for line in f if line.strip()]))


if __name__ == "__main__":
    main()
