"""`mhs judge`: an LLM judge's pairwise preferences between two eval runs of the same seeded test
examples, or between the systems of one of the paper's human-evaluation tables (3, 5, 6), asked
in both orders, on the paper's question and on the helping skills and strategy adherence."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mhsupport.errors import MhsError
from mhsupport.evaluation import humaneval, judge, judge_results, llm
from mhsupport.evaluation.generations_io import read_generations
from mhsupport.modeling import devices, loading
from mhsupport.reporting.render import write_csv
from mhsupport.runs import artifacts
from mhsupport.settings.config import eval_config, load_config

log = logging.getLogger(__name__)
STAGE = "judge"
COMMAND = "mhs judge"
PROFILE_GROUPS = ("generator", "classifier")
REPORT = "judge.md"
JUDGE_ENDPOINT_KEYS = llm.EndpointKeys(base_url="endpoint.base_url", model="judge.model",
                                       api_key_env="endpoint.api_key_env", timeout="runtime.judge.timeout_s",
                                       what="judge endpoint")
# A local judge below this size is reported as a plumbing check (the judges that agree with humans
# in MT-Bench and ESC-Judge are models of tens of billions of parameters or hosted ones).
TRUSTED_PARAMETERS = 1_000_000_000


def check(cfg: DictConfig) -> None:
    j = cfg.judge
    if j.backend == "none":
        raise MhsError("judge.backend=none: no judge is configured; use --backend openai --model NAME (a server at "
                       "endpoint.base_url, e.g. vLLM or llama.cpp's) or --backend local")
    if (j.pair is None) == (j.table is None):
        raise MhsError("mhs judge compares two eval runs (mhs judge RUN_A RUN_B) or one of the paper's tables "
                       f"(--table {'|'.join(j.tables)}): give exactly one")
    if j.pair is not None and len(j.pair) != 2:
        raise MhsError(f"judge.pair={list(j.pair)}: expected two eval run folders, [RUN_A, RUN_B]")
    if j.table is not None and j.table not in j.tables:
        raise MhsError(f"judge.table={j.table!r}: expected one of {list(j.tables)} (configs/judge.yaml judge.tables)")
    unknown = [d for d in j.dimensions if d not in judge.DIMENSIONS or d not in j.prompts.questions]
    if unknown or not j.dimensions or len(set(j.dimensions)) != len(j.dimensions):
        raise MhsError(f"judge.dimensions={list(j.dimensions)}: expected distinct names from {list(judge.DIMENSIONS)}, "
                       "e.g. judge.dimensions=[overall]")
    if j.backend == "openai" and not j.model:
        raise MhsError("judge.backend=openai needs the name of the model the server serves: --model NAME")
    if j.backend == "local" and j.temperature != 0:
        raise MhsError(f"judge.temperature={j.temperature}: the local judge decodes greedily; set judge.temperature=0")
    if j.table is not None and cfg.llm.backend == "local" and cfg.generator.family != "chat_template" and any(
            "llm" == system.get("generator_source") for row in judge.table_rows(cfg) for system in (row["a"], row["b"])):
        raise MhsError(f"{j.table} prompts a chat model, and the {cfg.generator.profile} profile's base model is not one "
                       "(llm.backend=local): use --profile cpu, or llm.backend=openai")
    for i, study in enumerate(j.human_studies):
        if not isinstance(study, DictConfig) or not study.get("key") or not study.get("answers"):
            raise MhsError(f"judge.human_studies[{i}]: expected {{key: key.json, answers: [answers.json, ...]}} "
                           "(--human KEY ANSWERS...)")
    if j.human_studies and "overall" not in j.dimensions:
        raise MhsError("judge.human_studies: raters answered the paper's question; add overall to judge.dimensions")


def requires(cfg: DictConfig) -> dict:
    """A paper table's eval runs, found from this config (as the report finds its own)."""
    if cfg.judge.table is None:
        return {}
    return {f"row{i}/{side}": ("eval", eval_config(cfg, _dotted(row[side])))
            for i, row in enumerate(judge.table_rows(cfg)) for side in ("a", "b")}


