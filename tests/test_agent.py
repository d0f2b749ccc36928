"""ActorCritic: gradient isolation, initialisation, distributions and action handling."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Normal

from ppo_cli.agent import ActorCritic
from ppo_cli.config import AgentConfig

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
    with torch.no_grad():
        action = agent.sample(obs).action
    out = agent.evaluate(obs, action)
    (out.value - torch.randn(16)).square().mean().backward()
    assert all(_no_grad(p) for p in _actor_params(agent))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.critic.parameters())


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])
def test_policy_loss_gradients_reach_only_actor(action_space, small_agent_cfg) -> None:
    agent = ActorCritic(OBS, action_space, small_agent_cfg)
    obs = torch.randn(16, 5)
    with torch.no_grad():
        action = agent.sample(obs).action
    out = agent.evaluate(obs, action)
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
    assert not agent.continuous
    obs = torch.randn(4, 5)
    dist = agent.distribution(obs)
    assert isinstance(dist, Categorical)
    assert dist.probs.shape == (4, 7)
    torch.testing.assert_close(dist.logits.exp().sum(-1), torch.ones(4))
    sample = agent.sample(obs)
    assert sample.action.shape == (4,)
    assert sample.action.dtype == torch.int64
    assert sample.value.shape == (4,)
    assert sample.log_prob.shape == (4,)


def test_box_gives_gaussian_with_state_independent_std() -> None:
    cfg = AgentConfig(actor_hidden=[8], critic_hidden=[8], log_std_init=-0.7)
    agent = ActorCritic(OBS, BOX, cfg)
    assert agent.continuous
    obs = torch.randn(4, 5)
    dist = agent.distribution(obs)
    assert isinstance(dist, Normal)
    assert dist.mean.shape == (4, 2)
    torch.testing.assert_close(dist.stddev, torch.full((4, 2), math.exp(-0.7)))
    assert agent.sample(obs).action.shape == (4, 2)


def test_env_action_clips_but_stored_action_is_raw() -> None:
    cfg = AgentConfig(actor_hidden=[8], critic_hidden=[8], log_std_init=1.5)  # std ~ 4.5
    agent = ActorCritic(OBS, BOX, cfg)
    obs = torch.randn(256, 5)
    sample = agent.sample(obs)
    raw = sample.action
    env_action = agent.env_action(raw)
    assert isinstance(env_action, np.ndarray)
    np.testing.assert_array_equal(env_action, np.clip(raw.numpy(), BOX.low, BOX.high))
    assert (env_action >= BOX.low).all() and (env_action <= BOX.high).all()
    outside = (raw.numpy() < BOX.low) | (raw.numpy() > BOX.high)
    assert outside.any()  # the stored action really is unclipped
    # The stored log-probability belongs to the raw action, not the clipped one.
    torch.testing.assert_close(agent.evaluate(obs, raw).log_prob, sample.log_prob)
    clipped_lp = agent.evaluate(obs, torch.as_tensor(env_action)).log_prob
    assert not torch.allclose(clipped_lp, sample.log_prob)


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
    sample = agent.sample(obs, deterministic=True)
    torch.testing.assert_close(sample.action, logits.argmax(-1))
    assert len(set(sample.action.tolist())) > 1
    expected_lp = torch.log_softmax(logits, -1).gather(1, sample.action[:, None]).squeeze(1)
    torch.testing.assert_close(sample.log_prob, expected_lp)


def test_deterministic_box_is_mean() -> None:
    cfg = AgentConfig(actor_hidden=[8], critic_hidden=[8], log_std_init=0.3)
    agent = ActorCritic(OBS, BOX, cfg)
    obs = torch.randn(10, 5)
    with torch.no_grad():
        mean = agent.actor(obs)
    a1 = agent.sample(obs, deterministic=True)
    a2 = agent.sample(obs, deterministic=True)
    torch.testing.assert_close(a1.action, mean)
    torch.testing.assert_close(a1.action, a2.action)
    # log N(mu | mu, sigma) summed over 2 dims = -2 * (log sigma + 0.5 * log(2 pi))
    expected = torch.full((10,), -2 * (0.3 + 0.5 * math.log(2 * math.pi)))
    torch.testing.assert_close(a1.log_prob, expected)


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "box"])
def test_evaluate_matches_sample(action_space, small_agent_cfg) -> None:
    agent = ActorCritic(OBS, action_space, small_agent_cfg)
    obs = torch.randn(32, 5)
    sample = agent.sample(obs)
    out = agent.evaluate(obs, sample.action)
    torch.testing.assert_close(out.log_prob, sample.log_prob)
    torch.testing.assert_close(out.value, sample.value)
    assert out.log_prob.shape == out.entropy.shape == (32,)


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
    plain = ActorCritic(OBS, DISCRETE, small_agent_cfg)
    torch.testing.assert_close(plain.normalize(obs), obs)


def test_multidimensional_observations_are_normalised_per_element() -> None:
    """Box observations of any shape: the network flattens them, so must the statistics."""
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(2, 3), dtype=np.float32)
    cfg = AgentConfig(actor_hidden=[4], critic_hidden=[4])
    agent = ActorCritic(obs_space, DISCRETE, cfg, normalize_obs=True, clip_obs=100.0)
    data = torch.randn(50, 2, 3) * torch.tensor([1.0, 2.0, 3.0]) + 5.0
    stats = agent.obs_normalizer.stats
    stats.update(data.reshape(len(data), *stats.mean.shape))  # whichever layout it keeps
    out = agent.normalize(data[:4])
    assert out.shape == (4, 6)
    flat = data.flatten(1).double()
    expected = (flat[:4] - flat.mean(0)) / flat.var(0, unbiased=False).sqrt()
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3)
    assert agent.sample(out).action.shape == (4,)


def test_exact_kl_matches_closed_forms(small_agent_cfg: AgentConfig) -> None:
    obs_space = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
    obs = torch.randn(5, 3)

    gaussian = ActorCritic(obs_space, gym.spaces.Box(-1.0, 1.0, shape=(2,)), small_agent_cfg)
    old_params = gaussian.policy_params(obs).detach()
    with torch.no_grad():
        gaussian.log_std.add_(torch.tensor([0.3, -0.2]))
    new = gaussian.distribution(obs)
    mu0, log_s0 = old_params.chunk(2, dim=-1)
    mu1, s1 = new.mean, new.stddev
    s0 = log_s0.exp()
    # KL(N0 || N1) = log(s1/s0) + (s0^2 + (mu0 - mu1)^2) / (2 s1^2) - 1/2, summed over dimensions
    expected = (torch.log(s1 / s0) + (s0**2 + (mu0 - mu1) ** 2) / (2 * s1**2) - 0.5).sum(-1)
    torch.testing.assert_close(gaussian.exact_kl(old_params, new), expected)

    categorical = ActorCritic(obs_space, gym.spaces.Discrete(3), small_agent_cfg)
    old_logits = categorical.policy_params(obs).detach()
    assert torch.all(categorical.exact_kl(old_logits, categorical.distribution(obs)).abs() < 1e-6)
    shifted = old_logits + torch.tensor([0.5, 0.0, -0.5])
    p_old, p_new = old_logits.softmax(-1), shifted.softmax(-1)
    expected = (p_old * (p_old.log() - p_new.log())).sum(-1)
    new_dist = categorical.distribution_from_params(shifted)
    torch.testing.assert_close(categorical.exact_kl(old_logits, new_dist), expected)


def test_discrete_sampling_is_categorical_sampling(small_agent_cfg: AgentConfig) -> None:
    """``sample`` skips building a Categorical, but draws exactly what torch's Categorical draws
    from the same random state and reports the same log-probabilities."""
    agent = ActorCritic(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(5), small_agent_cfg)
    obs = torch.randn(4096, 3)
    torch.manual_seed(7)
    fast = agent.sample(obs)
    torch.manual_seed(7)
    with torch.no_grad():
        reference = Categorical(logits=agent.actor(obs))
        expected = reference.sample()
    assert torch.equal(fast.action, expected)
    torch.testing.assert_close(fast.log_prob, reference.log_prob(expected))
    greedy = agent.sample(obs, deterministic=True).action
    assert torch.equal(greedy, reference.logits.argmax(-1))
