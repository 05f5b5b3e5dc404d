"""`mhs judge` against a real HTTP server on loopback that speaks the OpenAI chat-completions
protocol, with scripted judges: one that always prefers the first position, one that prefers the
longer reply, one that answers garbage, one that fails twice with 503 before answering; faults of
the endpoint; a real SIGKILL of a judge run and a rerun that asks only what was not answered."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

from mhsupport import pipeline
from mhsupport.evaluation import humaneval, judge
from mhsupport.cli import main
from mhsupport.errors import MhsError
from mhsupport.evaluation.generations_io import read_generations
from judge_server import ScriptedJudge, serve, stop

GEN = ["generator=tiny", "generator.train_subset=48", "generator.valid_subset=12", "strategy_tag=true"]
EVAL = [*GEN, "test_subset=12", "bootstrap.resamples=20", "decoding.max_new_tokens=8", "tag_adherence=false",
        "runtime.progress=false"]
JUDGE = ["generator=tiny", "classifier=tiny", "judge.backend=openai", "runtime.progress=false",
         "runtime.judge.max_retries=3", "runtime.judge.timeout_s=20"]


@pytest.fixture
def server():
    httpd, url = serve()
    yield url
    stop(httpd)


@pytest.fixture(scope="module")
def two_runs(make_cfg, prepared):
    """Two evals of one tiny tagged generator on the same 12 test examples: random and oracle tags."""
    pipeline.run("train_generator", make_cfg("train_generator", *GEN))
    random_run = pipeline.Pipeline().ensure("eval", make_cfg("eval", *EVAL, "sampler=random")).run.path
    oracle_run = pipeline.Pipeline().ensure("eval", make_cfg("eval", *EVAL, "sampler=oracle")).run.path
    return random_run, oracle_run


def judged(make_cfg, two_runs, server, *overrides, artifacts=None):
    """A judge run of the two evals; each scripted behaviour is its own judge model (and so its own run)."""
    a, b = two_runs
    cfg = make_cfg("judge", *JUDGE, f"judge.model=scripted-{ScriptedJudge.behaviour}", f"endpoint.base_url={server}",
                   f"judge.pair=[{a},{b}]", *overrides, artifacts=artifacts)
    return pipeline.run("judge", cfg)


def records_of(result) -> list[dict]:
    return [json.loads(line) for line in (result.run.path / judge.JUDGEMENTS).read_text().splitlines()]


def test_verdict_parsing_and_the_two_order_rule():
    assert judge.parse_verdict("A is kinder. [[A]]") == "A"
    assert judge.parse_verdict("[[A]] at first, but on reflection [[ b ]]") == "B"  # the last verdict counts
    assert judge.parse_verdict("[[C]]") == "tie" and judge.parse_verdict("A is better") is None
    assert judge.parse_verdict("") is None and judge.parse_verdict("[[D]]") is None
    # order "ab" shows a as Reply A; order "ba" shows b as Reply A
    assert judge.system_of("A", "ab") == "a" and judge.system_of("A", "ba") == "b"
    assert judge.system_of("B", "ba") == "a" and judge.system_of("tie", "ab") == "tie"
    assert judge.combine("b", "b") == ("win", True) and judge.combine("a", "a") == ("loss", True)
    assert judge.combine("tie", "tie") == ("tie", True)
    assert judge.combine("a", "b") == ("tie", False) and judge.combine("b", "tie") == ("tie", False)
    assert judge.combine(None, "b") == ("unparseable", None)


def test_the_adherence_question_names_each_replys_strategy(make_cfg):
    prompts = judge.Prompts.from_config(make_cfg("judge"))
    pair = judge.Pair(("c1", 3), [{"speaker": "seeker", "text": "I feel so alone."}], {"a": "How so?", "b": ""},
                      {"a": None, "b": "Comforting"})
    shown = prompts.messages(pair, "adherence", "ab")[1]["content"]
    # a system given no tag is judged against the other's (ESConv-SRA's "which follows strategy S better?")
    assert "Reply A: Comforting (show empathy" in shown and "Reply B: Comforting (show empathy" in shown
    assert "Seeker: I feel so alone." in shown and "### Reply A\nHow so?" in shown and "### Reply B\n(no reply)" in shown
    pair.tag["a"] = "Action"
    swapped = prompts.messages(pair, "adherence", "ba")[1]["content"]
    assert "Reply A: Comforting (" in swapped and "Reply B: Action (" in swapped
    assert "### Reply A\n(no reply)" in swapped and "### Reply B\nHow so?" in swapped
    assert judge.applies("overall", judge.Pair(("c", 1), [], {"a": "x", "b": "y"}, {"a": None, "b": None}))
    assert not judge.applies("adherence", judge.Pair(("c", 1), [], {"a": "x", "b": "y"}, {"a": None, "b": None}))
    key = judge.request_key("m", {"temperature": 0.0}, prompts.messages(pair, "overall", "ab"))
    assert key != judge.request_key("m", {"temperature": 0.0}, prompts.messages(pair, "overall", "ba"))
    assert key != judge.request_key("m2", {"temperature": 0.0}, prompts.messages(pair, "overall", "ab"))
    assert key != judge.request_key("m", {"temperature": 0.7}, prompts.messages(pair, "overall", "ab"))


def test_a_judge_that_prefers_the_first_position_gives_only_ties(make_cfg, two_runs, server):
    ScriptedJudge.behaviour = "first"
    result = judged(make_cfg, two_runs, server, "judge.dimensions=[overall]")
    records = records_of(result)
    asked = [r for r in records if not r["identical"]]
    assert asked, "the tiny runs' replies all coincide: nothing was asked"
    overall = result.metrics["rows"][0]["dimensions"]["overall"]
    assert overall["n"] == 12 and overall["win"]["count"] == overall["loss"]["count"] == 0
    assert overall["tie"]["pct"] == 100.0 and overall["sign_test_p"] is None and overall["preferred"] == "none"
    assert overall["position_consistent"] == {**overall["position_consistent"], "count": 0, "pct": 0.0}
    assert overall["first_position_chosen"]["pct"] == 100.0
    assert overall["first_position_chosen"]["p"] == pytest.approx(binomtest(2 * len(asked), 2 * len(asked)).pvalue)
    # both orders of every pair (and of every known pair the validity check asked) were asked, each once
    prompts = Counter(r["messages"][-1]["content"] for r in ScriptedJudge.requests)
    assert len(prompts) == 2 * len(asked) + result.metrics["validity"]["timing"]["sent"] and set(prompts.values()) == {1}
    # a judge that always picks the first position decides no known pair either
    assert result.metrics["validity"]["overall"]["accuracy"]["count"] == 0 and not result.metrics["validity"]["evidence"]
    assert "so this run's tables are not evidence" in (result.run.path / "judge.md").read_text()
    assert all(r["verdicts"] == {"ab": "A", "ba": "A"} and r["consistent"] is False for r in asked)


def test_a_judge_that_prefers_longer_replies(make_cfg, two_runs, server):
    result = judged(make_cfg, two_runs, server, "judge.dimensions=[overall]", "judge.length_match_ratio=0.2")
    records = records_of(result)
    a_lines = {(l["conversation_id"], l["turn_index"]): l for l in read_generations(two_runs[0])}
    b_lines = {(l["conversation_id"], l["turn_index"]): l for l in read_generations(two_runs[1])}
    expected = Counter()
    for r in records:  # the outcome follows from the two replies' lengths alone, computed here from the runs
        key = (r["conversation_id"], r["turn_index"])
        la, lb = len(a_lines[key]["response"].split()), len(b_lines[key]["response"].split())
        assert (r["length_a"], r["length_b"]) == (la, lb)
        outcome = "win" if lb > la else "loss" if la > lb else "tie"
        assert r["outcome"] == outcome and r["consistent"] in (True, None)
        expected[outcome] += 1
    overall = result.metrics["rows"][0]["dimensions"]["overall"]
    assert {o: overall[o]["count"] for o in ("win", "loss", "tie")} == {o: expected[o] for o in ("win", "loss", "tie")}
    decided = [r for r in records if r["outcome"] in ("win", "loss")]
    assert decided, "no pair of replies of different lengths in the tiny runs"
    assert overall["position_consistent"]["pct"] == 100.0
    assert overall["longer_chosen"]["pct"] == 100.0
    assert overall["longer_chosen"]["count"] == 2 * len(decided)
    assert overall["sign_test_p"] == pytest.approx(binomtest(expected["win"], len(decided)).pvalue)
    bins = overall["win_rate_by_length"]
    assert bins["B longer"]["win"]["pct"] in (100.0, None) and bins["B shorter"]["win"]["count"] == 0
    matched = [r for r in records if abs(r["length_b"] - r["length_a"]) <= 0.2 * max(r["length_a"], r["length_b"])]
    assert overall["length_matched"]["n"] == len(matched)
    rho = overall["length_difference_vs_outcome"]
    assert rho is None or rho["rho"] > 0.9
    report = (result.run.path / "judge.md").read_text()
    assert "| 100.0 (" in report and "longer reply chosen" in report
    assert (result.run.path / "judge.png").is_file() and (result.run.path / "judge.csv").is_file()
    assert result.metrics["signature"].startswith("backend:openai|model:scripted-longer|temperature:0|")


def test_garbage_answers_are_counted_never_dropped(make_cfg, two_runs, server, caplog):
    ScriptedJudge.behaviour = "garbage"
    result = judged(make_cfg, two_runs, server, "judge.dimensions=[overall,action]")
    for dimension in ("overall", "action"):
        s = result.metrics["rows"][0]["dimensions"][dimension]
        identical = s["identical_pairs"]
        assert s["n"] == 12 and s["unparseable"]["count"] == 12 - identical and s["tie"]["count"] == identical
        assert s["unparseable_answers"]["pct"] == (100.0 if identical < 12 else None)
        assert s["position_consistent"]["count"] == 0 and s["position_consistent"]["pct"] is None
    assert result.metrics["requests"]["unparseable"] == result.metrics["requests"]["asked"] > 0
    assert "had no verdict" in caplog.text
    assert "Unparseable %" in (result.run.path / "judge.md").read_text()


def test_503_twice_then_an_answer_is_retried_and_cached(make_cfg, two_runs, server):
    ScriptedJudge.behaviour = "flaky"
    result = judged(make_cfg, two_runs, server, "judge.dimensions=[overall]", "runtime.judge.concurrency=2")
    prompts = Counter(r["messages"][-1]["content"] for r in ScriptedJudge.requests)
    assert prompts and set(prompts.values()) == {3}  # two 503s and the answer, per request
    validity_sent = result.metrics["validity"]["timing"]["sent"]
    assert result.metrics["requests"]["sent"] + validity_sent == len(prompts)
    assert result.metrics["requests"]["unparseable"] == 0
    cached = [json.loads(l) for name in (judge.REQUESTS, "validity_requests.jsonl")
              for l in (result.run.path / name).read_text().splitlines()]
    assert len(cached) == len(prompts) and all(re.search(r"\[\[[ABC]\]\]", c["answer"]) for c in cached)
    # the same command again: the run is up to date; --force rebuilds from the cached answers alone
    ScriptedJudge.requests.clear()
    again = judged(make_cfg, two_runs, server, "judge.dimensions=[overall]", "runtime.judge.concurrency=2", "force=true")
    assert not again.skipped and ScriptedJudge.requests == []
    assert again.metrics["requests"]["from_cache"] == again.metrics["requests"]["asked"]
    assert again.metrics["rows"] == result.metrics["rows"]


def test_a_killed_judge_run_pays_for_nothing_twice(two_runs, server, mhs_env, prepared):
    """A real SIGKILL while requests are in flight; the rerun asks only what was never answered."""
    a, b = two_runs
    args = ["judge", str(a), str(b), "--profile", "tiny", "--backend", "openai", "--model", "scripted-judge",
            "--base-url", server, "judge.dimensions=[overall,exploration]", "runtime.judge.concurrency=2",
            "runtime.progress=false"]
    env = mhs_env()
    # The known pairs are judged first: answered once here, every later run reads them from this run's
    # cache, so the answers the server gives below all go to the pair's requests.
    known = subprocess.run([sys.executable, "-m", "mhsupport.cli", "judge", "--known-pairs", *args[3:]], env=env,
                           capture_output=True, text=True)
    assert known.returncode == 0, known.stderr
    ScriptedJudge.requests.clear()
    ScriptedJudge.answer_limit = 5
    process = subprocess.Popen([sys.executable, "-m", "mhsupport.cli", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    cache_files = lambda: list((prepared[1] / "judge").glob(".*.partial/checkpoints/requests.jsonl"))  # noqa: E731
    deadline = time.time() + 900  # generous: a loaded machine starts a Python with torch slowly
    while time.time() < deadline and not (cache_files() and len(cache_files()[0].read_text().splitlines()) >= 5):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    answered = [r["messages"][-1]["content"] for r in ScriptedJudge.requests[:5]]
    assert len(cache_files()[0].read_text().splitlines()) == 5

    ScriptedJudge.answer_limit = None
    ScriptedJudge.requests.clear()
    ScriptedJudge.release.set()
    done = subprocess.run([sys.executable, "-m", "mhsupport.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    asked_again = [r["messages"][-1]["content"] for r in ScriptedJudge.requests]
    assert not set(asked_again) & set(answered)  # nothing answered before the kill is paid for twice
    run_dir = Path(done.stdout.split("judge run (written): ")[1].split()[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["requests"]["asked"] == len(set(asked_again)) + 5 and metrics["requests"]["from_cache"] == 5
    assert not cache_files()  # the resumable folder became the run


def test_endpoint_faults_are_one_line_each_and_keep_cached_answers(make_cfg, two_runs, server, tmp_path, capsys,
                                                                   prepared):
    raw, _ = prepared
    a, b = two_runs
    pipeline.Pipeline().ensure("prepare_data", make_cfg("prepare_data", artifacts=tmp_path / "artifacts"))  # known pairs
    base = ["judge", str(a), str(b), "--profile", "tiny", "--backend", "openai", f"paths.raw_dir={raw}",
            f"paths.artifacts_dir={tmp_path / 'artifacts'}", "judge.dimensions=[overall]", "runtime.progress=false",
            "runtime.judge.max_retries=1"]
    cases = [
        ({"status": 401}, ["--model", "scripted-judge", "--base-url", server],
         "refused the API key (HTTP 401; $OPENAI_API_KEY is"),
        ({"status": 404}, ["--model", "no-such-model", "--base-url", server],
         "model 'no-such-model' not found (HTTP 404; it serves: scripted-judge); set judge.model"),
        ({}, ["--model", "scripted-judge", "--base-url", "http://127.0.0.1:9/v1"],
         "judge endpoint http://127.0.0.1:9/v1: unreachable"),
        ({"behaviour": "slow"}, ["--model", "scripted-judge", "--base-url", server, "runtime.judge.timeout_s=0.5",
                                 "runtime.judge.max_retries=0"],
         "no answer within 0.5 s (no retries); raise runtime.judge.timeout_s"),
    ]
    for settings, flags, expected in cases:
        ScriptedJudge.status, ScriptedJudge.behaviour = settings.get("status"), settings.get("behaviour", "longer")
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mhs judge: error: ") and expected in err[0], err
    assert not [p for p in (tmp_path / "artifacts" / "judge").iterdir() if not p.name.startswith(".")]


def test_answers_before_a_fault_are_kept_for_the_rerun(make_cfg, two_runs, server, tmp_path):
    """The server goes down after some answers: the run fails with one line, the answers stay, and
    the rerun against the server that is back asks only for the rest."""
    # The known pairs need the prepared data in this run's artifacts folder.
    pipeline.Pipeline().ensure("prepare_data", make_cfg("prepare_data", artifacts=tmp_path / "artifacts"))
    ScriptedJudge.answer_limit = 3
    ScriptedJudge.release.set()  # held requests end without an answer: the client sees the connection drop
    with pytest.raises(MhsError, match="unreachable|HTTP"):
        judged(make_cfg, two_runs, server, "judge.dimensions=[overall]", "runtime.judge.max_retries=0",
               "runtime.judge.concurrency=1", artifacts=tmp_path / "artifacts")
    first = [r["messages"][-1]["content"] for r in ScriptedJudge.requests[:3]]
    ScriptedJudge.answer_limit = None
    ScriptedJudge.requests.clear()
    result = judged(make_cfg, two_runs, server, "judge.dimensions=[overall]", "runtime.judge.max_retries=0",
                    "runtime.judge.concurrency=1", artifacts=tmp_path / "artifacts")
    assert not {r["messages"][-1]["content"] for r in ScriptedJudge.requests} & set(first)
    known = result.metrics["validity"]["timing"]  # the known pairs, judged first, may hold the three answers
    assert result.metrics["requests"]["from_cache"] + known["requests"] - known["sent"] == 3


def test_runs_of_different_examples_are_refused_naming_both(make_cfg, two_runs, server, capsys, prepared):
    raw, artifacts = prepared
    other = pipeline.Pipeline().ensure("eval", make_cfg("eval", *EVAL, "sampler=random", "test_subset=10")).run.path
    capsys.readouterr()
    code = main(["judge", str(two_runs[0]), str(other), "--profile", "tiny", "--backend", "openai", "--model", "m",
                 "--base-url", server, f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(two_runs[0]) in err[0] and str(other) in err[0]
    assert "scored different test examples" in err[0] and ScriptedJudge.requests == []
    assert main(["judge", str(two_runs[0]), str(artifacts / "eval"), "--backend", "openai", "--model", "m",
                 f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts}"]) == 2
    assert "not a complete run" in capsys.readouterr().err


def test_judge_human_agreement_on_shared_items(make_cfg, two_runs, server, tmp_path):
    """Raters of a blinded study of the same two runs against the length-preferring judge."""
    a, b = two_runs
    _, key_path = humaneval.export(b, a, 8, tmp_path / "study")  # the study shows the runs the other way round
    key = json.loads(key_path.read_text())
    lines = {(l["conversation_id"], l["turn_index"]): l for l in read_generations(a)}
    other = {(l["conversation_id"], l["turn_index"]): l for l in read_generations(b)}

    def longer_side(item):  # "a" / "b" in the study's terms (its run_a is the judge's run b)
        key_ = (item["conversation_id"], item["turn_index"])
        la, lb = len(other[key_]["response"].split()), len(lines[key_]["response"].split())
        return "a" if la > lb else "b" if lb > la else "tie"

    def answers(rater, choose):
        chosen = {}
        for item_id, item in key["items"].items():
            side = choose(item)
            chosen[item_id] = "tie" if side == "tie" else ("A" if item["A"] == side else "B")
        path = tmp_path / f"{rater}.json"
        path.write_text(json.dumps({"study_id": key["study_id"], "rater": rater, "answers": chosen}))
        return path

    agreeing = answers("agrees", longer_side)
    tie_only = answers("ties", lambda item: "tie")
    result = judged(make_cfg, two_runs, server, "judge.dimensions=[overall]",
                    f"judge.human_studies=[{{key:{key_path},answers:[{agreeing},{tie_only}]}}]")
    agreement = result.metrics["rows"][0]["human_agreement"]
    assert agreement["items"] == 8 and agreement["comparisons"] == 16 and agreement["raters"] == 2
    # the judge picks the longer reply, as the first rater does: in the judge's terms (its run a is the study's b)
    flip = {"a": "b", "b": "a", "tie": "tie"}
    judge_says = [flip[longer_side(item)] for item in key["items"].values()]
    by_key = {(r["conversation_id"], r["turn_index"]): {"win": "b", "loss": "a", "tie": "tie"}[r["outcome"]]
              for r in records_of(result)}
    assert judge_says == [by_key[(i["conversation_id"], i["turn_index"])] for i in key["items"].values()]
    humans, judges = judge_says + ["tie"] * 8, judge_says * 2
    assert agreement["accuracy"] == pytest.approx((8 + judge_says.count("tie")) / 16)
    kappa = cohen_kappa_score(humans, judges, labels=["a", "b", "tie"])
    assert agreement["cohen_kappa"] == pytest.approx(kappa)
    assert "Agreement with human raters" in (result.run.path / "judge.md").read_text()


def test_the_command_line_takes_relative_runs_and_overrides_anywhere(two_runs, server, tmp_path, prepared,
                                                                     monkeypatch, capsys):
    raw, artifacts = prepared
    a, b = two_runs
    _, key_path = humaneval.export(a, b, 4, tmp_path / "study")
    key = json.loads(key_path.read_text())
    answers = tmp_path / "rater.json"
    answers.write_text(json.dumps({"study_id": key["study_id"], "rater": "r", "answers": {i: "tie" for i in key["items"]}}))
    monkeypatch.chdir(a.parent)
    code = main(["judge", a.name, b.name, "--backend", "openai", "--model", "scripted-cli", "--base-url", server,
                 "--human", str(key_path), str(answers), "judge.dimensions=[overall]", "--profile", "tiny",
                 f"paths.raw_dir={raw}", f"paths.artifacts_dir={artifacts}", "runtime.progress=false"])
    out = capsys.readouterr().out
    assert code == 0 and "Agreement with human raters" in out and "| esconv+tag / oracle vs esconv+tag / random |" in out
    run_dir = Path(out.split("judge run (written): ")[1].split()[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["judge"]["dimensions"] == ["overall"] and metrics["rows"][0]["run_a"] == a.name
    agreement = metrics["rows"][0]["human_agreement"]
    ties = sum(r["outcome"] == "tie" for r in (json.loads(l) for l in (run_dir / judge.JUDGEMENTS).read_text().splitlines())
               if (r["conversation_id"], r["turn_index"]) in {(i["conversation_id"], i["turn_index"])
                                                              for i in key["items"].values()})
    assert agreement["items"] == 4 and agreement["accuracy"] == pytest.approx(ties / 4)
    assert main(["judge", a.name, a.name, "--backend", "openai", "--model", "m", f"paths.raw_dir={raw}",
                 f"paths.artifacts_dir={artifacts}"]) == 2
    assert "RUN_A and RUN_B are the same eval run" in capsys.readouterr().err
