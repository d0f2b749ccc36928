"""The Atari preprocessing of Mnih et al. 2015 ("Human-level control through deep reinforcement
learning", Methods), as PPO's Atari results use it (Schulman et al. 2017; Huang et al. 2022, "The
37 Implementation Details of PPO", details 1-9).

gymnasium's wrappers do most of it: ``AtariPreprocessing`` (up to 30 no-op actions at reset, the
action repeated for 4 frames with the maximum over the last two, 84x84 grayscale),
``ClipReward`` and ``FrameStackObservation``. Two pieces it lacks are written here:

* :class:`EpisodicLife`: during training a lost life ends the episode for the learner, so it
  cannot bootstrap value across a life it has lost; the game itself goes on (only a real game
  over resets the emulator). ``AtariPreprocessing(terminal_on_life_loss=True)`` is not the same:
  under autoreset, every lost life would reset the whole game.
* :class:`FireReset`: games that wait for FIRE after a reset (Breakout, BeamRider...) get it, so
  the agent does not have to discover that the game has not started.

The reported episode returns are those of whole games with raw rewards:
``RecordEpisodeStatistics`` sits inside the life-loss and clipping wrappers, and the rollout
reports what it records (see ``rollout.py``). Evaluation plays whole games unclipped.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from gymnasium.wrappers import AtariPreprocessing, ClipReward, FrameStackObservation, RecordEpisodeStatistics

from ppo_cli.config import AtariConfig


class EpisodicLife(gym.Wrapper):
    """``terminated`` when a life is lost; reset only restarts the emulator on a real game over,
    otherwise it continues the game with one no-op step."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.lives = 0
        self.game_over = True

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = _emulator(self.env).ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:  # the no-op ended the game: start a new one after all
                obs, info = self.env.reset(**kwargs)
        self.game_over = False
        self.lives = _emulator(self.env).ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Press FIRE after every reset, for games that do not start without it."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.fire = _emulator(env).get_action_meanings().index("FIRE")

    @staticmethod
    def needed(env: gym.Env) -> bool:
        return "FIRE" in _emulator(env).get_action_meanings()

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(self.fire)
        if terminated or truncated:
            obs, info = self.env.reset(**kwargs)
        return obs, info


def _emulator(env: gym.Env) -> Any:
    """The ale-py env under the wrappers (its ``ale`` interface and action meanings)."""
    return env.unwrapped


def wrap_atari(env: gym.Env, cfg: AtariConfig, training: bool) -> gym.Wrapper:
    """``env`` (an ALE env that renders every frame: ``frameskip=1``) preprocessed as in
    training (``training=True``: life loss ends episodes, rewards clipped to [-1, 1], game
    statistics recorded) or as in evaluation (whole games, raw rewards)."""
    env = AtariPreprocessing(
        env, noop_max=cfg.noop_max, frame_skip=cfg.frame_skip, screen_size=cfg.screen_size
    )
    if training:
        env = RecordEpisodeStatistics(env)  # whole games, raw rewards: what the rollout reports
        if cfg.episodic_life:
            env = EpisodicLife(env)
    if FireReset.needed(env):
        env = FireReset(env)
    if training and cfg.clip_rewards:
        env = ClipReward(env, -1.0, 1.0)
    return FrameStackObservation(env, cfg.frame_stack)


def is_atari(spec: gym.envs.registration.EnvSpec) -> bool:
    """Whether ``spec`` is an environment of ale-py."""
    entry = spec.entry_point
    return isinstance(entry, str) and entry.startswith("ale_py")
