"""Packed parameters: views of one tensor per network, stepped exactly as the unpacked ones."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from support import algo_config, on_policy_batch

from ppo_cli.agent import ActorCritic
from ppo_cli.algos.clip import ClipUpdater
from ppo_cli.config import AgentConfig, ClipConfig
from ppo_cli.packing import packed_optimizer_state

OBS_SPACE = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
ACTION_SPACES = {"discrete": gym.spaces.Discrete(3), "box": gym.spaces.Box(-1.0, 1.0, shape=(2,))}
CLIP = algo_config("clip", update_epochs=2, num_minibatches=4, max_grad_norm=0.1)
assert isinstance(CLIP, ClipConfig)


def make_agent(kind: str) -> ActorCritic:
    return ActorCritic(OBS_SPACE, ACTION_SPACES[kind], AgentConfig([16, 16], [8, 8], log_std_init=-0.5))


@pytest.mark.parametrize("kind", sorted(ACTION_SPACES))
def test_packed_parameters_are_views_of_one_tensor_per_network(kind: str) -> None:
    agent = make_agent(kind)
    obs = torch.randn(5, 3)
    before = agent.policy_params(obs), agent.value(obs)
    actor, critic = agent.pack_parameters()
    torch.testing.assert_close((agent.policy_params(obs), agent.value(obs)), before, rtol=0, atol=0)
    assert actor.numel() == sum(p.numel() for p in agent.actor_parameters())
    assert actor.numel() + critic.numel() == sum(p.numel() for p in agent.parameters())
    with torch.no_grad():
        critic.zero_()
        actor.fill_(0.5)
    assert all(bool((p == 0).all()) for p in agent.critic.parameters())
    assert all(bool((p == 0.5).all()) for p in agent.actor_parameters())


@pytest.mark.parametrize("kind", sorted(ACTION_SPACES))
def test_packed_adam_steps_like_adam_on_every_parameter(kind: str) -> None:
    """Adam is elementwise and the gradient norm is global: packing changes no step."""
    packed = make_agent(kind)
    plain = copy.deepcopy(packed)
    initial = [p.detach().clone() for p in plain.parameters()]
    batch = on_policy_batch(plain, torch.randn(64, 3), torch.randn(64), torch.randn(64))
    updaters = [
        ClipUpdater(plain, torch.optim.Adam(plain.parameters(), lr=1e-2, fused=True), CLIP),
        ClipUpdater(packed, torch.optim.Adam(packed.pack_parameters(), lr=1e-2, fused=True), CLIP),
    ]
    for updater in updaters:
        torch.manual_seed(0)  # the same minibatch order
        updater.update(batch)
        updater.update(batch)
    assert all(not torch.equal(a, b) for a, b in zip(plain.parameters(), initial, strict=True))
    for a, b in zip(plain.parameters(), packed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_optimizer_state_saved_per_parameter_resumes_the_same_steps() -> None:
    """Checkpoints written before packing hold Adam's moments per parameter; converted, they
    continue exactly as the per-parameter optimizer would have."""
    plain = make_agent("box")
    plain_updater = ClipUpdater(plain, torch.optim.Adam(plain.parameters(), lr=1e-2, fused=True), CLIP)
    batch = on_policy_batch(plain, torch.randn(64, 3), torch.randn(64), torch.randn(64))
    plain_updater.update(batch)

    resumed = make_agent("box")
    resumed.load_state_dict(plain.state_dict())
    optimizer = torch.optim.Adam(resumed.pack_parameters(), lr=1e-2, fused=True)
    saved = copy.deepcopy(plain_updater.optimizer.state_dict())  # as a checkpoint holds it
    state = packed_optimizer_state(saved, list(resumed.parameters()), resumed.packs)
    optimizer.load_state_dict(state)
    for updater in (plain_updater, ClipUpdater(resumed, optimizer, CLIP)):
        torch.manual_seed(1)
        updater.update(batch)
    for a, b in zip(plain.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_network_never_stepped_gets_no_optimizer_state() -> None:
    agent = make_agent("discrete")
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-2)
    agent.policy_params(torch.randn(4, 3)).sum().backward()  # a loss of the actor alone
    optimizer.step()
    packed = make_agent("discrete")
    packed.pack_parameters()
    converted = packed_optimizer_state(optimizer.state_dict(), list(packed.parameters()), packed.packs)
    assert sorted(converted["state"]) == [0]  # the actor's pack; the critic was never stepped
    assert converted["state"][0]["exp_avg"].shape == packed.packs[0].flat.shape
    assert converted["param_groups"][0]["params"] == [0, 1]
    assert converted["param_groups"][0]["lr"] == 1e-2
