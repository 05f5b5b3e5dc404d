"""Composing a stage's config from configs/ with Hydra's compose API."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mhsupport.errors import MhsError

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
    return cfg
