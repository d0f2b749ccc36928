"""Evaluation episodes with a frozen agent: after training, and for ``ppo-eval`` on a saved run."""

from __future__ import annotations

import importlib
import logging
import os
import random
import shutil
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import RecordVideo
from gymnasium.wrappers.vector import RecordEpisodeStatistics

from ppo_cli.agent import ActorCritic
from ppo_cli.checkpoint import (
    LAST,
    checkpoint_dir,
    load_checkpoint,
    newest_valid_checkpoint,
    resolve_checkpoint,
)
from ppo_cli.config import EnvConfig
from ppo_cli.envs import action_masks, close_envs, finished_episodes, make_vector_env
from ppo_cli.errors import UserError
from ppo_cli.hydra_config import env_config_of
from ppo_cli.logger import write_json
from ppo_cli.policy import agent_from_checkpoint
from ppo_cli.resume import run_dir_of

log = logging.getLogger(__name__)

MAX_PARALLEL_EPISODES = 8
EVAL_SEED_OFFSET = 10_000  # evaluation envs never replay the seeds of the training envs
EVAL_REPORT = "eval.json"
RENDERER_MODULES = ("mujoco", "OpenGL", "pygame")  # where a failure to render comes from


class Episodes(NamedTuple):
    """Returns (raw rewards) and lengths of complete episodes, in the order they finished."""

    returns: np.ndarray
    lengths: np.ndarray

    def summary(self) -> dict[str, Any]:
        """The scores as a report states them (``eval.json``): the statistics a comparison reads
        first, then every return and length, so that nothing the statistics hide is lost."""
        return {
            "mean": float(self.returns.mean()),
            "std": float(self.returns.std()),
            "min": float(self.returns.min()),
            "max": float(self.returns.max()),
            "returns": self.returns.tolist(),
            "lengths": self.lengths.tolist(),
        }


@contextmanager
def _seeded_generators(seed: int, device: torch.device) -> Iterator[None]:
    """Python's, numpy's and torch's generators seeded with ``seed`` for the block, then put back
    as they were."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class ActionRequest(NamedTuple):
    """What an evaluation needs acted on at one step: the envs' normalised observations, their
    action masks (None: all allowed) and a recurrent agent's state (updated in place)."""

    obs: torch.Tensor
    mask: torch.Tensor | None
    state: torch.Tensor


def evaluate(
    agent: ActorCritic,
    env_cfg: EnvConfig,
    episodes: int,
    deterministic: bool,
    seed: int,
    device: torch.device,
    video_dir: Path | None = None,
    video_episodes: int | None = None,
) -> Episodes:
    """Play ``episodes`` complete episodes, normalisation statistics frozen.

    Episodes run on parallel envs, each with a fixed quota decided up front. Taking "the first N
    episodes to finish" instead would favour short episodes and bias the mean. With ``video_dir``
    the episodes are played one after the other on one env and the first ``video_episodes`` (all,
    when None) are each recorded to an mp4 there.

    ``seed`` seeds the envs and every random number drawn (sampled actions), and the caller's
    random generators are left as they were: an agent scores the same wherever it is evaluated
    with the same seed (during training, at its end, by ppo-eval), and a run that evaluates on
    the way trains exactly as one that does not.
    """
    with _seeded_generators(seed, device), torch.no_grad():
        steps = evaluating(agent, env_cfg, episodes, seed, device, video_dir, video_episodes)
        request = next(steps)
        while True:
            action = agent.act(
                request.obs, deterministic=deterministic, mask=request.mask, state=request.state
            )
            try:
                request = steps.send(action)
            except StopIteration as end:
                return cast(Episodes, end.value)


