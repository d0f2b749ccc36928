"""The PPO-Clip update loop: early stopping, minibatch bookkeeping, logged means."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
from support import algo_config, compose_config, on_policy_batch

from ppo_cli import losses
from ppo_cli.advantages import monte_carlo_weights
from ppo_cli.agent import ActorCritic
from ppo_cli.algos import make_updater, variant_of
from ppo_cli.algos.a2c import A2CUpdater
from ppo_cli.algos.clip import ClipUpdater
from ppo_cli.algos.grpo import GRPOUpdater
from ppo_cli.algos.penalty import PenaltyUpdater
from ppo_cli.algos.pg import PGUpdater
from ppo_cli.batch import Batch
from ppo_cli.config import AgentConfig, ClipConfig, PenaltyConfig
from ppo_cli.errors import NonFiniteError
from ppo_cli.rollout import RolloutStorage
from ppo_cli.tags import metric_tag

BATCH = 64


def algo(**overrides: object) -> ClipConfig:
    values: dict = {"update_epochs": 3, "num_minibatches": 4, "ent_coef": 0.01, **overrides}
    cfg = algo_config("clip", **values)
    assert isinstance(cfg, ClipConfig)
    return cfg


def setup(
    small_agent_cfg: AgentConfig,
    advantages: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
) -> tuple[ActorCritic, torch.optim.Optimizer, Batch]:
    """A Discrete agent, its optimizer and an on-policy batch (random targets unless given)."""
    size = BATCH if advantages is None else len(advantages)
    obs_space = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
    agent = ActorCritic(obs_space, gym.spaces.Discrete(3), small_agent_cfg)
    obs = torch.randn(size, 3)
    batch = on_policy_batch(
        agent,
        obs,
        torch.randn(size) if advantages is None else advantages,
        torch.randn(size) if returns is None else returns,
    )
    return agent, torch.optim.Adam(agent.pack_parameters(), lr=1e-2), batch


def test_runs_every_minibatch_of_every_epoch(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    metrics = ClipUpdater(agent, optimizer, algo()).update(batch)
    assert metrics["minibatch_updates"] == 3 * 4
    assert metrics["early_stop"] == 0.0


def test_target_kl_stops_before_the_step_that_would_exceed_it(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    # The first minibatch sees pi == pi_old (KL 0) and steps; every later one sees KL > 0.
    metrics = ClipUpdater(agent, optimizer, algo(target_kl=1e-12)).update(batch)
    assert metrics["minibatch_updates"] == 1
    assert metrics["early_stop"] == 1.0
    # Exactly one optimizer step was taken.
    assert all(state["step"].item() == 1 for state in optimizer.state.values())


def test_logged_losses_are_means_over_all_minibatches(
    small_agent_cfg: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    seen: list[float] = []
    original = losses.clipped_surrogate_loss

    def recording_loss(*args: torch.Tensor | float, **kwargs: float | None) -> torch.Tensor:
        value = original(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(value.item())
        return value

    monkeypatch.setattr(losses, "clipped_surrogate_loss", recording_loss)
    metrics = ClipUpdater(agent, optimizer, algo()).update(batch)
    assert len(seen) == 12
    assert metrics["policy_loss"] == pytest.approx(float(np.mean(seen)), rel=1e-5)
    assert metrics["policy_loss"] != pytest.approx(seen[-1])


def test_minibatches_partition_the_batch_each_epoch(
    small_agent_cfg: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    sizes: list[int] = []
    original = agent.evaluate

    def counting_evaluate(obs: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None, memory: None):  # type: ignore[no-untyped-def]
        sizes.append(obs.shape[0])
        return original(obs, actions, mask, memory)

    monkeypatch.setattr(agent, "evaluate", counting_evaluate)
    ClipUpdater(agent, optimizer, algo(update_epochs=2, num_minibatches=4)).update(batch)
    assert sizes == [16] * 8 + [BATCH]  # then the whole batch once, to measure the KL reached


def test_dual_clip_is_logged_as_the_share_of_bound_samples(small_agent_cfg: AgentConfig) -> None:
    """dual_clipfrac (diagnostics/) only where algo.dual_clip is set; with c barely above 1 the
    epochs push some negative-advantage ratios past it."""
    agent, optimizer, batch = setup(small_agent_cfg)
    assert "dual_clipfrac" not in ClipUpdater(agent, optimizer, algo()).update(batch)
    agent, optimizer, batch = setup(small_agent_cfg)
    metrics = ClipUpdater(agent, optimizer, algo(dual_clip=1.0001, learning_rate=0.05)).update(batch)
    assert 0.0 < metrics["dual_clipfrac"] < 1.0
    assert metric_tag("dual_clipfrac") == "diagnostics/dual_clipfrac"


def test_the_spo_objective_replaces_the_clipped_surrogate(
    small_agent_cfg: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    calls: list[float] = []
    original = losses.spo_loss

    def recording_loss(*args: torch.Tensor | float) -> torch.Tensor:
        calls.append(float(args[3]))  # type: ignore[arg-type]
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(losses, "spo_loss", recording_loss)
    monkeypatch.setattr(losses, "clipped_surrogate_loss", None)  # never called
    metrics = ClipUpdater(agent, optimizer, algo(objective="spo", clip_eps=0.1)).update(batch)
    assert calls == [0.1] * 12
    assert {"policy_loss", "clipfrac", "value_loss"} <= metrics.keys()


def penalty(**overrides: object) -> PenaltyConfig:
    values: dict = {
        "update_epochs": 2,
        "num_minibatches": 4,
        "learning_rate": 1e-2,
        "anneal_lr": False,
        **overrides,
    }
    cfg = algo_config("penalty", **values)
    assert isinstance(cfg, PenaltyConfig)
    return cfg


def test_make_updater_picks_the_variant(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, _ = setup(small_agent_cfg)
    assert type(make_updater(algo(), agent, optimizer)) is ClipUpdater
    assert type(make_updater(penalty(), agent, optimizer)) is PenaltyUpdater


def test_fixed_beta_stays_and_is_logged(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    updater = PenaltyUpdater(agent, optimizer, penalty(adaptive=False, kl_coef=0.3))
    for _ in range(3):
        metrics = updater.update(batch)
        assert metrics["kl_beta"] == pytest.approx(0.3)
    assert updater.state_dict() == {"beta": pytest.approx(0.3)}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "exact"])
def test_adaptive_beta_applies_the_rule_to_the_measured_kl(
    small_agent_cfg: AgentConfig, estimator: str
) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    for target in (1e-9, 1e-2, 1e3):
        updater = PenaltyUpdater(agent, optimizer, penalty(kl_estimator=estimator, kl_target=target))
        measured = updater.update(batch)["kl_after_update"]
        assert updater.beta == pytest.approx(losses.adaptive_kl_coef(1.0, measured, target))


@pytest.mark.parametrize("estimator", ["k2", "k3", "exact"])  # k1 may be negative on a batch
def test_adaptive_beta_doubles_on_overshoot_and_halves_on_undershoot(
    small_agent_cfg: AgentConfig, estimator: str
) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    updater = PenaltyUpdater(agent, optimizer, penalty(kl_estimator=estimator, kl_target=1e-9))
    updater.update(batch)
    assert updater.beta == pytest.approx(2.0)
    updater = PenaltyUpdater(agent, optimizer, penalty(kl_estimator=estimator, kl_target=1e3))
    updater.update(batch)
    assert updater.beta == pytest.approx(0.5)


def test_penalty_term_pulls_towards_pi_old(small_agent_cfg: AgentConfig) -> None:
    """With beta large, the update moves the policy much less than without the penalty."""

    def kl_after(beta: float) -> float:
        torch.manual_seed(0)
        agent, optimizer, batch = setup(small_agent_cfg)
        cfg = penalty(adaptive=False, kl_coef=beta, update_epochs=5)
        return PenaltyUpdater(agent, optimizer, cfg).update(batch)["kl_exact"]

    assert kl_after(100.0) < 0.5 * kl_after(0.0)


def test_beta_round_trips_through_state_dict(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    updater = PenaltyUpdater(agent, optimizer, penalty(kl_target=1e-9))
    updater.update(batch)
    restored = PenaltyUpdater(agent, optimizer, penalty())
    restored.load_state_dict(updater.state_dict())
    assert restored.beta == updater.beta == pytest.approx(2.0)
    with pytest.raises(ValueError, match="keeps no state"):
        ClipUpdater(agent, optimizer, algo()).load_state_dict({"beta": 1.0})


COMMON = dict(gamma=0.5, gae_lambda=1.0, norm_adv=False, learning_rate=1e-2, anneal_lr=False)


PG_COMMON = dict(gamma=0.5, norm_adv=False, learning_rate=1e-2, anneal_lr=False)


def test_pg_uses_the_discounted_return_minus_the_baseline(small_agent_cfg: AgentConfig) -> None:
    """One episode of three steps: G = r0 + g r1 + g^2 r2 etc.; A = G - V, nothing bootstrapped."""
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [0.2], [0.1]])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    advantages, returns = monte_carlo_weights(rewards, valid, values, 0.5, "reward_to_go", "value")
    expected_returns = torch.tensor([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0])
    torch.testing.assert_close(returns.flatten(), expected_returns)
    torch.testing.assert_close(advantages.flatten(), expected_returns - values.flatten())

    agent, optimizer, batch = setup(small_agent_cfg, advantages.flatten(), returns.flatten())
    cfg = algo_config("pg", value_epochs=2, value_minibatches=1, **PG_COMMON)
    metrics = PGUpdater(agent, optimizer, cfg).update(batch)
    expected_loss = -(batch.log_probs * (expected_returns - values.flatten())).mean()
    assert metrics["policy_loss"] == pytest.approx(expected_loss.item(), rel=1e-5)


def test_pg_takes_one_policy_step_and_regresses_the_critic(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    actor_before = [p.clone() for p in agent.actor.parameters()]
    cfg = algo_config("pg", baseline="value", value_epochs=3, value_minibatches=4, **PG_COMMON)
    PGUpdater(agent, optimizer, cfg).update(batch)
    actor, critic = agent.packs
    assert optimizer.state[actor.flat]["step"].item() == 1
    assert optimizer.state[critic.flat]["step"].item() == 3 * 4  # the policy step skips V
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, agent.actor.parameters(), strict=True))
    # Regression moved the critic towards the returns.
    with torch.no_grad():
        before = losses.value_loss(batch.values, batch.values, batch.returns, None)
        after = losses.value_loss(agent.value(batch.obs), batch.values, batch.returns, None)
    assert after < before


@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_pg_without_a_value_baseline_leaves_the_critic_alone(
    baseline: str, small_agent_cfg: AgentConfig
) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    critic_before = [p.clone() for p in agent.critic.parameters()]
    cfg = algo_config("pg", baseline=baseline, **PG_COMMON)
    metrics = PGUpdater(agent, optimizer, cfg).update(batch)
    assert all(torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters(), strict=True))
    assert agent.packs[1].flat not in optimizer.state  # never stepped: no Adam moments either
    assert "value_loss" not in metrics


def test_pg_policy_loss_sends_no_gradient_to_the_critic(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    updater = PGUpdater(agent, optimizer, algo_config("pg", baseline="value", **PG_COMMON))
    _, terms = updater.policy_terms(batch)
    (terms["policy_loss"] - terms["entropy"]).backward()
    assert all(p.grad is None for p in agent.critic.parameters())
    assert all(p.grad is not None for p in agent.actor.parameters())


def test_a2c_takes_exactly_one_step(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    cfg = algo_config("a2c", **COMMON)
    updater = make_updater(cfg, agent, optimizer)
    assert type(updater) is A2CUpdater
    metrics = updater.update(batch)
    assert all(state["step"].item() == 1 for state in optimizer.state.values())
    assert metrics["kl_exact"] > 0  # the step moved the policy
    assert {"policy_loss", "value_loss", "entropy", "approx_kl"} <= metrics.keys()


def test_grpo_trains_only_the_policy_against_a_frozen_reference(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    cfg = algo_config("grpo", update_epochs=2, num_minibatches=2, kl_coef=0.1, ref_update_every=2)
    updater = make_updater(cfg, agent, optimizer)
    assert type(updater) is GRPOUpdater
    critic_before = [p.clone() for p in agent.critic.parameters()]
    reference = updater.reference.frozen
    reference_before = {k: v.clone() for k, v in reference.state_dict().items()}

    metrics = updater.update(batch)

    assert metrics["kl_reference"] > 0  # measured against the initial policy, which has moved
    assert all(torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters(), strict=True))
    assert all(torch.equal(reference_before[k], v) for k, v in reference.state_dict().items())
    assert not any(p.requires_grad for p in reference.parameters())

    updater.update(batch)  # the second update refreshes the reference to the current policy
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(value, agent.state_dict()[key])
    restored = make_updater(cfg, agent, optimizer)
    restored.load_state_dict(updater.state_dict())
    assert restored.state_dict()["updates"] == 2


def _snapshot(agent: ActorCritic) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in agent.state_dict().items()}


@pytest.mark.parametrize("name", ["clip", "penalty", "a2c", "pg", "trpo", "grpo"])
def test_non_finite_loss_stops_before_any_step(name: str, small_agent_cfg: AgentConfig) -> None:
    advantages = torch.full((BATCH,), float("nan"))  # in every minibatch: no step may be taken
    agent, optimizer, batch = setup(small_agent_cfg, advantages=advantages)
    before = _snapshot(agent)
    cfg = algo_config(name, **({"norm_adv": False} if name != "grpo" else {}))
    with pytest.raises(NonFiniteError, match=r"not finite|the loss is nan"):
        make_updater(cfg, agent, optimizer).update(batch)
    for key, value in agent.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_non_finite_gradient_names_the_parameter(small_agent_cfg: AgentConfig) -> None:
    agent, optimizer, batch = setup(small_agent_cfg)
    before = _snapshot(agent)
    agent.critic[0].weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError) as info:
        ClipUpdater(agent, optimizer, algo()).update(batch)
    assert str(info.value).startswith("the gradient of critic.0.weight is not finite (loss ")
    for key, value in agent.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


# Two GRPO episodes in a rollout of T = 3 steps: lengths 3 and 1. Flattened time-major, the valid
# steps belong to episodes 0, 1, 0, 0.
EPISODE_VALID = torch.tensor([[True, True], [True, False], [True, False]])
EPISODE_OF_STEP = [0, 1, 0, 0]


def test_grpo_batch_carries_the_loss_agg_weights_of_its_episodes(small_agent_cfg: AgentConfig) -> None:
    cfg = compose_config("algo=grpo", "env.num_envs=2", "algo.group_size=2", "algo.loss_agg=episode_mean")
    agent, _, _ = setup(small_agent_cfg)
    storage = RolloutStorage(3, 2, agent, torch.device("cpu"))
    storage.valid.copy_(EPISODE_VALID)
    zeros = torch.zeros(3, 2)
    batch = Batch.from_storage(storage, zeros, zeros, 1, variant_of(cfg).loss_weights(storage))
    assert batch.weights is not None
    torch.testing.assert_close(batch.weights, torch.tensor([2 / 3, 2.0, 2 / 3, 2 / 3]))  # B / (G |o_i|)


@pytest.mark.parametrize("loss_agg", ["token_mean", "episode_mean", "constant"])
def test_grpo_loss_and_gradient_are_the_written_formula(loss_agg: str, small_agent_cfg: AgentConfig) -> None:
    """The loss, its gradient, and the mean of its minibatches' losses against the formula
    written out per episode, with DAPO's asymmetric clip [1 - 0.1, 1 + 0.3]."""
    torch.manual_seed(3)
    agent, optimizer, _ = setup(small_agent_cfg)
    values = {"clip_eps_low": 0.1, "clip_eps_high": 0.3, "kl_coef": 0.1, "ent_coef": 0.01}
    cfg = algo_config("grpo", loss_agg=loss_agg, num_minibatches=2, **values)
    updater = make_updater(cfg, agent, optimizer)
    with torch.no_grad():
        agent.actor.linear_layers[-1].bias.add_(torch.tensor([0.5, -0.4, 0.2]))  # away from pi_ref
    obs, advantages = torch.randn(4, 3), torch.tensor([1.0, -0.5, 1.0, 1.0])
    batch = on_policy_batch(agent, obs, advantages, torch.zeros(4))
    # Ratios exp(-0.4) = 0.67 and exp(0.3) = 1.35 outside the range, 1 and exp(0.2) = 1.22 inside.
    old_log_probs = batch.log_probs + torch.tensor([0.4, -0.3, 0.0, -0.2])
    weights = losses.episode_step_weights(EPISODE_VALID, loss_agg)[EPISODE_VALID]
    batch = dataclasses.replace(batch, log_probs=old_log_probs, weights=weights)
    actor = agent.actor_parameters()

    loss, terms = updater.minibatch_loss(agent.evaluate(batch.obs, batch.actions), batch)
    grad = torch.autograd.grad(loss, actor)
    assert terms["clipfrac"].item() == 0.5

    out = agent.evaluate(batch.obs, batch.actions)
    with torch.no_grad():
        reference = updater.reference.frozen
        ref_log_prob = reference.dist.log_prob(reference.policy_params(obs), batch.actions)
    per_step = []
    for s in range(4):
        ratio = torch.exp(out.log_prob[s] - old_log_probs[s])
        a = advantages[s]
        surrogate = -torch.minimum(ratio * a, torch.clamp(ratio, 0.9, 1.3) * a)
        log_r = ref_log_prob[s] - out.log_prob[s]
        per_step.append(surrogate + 0.1 * (torch.exp(log_r) - 1 - log_r) - 0.01 * out.entropy[s])
    episodes = [[per_step[s] for s in range(4) if EPISODE_OF_STEP[s] == i] for i in range(2)]
    if loss_agg == "token_mean":  # 1/B sum_i sum_t
        expected = sum(per_step) / 4
    elif loss_agg == "episode_mean":  # 1/G sum_i 1/|o_i| sum_t
        expected = sum(sum(steps) / len(steps) for steps in episodes) / 2
    else:  # 1/(G T) sum_i sum_t
        expected = sum(per_step) / (2 * 3)
    assert isinstance(expected, torch.Tensor)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grad, torch.autograd.grad(expected, actor), strict=True):
        torch.testing.assert_close(got, want)

    minibatch_losses = [
        updater.minibatch_loss(agent.evaluate(mb.obs, mb.actions), mb)[0].detach()
        for mb in batch.shuffled_minibatches(2)
    ]
    torch.testing.assert_close(torch.stack(minibatch_losses).mean(), expected.detach())
