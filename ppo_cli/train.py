"""A training run from start to end, as a plain function that reads in the order of the algorithm.

build (or resume) -> (iteration -> log -> [evaluate] -> checkpoint) x iterations -> evaluate
-> checkpoint -> summary

One iteration (``iteration.py``) is the same for every variant of the family; what differs is
asked of the variant (``algos/``). The checkpoint's layout is ``checkpointer.py``'s, the resume
policy ``resume.py``'s, the run directory's rules ``rundir.py``'s.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf

from ppo_cli import rundir
from ppo_cli.checkpointer import Checkpointer
from ppo_cli.config import TrainConfig, hyperparameters
from ppo_cli.distributed import DataParallel
from ppo_cli.errors import EnvError, Interrupted, NonFiniteError
from ppo_cli.evaluator import Evaluator
from ppo_cli.init_from import starting_point
from ppo_cli.iteration import (
    TrainingState,
    build_state,
    pick_device,
    recent_mean,
    run_iteration,
    seed_everything,
    training_envs,
)
from ppo_cli.logger import RunLogger, new_summary, read_summary, summary_final, summary_started
from ppo_cli.resume import resume_checkpoint, resume_command, resume_state
from ppo_cli.signals import GracefulStop, training_stop

log = logging.getLogger(__name__)

HPARAMS_METRICS = ["eval/episodic_return", "charts/episodic_return"]  # columns of TensorBoard's HParams


def train(cfg: TrainConfig, run_dir: Path, label: str = "", swept: Sequence[str] = ()) -> dict[str, Any]:
    """Train an agent as ``cfg`` says, writing everything under ``run_dir``; returns the summary.

    SIGINT / SIGTERM stop the run at the end of the current iteration with a checkpoint (see
    ``signals.py``). Whatever ends the run, ``summary.json`` records how: ``completed``,
    ``interrupted``, or ``failed`` with the error; exceptions then propagate. A resume that is
    refused (a changed config, a checkpoint that does not fit) leaves the summary as it was.
    ``label`` prefixes the progress lines (the job, in a sweep); ``swept`` names the keys the
    sweep varies, the first columns of TensorBoard's HParams table.

    The run holds ``run_dir`` throughout (see ``rundir.py``: another process there is refused) and
    writes into it only once accepted: after the resume checks, or when a new run fails.

    Under ``torchrun`` every rank calls this with the same ``cfg`` and ``run_dir``; only rank 0
    holds and writes there (see ``distributed.py``).
    """
    parallel = DataParallel.current()
    with rundir.hold(run_dir, lock=parallel.is_main) as directory:
        return _train_held(cfg, run_dir, label, swept, parallel, directory)


def _train_held(
    cfg: TrainConfig,
    run_dir: Path,
    label: str,
    swept: Sequence[str],
    parallel: DataParallel,
    directory: rundir.RunDirectory,
) -> dict[str, Any]:
    plain_config = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    start = time.perf_counter()
    summary = new_summary(plain_config)
    previous_summary = read_summary(run_dir)
    new_run = not rundir.holds_run(run_dir)
    try:
        seed_everything(cfg.seed)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        device = pick_device(cfg.device)
        found = resume_checkpoint(cfg, run_dir)
        initial = starting_point(cfg.init_from) if found is None else None  # only a new run reads it
        with training_stop(parallel.active) as stop, training_envs(cfg) as envs:
            state = build_state(cfg, envs, device, parallel, initial)
            if parallel.rank:  # the agent is built; from here on each rank draws its own numbers
                seed_everything(parallel.rank_seed(cfg.seed))
            checkpointer = Checkpointer(run_dir, plain_config, cfg.checkpoint.keep)
            resumed = resume_state(cfg, plain_config, state, checkpointer, found)
            directory.accept()
            if resumed is not None:
                summary.update(resumed_from=resumed, global_step=state.global_step)
            if parallel.is_main:
                summary_started(run_dir, summary)
            if resumed is not None and _already_complete(cfg, state, previous_summary):
                log.info("the run is already complete; raise total_timesteps to train it further")
                kept = previous_summary.keys() - {"status", "config", "wall_time_s"}
                summary.update({key: previous_summary[key] for key in kept})
            else:
                logger = _run_logger(cfg, run_dir, plain_config, state, resumed is not None, label, swept)
                summary.update(_run(cfg, state, checkpointer, logger, stop, summary))
        summary["status"] = "completed"
    except (Interrupted, KeyboardInterrupt) as exc:
        summary.update(status="interrupted", error=str(exc) or type(exc).__name__)
        raise
    except BaseException as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        summary["wall_time_s"] = round(time.perf_counter() - start, 2)
        if parallel.is_main and (directory.accepted or new_run):  # a refused resume writes nothing
            directory.accept()
            summary_final(run_dir, summary)
    return summary


def _already_complete(cfg: TrainConfig, state: TrainingState, previous_summary: dict[str, Any]) -> bool:
    return state.global_step >= cfg.total_timesteps and previous_summary.get("status") == "completed"


def _run_logger(
    cfg: TrainConfig,
    run_dir: Path,
    plain_config: dict[str, Any],
    state: TrainingState,
    resumed: bool,
    label: str,
    swept: Sequence[str],
) -> RunLogger | None:
    """Rank 0's TensorBoard writer and progress bar (the other ranks write nothing)."""
    if not state.parallel.is_main:
        return None
    resumed_at = state.global_step if resumed else None
    config_yaml = OmegaConf.to_yaml(plain_config)
    logger = RunLogger(
        run_dir, config_yaml, cfg.total_timesteps, cfg.progress, resumed_at, label, cfg.tracking
    )
    logger.hparams(hyperparameters(plain_config, swept), HPARAMS_METRICS, logger.first_step)
    return logger


