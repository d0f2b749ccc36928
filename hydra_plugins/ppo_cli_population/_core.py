"""How the population launcher runs a sweep's jobs (imported only when jobs are launched).

1. Compose every job's config as Hydra's basic launcher does (its number, ``hydra.job.id/num``,
   its directory under the sweep's) and check it (``to_train_config``).
2. Group them (``ppo_cli/grouping.py``): one log line per job that runs alone and why, one per
   population.
3. Run the groups in the order of their first job. A job that runs alone (it cannot be batched,
   or its config is refused) goes through Hydra's ``run_job`` with ppo-train's task function, so
   it behaves exactly as under the basic launcher. A population's members are each set up as
   ``run_job`` and the task function would set up a job (its directory, the sweep's start record
   and ``on_job_start``, ``cli.job_setup``), each while its own config is Hydra's current one;
   then ``ppo_cli.population.train_population`` trains them together, and each member ends as a
   job does (``on_job_end`` with its ``JobReturn``, NaN for a failed one, its failure recorded).
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    configure_log,
    env_override,
    filter_overrides,
    run_job,
    setup_globals,
)
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ppo_cli import cli
from ppo_cli.config import TrainConfig
from ppo_cli.distributed import DataParallel
from ppo_cli.errors import ConfigError, Interrupted
from ppo_cli.grouping import form_groups, why_not_batched
from ppo_cli.hydra_config import to_train_config

if TYPE_CHECKING:
    from hydra_plugins.ppo_cli_population.population_launcher import PopulationLauncher

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """One job of the sweep, composed."""

    num: int
    config: DictConfig  # the whole config, ``hydra`` node included
    train_cfg: TrainConfig | None  # None: refused
    alone: str | None  # why it runs alone (None: it joins a population)


def launch(
    launcher: PopulationLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Hydra's ``Launcher.launch``: every job's return, in job order."""
    setup_globals()
    assert launcher.config is not None and launcher.hydra_context is not None
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    if not (isinstance(launcher.max_members, int) and launcher.max_members >= 1):
        raise ConfigError("hydra.launcher.max_members", f"an integer >= 1, not {launcher.max_members}")
    if not (isinstance(launcher.torch_threads, int) and launcher.torch_threads >= 0):
        raise ConfigError(
            "hydra.launcher.torch_threads", f"an integer >= 0 (0: one per core), not {launcher.torch_threads}"
        )
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs as populations of up to %d", len(job_overrides), launcher.max_members)
    hydra_before = HydraConfig.instance().cfg
    try:
        jobs = [
            _compose(launcher, num, overrides) for num, overrides in enumerate(job_overrides, initial_job_idx)
        ]
        returns: dict[int, JobReturn] = {}
        for unit in _plan(jobs, launcher.max_members):
            if unit[0].alone is not None:
                returns[unit[0].num] = _run_alone(launcher, unit[0])
            else:
                returns.update(_run_population(launcher, unit))
        return [returns[job.num] for job in jobs]
    finally:
        HydraConfig.instance().cfg = hydra_before


def _compose(launcher: PopulationLauncher, num: int, overrides: Sequence[str]) -> _Job:
    """The job's config as the basic launcher composes it, checked."""
    assert launcher.config is not None and launcher.hydra_context is not None
    log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(config):
        config.hydra.job.id = num
        config.hydra.job.num = num
    HydraConfig.instance().set_config(config)  # for ${hydra:...} in the job's config
    try:
        train_cfg = to_train_config(_task_config(config))
    except Exception as exc:
        return _Job(num, config, None, f"its config is refused ({cli.one_line_error(exc)})")
    if config.hydra.job.chdir:
        return _Job(num, config, train_cfg, "hydra.job.chdir=true moves each job into its own directory")
    return _Job(num, config, train_cfg, why_not_batched(train_cfg))


def _task_config(config: DictConfig) -> DictConfig:
    """The job's config less Hydra's node: what the task function gets."""
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


def _plan(jobs: list[_Job], max_members: int) -> list[list[_Job]]:
    """The jobs as units to run (one job alone, or a population), ordered by their first job;
    each decision logged in one line."""
    batchable = [job for job in jobs if job.alone is None]
    groups = form_groups([job.train_cfg for job in batchable if job.train_cfg is not None], max_members)
    units = [[job] for job in jobs if job.alone is not None]
    units += [[batchable[index] for index in group] for group in groups]
    units.sort(key=lambda unit: unit[0].num)
    for unit in units:
        if unit[0].alone is not None:
            log.info("job %d runs alone: %s", unit[0].num, unit[0].alone)
        else:
            log.info("population of %d: %s", len(unit), job_list([job.num for job in unit]))
    return units


