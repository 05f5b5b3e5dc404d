"""`-m`/`--multirun`: a sweep over Hydra overrides, expanded and launched by Hydra itself.

Hydra composes the stage's config (in multirun mode), its sweeper expands the sweep grammar
(`a=1,2`, `range(...)`, `choice(...)`, `glob(...)`) into jobs, and the launcher chosen with
`hydra/launcher=basic|joblib|submitit_local|submitit_slurm` runs each job through `run_job`. A job
is one content-addressed run of the command's own stage function: a run already built is up to
date, not rebuilt. A job that fails returns its one-line error, so the others still run; the
sweep ends with one table of every job's overrides, run, status and headline metrics.
"""

from __future__ import annotations

import functools
import logging
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mhsupport import preemption
from mhsupport.errors import MhsError
from mhsupport.settings.config import (CONFIG_DIR, check_overrides, composition_error, finish_config,
                                      open_node_overrides)

log = logging.getLogger(__name__)
# Hydra's per-job folders (.hydra/ configs, job logs, submitit's logs) go beside the runs, not into
# the working directory; `hydra.sweep.dir=...` puts them elsewhere.
SWEEP_DIR = "hydra.sweep.dir=${paths.artifacts_dir}/multirun/${now:%Y-%m-%d_%H-%M-%S}"
BUILT, UP_TO_DATE, FAILED, PREEMPTED = "built", "up to date", "failed", "preempted"


@dataclass
class Job:
    overrides: list[str]
    status: str
    run: str = ""
    metrics: str = ""
    error: str = ""


def multirun(stage: str, overrides: list[str], execute, headline) -> list[Job]:
    """Every job of the sweep that `overrides` describe, run by the configured launcher.
    execute(cfg) -> StageResult and headline(result) -> str must be module-level functions (a
    launcher may pickle them into another process)."""
    check_overrides(overrides, multirun=True)
    overrides = open_node_overrides(overrides, stage)
    if not any(o.lstrip("+").startswith("hydra.sweep.dir=") for o in overrides):
        overrides = [SWEEP_DIR, *overrides]
    task = functools.partial(run_one, execute, headline)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), job_name=stage, version_base=None):
            batches = GlobalHydra.instance().hydra.multirun(config_name=stage, task_function=task,
                                                            overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(f"sweep of '{stage}'", err) from None
    return [Job(**job.return_value) for batch in batches for job in batch]


def run_one(execute, headline, cfg: DictConfig) -> dict:
    """One job (Hydra's task function): the stage's run for this job's config, as a Job's fields;
    an error becomes the job's status and one line, so the sweep goes on."""
    hydra = HydraConfig.get()
    overrides = list(hydra.overrides.task)
    if preemption.requested():
        return vars(Job(overrides, PREEMPTED, error="stopped before it started; the same command resumes"))
    try:
        with preemption.handling(), _own_compose():  # handled in a launcher's own process too
            result = execute(finish_config(cfg, list(hydra.searchpath)))
    except preemption.Preempted as stop:
        return vars(Job(overrides, PREEMPTED, error=f"{stop}; the same command resumes"))
    except MhsError as err:
        return vars(Job(overrides, FAILED, error=str(err).replace("\n", " ")))
    except Exception as err:  # the traceback goes to the job's log; the table gets one line
        log.error("%s", traceback.format_exc())
        return vars(Job(overrides, FAILED, error=f"{type(err).__name__}: {err}".replace("\n", " ")))
    return vars(Job(overrides, UP_TO_DATE if result.skipped else BUILT, str(result.run.path), headline(result)))


@contextmanager
def _own_compose():
    """Let the stage compose its derived configs (Hydra's compose API) while the sweep's Hydra is
    set up in this process (the basic launcher runs jobs in it): the sweep's is put back after."""
    global_hydra = GlobalHydra.instance()
    sweep = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        yield
    finally:
        global_hydra.clear()
        if sweep is not None:
            global_hydra.initialize(sweep)


def table(jobs: list[Job]) -> str:
    """One Markdown table: the overrides that tell the jobs apart, run folder, status, metrics."""
    varying = {o for job in jobs for o in job.overrides if not all(o in other.overrides for other in jobs)}
    lines = ["| job | overrides | run | status | metrics |", "| ---: | --- | --- | --- | --- |"]
    for number, job in enumerate(jobs):
        shown = " ".join(o for o in job.overrides if o in varying or len(jobs) == 1)
        status = f"{job.status}: {job.error}" if job.error else job.status
        lines.append(f"| {number} | {shown} | {job.run} | {status} | {job.metrics} |")
    return "\n".join(lines)


def exit_code(jobs: list[Job]) -> int:
    """0 when every job is built or up to date; preemption.EXIT_CODE when one was stopped by a
    signal (the same command resumes); 1 when one failed."""
    if any(job.status == PREEMPTED for job in jobs):
        return preemption.EXIT_CODE
    return 1 if any(job.status == FAILED for job in jobs) else 0

