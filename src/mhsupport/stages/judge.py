"""`mhs judge`: an LLM judge's pairwise preferences between two eval runs of the same seeded test
examples, or between the systems of one of the paper's human-evaluation tables (3, 5, 6), asked
in both orders, on the paper's question and on the helping skills and strategy adherence. Every
run also judges known pairs of ESConv replies (judge_validity.py) and says whether its judge is
good enough for its tables to count as evidence; `--known-pairs` judges only those."""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import torch

from omegaconf import DictConfig, OmegaConf

from mhsupport.errors import MhsError
from mhsupport.data.examples_io import read_examples
from mhsupport.evaluation import humaneval, judge, judge_results, judge_validity, llm
from mhsupport.evaluation.generations_io import read_generations
from mhsupport.evaluation.judge_scoring import OptionScorer, ReplyScorer
from mhsupport.modeling import devices, loading
from mhsupport.modeling.offline_cache import judge_gguf_path
from mhsupport.reporting.render import write_csv
from mhsupport.runs import artifacts
from mhsupport.settings.config import eval_config, load_config, prepare_data_config

log = logging.getLogger(__name__)
STAGE = "judge"
COMMAND = "mhs judge"
PROFILE_GROUPS = ("generator", "classifier")
REPORT = "judge.md"
VALIDITY = "validity.json"
VALIDITY_REQUESTS = "validity_requests.jsonl"
VALIDITY_JUDGEMENTS = "validity_judgements.jsonl"
JUDGE_ENDPOINT_KEYS = llm.EndpointKeys(base_url="endpoint.base_url", model="judge.model",
                                       api_key_env="endpoint.api_key_env", timeout="runtime.judge.timeout_s",
                                       what="judge endpoint")
# A local judge below this size is reported as a plumbing check (the judges that agree with humans
# in MT-Bench and ESC-Judge are models of tens of billions of parameters or hosted ones).
TRUSTED_PARAMETERS = 1_000_000_000


def check(cfg: DictConfig) -> None:
    j = cfg.judge
    if j.backend == "none":
        raise MhsError("judge.backend=none: no judge is configured; use --backend local (the offline judge of "
                       "`mhs models fetch judge=true`) or --backend openai --model NAME (a server at "
                       "endpoint.base_url, e.g. vLLM or llama.cpp's)")
    if sum([j.pair is not None, j.table is not None, bool(j.known_pairs)]) != 1:
        raise MhsError("mhs judge compares two eval runs (mhs judge RUN_A RUN_B), one of the paper's tables "
                       f"(--table {'|'.join(j.tables)}) or only the known pairs (--known-pairs): give exactly one")
    if j.backend == "local" and j.scoring.method == "reply_likelihood" and "overall" not in j.dimensions:
        raise MhsError(f"judge.dimensions={list(j.dimensions)}: judge.scoring.method=reply_likelihood scores each "
                       "reply, not an answer to a question, so it judges overall only; set judge.dimensions=[overall]")
    if j.backend == "local" and (len(j.scoring.options) != 2 or len(set(j.scoring.options)) != 2):
        raise MhsError(f"judge.scoring.options={list(j.scoring.options)}: expected two different tokens, e.g. "
                       "judge.scoring.options=[A,B]")
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
    """The prepared data (the known pairs' ESConv split) and a paper table's eval runs, found from this
    config (as the report finds its own)."""
    needs = {"prepare_data": ("prepare_data", prepare_data_config(cfg))}
    if cfg.judge.table is None:
        return needs
    return {**needs, **{f"row{i}/{side}": ("eval", eval_config(cfg, _dotted(row[side])))
                        for i, row in enumerate(judge.table_rows(cfg)) for side in ("a", "b")}}


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
    what = cfg.judge.table or ("known pairs" if cfg.judge.known_pairs else "pair")
    return f"judge {what} ({cfg.judge.backend}{', ' + cfg.judge.model if cfg.judge.model else ''})"


