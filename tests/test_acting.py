"""Acting during rollouts: the joint forward pass, and numpy acting against torch acting."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from ppo_cli.acting import (
    ActingBuffers,
    JointForward,
    NumpyActing,
    PopulationActing,
    TorchActing,
    make_acting,
)
from ppo_cli.agent import ActorCritic
from ppo_cli.config import AgentConfig

OBS = gym.spaces.Box(-np.inf, np.inf, shape=(5,), dtype=np.float32)
DISCRETE = gym.spaces.Discrete(3)
BOX = gym.spaces.Box(np.array([-1.0, -2.0], dtype=np.float32), np.array([1.0, 0.5], dtype=np.float32))
SHAPES = pytest.mark.parametrize(
    ("actor_hidden", "critic_hidden", "activation"),
    [([8, 8], [8, 8], "tanh"), ([16, 4], [8, 32], "relu"), ([8], [8, 8], "tanh")],
    ids=["same-sizes", "other-sizes", "other-depths"],
)
SPACES = pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])


def make_agent(action_space: gym.spaces.Space, actor_hidden: list[int], critic_hidden: list[int],
               activation: str) -> ActorCritic:  # fmt: skip
    cfg = AgentConfig(actor_hidden=actor_hidden, critic_hidden=critic_hidden, activation=activation)
    agent = ActorCritic(OBS, action_space, cfg)
    with torch.no_grad():
        for layer in [*agent.actor.linear_layers, *agent.critic.linear_layers]:
            nn.init.normal_(layer.bias)  # the initial zero biases would hide a misplaced bias
        agent.actor.linear_layers[-1].weight.mul_(100.0)  # actions far apart, means beyond bounds
    return agent


@SHAPES
@SPACES
def test_joint_forward_is_actor_and_critic_side_by_side(
    action_space: gym.spaces.Space, actor_hidden: list[int], critic_hidden: list[int], activation: str
) -> None:
    agent = make_agent(action_space, actor_hidden, critic_hidden, activation)
    obs = torch.randn(6, 5)
    out = torch.empty(6, agent.actor_out_dim + 1)
    with torch.no_grad():
        JointForward(agent)(obs, out)
        torch.testing.assert_close(out[:, :-1], agent.actor(obs))
        torch.testing.assert_close(out[:, -1], agent.value(obs))


def buffers(agent: ActorCritic, steps: int, envs: int) -> ActingBuffers:
    """Zeroed (obs, outputs, actions) tensors of a rollout, and its exploration noise."""
    dist = agent.dist
    return ActingBuffers(
        torch.zeros(steps, envs, 5),
        torch.zeros(steps, envs, agent.actor_out_dim + 1),
        torch.zeros(steps, envs, *dist.action_shape, dtype=dist.action_dtype),
        agent.exploration_noise((steps, envs)),
    )


@SHAPES
@SPACES
def test_numpy_acting_writes_and_samples_what_torch_acting_does(
    action_space: gym.spaces.Space, actor_hidden: list[int], critic_hidden: list[int], activation: str
) -> None:
    agent = make_agent(action_space, actor_hidden, critic_hidden, activation)
    if isinstance(action_space, gym.spaces.Box):
        with torch.no_grad():
            agent.log_std.copy_(torch.tensor([0.5, -1.0]))
    torch_tensors = buffers(agent, steps=3, envs=64)
    numpy_tensors = ActingBuffers(*(tensor.clone() for tensor in torch_tensors[:4]))  # the same noise
    by_torch = TorchActing(agent, torch_tensors)
    by_numpy = make_acting(agent, numpy_tensors)
    assert isinstance(by_numpy, NumpyActing if JointForward.joinable(agent) else TorchActing)
    with torch.inference_mode():
        for t in range(3):
            obs = torch.randn(64, 5)
            env_actions = by_torch(t, obs), by_numpy(t, obs)
            np.testing.assert_allclose(*env_actions, rtol=1e-5, atol=1e-5)
    for torch_tensor, numpy_tensor in zip(torch_tensors[:3], numpy_tensors[:3], strict=True):
        torch.testing.assert_close(numpy_tensor, torch_tensor)
    obs, outputs, actions, noise = numpy_tensors[:4]
    # What was stored is the network's output and the distribution's draw from it.
    with torch.no_grad():
        torch.testing.assert_close(outputs[..., -1], agent.value(obs))
        params = agent.policy_params(obs)
    # (For the Gaussian the exploration noise is std * eps already: see test_agent.py.)
    expected = agent.dist.mode(params) + noise if agent.continuous else agent.dist.sample(params, noise)
    torch.testing.assert_close(actions, expected)
    if isinstance(action_space, gym.spaces.Box):
        assert (env_actions[1] >= BOX.low).all() and (env_actions[1] <= BOX.high).all()
        assert (actions.numpy() < BOX.low).any() or (actions.numpy() > BOX.high).any()  # stored raw
    else:
        assert len(np.unique(actions.numpy())) == 3


def test_masked_acting_samples_only_allowed_actions_alike_in_numpy_and_torch() -> None:
    """Random masks (at least one action allowed): both ways store the masked logits and draw
    the same actions, every one of them allowed, though the unmasked policy prefers others."""
    agent = make_agent(DISCRETE, [8, 8], [8, 8], "tanh")
    masks = torch.rand(20, 64, 3) < 0.5
    masks[..., 0] |= ~masks.any(-1)
    torch_tensors = buffers(agent, steps=20, envs=64)._replace(masks=masks)
    numpy_tensors = ActingBuffers(*(tensor.clone() for tensor in torch_tensors[:5]))
    by_torch, by_numpy = TorchActing(agent, torch_tensors), make_acting(agent, numpy_tensors)
    assert isinstance(by_numpy, NumpyActing)
    with torch.inference_mode():
        for t in range(20):
            obs = torch.randn(64, 5)
            np.testing.assert_array_equal(by_torch(t, obs), by_numpy(t, obs))
    torch.testing.assert_close(numpy_tensors.outputs, torch_tensors.outputs)
    actions = numpy_tensors.actions
    assert bool(masks.gather(-1, actions.unsqueeze(-1)).all())
    with torch.no_grad():
        unmasked = agent.dist.sample(agent.policy_params(numpy_tensors.obs), numpy_tensors.noise)
    assert not bool(masks.gather(-1, unmasked.unsqueeze(-1)).all())


@SPACES
def test_population_acting_writes_and_samples_what_each_member_s_numpy_acting_does(
    action_space: gym.spaces.Space,
) -> None:
    """Three members with their own weights and noise: the batched pass stores the outputs and
    returns the actions each member's own NumpyActing does, in float rounding."""
    agents = [make_agent(action_space, [8, 8], [8, 8], "tanh") for _ in range(3)]
    alone = [buffers(agent, steps=2, envs=4) for agent in agents]
    together = [ActingBuffers(*(tensor.clone() for tensor in b[:4])) for b in alone]  # the same noise
    by_member = [NumpyActing(agent, b) for agent, b in zip(agents, alone, strict=True)]
    population = PopulationActing([NumpyActing(agent, b) for agent, b in zip(agents, together, strict=True)])
    for t in range(2):
        observations = [torch.randn(4, 5) for _ in agents]
        population.act(t, observations)
        for k, (acting, obs) in enumerate(zip(by_member, observations, strict=True)):
            np.testing.assert_allclose(population.member(k)(t, obs), acting(t, obs), rtol=1e-5, atol=1e-5)
    for alone_buffers, together_buffers in zip(alone, together, strict=True):
        for a, b in zip(alone_buffers[:3], together_buffers[:3], strict=True):
            torch.testing.assert_close(b, a)
