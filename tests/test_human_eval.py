"""The human-evaluation kit: export a blinded study, answer it in a real headless Chromium
(Debian's, driven by Playwright), save, un-blind and score."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mhsupport.evaluation import humaneval
from mhsupport.cli import main
from mhsupport.errors import MhsError
from mhsupport import pipeline

GEN = ["generator=tiny", "generator.train_subset=48", "generator.valid_subset=12", "strategy_tag=true"]
EVAL = [*GEN, "test_subset=12", "bootstrap.resamples=20", "decoding.max_new_tokens=8", "tag_adherence=false",
        "runtime.progress=false"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def two_runs(make_cfg, prepared):
    pipeline.run("train_generator", make_cfg("train_generator", *GEN))
    random_run = pipeline.Pipeline().ensure("eval", make_cfg("eval", *EVAL, "sampler=random")).run.path
    oracle_run = pipeline.Pipeline().ensure("eval", make_cfg("eval", *EVAL, "sampler=oracle")).run.path
    return random_run, oracle_run


def answer_file(path: Path, key: dict, rater: str, choose) -> Path:
    answers = {item_id: choose(item_id, blind) for item_id, blind in key["items"].items()}
    path.write_text(json.dumps({"study_id": key["study_id"], "rater": rater, "answers": answers}))
    return path


def test_export_blinds_and_score_unblinds(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert main(["human-eval", "export", str(a), str(b), "--n", "10", "--out", str(tmp_path / "study")]) == 0
    key = json.loads((tmp_path / "study" / "key.json").read_text())
    page = (tmp_path / "study" / "study.html").read_text()
    assert len(key["items"]) == 10 and key["system_b"] == "esconv+tag / oracle"
    for secret in (key["system_a"], key["system_b"], str(a), str(b), a.name, b.name):
        assert secret not in page  # the page does not say which system is which
    assert {v["A"] for v in key["items"].values()} == {"a", "b"}  # both orders occur
    # rater 1 always prefers system b (wherever it was shown), rater 2 always says tie on the first 5
    r1 = answer_file(tmp_path / "r1.json", key, "r1", lambda i, blind: "A" if blind["A"] == "b" else "B")
    r2 = answer_file(tmp_path / "r2.json", key, "r2",
                     lambda i, blind: "tie" if int(i[-3:]) <= 5 else ("A" if blind["A"] == "b" else "B"))
    result = humaneval.score(tmp_path / "study" / "key.json", [r1, r2])
    assert result["raters"]["r1"]["win"] == 10 and result["raters"]["r1"]["win_pct"] == 100.0
    assert result["raters"]["r1"]["sign_test_p"] == pytest.approx(2 * 0.5 ** 10)
    assert result["pooled"] == {**result["pooled"], "win": 15, "lose": 0, "tie": 5, "n": 20}
    assert result["fleiss_kappa"] is not None and result["fleiss_kappa"] < 1
    assert main(["human-eval", "score", str(tmp_path / "study" / "key.json"), str(r1)]) == 0
    assert "| all raters | 100.0% | 0.0% | 0.0% | 10 |" in capsys.readouterr().out


def test_answers_for_another_study_are_refused(two_runs, tmp_path):
    a, b = two_runs
    _, key_path = humaneval.export(a, b, 5, tmp_path / "s")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"study_id": "other", "rater": "x", "answers": {}}))
    with pytest.raises(MhsError, match="the key is for study"):
        humaneval.score(key_path, [bad])
    key = json.loads(key_path.read_text())
    bad.write_text(json.dumps({"study_id": key["study_id"], "rater": "x", "answers": {"item-001": "maybe"}}))
    with pytest.raises(MhsError, match="'maybe'"):
        humaneval.score(key_path, [bad])


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_rater_answers_in_a_real_browser(two_runs, tmp_path):
    from playwright.sync_api import sync_playwright

    a, b = two_runs
    study, key_path = humaneval.export(a, b, 4, tmp_path / "study")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(accept_downloads=True)
        page.goto(study.as_uri())
        assert page.locator(".item").count() == 4
        page.click("#save")
        assert "enter your name" in page.inner_text("#status")
        page.fill("#rater", "browser rater")
        for index, choice in enumerate(["A", "B", "tie"]):  # the fourth item is left unanswered
            page.check(f'input[name="item-{index + 1:03d}"][value="{choice}"]')
        with page.expect_download() as download_info:
            page.click("#save")
        saved = tmp_path / "answers.json"
        download_info.value.save_as(saved)
        assert "Saved 3 of 4 answers" in page.inner_text("#status")
        browser.close()
    answers = json.loads(saved.read_text())
    assert answers["rater"] == "browser rater" and answers["answers"] == {"item-001": "A", "item-002": "B",
                                                                          "item-003": "tie"}
    result = humaneval.score(key_path, [saved])
    assert result["pooled"]["n"] == 3 and result["pooled"]["tie"] == 1


@pytest.fixture
def study(two_runs, tmp_path):
    """An exported study, its key, and one rater's complete answers."""
    a, b = two_runs
    _, key_path = humaneval.export(a, b, 6, tmp_path / "study")
    key = json.loads(key_path.read_text())
    return key_path, key, answer_file(tmp_path / "r1.json", key, "r1", lambda i, blind: "A")


