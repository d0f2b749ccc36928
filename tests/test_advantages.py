"""GAE against an independent reference and its limiting cases."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from support import compose_config

from ppo_cli import advantages as advantages_module
from ppo_cli.advantages import gae
from ppo_cli.algos import variant_of
from ppo_cli.rollout import RolloutStorage

GAMMA = 0.9


def reference_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Plain Python double loop over envs and time, straight from the GAE recursion."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            term = bool(terminated[t][n])
            done = term or bool(truncated[t][n])
            bootstrap = 0.0 if term else gamma * next_values[t][n]
            delta = rewards[t][n] + bootstrap - values[t][n]
            running = delta + (0.0 if done else gamma * lam * running)
            adv[t][n] = running
    return adv


def random_rollout(T: int = 12, N: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    next_values = torch.randn(T, N, generator=g, dtype=torch.float64)
    terminated = torch.rand(T, N, generator=g) < 0.2
    truncated = (torch.rand(T, N, generator=g) < 0.2) & ~terminated
    assert terminated.any() and truncated.any()
    return rewards, values, next_values, terminated, truncated


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_reference_loop(lam: float, seed: int) -> None:
    r, v, nv, term, trunc = random_rollout(seed=seed)
    adv, ret = gae(r, v, nv, term, trunc, GAMMA, lam)
    expected = reference_gae(r.tolist(), v.tolist(), nv.tolist(), term.tolist(), trunc.tolist(), GAMMA, lam)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(ret, adv + v)


def test_gae_accepts_float_flags() -> None:
    r, v, nv, term, trunc = random_rollout(seed=3)
    a_bool, _ = gae(r, v, nv, term, trunc, GAMMA, 0.9)
    a_float, _ = gae(r, v, nv, term.double(), trunc.double(), GAMMA, 0.9)
    torch.testing.assert_close(a_bool, a_float)


def test_lambda_zero_is_td_error() -> None:
    r, v, nv, term, trunc = random_rollout(seed=4)
    adv, _ = gae(r, v, nv, term, trunc, GAMMA, 0.0)
    td = r + GAMMA * nv * (1.0 - term.double()) - v
    torch.testing.assert_close(adv, td)


def test_lambda_one_is_discounted_return_minus_value() -> None:
    r, v, nv, term, trunc = random_rollout(T=10, N=3, seed=5)
    # As in a real rollout, V(s_{t+1}) inside an episode is the next step's value; only the
    # ends (terminations, truncations, the last step) carry an independent next value.
    inside = ~(term | trunc)[:-1]
    nv[:-1] = torch.where(inside, v[1:], nv[:-1])
    adv, ret = gae(r, v, nv, term, trunc, GAMMA, 1.0)
    T, N = r.shape
    expected = torch.empty_like(r)
    for n in range(N):
        for t in range(T):
            # Sum discounted rewards until the episode ends or the data runs out.
            total, discount, k = 0.0, 1.0, t
            while True:
                total += discount * r[k, n].item()
                discount *= GAMMA
                if term[k, n]:
                    break
                if trunc[k, n] or k == T - 1:
                    total += discount * nv[k, n].item()
                    break
                k += 1
            expected[t, n] = total - v[t, n]
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + v)


def test_terminated_step_does_not_bootstrap() -> None:
    r, v, nv, term, trunc = random_rollout(seed=6)
    term[5, 1], trunc[5, 1] = True, False
    adv, _ = gae(r, v, nv, term, trunc, GAMMA, 0.95)
    nv2 = nv.clone()
    nv2[5, 1] += 100.0
    adv2, _ = gae(r, v, nv2, term, trunc, GAMMA, 0.95)
    torch.testing.assert_close(adv, adv2)
    # Same change at a non-terminated step does matter (the test above is not vacuous).
    term[5, 1] = False
    a, _ = gae(r, v, nv, term, trunc, GAMMA, 0.95)
    b, _ = gae(r, v, nv2, term, trunc, GAMMA, 0.95)
    assert (a - b).abs().max() > 1.0


def test_truncated_step_bootstraps_and_cuts_trace() -> None:
    T, N = 8, 2
    r, v, nv, term, trunc = random_rollout(T=T, N=N, seed=7)
    term.zero_()
    trunc.zero_()
    t_cut = 4
    trunc[t_cut, 0] = True
    adv, _ = gae(r, v, nv, term, trunc, GAMMA, 0.95)
    # The truncated step is the TD error bootstrapped from V(final_obs) = next_values[t].
    torch.testing.assert_close(adv[t_cut, 0], r[t_cut, 0] + GAMMA * nv[t_cut, 0] - v[t_cut, 0])
    # Changing next_values at the truncation moves its advantage by gamma * change.
    nv2 = nv.clone()
    nv2[t_cut, 0] += 10.0
    adv_nv, _ = gae(r, v, nv2, term, trunc, GAMMA, 0.95)
    torch.testing.assert_close(adv_nv[t_cut, 0] - adv[t_cut, 0], torch.tensor(GAMMA * 10.0).double())
    # Rewards after the cut do not reach steps before it.
    r2 = r.clone()
    r2[t_cut + 1 :, 0] += 50.0
    adv_r, _ = gae(r2, v, nv, term, trunc, GAMMA, 0.95)
    torch.testing.assert_close(adv_r[: t_cut + 1, 0], adv[: t_cut + 1, 0])
    assert (adv_r[t_cut + 1 :, 0] - adv[t_cut + 1 :, 0]).abs().min() > 1.0
    # ... whereas without the truncation they do (env 1 has none).
    r3 = r.clone()
    r3[t_cut + 1 :, 1] += 50.0
    adv_r3, _ = gae(r3, v, nv, term, trunc, GAMMA, 0.95)
    assert (adv_r3[t_cut - 1, 1] - adv[t_cut - 1, 1]).abs() > 1.0


def test_returns_are_advantages_plus_values() -> None:
    r, v, nv, term, trunc = random_rollout(seed=8)
    adv, ret = gae(r, v, nv, term, trunc, 0.99, 0.95)
    torch.testing.assert_close(ret, adv + v)
    assert adv.shape == ret.shape == r.shape


def test_group_relative_hand_numbers_and_zero_sum_per_group() -> None:
    # Two groups of two envs; episode returns 1, 3 | 2, 2 (env 1 stops after one step).
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, True], [False] * 4])
    advantages = advantages_module.group_relative(rewards, valid, group_size=2)
    # Group 0: returns (1, 3): mean 2, population std 1 -> (-1, +1). Group 1: equal returns -> 0.
    expected_per_env = torch.tensor([-1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(advantages[0], expected_per_env, atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages[1], expected_per_env, atol=1e-6, rtol=0)
    assert torch.all(advantages[2] == 0)  # invalid steps carry no advantage
    per_episode = advantages[0].view(-1, 2)
    torch.testing.assert_close(per_episode.sum(dim=1), torch.zeros(2))


def test_group_relative_random_groups_sum_to_zero() -> None:
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(7, 12, generator=g)
    valid = torch.rand(7, 12, generator=g) < 0.8
    valid[0] = True
    advantages = advantages_module.group_relative(rewards, valid, group_size=4)
    first_step = advantages[0].view(3, 4)
    torch.testing.assert_close(first_step.sum(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    # Every valid step of an episode carries that episode's advantage.
    for env in range(12):
        steps = advantages[valid[:, env], env]
        torch.testing.assert_close(steps, steps[:1].expand_as(steps))


TIED_OPTIONS: list[dict[str, bool]] = [
    {},  # GRPO's default first
    {"divide_by_std": False},
    {"leave_one_out": True},
    {"leave_one_out": True, "divide_by_std": False},
]


@pytest.mark.parametrize("group_size", [3, 5, 6, 8, 16])
def test_group_relative_gives_a_tied_group_exactly_zero(group_size: int) -> None:
    """Every episode of a group scoring the same non-integer return carries no signal. In
    float32 with eps 1e-8 the rounding of the group's mean came out as advantages of about
    +/-0.75 (which values do so depends on the group size: these cover each)."""
    for options, value, steps in itertools.product(TIED_OPTIONS, (0.12, 0.3, 0.45, 0.47, 0.9), (1, 3)):
        rewards = torch.full((steps, 2 * group_size), value / steps)  # in one reward, or in several
        valid = torch.ones(steps, 2 * group_size, dtype=torch.bool)
        advantages = advantages_module.group_relative(rewards, valid, group_size, **options)
        assert torch.all(advantages == 0), (options, value, steps)


def test_group_relative_baselines_and_std_against_hand_numbers() -> None:
    """One group of returns (1, 2, 6): mean 3, population std sqrt(14 / 3). Leave-one-out
    baselines are the means of the other two: (2+6)/2, (1+6)/2, (1+2)/2."""
    rewards = torch.tensor([[1.0, 2.0, 6.0]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    std = (14 / 3) ** 0.5 + 1e-8
    loo = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5])  # = 3/2 * (R - mean) = (-3, -1.5, 4.5)
    expected = {
        (False, True): torch.tensor([-2.0, -1.0, 3.0]) / std,  # GRPO
        (False, False): torch.tensor([-2.0, -1.0, 3.0]),  # Dr. GRPO
        (True, False): loo,  # RLOO
        (True, True): loo / std,
    }
    for (leave_one_out, divide_by_std), want in expected.items():
        got = advantages_module.group_relative(
            rewards, valid, 3, leave_one_out=leave_one_out, divide_by_std=divide_by_std
        )
        torch.testing.assert_close(got[0], want, atol=1e-6, rtol=0)
        assert got.dtype == torch.float32
    torch.testing.assert_close(loo, 1.5 * torch.tensor([-2.0, -1.0, 3.0]))


def critic_target_rollout() -> tuple[torch.Tensor, ...]:
    """Two envs, four steps, gamma 0.5, V(s_t) = t + 1 and V = 6 after the rollout's last step.
    Env 0's episode terminates at t = 2 (next_values there is junk: never used); env 1's is cut by
    a time limit at t = 1 with V(final_obs) = 8. Each then starts an episode still running at the
    rollout's end."""
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0], [8.0, 8.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]], dtype=torch.float64)
    next_values = torch.tensor([[2.0, 2.0], [3.0, 8.0], [99.0, 4.0], [6.0, 6.0]], dtype=torch.float64)
    terminated = torch.tensor([[False, False], [False, False], [True, False], [False, False]])
    truncated = torch.tensor([[False, False], [False, True], [False, False], [False, False]])
    return rewards, values, next_values, terminated, truncated


