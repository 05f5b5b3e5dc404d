"""mhs chat in JSON mode with tiny models: categories per reply, the safety screen in front (a tiny
random BERT as its encoder, thresholds above 1 so that the pattern layer decides), a flagged reply
replaced with the fallback, and a chat that refuses to start without the screen's weights."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mhsupport.errors import MhsError
from mhsupport.safety import CRISIS_REPLY, FALLBACK_REPLY
from mhsupport import chat
from mhsupport import pipeline

GEN = ["generator=tiny", "generator.train_subset=64", "generator.valid_subset=16", "strategy_tag=true"]
CLF = ["classifier=tiny", "classifier.train_subset=200"]
SCREEN = ["safety.seeker_threshold=1.01", "safety.reply_threshold=1.01"]
MESSAGES = ["Hi, I have been feeling down since I lost my job.", "I want to kill myself",
            "This homework is killing me though."]


@pytest.fixture(scope="module")
def encoder(tiny_encoder, tmp_path_factory) -> list[str]:
    """Overrides that point the safety screen at the tiny encoder, its exemplar cache in a temporary folder."""
    return [f"safety.encoder={tiny_encoder}", f"paths.models_dir={tmp_path_factory.mktemp('models')}",
            "safety.everyday_seeker=40", "safety.everyday_replies=40"]


@pytest.fixture(scope="module")
def trained(make_cfg, prepared):
    pipeline.run("train_generator", make_cfg("train_generator", *GEN))
    pipeline.run("train_classifier", make_cfg("train_classifier", *CLF))
    return prepared


def test_json_chat_flags_risk_and_names_categories(make_cfg, trained, encoder):
    out = io.StringIO()
    replies = chat.run(make_cfg("chat", *GEN, *CLF, *encoder, *SCREEN, "max_new_tokens=8"),
                       lines=io.StringIO("\n".join(MESSAGES) + "\n"), out=out, json_mode=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert replies == 3 and [r["message"] for r in rows] == MESSAGES
    assert rows[1]["flagged"] and rows[1]["reply"] == CRISIS_REPLY and rows[1]["category"] is None
    for row in (rows[0], rows[2]):
        assert not row["flagged"] and row["category"] in ("Comforting", "Exploration", "Action", "Others")
        assert row["reply"] not in (CRISIS_REPLY, FALLBACK_REPLY) and not row["reply_flagged"]
    assert not any(row["weaker_screen"] for row in rows)


def test_a_flagged_reply_is_replaced_and_logged(make_cfg, trained, encoder, caplog):
    """A reply threshold of 0 flags every generated reply: each is replaced with the fallback."""
    out = io.StringIO()
    with caplog.at_level("WARNING", logger="mhsupport.chat"):
        chat.run(make_cfg("chat", *GEN, *CLF, *encoder, *SCREEN, "safety.reply_threshold=0.0", "max_new_tokens=8"),
                 lines=io.StringIO("I feel low today\nI want to kill myself\n"), out=out, json_mode=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[0]["reply"] == FALLBACK_REPLY and rows[0]["reply_flagged"] and rows[0]["reply_reasons"]
    assert rows[1]["reply"] == CRISIS_REPLY and not rows[1]["reply_flagged"]  # the crisis reply is not screened
    assert [r.getMessage() for r in caplog.records] == [
        f"mhs chat: the reply screen flagged the generated reply ({', '.join(rows[0]['reply_reasons'])}): replaced "
        "with the safe fallback"]


def test_the_pattern_layer_alone_says_so_on_every_turn(make_cfg, trained, capsys):
    out = io.StringIO()
    chat.run(make_cfg("chat", *GEN, *CLF, "safety.patterns_only=true", "max_new_tokens=4"),
             lines=io.StringIO("hello\nI want to kill myself\n"), out=out, json_mode=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["flagged"], r["weaker_screen"]) for r in rows] == [(False, True), (True, True)]
    assert capsys.readouterr().err.splitlines().count(chat.WEAKER_SCREEN) == 2


def test_chat_refuses_to_start_without_the_screen_weights(mhs_env, trained, tmp_path):
    done = subprocess.run([str(Path(sys.executable).parent / "mhs"), "chat", "--profile", "tiny", "--strategy-tag",
                           "--json", *GEN[1:3], f"paths.models_dir={tmp_path}"],
                          input="hello\n", capture_output=True, text=True, env=mhs_env())
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip().splitlines() == [
        f"mhs chat: error: the safety screen's weights are missing ({tmp_path}/all-mpnet-base-v2/"
        "all-mpnet-base-v2): run `mhs models fetch`"]


def test_chat_command_reads_stdin(mhs_env, trained, encoder):
    done = subprocess.run([str(Path(sys.executable).parent / "mhs"), "chat", "--profile", "tiny", "--strategy-tag",
                           "--sampler", "random", "--json", *GEN[1:3], *CLF[1:], *encoder, *SCREEN,
                           "max_new_tokens=6"],
                          input="I can't sleep at night\nI have been cutting myself\n", capture_output=True,
                          text=True, env=mhs_env())
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["flagged"] for r in rows] == [False, True]


def test_oracle_and_untagged_samplers_are_refused(make_cfg, trained, encoder):
    with pytest.raises(MhsError, match="gold labels"):
        chat.run(make_cfg("chat", *GEN, *encoder, "sampler=oracle"), lines=io.StringIO(""), out=io.StringIO())
    with pytest.raises(MhsError, match="accepts only --sampler none"):
        chat.run(make_cfg("chat", *GEN[:3], *encoder, "sampler=random"), lines=io.StringIO(""), out=io.StringIO())


def chat_command(mhs_env, trained, encoder, stdin, **options):
    """`mhs chat --json` as a user runs it; returns the finished process and the artifacts' files before and after."""
    before = sorted(p for p in trained[1].rglob("*"))
    done = subprocess.run([str(Path(sys.executable).parent / "mhs"), "chat", "--profile", "tiny", "--strategy-tag",
                           "--sampler", "random", "--json", *GEN[1:3], *encoder, *SCREEN, "max_new_tokens=6"],
                          stdin=stdin, capture_output=True, env=mhs_env(), **options)
    return done, before, sorted(p for p in trained[1].rglob("*"))


