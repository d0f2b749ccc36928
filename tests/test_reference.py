"""The KL to a frozen reference policy (reference.py): each kl_loss's expected gradient against the
exact one, PPO-Clip's ref_kl_coef term, and its reference across a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from support import algo_config, compose_config, on_policy_batch
from test_resume import _assert_same_state, _interrupt_at

from ppo_cli import checkpoint as ckpt
from ppo_cli.agent import ActorCritic
from ppo_cli.algos import make_updater
from ppo_cli.algos.clip import ClipUpdater
from ppo_cli.algos.grpo import GRPOUpdater
from ppo_cli.batch import Batch
from ppo_cli.config import AgentConfig
from ppo_cli.errors import Interrupted
from ppo_cli.train import train

ACTIONS = 4


def _agent(small_agent_cfg: AgentConfig, actions: int = ACTIONS) -> ActorCritic:
    obs_space = gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
    return ActorCritic(obs_space, gym.spaces.Discrete(actions), small_agent_cfg)


def _set_logits_bias(agent: ActorCritic, bias: list[float]) -> None:
    with torch.no_grad():
        agent.actor.linear_layers[-1].bias.copy_(torch.tensor(bias))


def _exact_expectation_batch(agent: ActorCritic, obs: torch.Tensor) -> Batch:
    """Every action of one state, each weighted by pi(a|s) * |A|: a weighted mean over this batch
    is the exact expectation over a ~ pi = pi_old (the first epoch on a rollout)."""
    obs = obs.expand(ACTIONS, -1)
    actions = torch.arange(ACTIONS)
    with torch.no_grad():
        params = agent.policy_params(obs)
        log_probs = agent.dist.log_prob(params, actions)
    zeros = torch.zeros(ACTIONS)
    weights = log_probs.exp() * ACTIONS
    return Batch(obs, actions, log_probs, params, zeros, zeros, zeros, None, weights)


@pytest.mark.parametrize("kl_loss", ["k3", "k2", "k1_in_reward"])
def test_each_kl_loss_s_expected_gradient_against_the_exact_kl(
    kl_loss: str, small_agent_cfg: AgentConfig
) -> None:
    """Tang & Munos 2025: k2 as a loss and k1 in the reward follow the gradient of the reverse
    KL(pi || pi_ref) that GRPO means to penalise; k3 as a loss (the GRPO paper's) follows the
    forward KL(pi_ref || pi)'s, although its value is the reverse KL."""
    torch.manual_seed(0)
    agent = _agent(small_agent_cfg)
    optimizer = torch.optim.Adam(agent.pack_parameters())
    cfg = algo_config("grpo", kl_loss=kl_loss, kl_coef=1.0, ent_coef=0.0)
    updater = make_updater(cfg, agent, optimizer)
    assert isinstance(updater, GRPOUpdater)
    _set_logits_bias(updater.reference.frozen, [2.0, 0.0, -1.0, 0.5])
    _set_logits_bias(agent, [-1.0, 0.5, 1.5, 0.0])  # pi far from pi_ref
    obs = torch.randn(1, 3)
    batch = _exact_expectation_batch(agent, obs)  # advantages 0: the loss is the KL term alone
    actor = agent.actor_parameters()

    loss, terms = updater.minibatch_loss(agent.evaluate(batch.obs, batch.actions), batch)
    got = torch.autograd.grad(loss, actor)

    log_pi = torch.log_softmax(agent.policy_params(obs), dim=-1)
    log_ref = torch.log_softmax(updater.reference.frozen.policy_params(obs), dim=-1).detach()
    reverse = (log_pi.exp() * (log_pi - log_ref)).sum()
    forward = (log_ref.exp() * (log_ref - log_pi)).sum()
    reverse_grad = torch.autograd.grad(reverse, actor, retain_graph=True)
    forward_grad = torch.autograd.grad(forward, actor)
    flat = [torch.cat([g.reshape(-1) for g in grads]) for grads in (got, reverse_grad, forward_grad)]
    got_flat, reverse_flat, forward_flat = flat
    assert (reverse_flat - forward_flat).norm() > 0.3 * reverse_flat.norm()  # the two differ here

    expected = forward_flat if kl_loss == "k3" else reverse_flat
    torch.testing.assert_close(got_flat, expected, rtol=1e-4, atol=1e-6)
    if kl_loss == "k3":  # its value: the reverse KL, exactly, in expectation
        assert terms["policy_loss"].item() == pytest.approx(reverse.item(), rel=1e-5)


def _clip_loss(updater: ClipUpdater, agent: ActorCritic, batch: Batch) -> torch.Tensor:
    return updater.minibatch_loss(agent.evaluate(batch.obs, batch.actions), batch)[0]


@pytest.mark.parametrize("kl_loss", ["k3", "k2", "k1_in_reward"])
def test_clip_adds_ref_kl_coef_times_the_kl_to_the_starting_policy(
    kl_loss: str, small_agent_cfg: AgentConfig
) -> None:
    torch.manual_seed(1)
    agent = _agent(small_agent_cfg, actions=3)
    optimizer = torch.optim.Adam(agent.pack_parameters())
    plain = make_updater(algo_config("clip", norm_adv=False), agent, optimizer)
    assert isinstance(plain, ClipUpdater) and plain.reference is None and plain.state_dict() == {}
    cfg = algo_config("clip", norm_adv=False, ref_kl_coef=0.5, kl_loss=kl_loss)
    updater = make_updater(cfg, agent, optimizer)
    assert isinstance(updater, ClipUpdater) and updater.reference is not None
    with torch.no_grad():
        start = agent.policy_params(torch.eye(3))
        agent.actor.linear_layers[-1].bias.add_(torch.tensor([0.7, -0.3, 0.1]))  # pi moves from pi_ref
    batch = on_policy_batch(agent, torch.randn(16, 3), torch.randn(16), torch.randn(16))

    out = agent.evaluate(batch.obs, batch.actions)
    loss, terms = updater.minibatch_loss(out, batch)
    with torch.no_grad():
        ref_log_prob = updater.reference.frozen.dist.log_prob(
            updater.reference.frozen.policy_params(batch.obs), batch.actions
        )
    log_ratio = ref_log_prob - out.log_prob.detach()  # log pi_ref / pi
    torch.testing.assert_close(updater.reference.frozen.policy_params(torch.eye(3)), start)
    assert terms["kl_reference"].item() == pytest.approx((log_ratio.exp() - 1 - log_ratio).mean().item())
    if kl_loss == "k1_in_reward":  # the advantages carry -beta * log(pi_old / pi_ref)
        shaped = dataclasses.replace(
            batch, advantages=batch.advantages - 0.5 * (batch.log_probs - ref_log_prob)
        )
        assert loss.item() == pytest.approx(_clip_loss(plain, agent, shaped).item(), rel=1e-6)
    else:
        per_step = log_ratio.exp() - 1 - log_ratio if kl_loss == "k3" else 0.5 * log_ratio.square()
        expected = _clip_loss(plain, agent, batch) + 0.5 * per_step.mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert (terms["policy_loss"] - terms["surrogate_loss"]).item() == pytest.approx(
            0.5 * per_step.mean().item(), rel=1e-5
        )


def test_the_reference_is_the_agent_when_the_updater_is_built(small_agent_cfg: AgentConfig) -> None:
    """Weights loaded into the agent before the updater is built (a fine-tuning start) are the
    reference; the reference stays frozen while the agent trains."""
    agent = _agent(small_agent_cfg, actions=3)
    optimizer = torch.optim.Adam(agent.pack_parameters(), lr=1e-2)
    _set_logits_bias(agent, [1.0, -2.0, 0.5])  # "loaded" weights
    updater = make_updater(algo_config("clip", ref_kl_coef=0.1), agent, optimizer)
    assert updater.reference is not None
    frozen = {k: v.clone() for k, v in updater.reference.frozen.state_dict().items()}
    assert all(torch.equal(v, agent.state_dict()[k]) for k, v in frozen.items())
    batch = on_policy_batch(agent, torch.randn(64, 3), torch.randn(64), torch.randn(64))
    metrics = updater.update(batch)
    assert metrics["kl_reference"] > 0
    assert all(torch.equal(v, updater.reference.frozen.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(agent.actor.linear_layers[-1].bias, frozen["actor.4.bias"])  # the logits' bias


def _clip_with_reference(*extra: str) -> list[str]:
    return [
        "algo=clip",
        "algo.ref_kl_coef=0.1",
        "env=CartPole",
        "env.num_envs=4",
        "env.num_steps=32",  # 128 steps per iteration
        "algo.num_minibatches=4",
        "algo.update_epochs=2",
        "total_timesteps=768",
        "checkpoint.interval=2",
        "eval.episodes=0",
        *extra,
    ]


def test_clip_s_reference_survives_a_stop_and_resume_bit_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train(compose_config(*_clip_with_reference()), whole)
    _interrupt_at(300, signal.SIGTERM, monkeypatch)
    with pytest.raises(Interrupted):
        train(compose_config(*_clip_with_reference()), stopped)
    monkeypatch.undo()
    assert json.loads((stopped / "summary.json").read_text())["status"] == "interrupted"
    train(compose_config(*_clip_with_reference(f"resume={stopped}")), stopped)

    final_whole, final_resumed = ckpt.load_checkpoint(whole), ckpt.load_checkpoint(stopped)
    _assert_same_state(final_whole, final_resumed)
    reference_whole, reference_resumed = (c["updater"]["reference"] for c in (final_whole, final_resumed))
    for name, tensor in reference_whole.items():
        assert torch.equal(tensor, reference_resumed[name]), name
    # The reference is still the policy the run started from, not the one it trained.
    assert not torch.equal(reference_whole["actor.4.bias"], final_whole["agent"]["actor.4.bias"])
