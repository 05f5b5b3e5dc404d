"""mhs prepare-data on slices of the real data, on the full data, and on broken inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mhsupport.cli import main
from mhsupport.settings.config import load_config
from mhsupport.data.examples_io import read_examples
from mhsupport import pipeline

CATEGORIES = ["Comforting", "Exploration", "Action", "Others"]
README_STRATEGY_COUNTS = {
    "Question": 3801, "Others": 3341, "Providing Suggestions": 2954, "Affirmation and Reassurance": 2827,
    "Self-disclosure": 1713, "Reflection of feelings": 1436, "Information": 1215, "Restatement or Paraphrasing": 1089,
}


def run_dirs(artifacts_dir: Path) -> list[Path]:
    stage_dir = artifacts_dir / "prepare_data"
    return sorted(stage_dir.iterdir()) if stage_dir.exists() else []


def test_slice_writes_examples_stats_and_manifest(prepare_cfg):
    result = pipeline.run("prepare_data", prepare_cfg())
    out = result.run.path
    assert not result.skipped and (out / "manifest.json").is_file()
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["esconv"]) == {"train", "valid", "test"}
    for split in ("train", "valid", "test"):
        assert list(stats["esconv"][split]) == ["turns", "examples"]
        assert list(stats["esconv"][split]["turns"]) == CATEGORIES
        assert list(stats["epitome"][split]) == CATEGORIES
        esconv = read_examples(out, "esconv", split)
        unified = read_examples(out, "unified", split)
        assert len(esconv) == sum(stats["esconv"][split]["examples"].values())
        assert len(unified) == len(esconv) + sum(stats["epitome"][split].values())
        assert {e["split"] for e in unified} <= {split}
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"esconv/train.json", "esconv/valid.json", "esconv/test.json",
                                       "epitome/emotional-reactions-reddit.csv", "epitome/explorations-reddit.csv",
                                       "epitome/interpretations-reddit.csv"}
    assert "examples/unified/train.parquet" in manifest["outputs"]
    assert "Paper Table 1" in (out / "stats.md").read_text()


def test_example_context_is_preceding_turns_most_recent_last(prepare_cfg, raw_slice):
    first = json.loads((raw_slice / "esconv" / "train.json").read_text().splitlines()[0])
    out = pipeline.run("prepare_data", prepare_cfg("data.max_context_turns=3")).run.path
    examples = [e for e in read_examples(out, "esconv", "train") if e["conversation_id"] == "esconv-train-0000"]
    supporter_turns = [i for i, t in enumerate(first["dialog"]) if t["speaker"] == "sys" and i > 0]
    assert [e["turn_index"] for e in examples] == supporter_turns
    example = examples[3]
    i = example["turn_index"]
    assert example["response"] == " ".join(first["dialog"][i]["text"].split())
    assert example["strategy"] == first["dialog"][i]["strategy"]
    assert [t["text"] for t in example["context"]] == [" ".join(t["text"].split()) for t in first["dialog"][i - 3:i]]
    assert example["context"][-1]["speaker"] == {"usr": "seeker", "sys": "supporter"}[first["dialog"][i - 1]["speaker"]]


def test_epitome_examples_take_the_seeker_post_as_context(prepare_cfg):
    out = pipeline.run("prepare_data", prepare_cfg()).run.path
    reddit = [e for s in ("train", "valid", "test") for e in read_examples(out, "unified", s) if e["source"] == "epitome"]
    assert len(reddit) == 40
    assert all(len(e["context"]) == 1 and e["context"][0]["speaker"] == "seeker" for e in reddit)
    assert all(e["strategy"].startswith("emotional_reactions=") for e in reddit)


def test_second_run_is_a_no_op_and_force_rebuilds(prepare_cfg, artifacts_dir, capsys):
    first = pipeline.run("prepare_data", prepare_cfg())
    stamp = (first.run.path / "manifest.json").stat().st_mtime_ns
    second = pipeline.run("prepare_data", prepare_cfg())
    assert second.skipped and second.run.path == first.run.path
    assert (first.run.path / "manifest.json").stat().st_mtime_ns == stamp
    assert main(["prepare-data", f"--raw-dir={prepare_cfg().paths.raw_dir}",
                 f"paths.artifacts_dir={artifacts_dir}"]) == 0
    assert "up to date" in capsys.readouterr().out
    forced = pipeline.run("prepare_data", prepare_cfg("force=true"))
    assert not forced.skipped and forced.run.path == first.run.path
    assert (first.run.path / "manifest.json").stat().st_mtime_ns != stamp
    assert len(run_dirs(artifacts_dir)) == 1  # no temporary or old directories left


def test_changed_config_or_input_gives_a_new_run(prepare_cfg, raw_slice, artifacts_dir):
    a = pipeline.run("prepare_data", prepare_cfg()).run
    b = pipeline.run("prepare_data", prepare_cfg("data.max_context_turns=4")).run
    with open(raw_slice / "esconv" / "test.json", "a") as f:
        f.write("\n")  # same content for the parser, different bytes
    c = pipeline.run("prepare_data", prepare_cfg()).run
    assert len({a.run_id, b.run_id, c.run_id}) == 3
    assert prepare_cfg().paths.artifacts_dir == str(artifacts_dir)


def test_print_config_shows_resolved_values_and_writes_nothing(raw_slice, artifacts_dir, capsys):
    assert main(["prepare-data", "--print-config", f"--raw-dir={raw_slice}",
                 f"paths.artifacts_dir={artifacts_dir}", "data.max_context_turns=7"]) == 0
    printed = capsys.readouterr().out
    assert f"raw_dir: {raw_slice}" in printed and "max_context_turns: 7" in printed
    assert not artifacts_dir.exists()


def test_environment_variables_choose_the_directories(raw_slice, tmp_path, monkeypatch):
    monkeypatch.setenv("MHS_RAW_DIR", str(raw_slice))
    monkeypatch.setenv("MHS_ARTIFACTS_DIR", str(tmp_path / "elsewhere"))
    cfg = load_config("prepare_data")
    assert cfg.paths.raw_dir == str(raw_slice)
    assert pipeline.run("prepare_data", cfg).run.path.parent == (tmp_path / "elsewhere" / "prepare_data").resolve()


@pytest.mark.parametrize("variable", ["MHS_ARTIFACTS_DIR", "MHS_RAW_DIR", "MHS_MODELS_DIR"])
def test_an_empty_directory_variable_is_an_error_not_the_working_directory(variable, raw_slice, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MHS_RAW_DIR", str(raw_slice))
    monkeypatch.setenv(variable, "")
    before = sorted(tmp_path.rglob("*"))
    assert main(["prepare-data"]) == 2
    assert capsys.readouterr().err == (f"mhs prepare-data: error: {variable} is set but empty: set it to a folder, "
                                       "or unset it for the default (configs/paths/default.yaml)\n")
    assert sorted(tmp_path.rglob("*")) == before


def test_an_empty_directory_override_names_the_key(raw_slice, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MHS_ARTIFACTS_DIR", raising=False)
    assert main(["prepare-data", f"--raw-dir={raw_slice}", "paths.artifacts_dir="]) == 2
    assert capsys.readouterr().err == ("mhs prepare-data: error: paths.artifacts_dir is empty: set it to a folder, "
                                       "or unset it for the default (configs/paths/default.yaml)\n")
    assert list(tmp_path.iterdir()) == [raw_slice]


def test_unknown_override_is_a_clear_error(capsys):
    assert main(["prepare-data", "data.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_single_upstream_file_is_split_by_conversation_with_recorded_seed(prepare_cfg, raw_slice):
    conversations = []
    for split in ("train", "valid", "test"):
        path = raw_slice / "esconv" / f"{split}.json"
        conversations += [json.loads(line) for line in path.read_text().splitlines()]
        path.unlink()
    (raw_slice / "esconv" / "ESConv.json").write_text(json.dumps(conversations, indent=1))
    result = pipeline.run("prepare_data", prepare_cfg("data.esconv_split_seed=3"))
    manifest = json.loads((result.run.path / "manifest.json").read_text())
    assert manifest["seed"] == 3 and "esconv/ESConv.json" in manifest["inputs"]
    ids = {s: {e["conversation_id"] for e in read_examples(result.run.path, "esconv", s)} for s in ("train", "valid", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["valid"])
    assert 20 <= len(ids["train"]) <= 29 and len(ids["test"]) >= 3


@pytest.mark.slow
def test_full_real_data(real_raw_dir, artifacts_dir):
    cfg = load_config("prepare_data", [f"paths.raw_dir={real_raw_dir}", f"paths.artifacts_dir={artifacts_dir}"])
    stats = pipeline.run("prepare_data", cfg).run.read_json("stats.json")
    assert stats["raw_totals"]["esconv_supporter_turns"] == 18376
    assert stats["raw_totals"]["esconv_conversations"] == 1300
    assert stats["raw_totals"]["esconv_strategies"] == README_STRATEGY_COUNTS
    assert stats["raw_totals"]["epitome_pairs"] == 3023
    assert stats["raw_totals"]["epitome_seeker_posts"] == 2979
    assert sum(sum(stats["epitome"][s].values()) for s in stats["epitome"]) == 3023
    # the given split shares two situation texts between train and test; those test conversations go
    assert [d["conversation_id"] for d in stats["dropped_for_leakage"]] == ["esconv-test-0114", "esconv-test-0188"]
    kept_turns = sum(sum(stats["esconv"][s]["turns"].values()) for s in stats["esconv"])
    dropped_turns = 18376 - kept_turns
    assert 0 < dropped_turns < 60
    # every supporter turn but a conversation's opening one becomes an example (683 open with one)
    examples = sum(sum(stats["esconv"][s]["examples"].values()) for s in stats["esconv"])
    assert kept_turns - examples <= 683
    assert stats["table1"]["primary"] == {"Comforting": 5976 + 663, "Exploration": 4890 + 401,
                                          "Action": 4169 + 1274, "Others": 3341 + 685}
