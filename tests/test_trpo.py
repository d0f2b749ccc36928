"""TRPO's pieces: conjugate gradient on a known system, and a trust-region step that keeps its promises."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from support import algo_config, on_policy_batch

from ppo_cli import losses
from ppo_cli.agent import ActorCritic
from ppo_cli.algos.trpo import TRPOUpdater
from ppo_cli.config import AgentConfig, TRPOConfig
from ppo_cli.trust_region import TrustRegion, batched_trust_region_step, conjugate_gradient, trust_region_step


def test_conjugate_gradient_solves_a_known_spd_system() -> None:
    # A = [[4, 1], [1, 3]], b = [1, 2]: x = A^-1 b = [1/11, 7/11].
    a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=2)
    torch.testing.assert_close(x, torch.tensor([1 / 11, 7 / 11], dtype=torch.float64))


def test_conjugate_gradient_on_a_random_spd_system_converges_in_n_steps() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a = m @ m.T + 8 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=8)
    torch.testing.assert_close(a @ x, b)
    # Fewer iterations give a worse, but not useless, answer.
    rough = conjugate_gradient(lambda v: a @ v, b, iterations=2)
    assert 0 < torch.linalg.norm(a @ rough - b) < torch.linalg.norm(b)


def test_full_step_is_scaled_by_the_damped_quadratic_model() -> None:
    """A linear surrogate g . theta and a quadratic KL 0.5 theta^T F theta around theta_old = 0:
    the step is s * sqrt(2 delta / s^T (F + lambda I) s), s = (F + lambda I)^-1 g, by hand
    (docs/algorithms.md, TRPO), and its undamped KL stays under delta so the first try is taken."""
    fisher = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    g = torch.tensor([1.0, 1.0], dtype=torch.float64)
    damping, max_kl = 0.5, 0.01
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    region = TrustRegion(max_kl, cg_iterations=2, cg_damping=damping, line_search_steps=1, backtrack=0.5)
    result = trust_region_step([theta], lambda: g @ theta, lambda: 0.5 * theta @ fisher @ theta, region)
    # (F + 0.5 I) = diag(1.5, 4.5): s = (2/3, 2/9), s^T (F + 0.5 I) s = 2/3 + 2/9 = 8/9.
    s = torch.tensor([2 / 3, 2 / 9], dtype=torch.float64)
    expected = s * (2 * max_kl / (8 / 9)) ** 0.5
    torch.testing.assert_close(theta.detach(), expected)
    assert result.step_fraction == 1.0
    assert 0.5 * expected @ fisher @ expected < 0.9 * max_kl  # the undamped model: well under delta


def test_a_batched_step_solves_each_members_problem_alone() -> None:
    """Three members, rows of one (3, 2) leaf: member 0 has the problem above, member 1 a
    different Fisher matrix and gradient (its step by hand as well), member 2 a NaN gradient.
    Each row moves as its own single step would; the NaN member is reported and left at 0."""
    fishers = torch.tensor([[[1.0, 0.0], [0.0, 4.0]], [[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    gradients = torch.tensor([[1.0, 1.0], [2.0, -1.0], [float("nan"), 1.0]])
    fishers, gradients = fishers.double(), gradients.double()
    flat = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    region = TrustRegion(0.01, cg_iterations=2, cg_damping=0.5, line_search_steps=1, backtrack=0.5)
    results, not_finite = batched_trust_region_step(
        flat,
        lambda: (gradients * flat).sum(dim=1),
        lambda: 0.5 * torch.einsum("ki,kij,kj->k", flat, fishers, flat),
        region,
        torch.ones(3, dtype=torch.bool),
    )
    # Member 1: (F + 0.5 I) = diag(2.5, 1.5), s = (0.8, -2/3), s^T (F + 0.5 I) s = 1.6 + 2/3 = 34/15.
    steps = [(torch.tensor([2 / 3, 2 / 9]), 8 / 9), (torch.tensor([0.8, -2 / 3]), 34 / 15)]
    for k, (s, quadratic) in enumerate(steps):
        torch.testing.assert_close(flat[k].detach(), s.double() * (2 * 0.01 / quadratic) ** 0.5)
        assert results[k].step_fraction == 1.0
    assert not_finite.tolist() == [False, False, True]
    assert flat[2].detach().tolist() == [0.0, 0.0] and results[2].step_fraction == 0.0


def trpo_config(max_kl: float) -> TRPOConfig:
    cfg = algo_config("trpo", max_kl=max_kl, value_epochs=2, value_minibatches=2)
    assert isinstance(cfg, TRPOConfig)
    return cfg


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("max_kl", [1e-3, 1e-2])
def test_step_stays_in_the_trust_region_and_improves_the_surrogate(continuous: bool, max_kl: float) -> None:
    obs_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,)) if continuous else gym.spaces.Discrete(3)
    agent = ActorCritic(obs_space, action_space, AgentConfig([16], [16]))
    obs = torch.randn(128, 4)
    advantages = torch.randn(128)
    batch = on_policy_batch(agent, obs, advantages, advantages)
    critic_before = [p.clone() for p in agent.critic.parameters()]
    optimizer = torch.optim.Adam(agent.pack_parameters(), lr=1e-3)
    actor_before = agent.packs[0].flat.detach().clone()

    metrics = TRPOUpdater(agent, optimizer, trpo_config(max_kl)).update(batch)

    assert metrics["line_search_fraction"] > 0  # a step was accepted
    assert metrics["kl_exact"] <= max_kl
    assert metrics["surrogate_improvement"] > 0
    # Recompute both independently of the updater.
    with torch.no_grad():
        params = agent.policy_params(obs)
        kl = agent.dist.kl(batch.policy_params, params).mean().item()
        log_prob = agent.dist.log_prob(params, batch.actions)
        normalized = losses.normalize_advantages(advantages)
        after = -losses.surrogate_loss(log_prob, batch.log_probs, normalized).item()
        before = normalized.mean().item()  # rho = 1 at theta_old
    assert kl <= max_kl
    assert after > before
    # The step was written into the actor's parameters in place: they are still views of the
    # packed tensor the optimizer holds, which moved with them.
    actor_pack = agent.packs[0]
    assert torch.equal(actor_pack.flat, torch.cat([p.reshape(-1) for p in agent.actor_parameters()]))
    assert not torch.equal(actor_pack.flat, actor_before)
    # The critic was trained separately by regression.
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters(), strict=True))
