"""The evaluations of a run while it trains: every ``eval.interval`` iterations, and at its end.

Each plays ``eval.episodes`` episodes with :func:`~ppo_cli.evaluate.evaluate`, on fresh envs
seeded with ``seed + EVAL_SEED_OFFSET`` every time, so that the points of the ``eval/`` curve
differ only by the agent; ``evaluate`` leaves the random generators as it found them, so a run
trains the same whether or not it evaluates on the way. An evaluation that beats every one before
it writes ``checkpoints/best.pt``. The best so far is part of the training state
(``TrainingState.best_eval``, in every checkpoint), and each evaluation comes before the checkpoint
of its iteration: a resumed run logs the same points and keeps the same ``best.pt`` as one that
never stopped. Only rank 0 evaluates (under torchrun the others wait at the next collective).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ppo_cli.checkpointer import Checkpointer
from ppo_cli.config import TrainConfig
from ppo_cli.evaluate import EVAL_SEED_OFFSET, evaluate
from ppo_cli.iteration import TrainingState
from ppo_cli.logger import RunLogger

log = logging.getLogger(__name__)


class Evaluator:
    """Rank 0's evaluations (``logger`` is None on the other ranks, which evaluate nothing)."""

    def __init__(self, cfg: TrainConfig, checkpointer: Checkpointer, logger: RunLogger | None) -> None:
        self.cfg = cfg
        self.checkpointer = checkpointer
        self.logger = logger
        self.seconds = 0.0  # spent evaluating, which the training's SPS leaves out
        # What plays the episodes (their returns): evaluate() here; a population plays its
        # members' evaluations together (population.py).
        self.play: Callable[[TrainingState], np.ndarray] = self._play

    def after_iteration(self, state: TrainingState) -> None:
        """Evaluate if this iteration completes an ``eval.interval`` (the last one: see :meth:`final`)."""
        interval = self.cfg.eval.interval
        if interval and state.iteration % interval == 0 and state.global_step < self.cfg.total_timesteps:
            self._evaluate(state)

    def final(self, state: TrainingState) -> dict[str, Any]:
        """The evaluation of the trained agent: what the summary reports of it."""
        return self._evaluate(state)

    def _play(self, state: TrainingState) -> np.ndarray:
        cfg = self.cfg
        seed = cfg.seed + EVAL_SEED_OFFSET
        episodes = evaluate(
            state.agent, cfg.env, cfg.eval.episodes, cfg.eval.deterministic, seed, state.collector.device
        )
        return episodes.returns

    def _evaluate(self, state: TrainingState) -> dict[str, Any]:
        cfg = self.cfg
        if self.logger is None or not cfg.eval.episodes:
            return {}
        start, training = time.perf_counter(), state.agent.training
        state.agent.eval()
        try:
            returns = self.play(state)
        finally:
            state.agent.train(training)
        result = {
            "eval_mean": float(returns.mean()),
            "eval_std": float(returns.std()),
            "eval_episodes": len(returns),
        }
        tags = {"eval/episodic_return": result["eval_mean"], "eval/episodic_return_std": result["eval_std"]}
        self.logger.scalars(tags, state.global_step)
        best = state.best_eval is None or result["eval_mean"] > state.best_eval["eval_mean"]
        if best:
            state.best_eval = {"global_step": state.global_step, **result}
            self.checkpointer.save_best(state)
        log.info(
            "evaluation at step %d over %d episodes: %.2f +/- %.2f%s",
            state.global_step,
            len(returns),
            result["eval_mean"],
            result["eval_std"],
            " (best so far: checkpoints/best.pt)" if best else "",
        )
        self.seconds += time.perf_counter() - start
        return {**result, "best_eval": state.best_eval}
