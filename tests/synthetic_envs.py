"""Small envs whose right behaviour is known, importable as ``env.id=synthetic_envs:<Id>`` (the
tests directory is on sys.path under pytest)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class MatchDigits(gym.Env[np.ndarray, np.ndarray]):
    """Each step shows K digits (one-hot); the action is K digits; the reward is the fraction of
    them matched. A MultiDiscrete policy that copies its input scores 1 per step, a random one
    1 / n; 8 steps per episode."""

    def __init__(self, nvec: tuple[int, ...] = (3, 5, 2)) -> None:
        self.nvec = np.asarray(nvec)
        self.action_space = gym.spaces.MultiDiscrete(self.nvec, start=np.ones_like(self.nvec))
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(int(self.nvec.sum()),), dtype=np.float32)
        self.digits = np.zeros(len(self.nvec), dtype=np.int64)

    def _observe(self) -> np.ndarray:
        self.digits = self.np_random.integers(0, self.nvec)
        obs = np.zeros(int(self.nvec.sum()), dtype=np.float32)
        obs[np.concatenate([[0], np.cumsum(self.nvec)[:-1]]) + self.digits] = 1.0
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._observe(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert self.action_space.contains(np.asarray(action)), action  # numbered from start = 1
        reward = float(np.mean(np.asarray(action) - 1 == self.digits))
        return self._observe(), reward, False, False, {}


gym.register("MatchDigits-v0", entry_point=MatchDigits, max_episode_steps=8)


class PickAllowed(gym.Env[np.ndarray, int]):
    """Each step allows a random subset of the 6 actions, shown as the observation and reported
    in ``info["action_mask"]`` (gymnasium's convention); picking the highest allowed action
    scores 1, another allowed one 0, and a disallowed one raises: a run that completes never
    sampled one. 8 steps per episode."""

    def __init__(self) -> None:
        self.action_space = gym.spaces.Discrete(6)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(6,), dtype=np.float32)
        self.allowed = np.ones(6, dtype=np.int8)

    def _observe(self) -> tuple[np.ndarray, dict[str, Any]]:
        self.allowed = (self.np_random.random(6) < 0.5).astype(np.int8)
        self.allowed[self.np_random.integers(6)] = 1  # at least one
        return self.allowed.astype(np.float32), {"action_mask": self.allowed.copy()}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._observe()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.allowed[action]:
            raise ValueError(f"action {action} is not allowed here: {self.allowed}")
        reward = float(action == np.flatnonzero(self.allowed).max())
        obs, info = self._observe()
        return obs, reward, False, False, info


gym.register("PickAllowed-v0", entry_point=PickAllowed, max_episode_steps=8)


class PickAllowedInObservation(PickAllowed):
    """PickAllowed with the mask inside a Dict observation instead of the info."""

    def __init__(self) -> None:
        super().__init__()
        box = self.observation_space
        mask = gym.spaces.Box(0, 1, shape=(6,), dtype=np.int8)
        self.observation_space = gym.spaces.Dict({"observation": box, "action_mask": mask})  # type: ignore[assignment]

    def _observe(self) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = super()._observe()
        return {"observation": obs, "action_mask": info["action_mask"]}, {}  # type: ignore[return-value]


gym.register("PickAllowedInObservation-v0", entry_point=PickAllowedInObservation, max_episode_steps=8)


class BrightSide(gym.Env[np.ndarray, int]):
    """A 1x36x36 grayscale image (the smallest the Nature CNN takes) with a bright square in its
    left or right half; action 0 / 1 names the side, scoring 1 when right. A random policy scores
    4 per 8-step episode, one that reads the image 8."""

    SIZE = 36

    def __init__(self) -> None:
        self.action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.spaces.Box(0, 255, shape=(1, self.SIZE, self.SIZE), dtype=np.uint8)
        self.side = 0

    def _observe(self) -> np.ndarray:
        self.side = int(self.np_random.integers(2))
        image = np.zeros((1, self.SIZE, self.SIZE), dtype=np.uint8)
        top, left = self.np_random.integers(0, self.SIZE - 8), self.np_random.integers(0, self.SIZE // 2 - 8)
        left += self.side * (self.SIZE // 2)
        image[0, top : top + 8, left : left + 8] = 255
        return image

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._observe(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = float(int(action) == self.side)
        return self._observe(), reward, False, False, {}


gym.register("BrightSide-v0", entry_point=BrightSide, max_episode_steps=8)


class RememberCue(gym.Env[np.ndarray, int]):
    """Partially observed: the first observation shows a cue (+1 or -1), the later ones only a
    clock; at the last of the ``length`` steps, the action that matches the cue scores 1 (the
    other actions count for nothing). The cue is gone when it matters: a feed-forward policy
    guesses (0.5 per episode), one with memory scores 1."""

    def __init__(self, length: int = 4) -> None:
        self.length = length
        self.action_space = gym.spaces.Discrete(2)
        # [cue, fraction of the episode gone, 1 at the step that is scored]
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
        self.cue, self.t = 0, 0

    def _observe(self) -> np.ndarray:
        cue = (2 * self.cue - 1) if self.t == 0 else 0
        return np.array([cue, self.t / self.length, self.t == self.length - 1], dtype=np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(2)), 0
        return self._observe(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        scored = self.t == self.length - 1
        reward = float(scored and int(action) == self.cue)
        self.t += 1
        return self._observe(), reward, scored, False, {}


gym.register("RememberCue-v0", entry_point=RememberCue)


class TiedBySeed(gym.Env[np.ndarray, np.ndarray]):
    """Two-step episodes whose return is decided by the reset seed s: when s % 4 != 3 every step
    scores 0.3 whatever the action, so a GRPO group reset from s is tied (all returns 0.6);
    otherwise a step scores its (continuous) action, so the group's returns differ. The
    observation says which: 1 tied, 0 not."""

    def __init__(self) -> None:
        self.action_space = gym.spaces.Box(-10.0, 10.0, shape=(1,), dtype=np.float32)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.tied = True

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.tied = seed is None or seed % 4 != 3
        return np.array([self.tied], dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = 0.3 if self.tied else float(action[0])
        return np.array([self.tied], dtype=np.float32), reward, False, False, {}


gym.register("TiedBySeed-v0", entry_point=TiedBySeed, max_episode_steps=2)
