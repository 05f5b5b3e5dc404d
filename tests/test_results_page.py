"""docs/results.md and the README's headline results are rendered from the committed report
(results/cpu/), never retyped: the committed page must equal what scripts/render_results.py renders
now, and every number a rendered page shows must be one of its report's."""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path

import pytest

from mhsupport import pipeline

REPO = Path(__file__).resolve().parents[1]
COMMITTED_REPORT = REPO / "results" / "cpu"
NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
SLICE = ["generator.train_subset=48", "generator.valid_subset=12", "classifier.train_subset=150", "test_subset=16",
         "bootstrap.resamples=40", "significance_resamples=40", "decoding.max_new_tokens=10", "runtime.progress=false"]


def render_results():
    spec = importlib.util.spec_from_file_location("render_results", REPO / "scripts" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report_numbers(report: Path) -> set[str]:
    """Every number the report's Markdown, CSV files and manifest hold, as written there."""
    text = (report / "report.md").read_text() + (report / "manifest.json").read_text()
    for path in report.glob("*.csv"):
        with open(path, newline="") as f:
            text += "\n".join(" ".join(row) for row in csv.reader(f))
    return set(NUMBER.findall(text))


@pytest.mark.skipif(not (COMMITTED_REPORT / "report.md").is_file(),
                    reason="results/cpu/ holds no committed report yet (copy a cpu reproduce's report folder there "
                           "and run scripts/render_results.py)")
def test_the_committed_results_page_is_the_committed_report():
    render = render_results()
    page = REPO / "docs" / "results.md"
    assert page.read_text() == render.page(COMMITTED_REPORT, page), "rerun scripts/render_results.py"
    readme = (REPO / "README.md").read_text()
    assert readme == render.with_headline(readme, render.headline(COMMITTED_REPORT)), "rerun scripts/render_results.py"


@pytest.mark.slow
def test_every_number_of_a_rendered_page_is_one_of_its_reports(make_cfg, tmp_path):
    report = pipeline.reproduce(make_cfg("report", "generator=tiny", "classifier=tiny", *SLICE)).report.run.path
    render = render_results()
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    text = render.page(report, page)
    prose = text.split("\n", 6)[6]  # the report's own text, after the page's title and provenance lines
    known = report_numbers(report)
    assert [n for n in NUMBER.findall(prose) if n not in known] == []
    headline = render.headline(report)
    table = headline[headline.index("| System"):]
    assert [n for n in NUMBER.findall(table) if n not in known] == []
    assert "| ESConv+tag |" in table and "](" not in table
    readme = render.with_headline(f"x\n{render.HEADLINE_START}\nold\n{render.HEADLINE_END}\ny\n", headline)
    assert readme.startswith(f"x\n{render.HEADLINE_START}\n") and "\nold\n" not in readme and readme.endswith("y\n")


@pytest.mark.skipif(not (COMMITTED_REPORT / "report.md").is_file(), reason="results/cpu/ holds no committed report yet")
def test_earlier_reproduces_get_a_row_per_tagged_system_from_their_own_files(tmp_path):
    import json
    import shutil

    render = render_results()
    report = tmp_path / "results" / "cpu"
    shutil.copytree(COMMITTED_REPORT, report, ignore=shutil.ignore_patterns("judge"))
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    assert "Earlier reproduces" not in render.page(report, page)  # no folder beside it: no section

    earlier = tmp_path / "results" / "cpu_reruns" / "other-host"
    earlier.mkdir(parents=True)
    metrics = json.loads((report / "metrics.json").read_text())
    metrics["tag_use"][0].update(tag_discrimination=0.612, tag_discrimination_ci="[0.581, 0.642]")
    metrics["steering"][0].update(following_Action=12.5)
    (earlier / "metrics.json").write_text(json.dumps(metrics))
    shutil.copy(report / "manifest.json", earlier)
    (earlier / "stage_shares.txt").write_text("21 runs, 71.5 min from the first run's start to the report\n")
    section = render.page(report, page).split("## Earlier reproduces of the same profile", 1)[1].split("## Figures")[0]
    rows = [line for line in section.splitlines() if line.startswith("| [`other-host`](../results/cpu_reruns/other-host)")]
    assert len(rows) == len(metrics["tag_use"])
    first = rows[0].split(" | ")
    assert first[2] == "71.5 min" and first[3] == metrics["tag_use"][0]["system"]
    assert first[4] == "61.2 [58.1, 64.2]" and first[8] == "Action 12.5"
    assert sum(line.startswith("| this page |") for line in section.splitlines()) == len(metrics["tag_use"])
