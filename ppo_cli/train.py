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
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf

from ppo_cli import rundir
from ppo_cli.checkpointer import Checkpointer
from ppo_cli.config import TrainConfig, hyperparameters
from ppo_cli.distributed import SINGLE_PROCESS, DataParallel
from ppo_cli.errors import EnvError, Interrupted, NonFiniteError
from ppo_cli.evaluator import Evaluator
from ppo_cli.init_from import starting_point
from ppo_cli.iteration import (
    IterationResult,
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
from ppo_cli.signals import training_stop

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

    Under ``torchrun`` every rank calls this with the same ``cfg`` and ``run_dir``; only rank 0
    holds and writes there (see ``distributed.py``).
    """
    parallel = DataParallel.current()
    run = Run(cfg, run_dir, label, swept, parallel)
    try:
        with training_stop(parallel.active) as stop:
            run.open()
            while run.training:
                with run.located():
                    result = run_iteration(run.state)
                run.report(result)
                stop_signal = parallel.any_signal(stop.signum)  # every rank stops alike
                run.checkpoint(stopping=stop_signal is not None)
                if stop_signal is not None:
                    raise run.interruption(stop_signal)
            run.finish()
            stop.graceful = False  # from here on nothing remains that a checkpoint would keep
    except BaseException as exc:
        run.close(exc)
        raise
    run.close(None)
    return run.summary


class Run:
    """One run in its directory, from its start to its summary, driven by a loop outside it:
    :func:`train` drives one, a population (``population.py``) several in lockstep.

    Built, it holds ``run_dir`` (see ``rundir.py``: another process there is refused); :meth:`open`
    builds (or resumes) the training state and accepts the run, and only then writes into the
    directory; :meth:`report` logs and evaluates (every ``eval.interval`` iterations),
    :meth:`checkpoint` saves; :meth:`finish` evaluates and saves the trained agent; :meth:`close` (always)
    writes ``summary.json`` with how the run ended and lets the directory go.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        label: str = "",
        swept: Sequence[str] = (),
        parallel: DataParallel = SINGLE_PROCESS,
    ) -> None:
        self.cfg, self.run_dir, self.label, self.swept, self.parallel = cfg, run_dir, label, swept, parallel
        self.plain_config = cast(
            dict[str, Any], OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        )
        self.start = time.perf_counter()
        self.summary = new_summary(self.plain_config)
        self._held = ExitStack()  # the directory, let go last
        self._resources = ExitStack()  # the envs and the logger, closed before the summary is written
        self.directory = self._held.enter_context(rundir.hold(run_dir, lock=parallel.is_main))
        self.previous_summary = read_summary(run_dir)
        self.new_run = not rundir.holds_run(run_dir)
        self._state: TrainingState | None = None
        self.checkpointer = Checkpointer(run_dir, self.plain_config, cfg.checkpoint.keep)
        self.logger: RunLogger | None = None
        self.evaluator = Evaluator(cfg, self.checkpointer, None)
        self.complete_before = False  # resumed from a run that had already completed
        self.start_step, self.train_start = 0, self.start

    @property
    def state(self) -> TrainingState:
        assert self._state is not None, "open() the run first"
        return self._state

    @property
    def training(self) -> bool:
        """Whether steps of the budget remain to be trained."""
        return not self.complete_before and self.state.global_step < self.cfg.total_timesteps

    def open(self) -> None:
        """Seed, build the state (or resume it: ``resume.py``), accept the run, start its log.
        Raises what refuses the run (a resume whose config differs, a checkpoint that does not
        fit); nothing is written into the directory before acceptance."""
        cfg, parallel = self.cfg, self.parallel
        seed_everything(cfg.seed)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        device = pick_device(cfg.device)
        found = resume_checkpoint(cfg, self.run_dir)
        initial = starting_point(cfg.init_from) if found is None else None  # only a new run reads it
        envs = self._resources.enter_context(training_envs(cfg))
        state = build_state(cfg, envs, device, parallel, initial)
        if parallel.rank:  # the agent is built; from here on each rank draws its own numbers
            seed_everything(parallel.rank_seed(cfg.seed))
        resumed = resume_state(cfg, self.plain_config, state, self.checkpointer, found)
        self.directory.accept()
        self._state = state
        if resumed is not None:
            self.summary.update(resumed_from=resumed, global_step=state.global_step)
        if parallel.is_main:
            summary_started(self.run_dir, self.summary)
        if resumed is not None and _already_complete(cfg, state, self.previous_summary):
            log.info("the run is already complete; raise total_timesteps to train it further")
            kept = self.previous_summary.keys() - {"status", "config", "wall_time_s"}
            self.summary.update({key: self.previous_summary[key] for key in kept})
            self.complete_before = True
            return
        self.logger = _run_logger(
            cfg, self.run_dir, self.plain_config, state, resumed is not None, self.label, self.swept
        )
        if self.logger is not None:
            self._resources.callback(self.logger.close)
        self.evaluator = Evaluator(cfg, self.checkpointer, self.logger)
        self.start_step, self.train_start = state.global_step, time.perf_counter()

    @contextmanager
    def located(self) -> Iterator[None]:
        """Name the iteration and the last good checkpoint in a failing env's or a non-finite
        number's error."""
        try:
            yield
        except (NonFiniteError, EnvError) as exc:
            raise self.located_error(exc) from None

    def located_error(self, exc: NonFiniteError | EnvError) -> NonFiniteError | EnvError:
        """``exc`` with the iteration and the last good checkpoint named in its message."""
        located = f"iteration {self.state.iteration}: {exc}"
        last_good = f"last good checkpoint: {self.checkpointer.last_saved or 'none written yet'}"
        if isinstance(exc, EnvError):
            return EnvError(f"{located}; {last_good}", exc.details)
        return NonFiniteError(f"{located}; training stopped before the optimizer step, {last_good}")

    def report(self, result: IterationResult) -> None:
        """Log the iteration and evaluate if an evaluation is due (before :meth:`checkpoint`,
        whose checkpoint keeps the best evaluation so far)."""
        state, logger = self.state, self.logger
        if logger is not None:
            sps = (state.global_step - self.start_step) / (
                time.perf_counter() - self.train_start - self.evaluator.seconds
            )
            logger.scalars(result.scalars(sps), state.global_step)
            logger.progress(state.global_step, sps, recent_mean(state))
        self.summary["global_step"] = state.global_step
        self.evaluator.after_iteration(state)

    def checkpoint(self, stopping: bool) -> None:
        """Save every ``checkpoint.interval`` iterations, and when ``stopping`` (a stop signal
        came: checked after :meth:`report`, so that one sent while it logged counts now)."""
        interval = self.cfg.checkpoint.interval
        periodic = bool(interval) and self.state.iteration % interval == 0
        if periodic or stopping:
            self._save(periodic)

    def interruption(self, signum: int) -> Interrupted:
        """What ends a run stopped by ``signum`` after its checkpoint: where it is, how to resume."""
        return Interrupted(
            signum,
            f"stopped by {signal.Signals(signum).name} at step {self.state.global_step}; "
            f"checkpoint: {self.checkpointer.last_saved}; resume with: {resume_command(self.run_dir)}",
        )

    def finish(self) -> None:
        """The budget is spent: evaluate the trained agent, save it, and fill the summary."""
        if self.complete_before:
            return
        state = self.state
        evaluation = self.evaluator.final(state)
        self._save(periodic=False)
        train_time = max(time.perf_counter() - self.train_start - self.evaluator.seconds, 1e-9)
        trained = state.global_step - self.start_step
        log.info(
            "%strained %d steps in %.1f s (%.0f SPS)", self.label, trained, train_time, trained / train_time
        )
        self.summary.update(
            global_step=state.global_step,
            train_time_s=round(train_time, 2),
            sps=round(trained / train_time, 1),
            recent_episodic_return=recent_mean(state),
        )
        self.summary.update(evaluation)  # rank 0's (the other ranks evaluate nothing)
        if self.logger is not None:
            self.logger.hparams_completed(state.global_step)

    def close(self, exc: BaseException | None) -> None:
        """Record how the run ended (``completed``, or ``interrupted`` / ``failed`` by ``exc``) in
        ``summary.json``, close the envs and the log, and let the directory go. A run refused
        before it was accepted leaves the directory as it was (a new run records its failure)."""
        if exc is None:
            self.summary["status"] = "completed"
        elif isinstance(exc, Interrupted | KeyboardInterrupt):
            self.summary.update(status="interrupted", error=str(exc) or type(exc).__name__)
        else:
            self.summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        try:
            self._resources.close()
        finally:
            self.summary["wall_time_s"] = round(time.perf_counter() - self.start, 2)
            if self.parallel.is_main and (self.directory.accepted or self.new_run):
                self.directory.accept()
                summary_final(self.run_dir, self.summary)
            self._held.close()

    def _save(self, periodic: bool) -> None:
        if self.logger is not None:
            self.logger.flush()  # the event files on disk reach at least as far as the checkpoint
        self.checkpointer.save(self.state, periodic)


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
