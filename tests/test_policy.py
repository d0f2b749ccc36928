"""TrainedAgent.predict, the Stable-Baselines3-style call: the same actions as act, the state
returned rather than updated."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from ppo_cli.agent import ActorCritic
from ppo_cli.config import AgentConfig
from ppo_cli.policy import TrainedAgent

OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)


def trained_agent(action_space: gym.spaces.Space, recurrent: str = "none") -> TrainedAgent:
    """An agent as load_agent builds it, with a policy head scaled up so that actions differ."""
    cfg = AgentConfig(actor_hidden=[8], critic_hidden=[8], recurrent=recurrent, recurrent_size=8)
    network = ActorCritic(OBS_SPACE, action_space, cfg, normalize_obs=True)
    with torch.no_grad():
        network.actor.linear_layers[-1].weight.mul_(100.0)
    return TrainedAgent(network, (3,), {}, 0)


def test_predict_returns_acts_actions_and_no_state_for_a_feed_forward_agent() -> None:
    agent = trained_agent(gym.spaces.Discrete(5, start=2))
    obs = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    actions, state = agent.predict(obs)
    assert state is None
    np.testing.assert_array_equal(actions, agent.act(obs, deterministic=True))
    assert len(set(actions.tolist())) > 1
    single, _ = agent.predict(obs[3])
    assert np.ndim(single) == 0 and single == actions[3]
    mask = np.zeros(5, dtype=bool)
    mask[4] = True
    assert agent.predict(obs[3], action_mask=mask)[0] == 6
    sampled = np.stack([agent.predict(obs[0], deterministic=False)[0] for _ in range(200)])
    assert len(set(sampled.tolist())) > 1  # sampled, unlike the default


def test_predict_returns_the_next_state_of_a_recurrent_agent_and_leaves_its_argument() -> None:
    """As in SB3: no state means the start of an episode, episode_start zeroes a row's state."""
    agent = trained_agent(gym.spaces.Box(-1.0, 1.0, (2,), np.float32), recurrent="lstm")
    rng = np.random.default_rng(1)
    first, second = (rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2))
    carried = agent.initial_state(4)
    expected_first = agent.act(first, state=carried)
    expected_second = agent.act(second, state=carried)

    actions, state = agent.predict(first)
    np.testing.assert_allclose(actions, expected_first)
    assert state is not None
    given = state.clone()
    actions, next_state = agent.predict(second, state)
    np.testing.assert_allclose(actions, expected_second)
    torch.testing.assert_close(next_state, carried)
    torch.testing.assert_close(state, given)  # the argument is left as it was

    restarted, restarted_state = agent.predict(
        second, state, episode_start=np.array([False, True, False, True])
    )
    fresh = agent.initial_state(4)
    fresh_actions = agent.act(second, state=fresh)
    np.testing.assert_allclose(restarted[[1, 3]], fresh_actions[[1, 3]])
    np.testing.assert_allclose(restarted[[0, 2]], expected_second[[0, 2]])
    assert not np.allclose(restarted[[1, 3]], expected_second[[1, 3]])
    torch.testing.assert_close(restarted_state[[1, 3]], fresh[[1, 3]])

    single, single_state = agent.predict(first[2])
    np.testing.assert_allclose(single, expected_first[2], rtol=1e-5, atol=1e-6)
    assert single_state is not None and single_state.shape == (agent.network.state_dim,)
    again, _ = agent.predict(second[2], single_state, episode_start=True)
    np.testing.assert_allclose(again, fresh_actions[2], rtol=1e-5, atol=1e-6)
