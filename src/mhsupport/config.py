"""Composing a stage's config from configs/ with Hydra's compose API."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mhsupport.errors import MhsError

# paths.<key> -> the environment variable that sets it (configs/paths/default.yaml)
PATH_VARIABLES = {"raw_dir": "MHS_RAW_DIR", "artifacts_dir": "MHS_ARTIFACTS_DIR", "models_dir": "MHS_MODELS_DIR"}
# In a checkout this is a link to the top-level configs/; in a wheel, a copy of it.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_config(stage: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The stage's config with Hydra overrides applied, every interpolation resolved."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name=stage, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise MhsError(f"config for '{stage}': {err}".replace("\n", " ")) from None
    OmegaConf.set_struct(cfg, True)
    check_paths(cfg)
    return cfg


def check_paths(cfg: DictConfig) -> None:
    """An empty folder setting would mean the working directory (runs written beside the code):
    refused, naming the variable or key that is empty."""
    for key, variable in PATH_VARIABLES.items():
        if key in cfg.get("paths", {}) and not str(cfg.paths[key]).strip():
            source = (f"{variable} is set but empty" if variable in os.environ and not os.environ[variable].strip()
                      else f"paths.{key} is empty")
            raise MhsError(f"{source}: set it to a folder, or unset it for the default "
                           "(configs/paths/default.yaml)")