def build(cfg: DictConfig, run_: artifacts.Run, inputs: dict) -> None:
    j = cfg.judge
    if j.table is not None:
        rows = table_rows(cfg, inputs)
    elif j.pair is not None:
        rows = [pair_row(cfg, inputs["a"], inputs["b"])]
    else:
        rows = []
    v = j.validity
    known = judge_validity.known_pair_rows(read_examples(inputs["prepare_data"].path, "esconv", v.split),
                                           v.pairs_per_kind, v.seed, v.truncate_words, v.min_words)
    backend, model_name, note, loaded = load_backend(cfg)
    prompts = judge.Prompts.from_config(cfg)
    tie_band = j.scoring.tie_band if j.backend == "local" else None
    dimensions = judge.judged_dimensions(cfg)
    if dimensions != list(j.dimensions):
        log.info("judge: judge.scoring.method=reply_likelihood scores each reply, not an answer to a question: "
                 "judging overall only, not %s", ", ".join(d for d in j.dimensions if d not in dimensions))
    batch_size = j.scoring.batch_size if j.backend == "local" else cfg.decoding.batch_size
    with run_.build(seed=cfg.seed, resumable=True) as out:
        # The caches live in the resumable folder while the run is built (kept when it is interrupted)
        # and start from the answers of the run a --force rebuild replaces; the known pairs' also from
        # every other judge run's (the same pairs, asked of the same judge, have the same keys).
        cache = judge.RequestCache(out / artifacts.CHECKPOINTS / judge.REQUESTS, (run_.path / judge.REQUESTS,))
        validity_cache = judge.RequestCache(out / artifacts.CHECKPOINTS / VALIDITY_REQUESTS,
                                            tuple(sorted(run_.path.parent.glob(f"*/{VALIDITY_REQUESTS}"))))
        try:
            started = time.perf_counter()
            known_records = judge.judge_rows(known, ["overall"], prompts, backend, model_name, judge.parameters(cfg),
                                             validity_cache, j.max_tokens, batch_size, cfg.runtime.progress,
                                             tie_band)
            validity_seconds = time.perf_counter() - started
            started = time.perf_counter()
            records = judge.judge_rows(rows, dimensions, prompts, backend, model_name, judge.parameters(cfg),
                                       cache, j.max_tokens, batch_size, cfg.runtime.progress, tie_band)
            seconds = time.perf_counter() - started
        finally:
            cache.close()
            validity_cache.close()
        used = request_keys(records)
        unparseable = sum(v is None for r in records if r["verdicts"] for v in r["verdicts"].values())
        if unparseable:
            log.warning("judge: %d of %d answers had no verdict ([[A]], [[B]] or [[C]]): counted as unparseable",
                        unparseable, len(used))
        validity = {"split": v.split, "seed": v.seed, "truncate_words": v.truncate_words, "min_words": v.min_words,
                    **judge_validity.summary(known_records, known, j.length_match_ratio, v.bars),
                    "timing": timing(validity_seconds, len(request_keys(known_records)),
                                     validity_cache.loaded, validity_cache)}
        if not validity["evidence"]:
            log.warning("judge: %s", judge_results.validity_verdict(validity).strip("*"))
        agreement = human_agreements(cfg, rows, records)
        run_.metrics = {
            "mode": "table" if j.table else "pair" if j.pair else "known pairs", "table": j.table,
            "profile": cfg.generator.profile,
            "title": (j.tables[j.table].title if j.table else f"{rows[0].system_b} against {rows[0].system_a}"
                      if rows else f"Known pairs of the ESConv {v.split} split"),
            "signature": judge.signature(cfg, model_name, prompts), "note": note,
            "judge": {"backend": j.backend, "model": model_name, "temperature": j.temperature,
                      "max_tokens": j.max_tokens, "seed": j.seed, "prompt_sha256": prompts.sha256(),
                      "dimensions": dimensions, "scoring": OmegaConf.to_container(j.scoring),
                      "served_models": sorted(getattr(backend, "served_models", []))},
            "examples": j.examples, "example_seed": j.example_seed, "length_match_ratio": j.length_match_ratio,
            "requests": {"asked": len(used), "from_cache": len(used) - (len(cache.answers) - cache.loaded),
                         "sent": len(cache.answers) - cache.loaded, "unparseable": unparseable},
            "timing": timing(seconds, len(used), cache.loaded, cache),
            "validity": validity,
            "rows": [{"name": row.name, "system_a": row.system_a, "system_b": row.system_b, "run_a": row.run_a,
                      "run_b": row.run_b, "examples": len(row.pairs), "paper_win_pct": row.paper_win_pct,
                      "paper_loss_pct": row.paper_loss_pct, "human_agreement": agreement.get(row.name),
                      "dimensions": {d: judge_results.dimension_stats(
                          [r for r in records if r["row"] == row.name and r["dimension"] == d], j.length_match_ratio)
                          for d in dimensions}}
                     for row in rows],
        }
        run_.device = devices.describe(cfg.runtime, loaded) if loaded else None
        (out / judge.JUDGEMENTS).write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / VALIDITY_JUDGEMENTS).write_text("".join(json.dumps(r) + "\n" for r in known_records))
        (out / judge.REQUESTS).write_text("".join(json.dumps(cache.answers[key]) + "\n" for key in used))
        (out / VALIDITY_REQUESTS).write_text("".join(json.dumps(validity_cache.answers[key]) + "\n"
                                                     for key in request_keys(known_records)))
        (out / VALIDITY).write_text(json.dumps({"signature": run_.metrics["signature"], **validity}, indent=2) + "\n")
        if rows:
            write_csv(out / "judge.csv", judge_results.csv_rows(run_.metrics))
            judge_results.figure([run_.metrics], out / "judge")
        (out / REPORT).write_text(judge_results.run_markdown(run_.metrics, heading="#"))
    log.info("judge wrote %s", run_.path)


