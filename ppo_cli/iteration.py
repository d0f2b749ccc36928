"""One iteration of the family's loop, and the training state it advances.

    learning rate -> collect -> merge statistics -> advantages -> batch -> update -> report

:func:`run_iteration` is the whole of it; the training loop (``train.py``) calls it, then logs,
checkpoints and checks for a stop, and ``benchmarks/breakdown.py`` times it part by part. What
differs between the variants is asked of ``state.variant`` (``algos/``).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv

from ppo_cli.agent import ActorCritic
from ppo_cli.algos import Variant, variant_of
from ppo_cli.batch import Batch
from ppo_cli.config import TrainConfig
from ppo_cli.distributed import DataParallel, StatisticsExchange
from ppo_cli.envs import closing_envs, make_vector_env
from ppo_cli.episodes import EpisodeLog
from ppo_cli.errors import ConfigError
from ppo_cli.init_from import StartingPoint
from ppo_cli.losses import explained_variance
from ppo_cli.normalization import RewardScaler
from ppo_cli.rollout import Collector, Rollout, RolloutStorage
from ppo_cli.tags import metric_tag
from ppo_cli.update import Updater

RECENT_EPISODES = 20  # episodes averaged for the progress bar and the summary


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (environments are seeded through reset)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when torch sees a GPU; asking for CUDA without one is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "got 'cuda' but torch sees no CUDA device; allowed: auto|cpu")
    return torch.device(name)


@contextmanager
def training_envs(cfg: TrainConfig) -> Iterator[VectorEnv]:
    """The vector env the run trains on (seeded the way its variant resets them), closed after."""
    per_env_seeds = variant_of(cfg).per_env_seeds
    sequences = cfg.agent.recurrent != "none"
    envs = make_vector_env(cfg.env, per_env_seeds=per_env_seeds, training=True, sequences=sequences)
    with closing_envs(envs):
        yield envs


@dataclass
class TrainingState:
    """Everything that shapes the rest of a run: what a checkpoint holds (``checkpointer.py``)."""

    variant: Variant
    agent: ActorCritic
    optimizer: torch.optim.Optimizer
    reward_scaler: RewardScaler | None
    updater: Updater
    collector: Collector
    parallel: DataParallel
    statistics: StatisticsExchange
    global_step: int = 0
    iteration: int = 0
    recent_returns: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_EPISODES))
    best_eval: dict[str, float] | None = None  # the best evaluation so far, its step (evaluator.py)

    @property
    def cfg(self) -> TrainConfig:
        return self.variant.cfg


def build_state(
    cfg: TrainConfig,
    envs: VectorEnv,
    device: torch.device,
    parallel: DataParallel,
    start: StartingPoint | None = None,
) -> TrainingState:
    """A fresh agent, optimizer, variant and collector for ``cfg`` on ``envs``, one of
    ``parallel``'s ranks (the agent depends only on ``cfg``: it is the same on every rank).

    With ``start`` (``init_from``) the agent and the reward statistics are loaded from it before
    the updater is built: a reference policy the updater takes (GRPO's) is then the loaded agent."""
    variant = variant_of(cfg)
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    assert isinstance(obs_space, gym.spaces.Box)  # make_vector_env refuses anything else
    agent = ActorCritic(obs_space, act_space, cfg.agent, cfg.env.normalize_obs, cfg.env.clip_obs)
    agent.to(device)
    reward_scaler = variant.reward_scaler()
    if start is not None:
        start.load_into(agent, reward_scaler, envs, cfg)
    # Adam steps the actor and the critic packed into one tensor each (see packing.py), with the
    # fused kernel: cheaper than the default per-tensor loop, which matters for these tiny nets.
    packed = agent.pack_parameters()
    optimizer = torch.optim.Adam(packed, lr=cfg.algo.learning_rate, eps=cfg.algo.adam_eps, fused=True)
    updater = variant.make_updater(agent, optimizer, parallel)
    normalizers = (agent.obs_normalizer, reward_scaler)
    statistics = StatisticsExchange(parallel, [n.stats for n in normalizers if n is not None])
    storage = RolloutStorage(variant.rollout_length(), cfg.env.num_envs, agent, device)
    seed = parallel.env_seed(cfg.seed, cfg.env.num_envs)
    collector = variant.collector(envs, agent, storage, reward_scaler, seed)
    return TrainingState(variant, agent, optimizer, reward_scaler, updater, collector, parallel, statistics)


@dataclass
class IterationReport:
    """What one iteration's data tells the log: of one rank, or pooled over all of them."""

    env_steps: int
    episodes: EpisodeLog
    explained_variance: float
    counts: dict[str, int] = field(default_factory=dict)  # the collector's (Rollout.counts)

    @classmethod
    def pooled(cls, reports: list[IterationReport]) -> IterationReport:
        """All ranks' reports in one: steps and counts summed, episodes pooled (in rank order),
        explained variance averaged."""
        return cls(
            env_steps=sum(r.env_steps for r in reports),
            episodes=EpisodeLog.pooled(r.episodes for r in reports),
            explained_variance=float(np.mean([r.explained_variance for r in reports])),
            counts={name: sum(r.counts[name] for r in reports) for name in reports[0].counts},
        )


@dataclass
class IterationResult:
    """What one iteration did: the learning rate it used, the updater's metrics, and the report
    of its data (over all ranks)."""

    learning_rate: float
    metrics: dict[str, float]
    report: IterationReport

    def scalars(self, sps: float) -> dict[str, float]:
        """The iteration as TensorBoard scalars (CleanRL's tag names, so curves overlay; the
        updater's metrics and the collector's counts sectioned by ``tags.metric_tag``), with
        ``sps`` env steps per second so far."""
        metrics = {**self.metrics, **self.report.counts, "explained_variance": self.report.explained_variance}
        scalars = {metric_tag(name): value for name, value in metrics.items()}
        scalars["charts/learning_rate"] = self.learning_rate
        scalars["charts/SPS"] = sps
        scalars.update(self.report.episodes.mean_scalars())
        return scalars


def run_iteration(state: TrainingState) -> IterationResult:
    """One iteration: collect a rollout (under torchrun, each rank its own envs), share the
    normalisation statistics, estimate advantages, update on the batch, and pool the report."""
    prepared = prepare_update(state)
    return finish_iteration(state, prepared, state.updater.update(prepared.batch))


@dataclass
class PreparedUpdate:
    """An iteration up to its update: the learning rate set, the rollout, the batch built from it."""

    learning_rate: float
    rollout: Rollout
    batch: Batch


def prepare_update(state: TrainingState) -> PreparedUpdate:
    """The iteration's first half: learning rate -> collect -> merge statistics -> advantages ->
    batch. A population (``population.py``) runs its parts for each member, collecting for all
    members in lockstep, then updates them together."""
    lr = start_iteration(state)
    return batch_of(state, lr, state.collector.collect())


def start_iteration(state: TrainingState) -> float:
    """Count the iteration and set its learning rate (returned)."""
    state.iteration += 1
    return _set_learning_rate(state.optimizer, state.cfg, state.global_step)


def batch_of(state: TrainingState, lr: float, rollout: Rollout) -> PreparedUpdate:
    """After the collection: merge statistics -> advantages -> the batch to update on."""
    state.statistics.merge()
    advantages, returns = state.variant.advantages(rollout.storage)
    weights = state.variant.loss_weights(rollout.storage)
    batch = Batch.from_storage(rollout.storage, advantages, returns, state.cfg.sequence_chunks, weights)
    return PreparedUpdate(lr, rollout, batch)


def finish_iteration(
    state: TrainingState, prepared: PreparedUpdate, metrics: dict[str, float]
) -> IterationResult:
    """The iteration's second half, after the update that returned ``metrics``: the report,
    pooled over the ranks, and the step counters."""
    rollout, batch = prepared.rollout, prepared.batch
    own = IterationReport(
        rollout.env_steps, rollout.episodes, explained_variance(batch.values, batch.returns), rollout.counts
    )
    report = IterationReport.pooled(state.parallel.all_gather(own))
    state.global_step += report.env_steps
    state.recent_returns.extend(report.episodes.returns)
    return IterationResult(prepared.learning_rate, metrics, report)


def _set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, global_step: int) -> float:
    """Linear annealing: the learning rate goes from its initial value towards 0 over the step
    budget (or stays, without ``algo.anneal_lr``)."""
    progress = global_step / cfg.total_timesteps
    lr = cfg.algo.learning_rate * (1.0 - progress if cfg.algo.anneal_lr else 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def recent_mean(state: TrainingState) -> float | None:
    """The mean return of the last :data:`RECENT_EPISODES` episodes, None before the first."""
    return float(np.mean(state.recent_returns)) if state.recent_returns else None