# By hand, column per env: td is r_t + 0.5 * next_values_t unless terminated; mc sums to the
# episode's end (env 0, t = 0: 1 + 0.5 * 2 + 0.25 * 4) and bootstraps at the time limit (env 1,
# t = 0: 1 + 0.5 * (2 + 0.5 * 8)) and at the rollout's end (t = 3: 8 + 0.5 * 6).
CRITIC_TARGETS_BY_HAND = {
    "td": [[2.0, 2.0], [3.5, 6.0], [4.0, 6.0], [11.0, 11.0]],
    "mc": [[3.0, 4.0], [4.0, 6.0], [4.0, 9.5], [11.0, 11.0]],
}


@pytest.mark.parametrize("critic_target", ["td", "mc"])
def test_critic_targets_by_hand_while_advantages_stay_gae(critic_target: str) -> None:
    rollout = critic_target_rollout()
    advantages, targets = advantages_module.gae_and_critic_targets(*rollout, 0.5, 0.5, critic_target)
    expected = torch.tensor(CRITIC_TARGETS_BY_HAND[critic_target], dtype=torch.float64)
    torch.testing.assert_close(targets, expected)
    gae_advantages, lambda_returns = gae(*rollout, 0.5, 0.5)
    torch.testing.assert_close(advantages, gae_advantages)  # the actor's side is unchanged
    assert (targets - lambda_returns).abs().max() > 0.5  # ... and the target is not the default's
    default = advantages_module.gae_and_critic_targets(*rollout, 0.5, 0.5, "gae")
    torch.testing.assert_close(default, (gae_advantages, lambda_returns))


