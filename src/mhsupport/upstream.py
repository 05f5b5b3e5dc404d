"""Finding the runs a stage builds on, from the same config (content-addressed)."""

from __future__ import annotations

from omegaconf import OmegaConf

from mhsupport import artifacts, devices
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


SHARED_KEYS = ("paths", "taxonomy", "data", "download", "seed")


def derived_config(stage: str, cfg, values: dict):
    """The config of an upstream stage: its defaults, with this config's shared keys and `values`
    (dotted key -> value or config node) put in, so it plans the same run its own command would."""
    from mhsupport.config import load_config

    derived = load_config(stage)
    OmegaConf.set_struct(derived, False)
    for key in SHARED_KEYS:
        if key in derived:
            derived[key] = cfg[key]
    for key, value in values.items():
        OmegaConf.update(derived, key, value, merge=False)
    for key in devices.RULE_KEYS:  # where models run is decided once, by the command the user ran
        if "runtime" in derived and key in cfg.get("runtime", {}):
            derived.runtime[key] = cfg.runtime[key]
    derived.force = False
    OmegaConf.set_struct(derived, True)
    return derived


def require_complete(run: artifacts.Run, command: str) -> artifacts.Run:
    if not run.complete:
        raise MhsError(f"no {run.stage} run for this config (expected {run.path}): run `{command}` first")
    return run


def profile_overrides(cfg, group: str) -> list[str]:
    """`group.key=value` for every setting of cfg[group] that differs from its profile's defaults."""
    from mhsupport.config import load_config

    default = OmegaConf.to_container(load_config(f"train_{'generator' if group == 'generator' else 'classifier'}",
                                                 [f"{group}={cfg[group].profile}"])[group])
    current = OmegaConf.to_container(cfg[group])
    return [f"{group}.{k}={v}" for k, v in current.items() if default.get(k) != v]


def check_dataset_and_tag_set(cfg) -> None:
    """The training-data and label-set options shared by the generator and the classifier."""
    if cfg.dataset not in ("esconv", "unified"):
        raise MhsError(f"dataset={cfg.dataset!r}: expected esconv or unified")
    if cfg.tag_set not in ("category", "strategy"):
        raise MhsError(f"tag_set={cfg.tag_set!r}: expected category or strategy")
    if cfg.tag_set == "strategy" and cfg.dataset != "esconv":
        raise MhsError("tag_set=strategy (the 8 ESConv strategies) needs dataset=esconv: EPITOME has no such labels")
