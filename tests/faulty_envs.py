"""Envs that fail mid-run, importable as ``env.id=faulty_envs:Exploding-v0`` (tests dir on
PYTHONPATH): stand-ins for a simulator that raises, takes its process down, crashes in native
code, or never returns."""

from __future__ import annotations

import ctypes
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


class SegfaultingCartPole(FailingCartPole):
    """Its step reads address 0, as a buggy native simulator does: the process dies of SIGSEGV."""

    def fail(self) -> None:
        ctypes.string_at(0)


gym.register("Exploding-v0", entry_point=FailingCartPole, max_episode_steps=500)
gym.register("Killed-v0", entry_point=KilledCartPole, max_episode_steps=500)
gym.register("Hanging-v0", entry_point=HangingCartPole, max_episode_steps=500)
gym.register("Segfaulting-v0", entry_point=SegfaultingCartPole, max_episode_steps=500)
