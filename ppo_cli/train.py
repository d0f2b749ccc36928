"""The training loop, as a plain function that reads in the order of the algorithm.

build (or resume) -> (collect -> advantages -> update -> log -> checkpoint) x iterations -> evaluate
-> summary
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv
from omegaconf import OmegaConf

from ppo_cli import rundir, supervisor
from ppo_cli.advantages import gae, group_relative
from ppo_cli.agent import ActorCritic
from ppo_cli.checkpoint import (
    LAST,
    checkpoint_dir,
    describe_spaces,
    load_matching,
    remove_stale_temp_files,
    save_checkpoint,
)
from ppo_cli.config import ActorCriticConfig, AlgoConfig, GRPOConfig, TrainConfig, hyperparameters
from ppo_cli.distributed import DataParallel, IterationReport, StatisticsExchange
from ppo_cli.envs import closing_envs, episode_time_limit, make_vector_env
from ppo_cli.errors import ConfigError, EnvError, Interrupted, NonFiniteError, UserError
from ppo_cli.evaluate import EVAL_SEED_OFFSET, evaluate
from ppo_cli.logger import RunLogger, read_summary, write_summary
from ppo_cli.losses import explained_variance
from ppo_cli.normalization import RewardScaler
from ppo_cli.packing import packed_optimizer_state
from ppo_cli.resume import check_config_changes, find_checkpoint, resume_command, rng_state, set_rng_state
from ppo_cli.rollout import Collector, GroupCollector, RolloutStorage
from ppo_cli.signals import SUPERVISOR_ECHO_S, TORCHRUN_ECHO_S, GracefulStop
from ppo_cli.update import Batch, Updater, make_updater

log = logging.getLogger(__name__)

RECENT_EPISODES = 20  # episodes averaged for the progress bar
HPARAMS_METRICS = ["eval/episodic_return", "charts/episodic_return"]  # columns of TensorBoard's HParams
# The parts of the training state that differ between the ranks of a data-parallel run (their envs,
# their random generators, their envs' discounted returns); everything else is the same on all.
PER_RANK_KEYS = ("collector", "rng", "reward_scaler")


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


def estimate_advantages(algo: AlgoConfig, storage: RolloutStorage) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, critic targets): GAE for the actor-critic variants, group-relative for GRPO."""
    if isinstance(algo, GRPOConfig):
        advantages = group_relative(storage.rewards, storage.valid, algo.group_size)
        return advantages, torch.zeros_like(advantages)  # no critic to train
    assert isinstance(algo, ActorCriticConfig), type(algo)
    terminated = storage.terminated
    if not algo.bootstrap_truncated:  # the old behaviour: a time limit counts as terminal
        terminated = terminated | storage.truncated
    return gae(
        storage.rewards,
        storage.values,
        storage.next_values,
        terminated,
        storage.truncated,
        algo.gamma,
        algo.gae_lambda,
    )


def rollout_length(cfg: TrainConfig) -> int:
    """Steps per env per iteration: ``env.num_steps``, or for GRPO the episode time limit, so that
    every episode ends inside one rollout."""
    if not isinstance(cfg.algo, GRPOConfig):
        return cfg.env.num_steps
    limit = episode_time_limit(cfg.env)
    if limit is None:
        raise UserError(
            f"env.id: algo=grpo needs episodic envs; {cfg.env.id} has no time limit "
            "(set env.max_episode_steps)"
        )
    return limit


