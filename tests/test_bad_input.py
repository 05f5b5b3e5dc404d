"""Every broken raw input exits non-zero with one message naming file, place, field and
expectation, and leaves no run directory behind. Harmless quirks are accepted."""

from __future__ import annotations

import csv
import io
import json

import pytest

from mhsupport.cli import main
from mhsupport.data.examples_io import read_examples
from mhsupport import pipeline

ER = "epitome/emotional-reactions-reddit.csv"
EX = "epitome/explorations-reddit.csv"


def edit_line(path, index, change):
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[index] = change(lines[index])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def edit_turn(index, change):
    def edit(line):
        record = json.loads(line)
        change(record["dialog"][index])
        return json.dumps(record)
    return edit


def edit_record(change):
    def edit(line):
        record = json.loads(line)
        change(record)
        return json.dumps(record)
    return edit


def set_csv_field(row, column, value):
    """Rewrite one data row of an EPITOME file (row 1 = the first row under the header)."""
    def apply(path):
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
        rows[row][rows[0].index(column)] = value
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        path.write_text(out.getvalue(), encoding="utf-8")
    return apply


CASES = {
    "missing file": (lambda raw: (raw / EX).unlink(), ["explorations-reddit.csv", "not found"]),
    "empty file": (lambda raw: (raw / "esconv/valid.json").write_text(""), ["valid.json", "file is empty"]),
    "malformed JSON line": (lambda raw: edit_line(raw / "esconv/train.json", 2, lambda l: l[:-5]),
                            ["train.json, line 3", "malformed JSON", "one JSON object per line"]),
    "not a conversation": (lambda raw: edit_line(raw / "esconv/test.json", 0, lambda l: "[1, 2]"),
                           ["test.json, line 1", "not a conversation", "'situation' and 'dialog'"]),
    "missing field": (lambda raw: edit_line(raw / "esconv/train.json", 1, edit_record(lambda r: r.pop("dialog"))),
                      ["train.json, line 2, field 'dialog'", "missing field"]),
    "unknown speaker": (lambda raw: edit_line(raw / "esconv/train.json", 0,
                                              edit_turn(2, lambda t: t.update(speaker="bot"))),
                        ["train.json, line 1, field 'dialog[2].speaker'", "'bot'", "'usr' or 'sys'"]),
    "supporter turn without strategy": (
        lambda raw: edit_line(raw / "esconv/train.json", 0, edit_turn(1, lambda t: t.pop("strategy"))),
        ["train.json, line 1, field 'dialog[1].strategy'", "without strategy", "8 ESConv strategies"]),
    "unknown strategy": (
        lambda raw: edit_line(raw / "esconv/valid.json", 4, edit_turn(1, lambda t: t.update(strategy="Empathy"))),
        ["valid.json, line 5, field 'dialog[1].strategy'", "unknown strategy 'Empathy'", "Question"]),
    "empty text": (lambda raw: edit_line(raw / "esconv/train.json", 0, edit_turn(0, lambda t: t.update(text="  "))),
                   ["train.json, line 1, field 'dialog[0].text'", "empty text"]),
    "CSV missing a column": (
        lambda raw: (raw / ER).write_text((raw / ER).read_text().replace("response_post,", "response,", 1)),
        ["emotional-reactions-reddit.csv, line 1, field 'response_post'", "missing column"]),
    "level outside 0-2": (set_csv_field(5, "level", "3"),
                          ["explorations-reddit.csv, line 6, row 5, field 'level'", "'3'", "0, 1 or 2"]),
    "non-UTF-8 bytes": (lambda raw: (raw / "esconv/test.json").write_bytes(
        (raw / "esconv/test.json").read_bytes().replace(b"\n", b"\n\xff\xfe", 1)),
        ["test.json, line 2", "not UTF-8", "UTF-8 text"]),
    "EPITOME pair sets differ": (set_csv_field(7, "rp_id", "zzzzzzz"),
                                 ["explorations-reddit.csv", "same (sp_id, rp_id) pairs", "zzzzzzz"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_with_one_located_message_and_no_run(case, raw_slice, artifacts_dir, capsys):
    break_it, expected_parts = CASES[case]
    break_it(raw_slice / EX if case in ("level outside 0-2", "EPITOME pair sets differ") else raw_slice)
    code = main(["prepare-data", f"--raw-dir={raw_slice}", f"paths.artifacts_dir={artifacts_dir}",
                 "download.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for part in expected_parts:
        assert part in err, f"{part!r} not in {err!r}"
    assert not (artifacts_dir / "prepare_data").exists() or not any((artifacts_dir / "prepare_data").iterdir())


def test_crlf_bom_blank_lines_and_trailing_whitespace_are_accepted(prepare_cfg, raw_slice, tmp_path):
    clean = pipeline.run("prepare_data", prepare_cfg()).run.path
    path = raw_slice / "esconv" / "train.json"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(l + "   " for l in lines).encode() + b"\r\n\r\n")
    er = raw_slice / ER
    er.write_bytes(b"\xef\xbb\xbf" + er.read_bytes().replace(b"\n", b"\r\n"))
    quirky = pipeline.run("prepare_data", prepare_cfg()).run.path
    assert quirky != clean  # different bytes, so a different run
    for dataset, split in (("esconv", "train"), ("unified", "train")):
        assert read_examples(quirky, dataset, split) == read_examples(clean, dataset, split)


def test_duplicate_epitome_rows_take_the_maximum_level(prepare_cfg, raw_slice):
    path = raw_slice / EX
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    level_at = rows[0].index("level")
    rows[1][level_at] = "0"
    rows.append(list(rows[1]))
    rows[-1][level_at] = "2"
    rows.append(list(rows[1]))  # a third copy, lower again: the maximum still wins
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    path.write_text(out.getvalue(), encoding="utf-8")
    run_dir = pipeline.run("prepare_data", prepare_cfg()).run.path
    examples = [e for s in ("train", "valid", "test") for e in read_examples(run_dir, "unified", s)
                if e["conversation_id"] == rows[1][0] and e["source"] == "epitome"]
    assert len(examples) == 1 and "explorations=2" in examples[0]["strategy"]