def request_keys(records: list[dict]) -> list[str]:
    """The distinct requests behind these records, in order."""
    return list(dict.fromkeys(key for r in records if r["request_keys"] for key in r["request_keys"].values()))


def timing(seconds: float, asked: int, loaded: int, cache: judge.RequestCache) -> dict:
    """Wall time of a judging pass and per pair judged (two requests, one per order), counting only
    the requests this run sent (cached answers take no time)."""
    sent = len(cache.answers) - loaded
    return {"seconds": round(seconds, 1), "requests": asked, "sent": sent,
            "seconds_per_pair": round(2 * seconds / sent, 2) if sent else None}


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
    started = time.perf_counter()
    model, tokenizer, name = local_judge_model(cfg)
    log.info("judge: %s loaded in %.0f s", name, time.perf_counter() - started)
    backend = (ReplyScorer(model, tokenizer, name, j.scoring.neutral_weight)
               if j.scoring.method == "reply_likelihood" else
               OptionScorer(model, tokenizer, tuple(j.scoring.options), j.scoring.answer_prefix, name))
    size = sum(p.numel() for p in model.parameters())
    note = (f"**The judge is {name}, a local model of {size / 1e6:.0f}M parameters: far too small to trust as a "
            "judge of support quality. This run checks the plumbing; its verdicts are not evidence.**"
            if size < TRUSTED_PARAMETERS else f"Local judge {name}, {size / 1e9:.1f}B parameters.")
    return backend, name, note, {"judge": model}


def local_judge_model(cfg: DictConfig):
    """(model, tokenizer, name) of the local judge in judge.scoring.dtype: judge.model as a .gguf file,
    a model folder or Hub id, or (null) the judge `mhs models fetch judge=true` keeps."""
    j = cfg.judge
    dtype = getattr(torch, j.scoring.dtype)
    placement = devices.Placement(devices.resolve(cfg.runtime), dtype)
    if j.model is None or str(j.model).endswith(".gguf"):
        if j.model is None:
            spec = load_config("models", [f"paths.models_dir={cfg.paths.models_dir}"]).judge_model
            gguf = judge_gguf_path(cfg.paths.models_dir, spec)
            name, fix, size = f"{spec.name} {spec.quantisation} (offline weights)", "mhs models fetch judge=true", \
                spec.size_bytes
        else:
            gguf, name, fix, size = Path(j.model).expanduser(), j.model, "judge.model=PATH of a whole .gguf file", None
        if not gguf.is_file():
            raise MhsError(f"the local judge's weights are not at {gguf}: run `{fix}`")
        if size is not None and gguf.stat().st_size != size:
            raise MhsError(f"{gguf} is {gguf.stat().st_size} bytes, not {size} (configs/models.yaml "
                           f"judge_model.size_bytes): damaged; run `{fix} force=true`")
        try:
            model, tokenizer = loading.load_gguf(gguf.parent, gguf.name, dtype)
        except (ValueError, OSError, KeyError, IndexError, struct.error) as err:  # what a damaged file raises
            raise MhsError(f"{gguf}: not a readable GGUF file ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                           f"run `{fix} force=true`") from None
    else:
        model, tokenizer = loading.load_causal_lm(OmegaConf.create({"source": "pretrained", "name_or_path": j.model}),
                                                  placement)
        name = j.model
    return devices.place(model, placement), tokenizer, name


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
