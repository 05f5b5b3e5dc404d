"""Finding the runs a stage builds on, from the same config (content-addressed)."""

from __future__ import annotations

from omegaconf import OmegaConf

from mhsupport import artifacts
from mhsupport.errors import MhsError

PREPARE_DATA_KEYS = ("paths", "taxonomy", "data", "download", "force")


def prepare_data_run(cfg) -> artifacts.Run:
    """The prepare-data run that this config's data settings make; an error naming the command
    to run when it is not there."""
    from mhsupport.stages import prepare_data

    data_cfg = OmegaConf.masked_copy(cfg, list(PREPARE_DATA_KEYS))
    run = prepare_data.plan(data_cfg)
    if not run.complete:
        overrides = data_overrides(cfg)
        raise MhsError(f"no prepare-data run for this config (expected {run.path}): "
                       f"run `mhs prepare-data{' ' + ' '.join(overrides) if overrides else ''}` first")
    return run


def data_overrides(cfg) -> list[str]:
    """The `data.*` settings that differ from the defaults, as overrides for the hint above."""
    from mhsupport.config import load_config

    default = OmegaConf.to_container(load_config("prepare_data").data)
    current = OmegaConf.to_container(cfg.data)
    return [f"data.{k}={v}" for k, v in current.items() if default.get(k) != v]
