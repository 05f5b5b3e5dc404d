"""The stage graph: who imports whom, planning once, content-addressed downstream runs,
checked upstream outputs, and hints that find the run when followed literally."""

from __future__ import annotations

import ast
import json
import logging
import shlex
import shutil
from pathlib import Path

import pytest

from mhsupport import pipeline
from mhsupport.runs import artifacts
from mhsupport.cli import build_parser, flag_overrides
from mhsupport.settings.config import generator_config, load_config, prepare_data_config
from mhsupport.errors import MhsError
from mhsupport.stages import prepare_data

SRC = Path(pipeline.__file__).resolve().parent
GEN = ["generator=tiny", "generator.train_subset=48", "generator.valid_subset=8", "generator.save_steps=1000"]
EVAL = [*GEN, "classifier=tiny", "test_subset=8", "decoding.max_new_tokens=4", "bootstrap.resamples=20",
        "runtime.progress=false"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_stage_module_imports_another_stage_or_the_graph():
    for path in (SRC / "stages").glob("*.py"):
        imported = imported_modules(path)
        assert not {name for name in imported if name.startswith("mhsupport.stages.")}, path.name
        assert "mhsupport.pipeline" not in imported and "mhsupport.stages" not in imported, path.name


def test_only_the_graph_and_the_cli_know_the_stages():
    users = {path.name for path in SRC.rglob("*.py") if path.parent.name != "stages"
             and any(name.startswith("mhsupport.stages") for name in imported_modules(path))}
    assert users <= {"pipeline.py", "cli.py"}, users


@pytest.fixture(scope="module")
def own_artifacts(tmp_path_factory, make_cfg):
    """A tiny generator and an eval of it in an artifacts folder of this module's own: the tests
    here rebuild and damage runs."""
    folder = tmp_path_factory.mktemp("pipeline") / "artifacts"
    eval_cfg = make_cfg("eval", *EVAL, artifacts=folder)
    graph = pipeline.Pipeline()
    graph.ensure("eval", eval_cfg)
    return folder, eval_cfg


def test_upstream_force_makes_the_downstream_eval_a_new_run(own_artifacts, make_cfg):
    folder, eval_cfg = own_artifacts
    before = pipeline.Pipeline().plan("eval", eval_cfg)
    assert before.complete
    forced = generator_config(eval_cfg)
    forced.force = True
    pipeline.run("train_generator", forced)
    after = pipeline.Pipeline().plan("eval", eval_cfg)
    assert after.run_id != before.run_id and not after.complete
    result = pipeline.Pipeline().ensure("eval", eval_cfg)
    assert not result.skipped and result.run.path == after.path


def test_a_replaced_model_file_is_detected_and_named(own_artifacts, caplog):
    folder, eval_cfg = own_artifacts
    generator_run = pipeline.Pipeline().plan("train_generator", generator_config(eval_cfg))
    weights = generator_run.path / "model" / "model.safetensors"
    saved = weights.read_bytes()
    other = bytearray(saved)
    other[-1] ^= 0xFF  # same size, other content: the full hash catches it
    weights.write_bytes(bytes(other))
    try:
        with pytest.raises(MhsError) as caught:
            pipeline.Pipeline().ensure("eval", eval_cfg)
        message = str(caught.value)
        assert "\n" not in message and str(generator_run.path) in message and "model/model.safetensors" in message
        assert "mhs train dialogpt --profile tiny" in message and "--force" in message
        weights.write_bytes(saved[:-10])  # truncated: the size alone tells
        with pytest.raises(MhsError, match="differs from the run's manifest"):
            pipeline.Pipeline().ensure("eval", eval_cfg)
    finally:
        weights.write_bytes(saved)
    assert pipeline.Pipeline().ensure("eval", eval_cfg).skipped  # restored: the same run again


def test_a_missing_output_file_is_named(own_artifacts):
    folder, eval_cfg = own_artifacts
    data_run = pipeline.Pipeline().plan("prepare_data", prepare_data_config(eval_cfg))
    parquet = data_run.path / "examples" / "esconv" / "test.parquet"
    moved = parquet.with_suffix(".moved")
    parquet.rename(moved)
    try:
        with pytest.raises(MhsError, match=r"examples/esconv/test\.parquet is missing; rebuild it with `mhs prepare-data"):
            pipeline.Pipeline().ensure("eval", eval_cfg)
    finally:
        moved.rename(parquet)


def test_a_run_built_by_other_code_is_reported_with_force(own_artifacts, caplog):
    folder, eval_cfg = own_artifacts
    generator_run = pipeline.Pipeline().plan("train_generator", generator_config(eval_cfg))
    manifest_path = generator_run.path / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["code_version"] = "0.0.1+git.elsewhere"
    manifest_path.write_text(json.dumps(manifest))
    try:
        with caplog.at_level(logging.WARNING):
            pipeline.Pipeline().ensure("eval", eval_cfg)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("0.0.1+git.elsewhere" in w and "--force" in w for w in warnings), warnings
    finally:
        manifest_path.write_text(original)


def test_report_plans_prepare_data_once_and_lists_every_missing_run(make_cfg, tmp_path, monkeypatch):
    calls = []
    real = prepare_data.file_inputs
    monkeypatch.setattr(prepare_data, "file_inputs", lambda cfg: calls.append(1) or real(cfg))
    cfg = make_cfg("report", "generator=tiny", "classifier=tiny", artifacts=tmp_path / "empty")
    with pytest.raises(MhsError) as caught:
        pipeline.Pipeline().plan("report", cfg)
    assert len(calls) == 1
    commands = [line.strip() for line in str(caught.value).splitlines()[1:]]
    assert commands[0].startswith("mhs prepare-data")
    kinds = [" ".join(c.split()[:3]) if c.startswith("mhs train") else " ".join(c.split()[:2]) for c in commands]
    # every likelihood is read where the replies were generated: the passes and the untagged evals
    assert {k: kinds.count(k) for k in set(kinds)} == {"mhs prepare-data": 1, "mhs train dialogpt": 4,
                                                       "mhs train classifier": 2, "mhs generate": 2,
                                                       "mhs eval": 11}


def test_a_systems_likelihood_comes_from_its_replies_run_only_where_it_scored_the_same_examples(make_cfg):
    from mhsupport.stages.report import likelihood_source
    from omegaconf import open_dict

    system = make_cfg("eval", "generator=tiny", "classifier=tiny", "strategy_tag=true")
    stage, cfg = likelihood_source(system)
    assert stage == "generate" and cfg.score_references and cfg.test_subset == system.test_subset
    untagged = make_cfg("eval", "generator=tiny", "classifier=tiny")
    assert likelihood_source(untagged) == ("eval", untagged)
    for cfg in (system, untagged):
        with open_dict(cfg):
            cfg.test_subset = cfg.test_subset + 1  # the likelihood budget no longer matches the replies' examples
        assert likelihood_source(cfg)[0] == "likelihood"


def cli_config(command: str):
    """The stage and config a command line gives, exactly as `mhs` builds them."""
    words = shlex.split(command)
    assert words[0] == "mhs"
    args = build_parser().parse_args(words[1:])
    return args.stage, load_config(args.stage, flag_overrides(args) + list(args.overrides))


def run_identity(cfg) -> dict:
    """What decides a run's folder: its result config and where runs are written."""
    return {"config": artifacts.result_config(cfg), "artifacts_dir": cfg.paths.artifacts_dir,
            "raw_dir": cfg.paths.raw_dir}


@pytest.mark.parametrize("extra", [
    [],
    ["seed=3", "data.max_context_turns=4", "generator.learning_rate=0.002"],
    ["classifier=cpu", "classifier_run.context_turns=2", "tag_set=strategy", "strategy_tag=true", "sampler=oracle"],
    ["generator=tiny", "dataset=unified", "strategy_tag=true", "sampler=classifier",
     "llm.system_prompt='Be kind, brief: one line.'", "decoding.seeds=[0,1]", "test_subset=null",
     "decoding.guidance_scale=2.5", "decoding.guidance_tokens=3"],
    ["strategy_tag=true", "runtime.bf16=false", "runtime.device=cpu"],  # precision is in run ids, the device not
])
def test_every_hint_followed_literally_finds_the_same_run(make_cfg, tmp_path, extra):
    cfg = make_cfg("eval", *extra, artifacts=tmp_path / "nothing")

    def upstream(stage, stage_cfg) -> dict:  # every run under this one, directly or through others
        runs = {}
        for s, c in pipeline.STAGES[stage].requires(stage_cfg).values():
            runs.update({**upstream(s, c), pipeline.node_key(s, c): (s, c)})
        return runs

    needed = list(upstream("eval", cfg).values())
    with pytest.raises(MhsError) as caught:
        pipeline.Pipeline().plan("eval", cfg)
    hinted = [line.strip() for line in str(caught.value).splitlines()[1:]]
    assert len(hinted) == len({pipeline.node_key(stage, c) for stage, c in needed})
    for command in hinted:
        stage, rebuilt = cli_config(command)
        assert any(stage == s and run_identity(rebuilt) == run_identity(c) for s, c in needed), command
    stage, rebuilt = cli_config(pipeline.command("eval", cfg))
    assert stage == "eval" and run_identity(rebuilt) == run_identity(cfg)


def test_guidance_switched_off_leaves_run_ids_as_before_it_existed(make_cfg):
    off = artifacts.result_config(make_cfg("eval", "strategy_tag=true", "decoding.guidance_scale=0",
                                           "decoding.guidance_tokens=0"))
    assert not {"guidance_scale", "guidance_tokens"} & set(off["decoding"])
    assert artifacts.result_config(make_cfg("eval", "strategy_tag=true", "decoding.guidance_scale=0",
                                            "decoding.guidance_tokens=4")) == off
    on = artifacts.result_config(make_cfg("eval", "strategy_tag=true", "decoding.guidance_scale=2",
                                          "decoding.guidance_tokens=4"))
    assert on["decoding"] == {**off["decoding"], "guidance_scale": 2.0, "guidance_tokens": 4}


def test_a_copied_artifacts_folder_is_still_up_to_date(own_artifacts, make_cfg, tmp_path):
    """mtimes change when a folder is copied: the full hash decides, and the runs stay valid."""
    folder, eval_cfg = own_artifacts
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copyfile)
    assert pipeline.Pipeline().ensure("eval", make_cfg("eval", *EVAL, artifacts=copy)).skipped