def test_bytes_that_are_not_utf8_are_replaced_with_one_warning(mhs_env, trained, encoder, tmp_path):
    messages = tmp_path / "messages.txt"
    messages.write_bytes(b"I feel low \xff\xfe today\n\xc3\nI want to kill my self\n")
    with open(messages, "rb") as stdin:
        done, before, after = chat_command(mhs_env, trained, encoder, stdin)
    err = done.stderr.decode()
    assert done.returncode == 0, err[-2000:]
    rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [r["message"] for r in rows] == ["I feel low \ufffd\ufffd today", "\ufffd", "I want to kill my self"]
    assert [r["flagged"] for r in rows] == [False, False, True]
    warnings = [line for line in err.splitlines() if "not UTF-8" in line]
    assert warnings == ["mhs chat: warning: a stdin line is not UTF-8 (byte 0xff at offset 11); such bytes are read "
                        "as U+FFFD", "mhs chat: warning: a stdin line is not UTF-8 (byte 0xc3 at offset 0); such "
                        "bytes are read as U+FFFD"]
    assert "Traceback" not in err and before == after


def test_closed_stdin_is_one_line_and_exit_2(mhs_env, trained, encoder):
    done, before, after = chat_command(mhs_env, trained, encoder, None, preexec_fn=lambda: os.close(0))
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b""
    assert err.strip().splitlines()[-1] == (
        "mhs chat: error: standard input is closed: pipe seeker messages in (one per line, e.g. "
        "`echo 'I feel low' | mhs chat --json`) or run `mhs chat` in a terminal")
    assert "Traceback" not in err and before == after