def job_list(nums: Sequence[int]) -> str:
    """``job 3``, ``jobs 0-7``, ``jobs 0-2, 5, 7-8``."""
    runs: list[list[int]] = []
    for num in nums:
        if runs and num == runs[-1][-1] + 1:
            runs[-1].append(num)
        else:
            runs.append([num])
    text = ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
    return f"{'job' if len(nums) == 1 else 'jobs'} {text}"


def _run_alone(launcher: PopulationLauncher, job: _Job) -> JobReturn:
    """The job as the basic launcher runs it."""
    assert launcher.config is not None and launcher.hydra_context is not None
    assert launcher.task_function is not None
    result = run_job(
        hydra_context=launcher.hydra_context,
        task_function=launcher.task_function,
        config=job.config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return result


def _run_population(launcher: PopulationLauncher, members: list[_Job]) -> dict[int, JobReturn]:
    """Set up every member, train them together, end each as a job; their returns by job number.

    A member whose setup fails (a run directory in use) fails alone, as does one whose training
    fails; a signal (``Interrupted``) ends them all, as it ends a sweep of single jobs."""
    assert launcher.config is not None and launcher.hydra_context is not None
    first = members[0].config.hydra
    configure_log(first.job_logging, first.verbose)  # once: it replaces the root logger's handlers
    parallel = DataParallel.current()
    started: list[tuple[_Job, JobReturn]] = []
    outcomes: dict[int, dict[str, Any] | BaseException] = {}
    with ExitStack() as stack:
        ready: list[tuple[_Job, cli.Job]] = []
        for member in members:
            job_return = _start(launcher, member, stack)
            started.append((member, job_return))
            try:
                assert job_return.cfg is not None
                ready.append((member, stack.enter_context(cli.job_setup(job_return.cfg, parallel))))
            except Exception as exc:  # logged and recorded as the task function would
                outcomes[member.num] = exc
        results = _train([job for _, job in ready], launcher.torch_threads) if ready else []
        for (member, job), result in zip(ready, results, strict=True):
            if isinstance(result, BaseException):
                cli.log_job_failure(member.config.hydra, job.run_dir, result)
            outcomes[member.num] = result
    returns = {}
    for member, job_return in started:
        outcome = outcomes[member.num]
        if isinstance(outcome, BaseException):
            job_return.return_value = cli.failed_job(member.config.hydra, outcome)
        else:
            run_dir = Path(member.config.hydra.runtime.output_dir)
            job_return.return_value = cli.job_result(run_dir, outcome)
        job_return.status = JobStatus.COMPLETED  # the task function returned (NaN: it failed)
        job_return.task_name = JobRuntime.instance().get("name")
        launcher.hydra_context.callbacks.on_job_end(config=member.config, job_return=job_return)
        returns[member.num] = job_return
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return returns


def _start(launcher: PopulationLauncher, member: _Job, stack: ExitStack) -> JobReturn:
    """What ``run_job`` does before it calls the task function: the job's output directory, its
    config made Hydra's current one, its ``env_set`` (for the stack's life), ``on_job_start``.
    The working directory stays (``hydra.job.chdir=true`` runs a job alone)."""
    assert launcher.hydra_context is not None and launcher.task_function is not None
    config = member.config
    HydraConfig.instance().set_config(config)
    output_dir = os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(config)
    overrides = OmegaConf.to_container(config.hydra.overrides.task)
    assert isinstance(overrides, list)
    hydra_cfg = cast(DictConfig, copy.deepcopy(HydraConfig.instance().cfg))
    job_return = JobReturn(
        overrides=overrides, cfg=_task_config(config), hydra_cfg=hydra_cfg, working_dir=os.getcwd()
    )
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    stack.enter_context(env_override(config.hydra.job.env_set))
    launcher.hydra_context.callbacks.on_job_start(config=config, task_function=launcher.task_function)
    return job_return


def _train(jobs: list[cli.Job], threads: int) -> list[dict[str, Any] | BaseException]:
    """``ppo_cli.population.train_population`` (looked up now: tests stand in for it) on the
    members, with ``threads`` torch threads; a failure of the population as a whole is every
    member's."""
    population = importlib.import_module("ppo_cli.population")
    members = [population.MemberJob(job.cfg, job.run_dir, job.label, job.swept) for job in jobs]
    try:
        return list(population.train_population(members, threads))
    except Interrupted as exc:  # every member saved: the whole sweep goes on from there
        raise Interrupted(exc.exit_code - 128, f"{exc}; resume with: {_resume_sweep_command()}") from None
    except Exception as exc:
        return [exc] * len(jobs)


def _resume_sweep_command() -> str:
    """This command again, continuing its sweep directory: ``resume=auto`` on the same
    ``hydra.sweep.dir`` continues every job where its checkpoint left it."""
    sweep_dir = HydraConfig.get().sweep.dir
    kept = [arg for arg in sys.argv[1:] if not arg.startswith(("resume=", "hydra.sweep.dir="))]
    return shlex.join(["ppo-train", *kept, "resume=auto", f"hydra.sweep.dir={sweep_dir}"])
