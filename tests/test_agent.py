"""ActorCritic: gradient isolation, initialisation, acting, and the joint rollout forward."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from ppo_cli.agent import ActorCritic
from ppo_cli.config import AgentConfig
from ppo_cli.distributions import Categorical, DiagonalGaussian

OBS = gym.spaces.Box(-np.inf, np.inf, shape=(5,), dtype=np.float32)
DISCRETE = gym.spaces.Discrete(3)
BOX = gym.spaces.Box(np.array([-1.0, -2.0], dtype=np.float32), np.array([1.0, 0.5], dtype=np.float32))


def _linears(seq: nn.Sequential) -> list[nn.Linear]:
    return [m for m in seq if isinstance(m, nn.Linear)]


def _actor_params(agent: ActorCritic) -> list[torch.Tensor]:
    params = list(agent.actor.parameters())
    if agent.continuous:
        params.append(agent.log_std)
    return params


def _no_grad(p: torch.Tensor) -> bool:
    return p.grad is None or bool((p.grad == 0).all())


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])
def test_parameters_split_into_actor_and_critic(action_space, small_agent_cfg) -> None:
    agent = ActorCritic(OBS, action_space, small_agent_cfg, normalize_obs=True)
    actor = {id(p) for p in _actor_params(agent)}
    critic = {id(p) for p in agent.critic.parameters()}
    assert not actor & critic
    assert actor | critic == {id(p) for p in agent.parameters()}


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])
def test_value_loss_gradients_reach_only_critic(action_space, small_agent_cfg) -> None:
    agent = ActorCritic(OBS, action_space, small_agent_cfg)
    obs = torch.randn(16, 5)
    out = agent.evaluate(obs, agent.act(obs))
    (out.value - torch.randn(16)).square().mean().backward()
    assert all(_no_grad(p) for p in _actor_params(agent))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.critic.parameters())


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])
def test_policy_loss_gradients_reach_only_actor(action_space, small_agent_cfg) -> None:
    agent = ActorCritic(OBS, action_space, small_agent_cfg)
    obs = torch.randn(16, 5)
    out = agent.evaluate(obs, agent.act(obs))
    (-(out.log_prob * torch.randn(16)).mean() - 0.01 * out.entropy.mean()).backward()
    assert all(_no_grad(p) for p in agent.critic.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _actor_params(agent))


def _assert_orthogonal(weight: torch.Tensor, gain: float) -> None:
    out_dim, in_dim = weight.shape
    gram = weight @ weight.T if out_dim <= in_dim else weight.T @ weight
    eye = torch.eye(min(out_dim, in_dim))
    torch.testing.assert_close(gram, gain**2 * eye, atol=1e-4 * gain**2, rtol=0)


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])
def test_orthogonal_init_gains(action_space) -> None:
    # Layer shapes that exercise both orientations: 5 -> 16 (tall), 16 -> 4 (wide), 4 -> 4.
    cfg = AgentConfig(actor_hidden=[16, 4, 4], critic_hidden=[16, 4], activation="relu")
    agent = ActorCritic(OBS, action_space, cfg)
    for net, head_gain in ((agent.actor, 0.01), (agent.critic, 1.0)):
        layers = _linears(net)
        for layer in layers[:-1]:
            _assert_orthogonal(layer.weight.detach(), math.sqrt(2))
        _assert_orthogonal(layers[-1].weight.detach(), head_gain)
        for layer in layers:
            assert torch.count_nonzero(layer.bias) == 0
    head = 2 if agent.continuous else 3
    assert [m.out_features for m in _linears(agent.actor)] == [16, 4, 4, head]
    assert [m.out_features for m in _linears(agent.critic)] == [16, 4, 1]
    assert all(isinstance(m, nn.ReLU) for m in agent.actor if not isinstance(m, nn.Linear))


def test_discrete_gives_categorical_over_n(small_agent_cfg) -> None:
    agent = ActorCritic(OBS, gym.spaces.Discrete(7), small_agent_cfg)
    assert not agent.continuous and isinstance(agent.dist, Categorical)
    obs = torch.randn(4, 5)
    assert agent.policy_params(obs).shape == (4, 7)
    action = agent.act(obs)
    assert action.shape == (4,) and action.dtype == torch.int64
    out = agent.evaluate(obs, action)
    assert out.value.shape == out.log_prob.shape == out.entropy.shape == (4,)


def test_box_gives_gaussian_with_state_independent_std() -> None:
    cfg = AgentConfig(actor_hidden=[8], critic_hidden=[8], log_std_init=-0.7)
    agent = ActorCritic(OBS, BOX, cfg)
    assert agent.continuous and isinstance(agent.dist, DiagonalGaussian)
    obs = torch.randn(4, 5)
    mean, log_std = agent.policy_params(obs).chunk(2, dim=-1)
    torch.testing.assert_close(mean, agent.actor(obs))
    torch.testing.assert_close(log_std, torch.full((4, 2), -0.7))
    assert agent.act(obs).shape == (4, 2)


def test_env_action_clips_but_stored_action_is_raw() -> None:
    cfg = AgentConfig(actor_hidden=[8], critic_hidden=[8], log_std_init=1.5)  # std ~ 4.5
    agent = ActorCritic(OBS, BOX, cfg)
    obs = torch.randn(256, 5)
    raw = agent.act(obs)
    env_action = agent.env_action(raw)
    assert isinstance(env_action, np.ndarray)
    np.testing.assert_array_equal(env_action, np.clip(raw.numpy(), BOX.low, BOX.high))
    assert (env_action >= BOX.low).all() and (env_action <= BOX.high).all()
    outside = (raw.numpy() < BOX.low) | (raw.numpy() > BOX.high)
    assert outside.any()  # the stored action really is unclipped
    # Clipping changes the log-probability: the update must see the raw action.
    raw_lp = agent.evaluate(obs, raw).log_prob
    clipped_lp = agent.evaluate(obs, torch.as_tensor(env_action)).log_prob
    assert not torch.allclose(clipped_lp, raw_lp)


def test_env_action_discrete_passes_through(small_agent_cfg) -> None:
    agent = ActorCritic(OBS, DISCRETE, small_agent_cfg)
    action = torch.tensor([0, 2, 1])
    np.testing.assert_array_equal(agent.env_action(action), np.array([0, 2, 1]))


def test_deterministic_discrete_is_argmax(small_agent_cfg) -> None:
    agent = ActorCritic(OBS, gym.spaces.Discrete(4), small_agent_cfg)
    with torch.no_grad():
        agent.actor[-1].weight.mul_(300.0)  # spread logits so argmax is unambiguous
    obs = torch.randn(64, 5)
    with torch.no_grad():
        logits = agent.actor(obs)
    action = agent.act(obs, deterministic=True)
    torch.testing.assert_close(action, logits.argmax(-1))
    assert len(set(action.tolist())) > 1


def test_deterministic_box_is_mean() -> None:
    cfg = AgentConfig(actor_hidden=[8], critic_hidden=[8], log_std_init=0.3)
    agent = ActorCritic(OBS, BOX, cfg)
    obs = torch.randn(10, 5)
    with torch.no_grad():
        mean = agent.actor(obs)
    torch.testing.assert_close(agent.act(obs, deterministic=True), mean)
    torch.testing.assert_close(agent.act(obs, deterministic=True), mean)


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])
def test_noisy_action_is_the_distributions_sample(action_space, small_agent_cfg) -> None:
    """The rollout samples from the actor's raw output with pre-drawn noise; that must be the
    draw ``dist.sample`` makes from the full parameters with the same noise."""
    agent = ActorCritic(OBS, action_space, small_agent_cfg, normalize_obs=False)
    with torch.no_grad():
        agent.actor[-1].weight.mul_(100.0)  # logits / means far from their initial near-zero
        if agent.continuous:
            agent.log_std.copy_(torch.tensor([0.5, -1.0]))
    obs = torch.randn(512, 5)
    torch.manual_seed(3)
    rollout_noise = agent.exploration_noise((512,))
    torch.manual_seed(3)
    params = agent.policy_params(obs).detach()
    noise = agent.dist.draw_noise((512,), torch.device("cpu"))
    expected = agent.dist.sample(params, noise)
    torch.testing.assert_close(agent.noisy_action(agent.actor(obs).detach(), rollout_noise), expected)


def test_box_log_prob_is_diagonal_gaussian_density() -> None:
    cfg = AgentConfig(actor_hidden=[8], critic_hidden=[8], log_std_init=0.0)
    agent = ActorCritic(OBS, BOX, cfg)
    with torch.no_grad():
        agent.log_std.copy_(torch.tensor([0.2, -0.4]))
    obs = torch.randn(6, 5)
    action = torch.randn(6, 2) * 3
    out = agent.evaluate(obs, action)
    with torch.no_grad():
        mu = agent.actor(obs)
    log_std = torch.tensor([0.2, -0.4])
    z = (action - mu) / log_std.exp()
    expected = (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(out.log_prob, expected.detach())
    expected_entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum()
    torch.testing.assert_close(out.entropy, expected_entropy.expand(6))


def test_normalize_uses_frozen_obs_statistics(small_agent_cfg) -> None:
    agent = ActorCritic(OBS, DISCRETE, small_agent_cfg, normalize_obs=True, clip_obs=3.0)
    stats = agent.obs_normalizer.stats
    stats.mean.copy_(torch.arange(5, dtype=torch.float64))
    stats.var.copy_(torch.full((5,), 4.0, dtype=torch.float64))
    obs = torch.randn(3, 5)
    before = stats.count.clone()
    expected = torch.clamp((obs - torch.arange(5.0)) / math.sqrt(4.0 + 1e-8), -3.0, 3.0)
    torch.testing.assert_close(agent.normalize(obs), expected)
    assert stats.count == before
    np.testing.assert_allclose(agent.obs_normalizer.normalize_array(obs.numpy()), expected.numpy(), rtol=1e-6)
    plain = ActorCritic(OBS, DISCRETE, small_agent_cfg)
    torch.testing.assert_close(plain.normalize(obs), obs)


def test_multidimensional_observations_are_normalised_per_element() -> None:
    """Box observations of any shape: the network flattens them, so must the statistics."""
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(2, 3), dtype=np.float32)
    cfg = AgentConfig(actor_hidden=[4], critic_hidden=[4])
    agent = ActorCritic(obs_space, DISCRETE, cfg, normalize_obs=True, clip_obs=100.0)
    data = torch.randn(50, 2, 3) * torch.tensor([1.0, 2.0, 3.0]) + 5.0
    stats = agent.obs_normalizer.stats
    stats.fold_in(data.reshape(len(data), *stats.mean.shape))  # whichever layout it keeps
    out = agent.normalize(data[:4])
    assert out.shape == (4, 6)
    flat = data.flatten(1).double()
    expected = (flat[:4] - flat.mean(0)) / flat.var(0, unbiased=False).sqrt()
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3)
    assert agent.act(out).shape == (4,)