def _run(
    cfg: TrainConfig,
    state: TrainingState,
    checkpointer: Checkpointer,
    logger: RunLogger | None,
    stop: GracefulStop,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Iterate (evaluating every ``eval.interval`` iterations) until the step budget is spent or a
    stop is asked for, then evaluate and save."""
    start_step, train_start = state.global_step, time.perf_counter()
    evaluator = Evaluator(cfg, checkpointer, logger)
    try:
        while state.global_step < cfg.total_timesteps:
            with _located(state, checkpointer):
                result = run_iteration(state)
            if logger is not None:
                sps = (state.global_step - start_step) / (
                    time.perf_counter() - train_start - evaluator.seconds
                )
                logger.scalars(result.scalars(sps), state.global_step)
                logger.progress(state.global_step, sps, recent_mean(state))
            summary["global_step"] = state.global_step
            evaluator.after_iteration(state)  # before the checkpoint, which keeps the best so far
            _checkpoint_or_stop(cfg, state, checkpointer, logger, stop)
        evaluation = evaluator.final(state)
        _save(state, checkpointer, logger, periodic=False)
        stop.graceful = False  # from here on nothing remains that a checkpoint would keep
        train_time = max(time.perf_counter() - train_start - evaluator.seconds, 1e-9)
        trained = state.global_step - start_step
        log.info("trained %d steps in %.1f s (%.0f SPS)", trained, train_time, trained / train_time)
        result_summary: dict[str, Any] = {
            "global_step": state.global_step,
            "train_time_s": round(train_time, 2),
            "sps": round(trained / train_time, 1),
            "recent_episodic_return": recent_mean(state),
        }
        result_summary.update(evaluation)  # rank 0's (the other ranks evaluate nothing)
        if logger is not None:
            logger.hparams_completed(state.global_step)
        return result_summary
    finally:
        if logger is not None:
            logger.close()


@contextmanager
def _located(state: TrainingState, checkpointer: Checkpointer) -> Iterator[None]:
    """Name the iteration and the last good checkpoint in a failing env's or a non-finite
    number's error."""
    try:
        yield
    except (NonFiniteError, EnvError) as exc:
        located = f"iteration {state.iteration}: {exc}"
        last_good = f"last good checkpoint: {checkpointer.last_saved or 'none written yet'}"
        if isinstance(exc, EnvError):
            raise EnvError(f"{located}; {last_good}", exc.details) from None
        raise NonFiniteError(f"{located}; training stopped before the optimizer step, {last_good}") from None


def _checkpoint_or_stop(
    cfg: TrainConfig,
    state: TrainingState,
    checkpointer: Checkpointer,
    logger: RunLogger | None,
    stop: GracefulStop,
) -> None:
    """Save every ``checkpoint.interval`` iterations, and when a stop was asked for (on any rank,
    under torchrun: every rank stops alike), then stop."""
    stop_signal = state.parallel.any_signal(stop.signum)
    periodic = bool(cfg.checkpoint.interval) and state.iteration % cfg.checkpoint.interval == 0
    if periodic or stop_signal is not None:
        _save(state, checkpointer, logger, periodic)
    if stop_signal is not None:
        raise Interrupted(
            stop_signal,
            f"stopped by {signal.Signals(stop_signal).name} at step {state.global_step}; "
            f"checkpoint: {checkpointer.last_saved}; resume with: {resume_command(checkpointer.run_dir)}",
        )


def _save(state: TrainingState, checkpointer: Checkpointer, logger: RunLogger | None, periodic: bool) -> None:
    if logger is not None:
        logger.flush()  # the event files on disk reach at least as far as the checkpoint
    checkpointer.save(state, periodic)
