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
    lambda = 1 gives the discounted return to the end of the episode or of the data, whichever
    comes first, minus V(s_t): the Monte-Carlo return where the episode terminates inside the
    rollout, bootstrapped with V at a time limit and at the rollout's last step otherwise (high
    variance, biased by V only at those ends). Returns ``(advantages, returns)`` with
    returns = advantages + values, the lambda-return (the critic's target by default).
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


def group_returns(rewards: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each env's episode return R_i = sum of its valid rewards, in float64, shaped (groups, G).

    float64 because these returns are compared for equality (a tied group) and standardised by
    their spread: in float32 the rounding of a tied group's mean is itself a "spread".
    """
    return (rewards.double() * valid).sum(dim=0).view(-1, group_size)


def zero_spread(returns: torch.Tensor) -> torch.Tensor:
    """(groups,) True where every return of the group (a row of :func:`group_returns`) is equal:
    the group carries no learning signal, its advantages are 0."""
    return returns.amax(dim=1) == returns.amin(dim=1)


def gae_and_critic_targets(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
    critic_target: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) advantages for the actor, and the critic's regression targets chosen
    apart from them (``algo.critic_target``), so that the bias-variance trade-off of what V learns
    can be studied without changing the policy's gradient:

    - ``gae``: R_t = A_t + V(s_t), the lambda-return of the advantages themselves;
    - ``td``: R_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t), the one-step (TD(0)) target;
    - ``mc``: R_t = r_t + gamma * r_{t+1} + ... to the end of the episode, the Monte-Carlo return
      where the episode terminates inside the rollout. Where it does not (still running at the
      rollout's last step, or cut by a time limit) the sum is bootstrapped there with V, as
      GAE's lambda = 1 return is: the alternative, dropping those steps from the critic's loss,
      would leave an env whose episodes outlast the rollout with no target at all.

    Every target is the lambda-return of :func:`gae` for some lambda (``td`` 0, ``mc`` 1), so
    ``terminated`` and ``truncated`` mean the same here as there; lambda = 1 telescopes to the
    discounted sum of rewards because ``next_values[t]`` = ``values[t + 1]`` inside an episode, as
    a rollout stores them.
    """
    advantages, returns = gae(rewards, values, next_values, terminated, truncated, gamma, gae_lambda)
    target_lambda = {"gae": gae_lambda, "td": 0.0, "mc": 1.0}[critic_target]
    if target_lambda != gae_lambda:
        _, returns = gae(rewards, values, next_values, terminated, truncated, gamma, target_lambda)
    return advantages, returns


def group_relative(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    group_size: int,
    eps: float = 1e-8,
    *,
    leave_one_out: bool = False,
    divide_by_std: bool = True,
) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024, "DeepSeekMath", sec. 4.1), for one episode per env.

    Env i ran one episode over the valid steps of column i; envs i and j are in the same group
    when i // group_size == j // group_size (they started from the same reset seed). With
    R_i = sum_t r_t,i the episode's return, every step of episode i gets

        A_i = (R_i - b_i) / (std_group(R) + eps)       (population std; eps = 1e-8)

    with the baseline b_i = mean_group(R), so that within each group the advantages sum to zero:
    better-than-the-group episodes are reinforced, worse ones discouraged, with no critic.
    ``leave_one_out`` makes b_i the mean of the *other* G - 1 returns (RLOO, Ahmadian et al.
    2024), an unbiased baseline: R_i - b_i = G / (G - 1) * (R_i - mean_group(R)).
    ``divide_by_std=False`` drops the division (Dr. GRPO, Liu et al. 2025: dividing by the std
    weighs groups that barely differ, too easy or too hard, the most).

    The statistics are computed in float64 and a group whose returns are all equal gets 0
    exactly (in float32 with eps 1e-8 the rounding of its mean became advantages of about
    +/-0.75). Invalid steps get 0. Returns the rewards' dtype.
    """
    returns = group_returns(rewards, valid, group_size)
    centred = returns - returns.mean(dim=1, keepdim=True)
    if leave_one_out:
        centred = centred * (group_size / (group_size - 1))
    if divide_by_std:
        centred = centred / (returns.std(dim=1, unbiased=False, keepdim=True) + eps)
    advantages = centred.masked_fill(zero_spread(returns).unsqueeze(1), 0.0)
    return advantages.flatten().unsqueeze(0).to(rewards.dtype) * valid.to(rewards.dtype)


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