def test_monte_carlo_targets_without_bootstrap_at_time_limits() -> None:
    """With algo.bootstrap_truncated=false a time limit counts as terminal (the variant passes
    terminated | truncated): env 1's first episode then sums its rewards only, 1 + 0.5 * 2."""
    rewards, values, next_values, terminated, truncated = critic_target_rollout()
    _, targets = advantages_module.gae_and_critic_targets(
        rewards, values, next_values, terminated | truncated, truncated, 0.5, 0.5, "mc"
    )
    torch.testing.assert_close(targets[:2, 1], torch.tensor([2.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("algo", "critic_target"),
    [("clip", "td"), ("penalty", "mc"), ("a2c", "td"), ("trpo", "mc"), ("clip", None)],
)
def test_each_actor_critic_variant_fits_its_critic_to_the_chosen_target(
    algo: str, critic_target: str | None
) -> None:
    """What ``algo.critic_target`` reaches: the targets the loop hands the updater; by default
    (the key unset) the lambda-returns."""
    choice = [] if critic_target is None else [f"algo.critic_target={critic_target}"]
    cfg = compose_config(f"algo={algo}", "algo.gamma=0.5", "algo.gae_lambda=0.5", *choice)
    rollout = critic_target_rollout()
    fields = ("rewards", "values", "next_values", "terminated", "truncated")
    storage = cast(RolloutStorage, SimpleNamespace(**dict(zip(fields, rollout, strict=True))))
    advantages, targets = variant_of(cfg).advantages(storage)
    gae_advantages, lambda_returns = gae(*rollout, 0.5, 0.5)
    torch.testing.assert_close(advantages, gae_advantages)
    if critic_target is not None:
        expected = torch.tensor(CRITIC_TARGETS_BY_HAND[critic_target], dtype=torch.float64)
    else:
        expected = lambda_returns
    torch.testing.assert_close(targets, expected)


# REINFORCE's weights on two hand episodes, gamma = 0.5: env 0 gets rewards 1, 2, 3 and ends;
# env 1 gets 4 and ends after one step (its later steps are invalid; their rewards and values
# are garbage that must not count). Discounted returns from t on: env 0 G = 2.75, 3.5, 3;
# env 1 G = 4. Critic values: 1, 1, 1 and 2.
MC_REWARDS = torch.tensor([[1.0, 4.0], [2.0, 9.0], [3.0, 9.0]])
MC_VALID = torch.tensor([[True, True], [True, False], [True, False]])
MC_VALUES = torch.tensor([[1.0, 2.0], [1.0, 7.0], [1.0, 7.0]])
MC_PSI = {
    "episode": [[2.75, 4.0], [2.75, 0.0], [2.75, 0.0]],  # R(tau) = G_0 at every step
    "reward_to_go": [[2.75, 4.0], [3.5, 0.0], [3.0, 0.0]],  # G_t
}
MC_ADVANTAGES = {
    ("episode", "none"): MC_PSI["episode"],
    ("reward_to_go", "none"): MC_PSI["reward_to_go"],
    # mean over the 4 valid steps: (3 * 2.75 + 4) / 4 = 3.0625
    ("episode", "mean"): [[-0.3125, 0.9375], [-0.3125, 0.0], [-0.3125, 0.0]],
    # (2.75 + 3.5 + 3 + 4) / 4 = 3.3125
    ("reward_to_go", "mean"): [[-0.5625, 0.6875], [0.1875, 0.0], [-0.3125, 0.0]],
    ("episode", "value"): [[1.75, 2.0], [1.75, 0.0], [1.75, 0.0]],
    ("reward_to_go", "value"): [[1.75, 2.0], [2.5, 0.0], [2.0, 0.0]],
}


@pytest.mark.parametrize(("returns", "baseline"), list(MC_ADVANTAGES))
def test_monte_carlo_weights_hand_numbers(returns: str, baseline: str) -> None:
    advantages, targets = advantages_module.monte_carlo_weights(
        MC_REWARDS, MC_VALID, MC_VALUES, 0.5, returns, baseline
    )
    torch.testing.assert_close(advantages, torch.tensor(MC_ADVANTAGES[returns, baseline]), rtol=0, atol=1e-6)
    # The critic's targets are the weights psi_t themselves, whatever the baseline.
    torch.testing.assert_close(targets, torch.tensor(MC_PSI[returns]), rtol=0, atol=1e-6)


def test_monte_carlo_mean_baseline_centres_the_valid_steps() -> None:
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(9, 6, generator=g, dtype=torch.float64)
    valid = torch.arange(9).unsqueeze(1) < torch.tensor([9, 1, 4, 7, 2, 9])  # episodes of those lengths
    for returns in ("episode", "reward_to_go"):
        advantages, _ = advantages_module.monte_carlo_weights(rewards, valid, rewards, 0.9, returns, "mean")
        assert abs(float(advantages[valid].sum())) < 1e-12
        assert torch.all(advantages[~valid] == 0)
