"""Advantage estimators: pure functions of tensors and floats.

Conventions for every function here: tensors are shaped (T, N) = (time, env); step t holds the
reward r_t received after acting in s_t, the value V(s_t), and ``next_values[t]`` = V(s_{t+1}) of
the state that followed. When an episode was cut by a time limit at step t, ``next_values[t]`` is
V of the *final* observation of that episode (not of the first observation of the next one), which
is what makes bootstrapping through a truncation correct.
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16).

    delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
    A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1},   done_t = terminated_t or truncated_t

    A terminal state has value 0, so ``terminated`` removes the bootstrap; a time-limit
    ``truncated`` keeps it (the state was not terminal, we only stopped watching). Either one ends
    the trace, since step t+1 belongs to another episode.

    lambda = 0 gives the one-step TD error delta_t (low variance, biased by V);
    lambda = 1 gives the discounted return to the end of the data minus V(s_t) (unbiased, high
    variance). Returns ``(advantages, returns)`` with returns = advantages + values, the
    regression target of the critic (the lambda-return).
    """
    not_terminated = 1.0 - terminated.to(rewards.dtype)
    not_done = 1.0 - torch.logical_or(terminated.bool(), truncated.bool()).to(rewards.dtype)
    decay = gamma * gae_lambda * not_done
    advantages = rewards + gamma * next_values * not_terminated - values  # delta_t, overwritten below
    # Backwards in time, A_t = delta_t + decay_t * A_{t+1}, in place on row views: one tensor
    # operation per step.
    rows, decays = advantages.unbind(0), decay.unbind(0)
    for t in range(len(rows) - 2, -1, -1):
        rows[t].addcmul_(decays[t], rows[t + 1])
    return advantages, advantages + values


def group_relative(
    rewards: torch.Tensor, valid: torch.Tensor, group_size: int, eps: float = 1e-8
) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024, "DeepSeekMath", sec. 4.1), for one episode per env.

    Env i ran one episode over the valid steps of column i; envs i and j are in the same group
    when i // group_size == j // group_size (they started from the same reset seed). With
    R_i = sum_t r_t,i the episode's return, every step of episode i gets

        A_i = (R_i - mean_group(R)) / (std_group(R) + eps)

    so within each group the advantages sum to zero: better-than-the-group episodes are
    reinforced, worse ones discouraged, with no critic. Invalid steps get 0.
    """
    valid_f = valid.to(rewards.dtype)
    returns = (rewards * valid_f).sum(dim=0).view(-1, group_size)
    centred = returns - returns.mean(dim=1, keepdim=True)
    standardised = centred / (returns.std(dim=1, unbiased=False, keepdim=True) + eps)
    return standardised.flatten().unsqueeze(0) * valid_f


def monte_carlo_weights(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    returns: str,
    baseline: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE's weights of log pi(a_t|s_t) (Williams 1992), for one whole episode per env.

    Column i holds env i's episode from its first step on, over its valid steps (rewards after
    the episode's end are 0). With G_t = sum_{k >= t} gamma^(k-t) r_k, the discounted return from
    t on, the weight psi_t is

        returns="episode":       R(tau) = G_0, the same for every step of the episode
        returns="reward_to_go":  G_t (an action cannot change the rewards that came before it)

    and the advantage A_t = psi_t - b_t, with the baseline b_t

        baseline="none":   0
        baseline="mean":   the mean of psi over every valid step of the batch (one number)
        baseline="value":  V(s_t), ``values``, the critic's estimate of psi_t

    Nothing is bootstrapped: an episode cut by a time limit ends there, as if terminal. Returns
    ``(advantages, targets)``, the targets being psi (what the critic is regressed on); both are
    0 on invalid steps.
    """
    valid_f = valid.to(rewards.dtype)
    to_go = rewards * valid_f  # G_t, computed in place backwards in time
    rows = to_go.unbind(0)
    for t in range(len(rows) - 2, -1, -1):
        rows[t].add_(rows[t + 1], alpha=gamma)
    psi = to_go if returns == "reward_to_go" else to_go[:1].expand_as(to_go)
    psi = psi * valid_f
    if baseline == "none":
        return psi, psi
    if baseline == "mean":
        mean = psi.sum() / valid_f.sum()
        return (psi - mean) * valid_f, psi
    return (psi - values) * valid_f, psi
