"""Envs that fail, importable as ``env.id=faulty_envs:Exploding-v0`` (tests dir on PYTHONPATH):
stand-ins for a simulator that raises, that takes its process down, that never returns, or that
breaks its own observation space mid-run."""

from __future__ import annotations

import os
import signal
import time

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

FAILING_STEP = 50  # counted across episodes


class FailingCartPole(CartPoleEnv):
    """CartPole that calls :meth:`fail` at its FAILING_STEP-th step."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.steps = 0

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.steps += 1
        if self.steps == FAILING_STEP:
            self.fail()
        return super().step(action)

    def fail(self) -> None:
        raise RuntimeError("the simulator exploded")


class KilledCartPole(FailingCartPole):
    """Its process is killed (SIGKILL, as by the OOM killer) instead."""

    def fail(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class HangingCartPole(FailingCartPole):
    """Its step never returns (a simulator stuck in a deadlock or an endless loop)."""

    def fail(self) -> None:
        while True:
            time.sleep(60)


class GrowingCartPole(CartPoleEnv):
    """From its FAILING_STEP-th step on, its observations hold 5 values; its space says 4."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.steps = 0

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps += 1
        if self.steps >= FAILING_STEP:
            obs = np.append(obs, np.float32(0.0))
        return obs, reward, terminated, truncated, info


class UnstartableCartPole(CartPoleEnv):
    """Raises in every reset."""

    def reset(self, **kwargs: object) -> tuple[np.ndarray, dict]:
        raise RuntimeError("the simulator would not start")


class BuggyConstructor(CartPoleEnv):
    """Takes ``size`` but its constructor raises TypeError whatever it is given: a bug, not a
    wrong keyword argument."""

    def __init__(self, size: int = 4) -> None:
        super().__init__()
        self.size = len(size)  # type: ignore[arg-type]


gym.register("Exploding-v0", entry_point=FailingCartPole, max_episode_steps=500)
gym.register("Killed-v0", entry_point=KilledCartPole, max_episode_steps=500)
gym.register("Hanging-v0", entry_point=HangingCartPole, max_episode_steps=500)
gym.register("Growing-v0", entry_point=GrowingCartPole, max_episode_steps=500)
gym.register("Unstartable-v0", entry_point=UnstartableCartPole, max_episode_steps=500)
gym.register("BuggyConstructor-v0", entry_point=BuggyConstructor, max_episode_steps=500)


class SegfaultingCartPole(FailingCartPole):
    """Its process dies of a segmentation fault (SIGSEGV), as in a crashing native simulator."""

    def fail(self) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)


gym.register("Segfaulting-v0", entry_point=SegfaultingCartPole, max_episode_steps=500)


class PoisonedBySeed(CartPoleEnv):
    """CartPole whose rewards are NaN from its 20th step on when it was reset with a seed of 1000
    or more: one member of a population (seeded there) meets a non-finite number, the others not."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.poisoned, self.steps = False, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            self.poisoned = seed >= 1000
        return super().reset(seed=seed, options=options)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps += 1
        return (
            obs,
            float("nan") if self.poisoned and self.steps >= 20 else reward,
            terminated,
            truncated,
            info,
        )


gym.register("PoisonedBySeed-v0", entry_point=PoisonedBySeed, max_episode_steps=500)
