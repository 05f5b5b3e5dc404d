"""Render docs/results.md, and the headline results in README.md, from a committed report folder
(the report run of a reproduce, copied to results/<profile>/). Nothing in either is typed by hand:
rerun this script after replacing the report folder. Earlier reproduces of the profile kept in
results/<profile>_reruns/<name>/ (their report's metrics.json, manifest.json and stage_shares.txt) get a
table beside the latest: what another host or another run of the same code changes.

    python scripts/render_results.py                     # results/cpu -> docs/results.md, README.md
    python scripts/render_results.py --report DIR --page OUT.md --readme README.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The README's headline block: the script owns the lines between these markers.
HEADLINE_START = "<!-- headline results: rendered by scripts/render_results.py from results/cpu -->"
HEADLINE_END = "<!-- end of headline results -->"
FIGURES = (("table2_bleu.png", "Table 2: BLEU with 95% intervals"),
           ("table4_bleu.png", "Table 4: BLEU with 95% intervals"),
           ("tag_use_confusion.png", "Lowest-NLL tag against the gold tag"),
           ("steering_confusion.png", "Replies under every forced category, as the recogniser reads them"),
           ("judge_tables.png", "The LLM judge's tables"))


def read_rows(report: Path, name: str) -> list[dict]:
    with open(report / name, newline="") as f:
        return list(csv.DictReader(f))


def machine(report: Path) -> str:
    """Where the report's runs were measured: the CPU line of its stage timeline
    (scripts/stage_shares.py), else the CPU its manifest records, else the manifest's platform."""
    timeline = report / "stage_shares.txt"
    if timeline.is_file():
        cpu_lines = [line for line in timeline.read_text().splitlines() if line.startswith("CPU ")]
        if cpu_lines:
            return cpu_lines[0]
    manifest = json.loads((report / "manifest.json").read_text())
    cpu = ((manifest.get("device") or {}).get("cpu") or {})
    if cpu:
        flags = " ".join(cpu.get("flags", [])) or "no listed SIMD flags"
        return f"CPU {cpu.get('name', '?')}, {cpu.get('logical_cores', '?')} cores, flags {flags}"
    return manifest["platform"]


def timeline(report: Path) -> str:
    """The stage timeline scripts/stage_shares.py wrote beside the report, as a code block; none without it."""
    path = report / "stage_shares.txt"
    return f"\n## Stage times\n\n```text\n{path.read_text().rstrip()}\n```\n" if path.is_file() else ""


def provenance(report: Path) -> str:
    manifest = json.loads((report / "manifest.json").read_text())
    packages = manifest.get("packages", {})
    return (f"built {manifest['finished_at'][:10]} ({machine(report)}), torch {packages.get('torch', '?')}, "
            f"code {manifest['code_version']}")


def page(report: Path, page_path: Path) -> str:
    """docs/results.md: the report's own Markdown (its title line replaced, its sections one level
    down) with links to its CSV files and its figures."""
    body = (report / "report.md").read_text().split("\n", 1)[1]
    body = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)
    link = os.path.relpath(report, page_path.parent)
    figures = "\n\n".join(f"![{title}]({link}/{name})" for name, title in FIGURES if (report / name).is_file())
    csvs = ", ".join(f"[`{p.name}`]({link}/{p.name})" for p in sorted(report.glob("*.csv")))
    profile = json.loads((report / "metrics.json").read_text())["profile"]
    return (f"# Results ({profile} profile)\n\n"
            f"<!-- rendered by scripts/render_results.py from {link}; edit nothing here, rerun the script -->\n\n"
            f"The report of the latest `{profile}` reproduce (`make reproduce-paper PROFILE={profile}`), "
            f"{provenance(report)}, as the report stage wrote it ([`report.md`]({link}/report.md)). "
            f"CSV: {csvs}. Ablations and their machines are in [ablations.md](ablations.md).\n"
            f"{body}{timeline(report)}{reruns(report, page_path)}\n## Figures\n\n{figures}\n")


def wall_minutes(report: Path) -> str:
    """The minutes from the first run's start to the report, from the stage timeline's first line."""
    path = report / "stage_shares.txt"
    return path.read_text().splitlines()[0].split(", ", 1)[-1].split(" from ")[0] if path.is_file() else "not recorded"


def percent(share) -> str:
    return f"{100 * float(share):.1f}"


def report_json(report: Path, name: str) -> dict:
    path = report / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a readable report file ({err}); copy it again from the report run, "
                         "or remove its folder from the reruns")