def given_inputs(cfg: DictConfig) -> dict:
    """What a user names by path: the two eval runs of a pair, and the human studies' files (hashed
    into the run id, so new answers make a new run)."""
    inputs = {}
    if cfg.judge.pair is not None:
        inputs["a"] = artifacts.open_run(cfg.judge.pair[0], "eval", "RUN_A")
        inputs["b"] = artifacts.open_run(cfg.judge.pair[1], "eval", "RUN_B")
        if inputs["a"].path == inputs["b"].path:
            raise MhsError(f"RUN_A and RUN_B are the same eval run ({inputs['a'].path}): give two systems' runs")
    for i, study in enumerate(cfg.judge.human_studies):
        for j, path in enumerate([study.key, *study.answers]):
            if not Path(path).is_file():
                raise MhsError(f"judge.human_studies[{i}]: {path} not found (expected the key.json of `mhs human-eval "
                               "export` and the raters' answer files)")
            inputs[f"human{i}/{j}"] = Path(path).resolve()
    return inputs


def _dotted(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def label(cfg: DictConfig) -> str:
    return f"judge {cfg.judge.table or 'pair'} ({cfg.judge.backend}{', ' + cfg.judge.model if cfg.judge.model else ''})"


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    j = cfg.judge
    rows = table_rows(cfg, inputs) if j.table is not None else [pair_row(cfg, inputs["a"], inputs["b"])]
    backend, model_name, note, loaded = load_backend(cfg)
    prompts = judge.Prompts.from_config(cfg)
    batch_size = cfg.decoding.batch_size
    with run_.build(seed=cfg.seed, resumable=True) as out:
        # The cache lives in the resumable folder while the run is built (kept when it is interrupted)
        # and starts from the answers of the run a --force rebuild replaces.
        cache = judge.RequestCache(out / artifacts.CHECKPOINTS / judge.REQUESTS, (run_.path / judge.REQUESTS,))
        try:
            records = judge.judge_rows(rows, list(j.dimensions), prompts, backend, model_name, judge.parameters(cfg),
                                       cache, j.max_tokens, batch_size, cfg.runtime.progress)
        finally:
            cache.close()
        used = [key for r in records if r["request_keys"] for key in r["request_keys"].values()]
        unparseable = sum(v is None for r in records if r["verdicts"] for v in r["verdicts"].values())
        if unparseable:
            log.warning("judge: %d of %d answers had no verdict ([[A]], [[B]] or [[C]]): counted as unparseable",
                        unparseable, len(used))
        agreement = human_agreements(cfg, rows, records)
        run_.metrics = {
            "mode": "table" if j.table else "pair", "table": j.table, "profile": cfg.generator.profile,
            "title": j.tables[j.table].title if j.table else f"{rows[0].system_b} against {rows[0].system_a}",
            "signature": judge.signature(cfg, model_name, prompts), "note": note,
            "judge": {"backend": j.backend, "model": model_name, "temperature": j.temperature,
                      "max_tokens": j.max_tokens, "seed": j.seed, "prompt_sha256": prompts.sha256(),
                      "dimensions": list(j.dimensions),
                      "served_models": sorted(getattr(backend, "served_models", []))},
            "examples": j.examples, "example_seed": j.example_seed, "length_match_ratio": j.length_match_ratio,
            "requests": {"asked": len(used), "from_cache": len(used) - (len(cache.answers) - cache.loaded),
                         "sent": len(cache.answers) - cache.loaded, "unparseable": unparseable},
            "rows": [{"name": row.name, "system_a": row.system_a, "system_b": row.system_b, "run_a": row.run_a,
                      "run_b": row.run_b, "examples": len(row.pairs), "paper_win_pct": row.paper_win_pct,
                      "paper_loss_pct": row.paper_loss_pct, "human_agreement": agreement.get(row.name),
                      "dimensions": {d: judge_results.dimension_stats(
                          [r for r in records if r["row"] == row.name and r["dimension"] == d], j.length_match_ratio)
                          for d in j.dimensions}}
                     for row in rows],
        }
        run_.device = devices.describe(cfg.runtime, loaded) if loaded else None
        (out / judge.JUDGEMENTS).write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / judge.REQUESTS).write_text("".join(json.dumps(cache.answers[key]) + "\n" for key in dict.fromkeys(used)))
        write_csv(out / "judge.csv", judge_results.csv_rows(run_.metrics))
        judge_results.figure([run_.metrics], out / "judge")
        (out / REPORT).write_text(judge_results.run_markdown(run_.metrics, heading="#"))
    log.info("judge wrote %s", run_.path)


def system_name(run: artifacts.Run) -> str:
    return run.read_metrics().get("system", run.run_id)