def score_cli(key_path, *answers, out=None):
    return main(["human-eval", "score", str(key_path), *map(str, answers), *(["--out", str(out)] if out else [])])


def test_each_rater_is_counted_once(study, tmp_path, capsys):
    key_path, key, r1 = study
    out = tmp_path / "scores" / "result.json"
    assert score_cli(key_path, r1, r1, out=out) == 2
    assert capsys.readouterr().err == f"mhs human-eval score: error: {r1} is given twice (each rater counts once): " \
                                      "drop the repeat\n"
    same_rater = answer_file(tmp_path / "r1-again.json", key, " R1 ", lambda i, blind: "B")
    assert score_cli(key_path, r1, same_rater, out=out) == 2
    assert capsys.readouterr().err == (
        f"mhs human-eval score: error: {same_rater}: rater ' R1 ' already answered in {r1} (each rater counts once): "
        "drop one file, or give each rater their own id\n")
    assert not out.exists() and not out.parent.exists()
    r2 = answer_file(tmp_path / "r2.json", key, "r2", lambda i, blind: "B")
    assert score_cli(key_path, r1, r2, out=out) == 0
    result = json.loads(out.read_text())  # --out into a missing folder: the folder is made
    assert set(result["raters"]) == {"r1", "r2"} and result["pooled"]["n"] == 12


ANSWERS_EXPECTED = 'the answers file the study page saves: {"study_id", "rater", "answers"}'
MALFORMED = {
    "a JSON list": (lambda key: b"[1, 2, 3]", "{path}: a JSON list, expected {expected}"),
    "a JSON string": (lambda key: b'"study_id rater answers"', "{path}: a JSON string, expected {expected}"),
    "binary bytes": (lambda key: bytes(range(256)),
                     "{path}: byte 128 is not UTF-8 (expected {expected}, a JSON file)"),
    "truncated JSON": (lambda key: json.dumps({"study_id": key["study_id"], "rater": "x"}).encode()[:-8],
                       "{path}, line 1: not valid JSON (Unterminated string starting at; expected {expected})"),
    "wrong key": (lambda key: json.dumps({"study": key["study_id"], "rater": "x", "answers": {}}).encode(),
                  "{path}: missing field 'study_id' (expected {expected})"),
    "another study": (lambda key: json.dumps({"study_id": "0123abcd", "rater": "x", "answers": {}}).encode(),
                      "{path}: answers to study 0123abcd, but the key is for study {study_id}"),
    "no items answered": (lambda key: json.dumps({"study_id": key["study_id"], "rater": "x", "answers": {}}).encode(),
                          "{path}, field 'answers': object {{}} (expected item id -> A, B or tie for at least one of "
                          "the 6 items)"),
    "answers a list": (lambda key: json.dumps({"study_id": key["study_id"], "rater": "x", "answers": ["A"]}).encode(),
                       "{path}, field 'answers': list ['A'] (expected item id -> A, B or tie for at least one of "
                       "the 6 items)"),
    "no rater id": (lambda key: json.dumps({"study_id": key["study_id"], "rater": " ", "answers": {}}).encode(),
                    "{path}, field 'rater': ' ' (expected the rater's name or id)"),
    "unknown item": (lambda key: json.dumps({"study_id": key["study_id"], "rater": "x",
                                             "answers": {"item-999": "A"}}).encode(),
                     "{path}, field 'answers.item-999': no such item in the key"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_foreign_or_malformed_answers_file_is_one_line(case, study, tmp_path, capsys):
    key_path, key, r1 = study
    content, expected = MALFORMED[case]
    bad = tmp_path / "answers.json"
    bad.write_bytes(content(key))
    out = tmp_path / "result.json"
    assert score_cli(key_path, r1, bad, out=out) == 2
    message = expected.format(path=bad, study_id=key["study_id"], expected=ANSWERS_EXPECTED)
    assert capsys.readouterr().err == f"mhs human-eval score: error: {message}\n"
    assert not out.exists()


def test_a_foreign_key_file_is_one_line(study, tmp_path, capsys):
    _, key, r1 = study
    expected = "the key.json that `mhs human-eval export` writes"
    for content, message in ((b"\x89PNG\r\n\x1a\n", f"byte 0 is not UTF-8 (expected {expected}, a JSON file)"),
                             (b'{"study_id": "x"}', f"missing field 'system_a' (expected {expected})"),
                             (r1.read_bytes(), f"missing field 'system_a' (expected {expected})")):
        bad_key = tmp_path / "key.json"
        bad_key.write_bytes(content)
        assert score_cli(bad_key, r1) == 2
        assert capsys.readouterr().err == f"mhs human-eval score: error: {bad_key}: {message}\n"
    assert score_cli(tmp_path / "no-key.json", r1) == 2
    assert capsys.readouterr().err == (f"mhs human-eval score: error: {tmp_path / 'no-key.json'}: cannot read "
                                       f"{expected} (No such file or directory)\n")