@dataclass
class TrainingState:
    """Everything that shapes the rest of a run, i.e. everything a checkpoint holds."""

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

    def state_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.state_dict(),
            "updater": self.updater.state_dict(),
            "collector": self.collector.state_dict(),
            "rng": rng_state(),
            "global_step": self.global_step,
            "iteration": self.iteration,
            "recent_returns": list(self.recent_returns),
        }

    def load_state_dict(self, payload: dict[str, Any], source: Path, env_seed: int) -> bool:
        """Restore a checkpoint; True if this rank's envs continue their episodes exactly.

        Where they cannot (see ``env_state.py``), its envs restart from a seed derived from
        ``env_seed`` and the checkpoint's step, so a resumed run is still reproducible. So do those
        of a rank the checkpoint holds no state for (resumed by more ranks than wrote it).
        """
        load_matching(self.agent, payload["agent"], "network", source)
        optimizer_state = payload["optimizer"]
        if len(optimizer_state["param_groups"][0]["params"]) != len(self.agent.packs):  # before packing
            params = list(self.agent.parameters())
            optimizer_state = packed_optimizer_state(optimizer_state, params, self.agent.packs)
        self.optimizer.load_state_dict(optimizer_state)
        try:
            self.updater.load_state_dict(payload["updater"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UserError(
                f"{source}: the checkpoint's algorithm state does not fit this run's ({exc})"
            ) from None
        self.global_step, self.iteration = int(payload["global_step"]), int(payload["iteration"])
        self.recent_returns.extend(payload["recent_returns"])
        reset_seed = int(np.random.SeedSequence([env_seed, self.global_step]).generate_state(1)[0])
        # Rank 0's part is the checkpoint's top level; the other ranks' are listed beside it.
        others = payload.get("other_ranks", [])
        own = payload if self.parallel.is_main else None
        if self.parallel.rank and len(others) == self.parallel.world_size - 1:
            own = others[self.parallel.rank - 1]
        scaler_state = (own or payload)["reward_scaler"]
        if self.reward_scaler is not None and scaler_state is not None:
            load_matching(self.reward_scaler, scaler_state, "reward scaler", source)
        self.statistics.mark()  # every rank loaded the same statistics
        if own is None:
            self.collector.restart(reset_seed)
            seed_everything(reset_seed)
            return False
        exact = self.collector.load_state_dict(own["collector"], reset_seed)
        set_rng_state(own["rng"])  # last: building the run above drew from the generators
        return exact


def build_state(
    cfg: TrainConfig, envs: VectorEnv, device: torch.device, parallel: DataParallel
) -> TrainingState:
    """A fresh agent, optimizer, variant and collector for ``cfg`` on ``envs``, one of
    ``parallel``'s ranks (the agent depends only on ``cfg``: it is the same on every rank)."""
    algo = cfg.algo
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    assert isinstance(obs_space, gym.spaces.Box)  # make_vector_env refuses anything else
    agent = ActorCritic(obs_space, act_space, cfg.agent, cfg.env.normalize_obs, cfg.env.clip_obs)
    agent.to(device)
    # Adam steps the actor and the critic packed into one tensor each (see packing.py), with the
    # fused kernel: cheaper than the default per-tensor loop, which matters for these tiny nets.
    packed = agent.pack_parameters()
    optimizer = torch.optim.Adam(packed, lr=algo.learning_rate, eps=algo.adam_eps, fused=True)
    reward_scaler = (
        RewardScaler(cfg.env.num_envs, algo.gamma, cfg.env.clip_reward)  # on the CPU: see its docstring
        if isinstance(algo, ActorCriticConfig) and cfg.env.normalize_reward
        else None
    )
    updater = make_updater(algo, agent, optimizer, parallel)
    normalizers = (agent.obs_normalizer, reward_scaler)
    statistics = StatisticsExchange(parallel, [n.stats for n in normalizers if n is not None])
    storage = RolloutStorage(rollout_length(cfg), cfg.env.num_envs, agent, device)
    env_seed = parallel.env_seed(cfg.seed, cfg.env.num_envs)
    collector: Collector
    if isinstance(algo, GRPOConfig):
        collector = GroupCollector(envs, agent, storage, algo.group_size, device, env_seed)
    else:
        assert isinstance(algo, ActorCriticConfig), type(algo)
        games_in_info = cfg.env.atari.enabled  # episodes end at lost lives: report whole games
        collector = Collector(
            envs, agent, storage, reward_scaler, algo.bootstrap_truncated, device, env_seed, games_in_info
        )
    return TrainingState(agent, optimizer, reward_scaler, updater, collector, parallel, statistics)


def train(cfg: TrainConfig, run_dir: Path, label: str = "") -> dict[str, Any]:
    """Train an agent as ``cfg`` says, writing everything under ``run_dir``; returns the summary.

    SIGINT / SIGTERM stop the run at the end of the current iteration with a checkpoint (see
    ``signals.py``). Whatever ends the run, ``summary.json`` records how: ``completed``,
    ``interrupted``, or ``failed`` with the error; exceptions then propagate. A resume that is
    refused (a changed config, a checkpoint that does not fit) leaves the summary as it was.
    ``label`` prefixes the progress lines (the job, in a sweep).

    The run holds ``run_dir`` throughout (see ``rundir.py``: another process there is refused) and
    writes into it only once accepted: after the resume checks, or when a new run fails.

    Under ``torchrun`` every rank calls this with the same ``cfg`` and ``run_dir``; only rank 0
    holds and writes there (see ``distributed.py``).
    """
    parallel = DataParallel.current()
    with rundir.hold(run_dir, lock=parallel.is_main) as directory:
        return _train_held(cfg, run_dir, label, parallel, directory)


def _train_held(
    cfg: TrainConfig, run_dir: Path, label: str, parallel: DataParallel, directory: rundir.RunDirectory
) -> dict[str, Any]:
    plain_config = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    start = time.perf_counter()
    summary: dict[str, Any] = {"status": "running", "global_step": 0, "config": plain_config}
    previous_summary = read_summary(run_dir)
    new_run = not rundir.holds_run(run_dir)
    try:
        seed_everything(cfg.seed)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        device = pick_device(cfg.device)
        per_env_seeds = isinstance(cfg.algo, GRPOConfig)
        sequences = cfg.agent.recurrent != "none"
        # A signal may come twice, directly and forwarded (see signals.py).
        echo_window = SUPERVISOR_ECHO_S if supervisor.supervised() else 0.0
        if parallel.active:
            echo_window = TORCHRUN_ECHO_S
        with (
            GracefulStop(echo_window) as stop,
            closing_envs(
                make_vector_env(cfg.env, per_env_seeds=per_env_seeds, training=True, sequences=sequences)
            ) as envs,
        ):
            state = build_state(cfg, envs, device, parallel)
            if parallel.rank:  # the agent is built; from here on each rank draws its own numbers
                seed_everything(parallel.rank_seed(cfg.seed))
            resumed = resume_state(cfg, run_dir, plain_config, state)
            directory.accept()
            if resumed is not None:
                summary.update(resumed_from=resumed, global_step=state.global_step)
            if parallel.is_main:
                supervisor.run_started(run_dir, summary)
            if resumed is not None and _already_complete(cfg, state, previous_summary):
                log.info("the run is already complete; raise total_timesteps to train it further")
                kept = previous_summary.keys() - {"status", "config", "wall_time_s"}
                summary.update({key: previous_summary[key] for key in kept})
            else:
                summary.update(
                    _run(cfg, run_dir, plain_config, summary, stop, state, resumed is not None, label)
                )
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
            write_summary(run_dir, summary)
            supervisor.run_ended()
    return summary


def _already_complete(cfg: TrainConfig, state: TrainingState, previous_summary: dict[str, Any]) -> bool:
    return state.global_step >= cfg.total_timesteps and previous_summary.get("status") == "completed"


def resume_state(
    cfg: TrainConfig, run_dir: Path, plain_config: dict[str, Any], state: TrainingState
) -> dict[str, Any] | None:
    """Load the checkpoint that ``cfg.resume`` names into ``state``; what was resumed, or None.

    Without ``resume``, a run directory that already holds checkpoints is refused: starting over
    there would overwrite them and write a second set of points into the same curves.
    """
    if cfg.resume is None:
        if any(checkpoint_dir(run_dir).glob("*.pt")):
            raise UserError(
                f"{run_dir} already holds a run's checkpoints; continue it with resume=auto, "
                "or choose another hydra.run.dir"
            )
        return None
    found = find_checkpoint(cfg.resume, run_dir)
    if found is None:
        log.info("resume=auto: no checkpoint in %s yet, starting a new run", run_dir)
        return None
    path, payload = found
    changes = check_config_changes(payload["config"], plain_config, cfg.resume_allow_changes)
    for change in changes:
        log.warning("resuming with a changed key: %s", change)
    spaces = describe_spaces(
        state.collector.envs.single_observation_space, state.collector.envs.single_action_space
    )
    if payload["spaces"] != spaces:
        raise UserError(
            f"{path}: the checkpoint was trained on spaces {payload['spaces']}, "
            f"env.id={cfg.env.id} has {spaces}"
        )
    saved_ranks = 1 + len(payload.get("other_ranks", []))
    if saved_ranks != state.parallel.world_size and state.parallel.is_main:
        log.warning(
            "the checkpoint was written by %d process(es), this run has %d: the global batch changes, "
            "and ranks the checkpoint holds no state for restart their envs",
            saved_ranks,
            state.parallel.world_size,
        )
    exact = state.load_state_dict(payload, path, state.parallel.env_seed(cfg.seed, cfg.env.num_envs))
    remove_stale_temp_files(path.parent)
    log.info(
        "resumed from %s at step %d (%s)",
        path,
        state.global_step,
        "episodes continue exactly" if exact else "envs restarted from a derived seed",
    )
    return {"checkpoint": str(path), "global_step": state.global_step, "exact_env_state": exact}


def _run(
    cfg: TrainConfig,
    run_dir: Path,
    plain_config: dict[str, Any],
    summary: dict[str, Any],
    stop: GracefulStop,
    state: TrainingState,
    resumed: bool,
    label: str,
) -> dict[str, Any]:
    algo, agent, collector, parallel = cfg.algo, state.agent, state.collector, state.parallel
    envs = collector.envs
    spaces = describe_spaces(envs.single_observation_space, envs.single_action_space)
    start_step = state.global_step
    logger: RunLogger | None = None  # only rank 0 writes
    if parallel.is_main:
        resumed_at = start_step if resumed else None
        logger = RunLogger(
            run_dir, OmegaConf.to_yaml(plain_config), cfg.total_timesteps, cfg.progress, resumed_at, label
        )
        logger.hparams(hyperparameters(plain_config), HPARAMS_METRICS, logger.first_step)
    # The newest checkpoint on disk: the one resumed from, then each one written.
    last_saved: Path | None = Path(summary["resumed_from"]["checkpoint"]) if resumed else None

    def checkpoint(periodic: bool) -> None:
        """Rank 0 saves; the other ranks send it their own parts of the state."""
        nonlocal last_saved
        state_dict = state.state_dict()
        parts = parallel.gather_on_main({key: state_dict[key] for key in PER_RANK_KEYS})
        last_saved = checkpoint_dir(run_dir) / LAST
        if logger is not None:
            logger.flush()  # the event files on disk reach at least as far as the checkpoint
            payload = {"config": plain_config, "spaces": spaces, **state_dict}
            if parallel.active:
                payload["other_ranks"] = parts[1:]
            last_saved = save_checkpoint(payload, run_dir, cfg.checkpoint.keep, periodic)
            supervisor.checkpoint_saved(last_saved, state.global_step)

    train_start = time.perf_counter()
    try:
        while state.global_step < cfg.total_timesteps:
            state.iteration += 1
            # Linear annealing: lr goes from its initial value towards 0 over the step budget.
            progress = state.global_step / cfg.total_timesteps
            lr = algo.learning_rate * (1.0 - progress if algo.anneal_lr else 1.0)
            for group in state.optimizer.param_groups:
                group["lr"] = lr

            try:
                # --- collect (under torchrun: each rank its own envs, then statistics merged) ---
                rollout = collector.collect()
                state.statistics.merge()

                # --- advantages ----------------------------------------------------------------
                advantages, returns = estimate_advantages(algo, collector.storage)
                batch = Batch.from_storage(collector.storage, advantages, returns, cfg.sequence_chunks)

                # --- update --------------------------------------------------------------------
                metrics = state.updater.update(batch)
            except (NonFiniteError, EnvError) as exc:
                located = f"iteration {state.iteration}: {exc}"
                last_good = f"last good checkpoint: {last_saved or 'none written yet'}"
                if isinstance(exc, EnvError):
                    raise EnvError(f"{located}; {last_good}", exc.details) from None
                raise NonFiniteError(
                    f"{located}; training stopped before the optimizer step, {last_good}"
                ) from None
            report = parallel.combine(
                IterationReport(
                    rollout.env_steps,
                    rollout.episode_returns,
                    rollout.episode_lengths,
                    explained_variance(batch.values, batch.returns),
                )
            )
            state.global_step += report.env_steps
            state.recent_returns.extend(report.episode_returns)

            # --- log ---------------------------------------------------------------------------
            if logger is not None:
                sps = (state.global_step - start_step) / (time.perf_counter() - train_start)
                scalars = {f"losses/{key}": value for key, value in metrics.items()}
                scalars["losses/explained_variance"] = report.explained_variance
                scalars["charts/learning_rate"] = lr
                scalars["charts/SPS"] = sps
                if report.episode_returns:
                    scalars["charts/episodic_return"] = float(np.mean(report.episode_returns))
                    scalars["charts/episodic_length"] = float(np.mean(report.episode_lengths))
                logger.scalars(scalars, state.global_step)
                mean_recent = float(np.mean(state.recent_returns)) if state.recent_returns else None
                logger.progress(state.global_step, sps, mean_recent)
            summary["global_step"] = state.global_step

            # --- checkpoint --------------------------------------------------------------------
            stop_signal = parallel.any_signal(stop.signum)  # under torchrun, every rank stops alike
            periodic = bool(cfg.checkpoint.interval) and state.iteration % cfg.checkpoint.interval == 0
            if periodic or stop_signal is not None:
                checkpoint(periodic)
            if stop_signal is not None:
                raise Interrupted(
                    stop_signal,
                    f"stopped by {signal.Signals(stop_signal).name} at step {state.global_step}; "
                    f"checkpoint: {last_saved}; resume with: {resume_command(run_dir)}",
                )

        checkpoint(periodic=False)
        stop.graceful = False  # from here on nothing remains that a checkpoint would keep
        train_time = max(time.perf_counter() - train_start, 1e-9)
        trained = state.global_step - start_step
        log.info("trained %d steps in %.1f s (%.0f SPS)", trained, train_time, trained / train_time)

        # --- evaluate ------------------------------------------------------------------------------
        result: dict[str, Any] = {
            "global_step": state.global_step,
            "train_time_s": round(train_time, 2),
            "sps": round(trained / train_time, 1),
            "recent_episodic_return": float(np.mean(state.recent_returns)) if state.recent_returns else None,
        }
        if logger is None:  # the evaluation is rank 0's
            return result
        if cfg.eval.episodes:
            agent.eval()
            eval_returns = evaluate(
                agent,
                cfg.env,
                cfg.eval.episodes,
                cfg.eval.deterministic,
                cfg.seed + EVAL_SEED_OFFSET,
                collector.device,
            ).returns
            result.update(
                eval_mean=float(eval_returns.mean()),
                eval_std=float(eval_returns.std()),
                eval_episodes=len(eval_returns),
            )
            logger.scalars(
                {
                    "eval/episodic_return": result["eval_mean"],
                    "eval/episodic_return_std": result["eval_std"],
                },
                state.global_step,
            )
            log.info(
                "evaluation over %d episodes: %.2f +/- %.2f",
                len(eval_returns),
                result["eval_mean"],
                result["eval_std"],
            )
        logger.hparams_completed(state.global_step)
        return result
    finally:
        if logger is not None:
            logger.close()