def rerun_rows(report: Path, label: str) -> list[str]:
    """One row per tagged system of a report: the figures a recipe for following the strategy is judged by."""
    metrics, manifest = report_json(report, "metrics.json"), report_json(report, "manifest.json")
    steering = {r["system"]: r for r in metrics.get("steering", [])}
    distinct = min(metrics["table2"], key=lambda r: float(r["distinct_2"]))
    cpu = (manifest.get("device") or {}).get("cpu") or {}
    host = f"{cpu.get('name', '?')} ({' '.join(cpu.get('flags', []))})"
    rows = []
    for used in metrics["tag_use"]:
        steered = steering.get(used["system"], {})
        interval = used["tag_discrimination_ci"].strip("[]").split(", ")
        categories = [k for k, v in steered.items()  # following_<category>: a number, not an interval
                      if k.startswith("following_") and "minus" not in k and isinstance(v, (int, float))]
        lowest = min(categories, key=lambda k: steered[k], default=None)
        rows.append(f"| {label} | {host}, code {manifest['code_version']} | {wall_minutes(report)} | {used['system']} | "
                    f"{percent(used['tag_discrimination'])} [{', '.join(map(percent, interval))}] | "
                    f"{float(used['nll_gold_minus_untagged']):+.3f} (p {used['p_gold_vs_untagged']}) | "
                    f"{used['oracle_adherence']} | {steered.get('tag_following', '')} | "
                    + (f"{lowest.removeprefix('following_')} {steered[lowest]}" if lowest else "")
                    + f" | {distinct['system']} {distinct['distinct_2']} |")
    return rows


def reruns(report: Path, page_path: Path) -> str:
    """The latest report beside the earlier reproduces kept in results/<profile>_reruns/ (none: nothing)."""
    folder = report.parent / f"{report.name}_reruns"
    earlier = sorted(p for p in folder.glob("*") if (p / "metrics.json").is_file()) if folder.is_dir() else []
    if not earlier:
        return ""
    link = os.path.relpath(folder, page_path.parent)
    lines = ["| run | host, code | wall | system | tag discrimination % [95% CI] | gold - untagged NLL/token (p) "
             "| oracle adherence % | tag following % | least-followed category % | lowest Distinct-2 (Table 2) |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | --- | --- |"]
    lines += rerun_rows(report, "this page")
    for run in earlier:
        lines += rerun_rows(run, f"[`{run.name}`]({link}/{run.name})")
    return ("\n## Earlier reproduces of the same profile\n\nThe same profile reproduced before, from an empty "
            "artifacts folder (each run's report files are kept in its folder). Training and bf16 kernels are not "
            "bit-identical across CPUs, so another host trains other weights from the same data and seeds:\n\n"
            + "\n".join(lines) + "\n")


def headline(report: Path) -> str:
    """The README's compact results: Table 2's BLEU, esconv B-2 and PPL, tag use and the share of replies
    the safety screen flags, with the machine."""
    table2 = read_rows(report, "table2.csv")
    tag_use = {r["system"]: r for r in read_rows(report, "tag_use.csv")}
    steering = {r["system"]: r for r in read_rows(report, "steering.csv")} if (report / "steering.csv").is_file() else {}
    lines = ["| System | BLEU [95% CI] | esconv B-2 | PPL | Tag discrimination (chance) | Tag following % (human replies) "
             "| Flagged by the safety screen % |", "| --- | --- | ---: | ---: | --- | --- | ---: |"]
    for r in table2:
        used, steered = tag_use.get(r["system"]), steering.get(r["system"])
        lines.append(f"| {r['system']} | {r['bleu']} {r['bleu_ci']} | {r.get('esconv_bleu_2', '')} | {r['ppl']} | "
                     + (f"{used['tag_discrimination']} ({used['chance']})" if used else "") + " | "
                     + (f"{steered['tag_following']} ({steered['recogniser_on_references']})" if steered else "")
                     + f" | {r.get('flagged_replies', '')} |")
    profile = json.loads((report / "metrics.json").read_text())["profile"]
    return (f"Latest `{profile}` reproduce, {provenance(report)} (all tables, the paired tests of the paper's "
            f"orderings and the figures: [docs/results.md](docs/results.md)):\n\n" + "\n".join(lines))


def with_headline(readme: str, block: str) -> str:
    start, end = readme.index(HEADLINE_START) + len(HEADLINE_START), readme.index(HEADLINE_END)
    return readme[:start] + "\n" + block + "\n" + readme[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=REPO / "results" / "cpu", help="the committed report folder")
    parser.add_argument("--page", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md", help="README with the headline markers")
    args = parser.parse_args()
    args.page.write_text(page(args.report, args.page))
    args.readme.write_text(with_headline(args.readme.read_text(), headline(args.report)))
    print(f"wrote {args.page} and the headline results of {args.readme}")


if __name__ == "__main__":
    main()
