"""Composing a stage's config from configs/ with Hydra's compose API."""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from mhsupport.errors import MhsError

# paths.<key> -> the environment variable that sets it (configs/paths/default.yaml)
PATH_VARIABLES = {"raw_dir": "MHS_RAW_DIR", "artifacts_dir": "MHS_ARTIFACTS_DIR", "models_dir": "MHS_MODELS_DIR"}
# In a checkout this is a link to the top-level configs/; in a wheel, a copy of it.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# Nodes that take keys the config files do not list (`trainer`: any TrainingArguments argument), so
# `trainer.max_steps=3` adds the key as Hydra's `++trainer.max_steps=3` would; each with the stages
# whose configs have it (elsewhere such a key would be added and then read by nothing).
OPEN_NODES = {"trainer": ("train_generator", "train_classifier")}


def load_config(stage: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The stage's config with Hydra overrides applied, every interpolation resolved (a fresh copy
    the caller may change)."""
    check_overrides(overrides, multirun=False)
    environment = tuple(os.environ.get(name) for name in (*PATH_VARIABLES.values(), "HOME"))
    return copy.deepcopy(_composed(stage, tuple(open_node_overrides(overrides, stage)), environment))


def open_node_overrides(overrides, stage: str) -> list[str]:
    """Overrides of an open node (OPEN_NODES, e.g. trainer.*) may add keys: Hydra's `++`. A stage
    without the node refuses them."""
    opened = []
    for override in overrides:
        node = next((n for n in OPEN_NODES if override.lstrip("+").startswith(f"{n}.")), None)
        if node is None:
            opened.append(override)
        elif stage not in OPEN_NODES[node]:
            raise MhsError(f"{override}: the {stage} config has no {node} node (Trainer arguments belong to "
                           "`mhs train dialogpt` and `mhs train classifier`, and the runs they train are not "
                           "looked up from here); drop it")
        else:
            opened.append(f"++{override.lstrip('+')}")
    return opened


@functools.lru_cache(maxsize=256)
def _composed(stage: str, overrides: tuple[str, ...], environment: tuple) -> DictConfig:
    """Hydra's compose, once per stage, overrides and path variables in a process: planning a
    report derives about fifty configs, and each compose takes a fifth of a second."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name=stage, overrides=list(overrides), return_hydra_config=True)
        searchpath = list(cfg.hydra.searchpath)
        with open_dict(cfg):
            del cfg["hydra"]
        return finish_config(cfg, searchpath)
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(f"config for '{stage}'", err) from None


def composition_error(what: str, err: Exception) -> MhsError:
    """Hydra's or OmegaConf's error as one line; a config file not found names the options."""
    if isinstance(err, MissingConfigException):
        options = f" (options: {', '.join(err.options)})" if err.options else ""
        return MhsError(f"{what}: {str(err).splitlines()[0]}{options}; a folder of your own configs joins the "
                        "packaged ones with hydra.searchpath=[file:///abs/folder]")
    return MhsError(f"{what}: {' '.join(str(err).split())}")


def finish_config(cfg: DictConfig, searchpath: list[str]) -> DictConfig:
    """A composed config (without its hydra node) made ready for a stage: every interpolation
    resolved, the config folders it was composed from (`hydra.searchpath`) kept in paths.searchpath
    so that the configs derived from it and the commands in hints find them, and then read-only in
    its structure; its folder settings checked. Raises omegaconf's errors."""
    OmegaConf.resolve(cfg)
    if "paths" in cfg:
        cfg.paths.searchpath = searchpath
    OmegaConf.set_struct(cfg, True)
    check_paths(cfg)
    return cfg


def searchpath_overrides(cfg: DictConfig) -> list[str]:
    """The override that composes a config from the same config folders as `cfg` (none if only the
    packaged ones)."""
    folders = list(cfg.get("paths", {}).get("searchpath") or [])
    quoted = [folder if re.fullmatch(r"[\w\-./:]+", folder) else "'" + folder.replace("'", "\\'") + "'"
              for folder in folders]
    return [f"hydra.searchpath=[{','.join(quoted)}]"] if folders else []


def check_overrides(overrides, multirun: bool) -> None:
    """Refuse, in one line, the overrides that would be read and then ignored: Hydra's own settings
    outside a sweep (except hydra.searchpath), hydra.run.* (runs go to content-addressed folders) and
    paths.searchpath (which hydra.searchpath sets)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise MhsError(f"{err}".replace("\n", " ")) from None
    for override in parsed:
        key, line = override.key_or_group, override.input_line
        if key == "paths.searchpath":
            raise MhsError(f"{line}: the config folders are given with hydra.searchpath, e.g. "
                           "hydra.searchpath=[file:///abs/my_configs]")
        if key.startswith("hydra.run.") or key == "hydra.run":
            raise MhsError(f"{line}: every run is written to its own content-addressed folder under "
                           "paths.artifacts_dir; to put runs elsewhere set paths.artifacts_dir=DIR (or MHS_ARTIFACTS_DIR)")
        if (key == "hydra" or key.startswith(("hydra.", "hydra/"))) and key != "hydra.searchpath" and not multirun:
            raise MhsError(f"{line}: Hydra's own settings (launcher, sweep dir) apply to a sweep: add -m "
                           "(without it only hydra.searchpath is read)")


@functools.lru_cache(maxsize=32)
def default_choice(stage: str, group: str) -> str:
    """The option a stage's config picks for a config group by default (e.g. its profile)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=stage, return_hydra_config=True).hydra.runtime.choices[group]


# --- the configs of upstream stages -------------------------------------------------------
#
# A downstream config (eval, report, chat) implies the configs of the runs it builds on: the
# upstream stage's defaults with the shared keys and the choices below put in, so they plan the
# same runs as the upstream stage's own command with the same options. A derived config whose
# stage has budgets (eval, likelihood) is composed with the profile of the generator it scores.