def pair_row(cfg: DictConfig, run_a: artifacts.Run, run_b: artifacts.Run) -> judge.Row:
    a, b = system_name(run_a), system_name(run_b)
    pairs = judge.paired_examples(read_generations(run_a.path), read_generations(run_b.path), f"RUN_A {run_a.path}",
                                  f"RUN_B {run_b.path}", cfg.judge.examples, cfg.judge.example_seed)
    return judge.Row(f"{b} vs {a}", a, b, run_a.run_id, run_b.run_id, pairs)


def table_rows(cfg: DictConfig, inputs: dict) -> list[judge.Row]:
    rows = []
    for i, spec in enumerate(judge.table_rows(cfg)):
        row = pair_row(cfg, inputs[f"row{i}/a"], inputs[f"row{i}/b"])
        row.name, row.paper_win_pct, row.paper_loss_pct = spec["name"], spec["paper_win_pct"], spec["paper_loss_pct"]
        rows.append(row)
    return rows


def load_backend(cfg: DictConfig):
    """(backend, the judge model's name, a note on trusting it, the local models loaded)."""
    j = cfg.judge
    if j.backend == "openai":
        backend = llm.OpenAIChatBackend(cfg.endpoint.base_url, j.model, cfg.endpoint.api_key_env,
                                        cfg.runtime.judge.timeout_s, cfg.runtime.judge.max_retries,
                                        cfg.runtime.judge.concurrency, JUDGE_ENDPOINT_KEYS, temperature=j.temperature,
                                        seed=j.seed)
        return backend, j.model, "", {}
    if j.model is None:  # the offline profile's SmolLM2-135M-Instruct
        model_cfg = load_config("train_generator", ["generator=offline", f"paths.models_dir={cfg.paths.models_dir}"]).generator
        name = f"{Path(model_cfg.gguf_file).stem} (offline weights)"
    elif str(j.model).endswith(".gguf"):
        model_cfg = OmegaConf.create({"source": "gguf", "model_dir": str(Path(j.model).parent),
                                      "gguf_file": Path(j.model).name})
        name = j.model
    else:
        model_cfg = OmegaConf.create({"source": "pretrained", "name_or_path": j.model})
        name = j.model
    model, tokenizer = loading.load_causal_lm(model_cfg, devices.inference(cfg.runtime))
    backend = llm.LocalChatBackend(model, tokenizer, model.config.max_position_embeddings - j.max_tokens, name)
    size = sum(p.numel() for p in model.parameters())
    note = (f"**The judge is {name}, a local model of {size / 1e6:.0f}M parameters: far too small to trust as a "
            "judge of support quality. This run checks the plumbing; its verdicts are not evidence.**"
            if size < TRUSTED_PARAMETERS else f"Local judge {name}, {size / 1e9:.1f}B parameters.")
    return backend, name, note, {"judge": model}


def human_agreements(cfg: DictConfig, rows: list[judge.Row], records: list[dict]) -> dict[str, dict]:
    """Judge-human agreement per row that a human study compared (by its two runs, in either order)."""
    found = {}
    for i, study in enumerate(cfg.judge.human_studies):
        key, per_rater = humaneval.rater_outcomes(Path(study.key), [Path(p) for p in study.answers])
        runs = (Path(key.get("run_a", "")).name, Path(key.get("run_b", "")).name)
        row = next((r for r in rows if {r.run_a, r.run_b} == set(runs)), None)
        if row is None and cfg.judge.table is not None:  # a study of another table's pair (the report passes all)
            log.info("human study %s compares no row of %s; not used here", study.key, cfg.judge.table)
            continue
        if row is None:
            raise MhsError(f"judge.human_studies[{i}] ({study.key}): its runs {runs[0]} and {runs[1]} are not "
                           f"a pair this judge run compares ({', '.join(f'{r.run_a} / {r.run_b}' for r in rows)})")
        flip = {"a": "b", "b": "a", "tie": "tie"} if runs[0] == row.run_b else {"a": "a", "b": "b", "tie": "tie"}
        items = key["items"]
        human = {rater: {(items[item]["conversation_id"], items[item]["turn_index"]): flip[outcome]
                         for item, outcome in outcomes.items()} for rater, outcomes in per_rater.items()}
        if row.name in found:
            raise MhsError(f"judge.human_studies[{i}] ({study.key}): a second study of {row.name}; score both "
                           "raters' answers in one study")
        overall = [r for r in records if r["row"] == row.name and r["dimension"] == "overall"]
        found[row.name] = {"study": str(study.key), **judge_results.human_agreement(overall, human)}
    return found