def evaluating(
    agent: ActorCritic,
    env_cfg: EnvConfig,
    episodes: int,
    seed: int,
    device: torch.device,
    video_dir: Path | None = None,
    video_episodes: int | None = None,
) -> Generator[ActionRequest, torch.Tensor, Episodes]:
    """:func:`evaluate`'s episodes, step by step: it yields what needs acting on and is sent the
    actions, so that a population (``population.py``) can act for all its members' evaluations
    in one batched pass. Draws no random numbers itself (the caller acts)."""
    num_envs = 1 if video_dir is not None else min(episodes, MAX_PARALLEL_EPISODES)
    quota = np.full(num_envs, episodes // num_envs)
    quota[: episodes % num_envs] += 1
    returns: list[float] = []
    lengths: list[int] = []
    counted = np.zeros(num_envs, dtype=int)
    recorded = episodes if video_episodes is None else min(video_episodes, episodes)
    envs = RecordEpisodeStatistics(_eval_envs(env_cfg, num_envs, recorded, video_dir, agent.core is not None))
    shape = envs.single_observation_space.shape
    if shape is None or int(np.prod(shape)) != agent.obs_dim:
        envs.close()
        raise UserError(
            f"env.id: {env_cfg.id} observes shape {shape}; the agent takes {agent.obs_dim} values"
        )
    state = agent.initial_state(num_envs)  # a recurrent agent's; zeroed where an episode ends
    try:
        obs, info = envs.reset(seed=seed)
        while (counted < quota).any():
            obs_t = agent.normalize(torch.as_tensor(obs, dtype=torch.float32, device=device))
            masks = None if agent.continuous else action_masks(info, num_envs, agent.actor_out_dim)
            mask = None if masks is None else torch.as_tensor(masks, device=device)
            action = yield ActionRequest(obs_t, mask, state)
            obs, _, terminated, truncated, info = envs.step(agent.env_action(action))
            state[torch.as_tensor(terminated | truncated, device=device)] = 0.0
            for env_index, episode_return, length in zip(*finished_episodes(info), strict=True):
                if counted[env_index] < quota[env_index]:
                    counted[env_index] += 1
                    returns.append(float(episode_return))
                    lengths.append(int(length))
    finally:
        close_envs(envs)
    return Episodes(np.asarray(returns), np.asarray(lengths))


def _eval_envs(
    env_cfg: EnvConfig, num_envs: int, recorded: int, video_dir: Path | None, sequences: bool
) -> gym.vector.VectorEnv:
    """The evaluation envs; with ``video_dir``, one env whose first ``recorded`` episodes are
    recorded there."""
    if video_dir is None:
        return make_vector_env(env_cfg, num_envs=num_envs, sequences=sequences)
    if not os.environ.get("DISPLAY"):
        # MuJoCo renders through an X display by default; headless machines need EGL (read when
        # mujoco is first imported, i.e. when the first MuJoCo env is made, which is below).
        os.environ.setdefault("MUJOCO_GL", "egl")
    # Frames are drawn into arrays, never a window, and nothing plays sound: SDL's dummy drivers
    # (read when pygame initialises, in the first render) keep pygame's classic-control and Box2D
    # renderers from looking for a desktop session and printing "XDG_RUNTIME_DIR is invalid" or
    # ALSA's errors on a headless machine.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    recorder = partial(
        RecordVideo,
        video_folder=str(video_dir),
        episode_trigger=lambda episode: episode < recorded,  # not the episode the last autoreset starts
        name_prefix="eval",
        disable_logger=True,
    )
    try:
        return make_vector_env(env_cfg, num_envs=1, render_mode="rgb_array", wrappers=[recorder])
    except gym.error.DependencyNotInstalled as exc:
        raise UserError(f"--video needs moviepy: pip install 'ppo-cli[video]' ({exc})") from None


def checkpoint_to_evaluate(target: Path) -> tuple[Path, dict[str, Any]]:
    """A checkpoint file as it is; for a run directory, its newest readable checkpoint.

    As ``resume=<run dir>`` does, a damaged ``last.pt`` (a crash mid-copy, a full disk) does not
    cost the run's evaluation when a periodic checkpoint still reads: each file skipped is logged
    with its reason, and so is the one used instead.
    """
    if target.is_dir():
        found = newest_valid_checkpoint(checkpoint_dir(target))
        if found is not None:
            if found[0].name != LAST:
                log.warning("evaluating %s instead, the newest readable checkpoint", found[0])
            return found
        resolve_checkpoint(target)  # one line if the run has no last.pt at all
        raise UserError(f"{checkpoint_dir(target)}: no readable checkpoint (each one skipped is named above)")
    checkpoint = resolve_checkpoint(target)
    return checkpoint, load_checkpoint(checkpoint)


