"""MultiDiscrete actions, action masks, and action spaces numbered from a ``start``, end to end."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from support import compose_config

from ppo_cli import load_agent
from ppo_cli.agent import ActorCritic
from ppo_cli.config import AgentConfig
from ppo_cli.distributed import SINGLE_PROCESS
from ppo_cli.envs import action_masks, make_vector_env
from ppo_cli.errors import UserError
from ppo_cli.iteration import build_state
from ppo_cli.train import train

OBS = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)


@pytest.mark.parametrize(
    "space", [gym.spaces.Discrete(4, start=-2), gym.spaces.MultiDiscrete([3, 2, 4], start=[1, 0, -1])]
)
def test_env_actions_are_numbered_from_the_space_start(space: gym.spaces.Space) -> None:
    """The agent samples from 0; the env receives actions inside its own space."""
    agent = ActorCritic(OBS, space, AgentConfig(actor_hidden=[8], critic_hidden=[8]))
    actions = agent.act(torch.randn(500, 3))
    sent = agent.env_action(actions)
    assert all(space.contains(np.asarray(a, dtype=space.dtype)) for a in sent)
    np.testing.assert_array_equal(sent - actions.numpy(), np.broadcast_to(space.start, sent.shape))


@pytest.mark.slow
def test_multidiscrete_policy_learns_to_match_digits(tmp_path: Path) -> None:
    """MatchDigits: copying the K shown digits scores 8 per episode, guessing about 2.8 (seeds 0-2
    reach 8.0 with this budget)."""
    cfg = compose_config(
        "env.id=synthetic_envs:MatchDigits-v0", "env.num_envs=8", "env.num_steps=32", "~tuned",
        "algo.update_epochs=4", "algo.num_minibatches=4", "algo.learning_rate=0.003", "algo.ent_coef=0.0",
        "total_timesteps=20480", "eval.episodes=10",
    )  # fmt: skip
    summary = train(cfg, tmp_path)
    assert summary["eval_mean"] >= 7.5, summary
    # The saved agent, rebuilt from its checkpoint alone, copies the digits in the env's numbering.
    env = gym.make("synthetic_envs:MatchDigits-v0")
    obs, _ = env.reset(seed=5)
    agent = load_agent(tmp_path)
    _, reward, *_ = env.step(agent.act(obs))
    assert reward == 1.0


@pytest.mark.parametrize(
    ("algo", "env_id"),
    [("clip", "PickAllowed-v0"), ("trpo", "PickAllowed-v0"), ("clip", "PickAllowedInObservation-v0")],
)
@pytest.mark.slow
def test_masked_actions_are_never_sampled_and_the_policy_learns(
    algo: str, env_id: str, tmp_path: Path
) -> None:
    """PickAllowed raises on a disallowed action, in training and evaluation alike; the highest
    allowed action scores 1 per step (8 per episode), a uniform pick among the allowed ones about
    half that. The mask comes in the info, or in a Dict observation."""
    cfg = compose_config(
        f"algo={algo}", f"env.id=synthetic_envs:{env_id}", "env.num_envs=8", "env.num_steps=32",
        "~tuned", "algo.learning_rate=0.003", "total_timesteps=16384", "eval.episodes=10",
        *(["algo.update_epochs=4", "algo.num_minibatches=4", "algo.ent_coef=0.0"] if algo == "clip" else []),
    )  # fmt: skip
    summary = train(cfg, tmp_path)
    assert summary["eval_mean"] >= 7.5, summary
    if env_id != "PickAllowed-v0":
        return
    agent = load_agent(tmp_path)
    env = gym.make("synthetic_envs:PickAllowed-v0")
    obs, info = env.reset(seed=3)
    for _ in range(8):  # the saved agent takes the mask as the env reports it
        obs, reward, _, _, info = env.step(int(agent.act(obs, action_mask=info["action_mask"])))
        assert reward == 1.0


def test_action_masks_read_from_vector_env_infos() -> None:
    """Sync vector envs gather each env's info["action_mask"]; an env that reports none allows all;
    MultiDiscrete masks come per component and are concatenated."""
    info = {
        "action_mask": np.array([[1, 0, 1], [0, 0, 0]], dtype=np.int8),
        "_action_mask": np.array([True, False]),
    }
    np.testing.assert_array_equal(action_masks(info, 2, 3), [[True, False, True], [True, True, True]])
    assert action_masks({}, 2, 3) is None
    per_component = {"action_mask": (np.array([[1, 0], [0, 1]]), np.array([[1, 1, 0], [0, 1, 1]]))}
    np.testing.assert_array_equal(action_masks(per_component, 2, 5), [[1, 0, 1, 1, 0], [0, 1, 0, 1, 1]])
    with pytest.raises(UserError, match="info\\['action_mask'\\] has 3 entries, for 4 actions"):
        action_masks(info, 2, 4)


def test_a_rollout_stores_the_masked_policy_it_sampled_from() -> None:
    """The stored log pi_old(a|s) and policy parameters are those of the masked policy, which
    the update recomputes from the stored masks: the first ratio of an update is exactly 1."""
    cfg = compose_config("env.id=synthetic_envs:PickAllowed-v0", "env.num_envs=4", "env.num_steps=16")
    with closing(make_vector_env(cfg.env)) as envs:
        state = build_state(cfg, envs, torch.device("cpu"), SINGLE_PROCESS)
        state.collector.collect()
    storage = state.collector.storage
    assert storage.action_masks is not None and not bool(storage.action_masks.all())
    assert bool(storage.action_masks.gather(-1, storage.actions.unsqueeze(-1)).all())  # only allowed ones
    out = state.agent.evaluate(storage.obs, storage.actions, storage.action_masks)
    torch.testing.assert_close(out.log_prob, storage.log_probs)
    torch.testing.assert_close(out.policy_params, storage.policy_params)
    unmasked = state.agent.evaluate(storage.obs, storage.actions)
    assert not torch.allclose(unmasked.log_prob, storage.log_probs)
