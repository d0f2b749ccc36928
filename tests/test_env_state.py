"""Env state saved as plain data comes back exactly, and only where that is possible."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from support import compose_config

from ppo_cli import env_state
from ppo_cli.envs import make_vector_env


def _play(envs, actions: np.ndarray) -> list[tuple]:  # type: ignore[no-untyped-def]
    """Step through ``actions`` and record everything the envs report."""
    trace = []
    for action in actions:
        obs, reward, terminated, truncated, info = envs.step(action)
        trace.append((obs.copy(), reward.copy(), terminated.copy(), truncated.copy()))
        if "episode" in info:
            trace.append((info["_episode"].copy(), info["episode"]["r"].copy(), info["episode"]["l"].copy()))
    return trace


def _through_checkpoint_format(state: object) -> object:
    """Save and load as a checkpoint would: torch.save, then a weights-only load."""
    buffer = io.BytesIO()
    torch.save({"envs": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["envs"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["env=CartPole"],  # gymnasium's numpy-vectorised CartPoleVectorEnv (NEXT_STEP autoreset)
        ["env=CartPole", "env.vectorization=sync"],
        ["env=Pendulum"],  # sync, continuous actions
        ["env=Acrobot", "env.num_envs=2"],
    ],
    ids=" ".join,
)
def test_restored_envs_continue_exactly(overrides: list[str]) -> None:
    cfg = compose_config(*overrides).env
    rng = np.random.default_rng(0)
    original = make_vector_env(cfg)
    original.reset(seed=1)
    _play(original, [original.action_space.sample() for _ in range(300)])  # mid-episode, some ended
    state = _through_checkpoint_format(env_state.capture(original))
    assert state is not None

    actions = [original.action_space.sample() for _ in range(600)]
    rng.shuffle(actions)
    expected = _play(original, actions)

    fresh = make_vector_env(cfg)
    fresh.reset(seed=999)  # a different state, overwritten below
    assert env_state.restore(fresh, state)
    got = _play(fresh, actions)
    assert len(got) == len(expected)
    for got_step, expected_step in zip(got, expected, strict=True):
        for a, b in zip(got_step, expected_step, strict=True):
            np.testing.assert_array_equal(a, b)
    original.close()
    fresh.close()


def test_restore_refuses_envs_of_another_shape() -> None:
    two = make_vector_env(compose_config("env=Pendulum", "env.num_envs=2").env)
    four = make_vector_env(compose_config("env=Pendulum", "env.num_envs=4").env)
    two.reset(seed=0)
    four.reset(seed=0)
    before = four.unwrapped.envs[0].unwrapped.state.copy()  # type: ignore[attr-defined]
    assert not env_state.restore(four, env_state.capture(two))  # type: ignore[arg-type]
    np.testing.assert_array_equal(four.unwrapped.envs[0].unwrapped.state, before)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "overrides",
    [
        ["env=CartPole", "env.vectorization=async", "env.num_envs=2"],  # state in worker processes
        ["env=HalfCheetah"],  # MuJoCo's native simulator state
    ],
    ids=" ".join,
)
def test_state_out_of_reach_is_not_captured(overrides: list[str]) -> None:
    envs = make_vector_env(compose_config(*overrides).env)
    envs.reset(seed=0)
    assert env_state.capture(envs) is None
    envs.close()