SHARED_KEYS = ("paths", "taxonomy", "strategy_words", "data", "download", "seed", "subset_seed")


def derive(stage: str, cfg: DictConfig, values: dict | None = None, profile: str | None = None) -> DictConfig:
    """`stage`'s config (of `profile`, or its default one) with this config's shared keys and runtime
    settings and `values` (dotted key -> value or node) put in; never forced."""
    derived = load_config(stage, ([f"profile={profile}"] if profile else []) + searchpath_overrides(cfg))
    OmegaConf.set_struct(derived, False)
    for key in SHARED_KEYS:
        if key in derived and key in cfg:
            derived[key] = cfg[key]
    for key in derived.get("runtime", {}):
        if key in cfg.get("runtime", {}):
            derived.runtime[key] = cfg.runtime[key]
    for key, value in (values or {}).items():
        OmegaConf.update(derived, key, value, merge=False)
    derived.force = False
    OmegaConf.set_struct(derived, True)
    return derived


def prepare_data_config(cfg: DictConfig) -> DictConfig:
    return derive("prepare_data", cfg)


def generator_config(cfg: DictConfig) -> DictConfig:
    """The `mhs train dialogpt` config of the generator an eval or chat config uses."""
    return derive("train_generator", cfg, {
        "generator": cfg.generator, "dataset": cfg.dataset, "strategy_tag": cfg.strategy_tag,
        "tag_set": cfg.tag_set, "tags_in_history": cfg.tags_in_history})


def classifier_config(cfg: DictConfig, mode: str) -> DictConfig:
    """The `mhs train classifier` config of the next-category classifier (mode next_category) or the
    response recogniser (mode response) an eval or chat config uses."""
    chosen = cfg.classifier_run
    dataset = chosen.dataset if mode == "next_category" else "unified"
    if cfg.tag_set == "strategy":
        dataset = "esconv"
    return derive("train_classifier", cfg, {
        "classifier": cfg.classifier, "mode": mode, "tag_set": cfg.tag_set, "dataset": dataset,
        "context_turns": chosen.context_turns, "history_categories": chosen.history_categories,
        "class_weighting": chosen.class_weighting})


def likelihood_config(cfg: DictConfig) -> DictConfig:
    """The `mhs likelihood` config of the generator an eval config scores (its sampler plays no part:
    the reference is scored under every tag), with the likelihood budgets of its generator's profile."""
    return derive("likelihood", cfg, {
        "generator": cfg.generator, "dataset": cfg.dataset, "strategy_tag": cfg.strategy_tag, "tag_set": cfg.tag_set,
        "tags_in_history": cfg.tags_in_history, "generator_source": cfg.generator_source,
        "test_subset_seed": cfg.test_subset_seed, "bootstrap": cfg.bootstrap}, profile=cfg.generator.profile)


def generation_config(cfg: DictConfig) -> DictConfig:
    """The `mhs generate` config of the generation pass a tagged eval config selects its replies
    from: the same generator, test examples, decoding and recogniser (its sampler plays no part)."""
    return derive("generate", cfg, {
        "generator": cfg.generator, "dataset": cfg.dataset, "strategy_tag": cfg.strategy_tag, "tag_set": cfg.tag_set,
        "tags_in_history": cfg.tags_in_history, "classifier": cfg.classifier, "classifier_run": cfg.classifier_run,
        "test_subset": cfg.test_subset, "test_subset_seed": cfg.test_subset_seed, "decoding": cfg.decoding,
        "tag_adherence": cfg.tag_adherence, "bootstrap": cfg.bootstrap}, profile=cfg.generator.profile)


def _shared_with(stage: str, cfg: DictConfig, own: tuple[str, ...]) -> dict:
    """The keys of `cfg` that `stage`'s config (of cfg's generator profile) also has, less `own`
    (the keys the derived config's caller chooses)."""
    shared = load_config(stage, [f"profile={cfg.generator.profile}", *searchpath_overrides(cfg)])
    return {key: cfg[key] for key in shared if key in cfg and key not in ("force", *own)}


def eval_config(cfg: DictConfig, values: dict) -> DictConfig:
    """The eval config of one system of the report or of a judge table: the eval config of that
    config's generator profile with every setting the two share (models, scoring, seeds, paths,
    runtime) and the system's choices (dotted key -> value, e.g. "llm.prompt") put in; the system
    is a fine-tuned generator unless it says otherwise."""
    return derive("eval", cfg, {**_shared_with("eval", cfg, own=("generator_source",)), **values},
                  profile=cfg.generator.profile)


def judge_config(report_cfg: DictConfig, table: str, seed: int) -> DictConfig:
    """The `mhs judge --table` config of one of the paper's human-evaluation tables that a report
    shows: every setting the report shares with the judge's config, judging the evals of one
    training seed."""
    return derive("judge", report_cfg, {**_shared_with("judge", report_cfg, own=()), "judge.table": table,
                                        "judge.pair": None, "seed": seed}, profile=report_cfg.generator.profile)


def check_paths(cfg: DictConfig) -> None:
    """An empty folder setting would mean the working directory (runs written beside the code):
    refused, naming the variable or key that is empty."""
    for key, variable in PATH_VARIABLES.items():
        if key in cfg.get("paths", {}) and not str(cfg.paths[key]).strip():
            source = (f"{variable} is set but empty" if variable in os.environ and not os.environ[variable].strip()
                      else f"paths.{key} is empty")
            raise MhsError(f"{source}: set it to a folder, or unset it for the default "
                           "(configs/paths/default.yaml)")