def test_an_up_to_date_eval_needs_no_raw_files(own_artifacts, make_cfg, tmp_path):
    folder, _ = own_artifacts
    cfg = make_cfg("eval", *EVAL, f"paths.raw_dir={tmp_path / 'moved-away'}", artifacts=folder)
    assert pipeline.Pipeline().ensure("eval", cfg).skipped
    with pytest.raises(MhsError, match=r"moved-away \(from .*\): no such folder"):
        pipeline.run("prepare_data", prepare_data_config(cfg))


def test_reproduce_checks_every_setting_before_building_anything(make_cfg, tmp_path):
    cfg = make_cfg("report", "generator=tiny", "classifier=tiny", "significance_metrics=[bleu,bertscore]",
                   artifacts=tmp_path / "artifacts")
    with pytest.raises(MhsError, match=r"significance_metrics=\['bleu', 'bertscore'\]: expected a non-empty list"):
        pipeline.reproduce(cfg)
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("value", ["/tmp/a b\\c", "ends with \\", "it's 'quoted'", "1e-3", "true", "x=y,z", "[a]"])
def test_a_hinted_string_reads_back_as_itself(value, make_cfg):
    cfg = make_cfg("train_generator", "generator=tiny")
    cfg.generator.system_prompt = value
    stage, rebuilt = cli_config(pipeline.command("train_generator", cfg))
    assert stage == "train_generator" and rebuilt.generator.system_prompt == value
