"""Reading an eval run's generations.jsonl: `mhs compare` (and everything else that reads it)
gets one line naming the file, the line and the command that rebuilds a damaged run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mhsupport import pipeline
from mhsupport.cli import main
from mhsupport.evaluation.generations_io import GENERATIONS, read_generations

GEN = ["generator=tiny", "generator.train_subset=48", "generator.valid_subset=12", "strategy_tag=true"]
EVAL = [*GEN, "test_subset=12", "bootstrap.resamples=20", "decoding.max_new_tokens=8", "tag_adherence=false",
        "runtime.progress=false", "sampler=random"]
GENERIC_HINT = "rebuild the run with the `mhs eval` command that made it, with --force (its settings: {run}/config.yaml)"


@pytest.fixture(scope="module")
def eval_run(make_cfg, prepared):
    pipeline.run("train_generator", make_cfg("train_generator", *GEN))
    return pipeline.Pipeline().ensure("eval", make_cfg("eval", *EVAL)).run.path


def damaged(eval_run: Path, tmp_path: Path, change) -> Path:
    """A copy of the eval run with its generations.jsonl changed."""
    copy = tmp_path / "eval" / eval_run.name
    shutil.copytree(eval_run, copy)
    change(copy / GENERATIONS)
    return copy


def drop_key(key):
    def change(path):
        lines = path.read_text().splitlines()
        record = json.loads(lines[4])
        del record[key]
        lines[4] = json.dumps(record)
        path.write_text("\n".join(lines) + "\n")
    return change


CASES = {
    "missing file": (lambda p: p.unlink(), "{path} not found; " + GENERIC_HINT),
    "empty file": (lambda p: p.write_text(""), "{path} is empty; " + GENERIC_HINT),
    "truncated last line": (lambda p: p.write_text(p.read_text()[:p.read_text().rindex('"conversation_id"') + 22]),
                            "{path}, line 12: not a JSON object (Unterminated string starting at; the file is "
                            "truncated or damaged); " + GENERIC_HINT),
    "a line that is not an object": (lambda p: p.write_text("[1, 2]\n" + p.read_text()),
                                     "{path}, line 1: a JSON list, expected one object per generation; " + GENERIC_HINT),
    "missing key": (drop_key("response"), "{path}, line 5: missing key(s) 'response'; " + GENERIC_HINT),
    "binary bytes": (lambda p: p.write_bytes(b"\x00\xff\xfe" * 20), "{path}: byte 1 is not UTF-8 (the file is damaged); "
                     + GENERIC_HINT),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compare_on_a_damaged_run_is_one_line_naming_file_line_and_fix(case, eval_run, tmp_path, capsys):
    change, expected = CASES[case]
    bad = damaged(eval_run, tmp_path, change)
    out = tmp_path / "results" / "compare.json"
    assert main(["compare", str(eval_run), str(bad), "--resamples", "20", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    message = expected.format(path=bad / GENERATIONS, run=bad)
    assert err == f"mhs compare: error: {message}\n"
    assert not out.exists() and not out.parent.exists()


def test_the_hint_is_the_recorded_mhs_eval_command_with_force(eval_run, tmp_path, capsys):
    bad = damaged(eval_run, tmp_path, lambda p: p.write_text(""))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["command"] = ["/home/me/.venv/bin/mhs", "eval", "--profile", "tiny", "--strategy-tag", "--sampler",
                           "random", "test_subset=12", "--force"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert main(["compare", str(bad), str(eval_run)]) == 2
    assert capsys.readouterr().err == (f"mhs compare: error: {bad / GENERATIONS} is empty; rebuild the run with "
                                       "`mhs eval --force --profile tiny --strategy-tag --sampler random test_subset=12`\n")


def test_a_folder_that_is_no_eval_run_is_named(eval_run, prepared, tmp_path, capsys):
    generator_run = next((prepared[1] / "train_generator").iterdir())
    assert main(["compare", str(eval_run), str(generator_run)]) == 2
    assert capsys.readouterr().err == (f"mhs compare: error: {generator_run / GENERATIONS} not found: {generator_run} "
                                       "is a train_generator run, expected an `mhs eval` run directory\n")
    assert main(["compare", str(tmp_path / "nowhere"), str(eval_run)]) == 2
    assert capsys.readouterr().err == (f"mhs compare: error: {tmp_path / 'nowhere'}: no such directory (expected an "
                                       "`mhs eval` run directory, artifacts/eval/<run_id>)\n")


def test_compare_out_into_a_missing_folder_creates_it(eval_run, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "compare.json"
    assert main(["compare", str(eval_run), str(eval_run), "--resamples", "20", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["a"] == result["b"] == str(eval_run) and result["tests"]["bleu"]["delta"] == 0.0
    assert main(["compare", str(eval_run), str(eval_run), "--resamples", "20", "--out", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"mhs compare: error: --out {tmp_path / 'new'} is a folder: give a file name, e.g. "
        f"{tmp_path / 'new' / 'result.json'}")


def test_reading_keeps_one_seed_and_refuses_an_absent_one(eval_run):
    lines = read_generations(eval_run)
    assert len(lines) == 12 and {line["seed"] for line in lines} == {0}
    with pytest.raises(Exception, match=r"no generations for decoding seed 7 \(the run has seeds \[0\]\)"):
        read_generations(eval_run, seed=7)