def output_dir(checkpoint: Path) -> Path:
    """Where ``ppo-eval`` writes ``eval.json`` and ``videos/``: the run directory of a checkpoint
    in one, else the checkpoint file's folder."""
    return run_dir_of(checkpoint) if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def evaluate_checkpoint(
    target: Path,
    episodes: int,
    deterministic: bool | None,
    seed: int | None = None,
    video: bool = False,
    device: str = "cpu",
    trusted_modules: tuple[str, ...] = (),
    video_episodes: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run directory's (or a checkpoint file's) agent; videos (of the first
    ``video_episodes`` episodes, or all) go to the run directory's ``videos/``. The report is
    returned, not written (:func:`write_report`), so that a score is never lost to a run directory
    that cannot be written. ``deterministic`` None acts as the run's own evaluation did (its
    ``eval.deterministic``).

    Nothing read from the run is executed: the checkpoint loads as weights only, and an env id of
    the form ``module:Env`` is refused unless the user names that module in ``trusted_modules``.
    """
    if episodes < 1:
        raise UserError(f"--episodes: got {episodes}, allowed: an integer >= 1")
    if video_episodes is not None and video_episodes < 1:
        raise UserError(f"--video-episodes: got {video_episodes}, allowed: an integer >= 1")
    checkpoint, payload = checkpoint_to_evaluate(Path(target))
    trained = agent_from_checkpoint(payload, checkpoint, device)
    env_cfg = env_config_of(trained.config["env"])
    _import_trusted_modules(env_cfg.id, trusted_modules)
    seed = trained.config["seed"] + EVAL_SEED_OFFSET if seed is None else seed
    if deterministic is None:  # as the run evaluated itself (Atari presets sample)
        deterministic = bool(trained.config["eval"]["deterministic"])
    video_dir = output_dir(checkpoint) / "videos" / time.strftime("eval-%Y%m%d-%H%M%S") if video else None
    with _rendering_failure_explained(env_cfg.id, video_dir):
        torch_device = torch.device(device)
        result = evaluate(
            trained.network, env_cfg, episodes, deterministic, seed, torch_device, video_dir, video_episodes
        )
    return {
        "checkpoint": str(checkpoint),
        "global_step": trained.global_step,
        "env_id": env_cfg.id,
        "episodes": episodes,
        "deterministic": deterministic,
        "seed": seed,
        **result.summary(),
        "videos": sorted(str(p) for p in video_dir.glob("*.mp4")) if video_dir else [],
    }


def _import_trusted_modules(env_id: str, trusted_modules: tuple[str, ...]) -> None:
    """Import the modules the user trusts (``--import``), which register their envs; an env id of
    the form ``module:Env`` naming any other module is refused, since importing it would run code
    that only the run directory, untrusted input, asks for."""
    module = env_id.partition(":")[0] if ":" in env_id else None
    if module is not None and module not in trusted_modules:
        raise UserError(
            f"env.id: {env_id!r} needs module {module!r} imported, and ppo-eval runs nothing named by "
            f"a run dir; pass --import {module} if you trust it"
        )
    for name in trusted_modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"--import: cannot import {name!r} ({exc})") from None


@contextmanager
def _rendering_failure_explained(env_id: str, video_dir: Path | None) -> Iterator[None]:
    """A renderer failing while the body records to ``video_dir`` (no display, no EGL) becomes one
    line with what to try, not a traceback from deep in MuJoCo or OpenGL, and leaves no partial
    videos. Any other failure, and any failure without recording, is not about rendering: it is
    raised as it is."""
    try:
        yield
    except Exception as exc:
        if video_dir is None or not type(exc).__module__.startswith(RENDERER_MODULES):
            raise
        shutil.rmtree(video_dir, ignore_errors=True)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"--video: rendering {env_id} failed ({first_line}); try MUJOCO_GL=egl or MUJOCO_GL=osmesa"
        ) from None


def write_report(report: dict[str, Any]) -> Path:
    """Write ``report`` to its ``eval.json``; a file that cannot be written is one UserError."""
    path = output_dir(Path(report["checkpoint"])) / EVAL_REPORT
    write_json(path, report)
    return path
