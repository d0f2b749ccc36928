"""Objective terms and diagnostics: pure functions of tensors and floats, no config objects.

Every loss here is something to *minimise* and is averaged over the minibatch it is given.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def clipped_surrogate_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    *,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO-Clip policy loss (Schulman et al. 2017, eq. 7), negated for minimisation.

    L = -mean( min( rho * A, clip(rho, 1 - eps, 1 + eps_high) * A ) ),   rho = pi(a|s) / pi_old(a|s)

    The min makes the objective a pessimistic bound: moving rho outside the range in the direction
    that A rewards earns nothing more, while moving it the wrong way is paid in full.
    ``clip_eps_high`` (default ``clip_eps``) is DAPO's asymmetric upper end (Yu et al. 2025): a
    higher ceiling lets unlikely actions with A > 0 gain more probability per update, which keeps
    the policy's entropy from collapsing. ``weights`` weigh the steps in the mean (see
    :func:`weighted_mean`).

    ``dual_clip`` = c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL",
    dual-clip PPO) bounds that full payment for A < 0: the term becomes
    max( min(rho * A, clip(rho) * A), c * A ). Without it a sample whose ratio has grown huge
    (off-policy data, a policy that moved far) contributes rho * A without bound; with it, once
    rho > c the term is the constant c * A, so it gives no gradient at all.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * advantages
    objective = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        objective = torch.where(advantages < 0, torch.maximum(objective, dual_clip * advantages), objective)
    return -weighted_mean(objective, weights)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """mean(weights * values), or the plain mean without weights.

    With weights that average 1 over the whole batch (:func:`episode_step_weights`), each
    minibatch's value is an unbiased estimate of the batch's weighted aggregate, and the mean over
    an epoch's equal-sized minibatches is that aggregate exactly: shuffling single steps into
    minibatches does not change what is minimised.
    """
    return values.mean() if weights is None else (weights * values).mean()


def episode_step_weights(valid: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Per-step loss weights u, (T, N), for a rollout whose column n holds one episode (GRPO's),
    such that mean(u * l) over the B valid steps is the chosen aggregate of per-step terms l:

        token_mean    1/B   sum_i sum_t l_it            u = 1              (DAPO)
        episode_mean  1/G   sum_i 1/|o_i| sum_t l_it    u = B / (G |o_i|)  (the GRPO paper)
        constant      1/(G T) sum_i sum_t l_it          u = B / (G T)      (Dr. GRPO)

    G = episodes (columns with a valid step), |o_i| = episode i's length, T = the rollout length
    (GRPO's: the episode time limit, the longest an episode can be). u is 0 at invalid steps and
    averages 1 over the valid ones. token_mean lets long episodes weigh more; episode_mean gives
    every episode the same weight, so each step of a short one weighs more; constant weighs every
    step alike and, unlike token_mean, does not rescale the loss by how long this batch's
    episodes happened to be (Liu et al. 2025, "Understanding R1-Zero-Like Training").
    """
    lengths = valid.sum(dim=0, dtype=torch.float64)
    steps, episodes = lengths.sum(), (lengths > 0).sum()
    if loss_agg == "token_mean":
        per_episode = torch.ones_like(lengths)
    elif loss_agg == "episode_mean":
        per_episode = steps / (episodes * lengths.clamp(min=1))
    elif loss_agg == "constant":
        per_episode = (steps / (episodes * valid.shape[0])).expand_as(lengths)
    else:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}")
    return (valid * per_episode).float()


def spo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    eps: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPO's policy loss (Xie et al. 2024, "Simple Policy Optimization", arXiv 2401.16025, ICML
    2025: the SPO objective, as in the authors' reference code), negated for minimisation:

    L = -mean( rho * A - |A| / (2 * eps) * (rho - 1)^2 )

    Per sample the objective is a concave parabola in rho with its maximum at
    rho = 1 + eps * sign(A): the penalty, not a clip, pulls the ratio back towards the edge of
    [1 - eps, 1 + eps], so every sample keeps a gradient (a clipped one has none) and a ratio
    that overshoots is pushed back. At rho = 1 the penalty's gradient vanishes: the first step
    is the policy gradient, as for the clipped surrogate.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    penalty = advantages.abs() / (2.0 * eps) * (ratio - 1.0).square()
    return -weighted_mean(ratio * advantages - penalty, weights)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_eps: float | None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Critic regression loss, optionally with PPO's value clipping in its max form.

    Unclipped: 0.5 * mean( (V - R)^2 ).
    Clipped:   0.5 * mean( max( (V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2 ) ).
    Taking the max (not the clipped term alone) means clipping can only make the loss larger, so
    it slows the critic down near V_old without ever rewarding it for staying there.
    """
    unclipped = (values - returns).square()
    if clip_eps is None:
        return 0.5 * weighted_mean(unclipped, weights)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped = (clipped_values - returns).square()
    return 0.5 * weighted_mean(torch.maximum(unclipped, clipped), weights)


def normalize_advantages(
    advantages: torch.Tensor, eps: float = 1e-8, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(A - mean) / (std + eps); a single sample is left centred only (its std is undefined).

    With ``weights`` (a padded minibatch's: w = mask * B / n over B slots of which n are
    samples, see :func:`weighted_mean`) the mean and the unbiased std are the n samples' own."""
    if weights is not None:
        mean = weighted_mean(advantages, weights)
        samples = (weights > 0).sum()
        variance = weighted_mean((advantages - mean).square(), weights) * samples / (samples - 1).clamp(min=1)
        return (advantages - mean) / (variance.sqrt() + eps)
    if advantages.numel() < 2:
        return advantages - advantages.mean()
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def policy_gradient_loss(
    log_prob: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """-mean(log pi(a|s) * A): the score-function (REINFORCE) estimator of the policy gradient.

    Only valid on data from the current policy: one step per rollout (Williams 1992; with a
    baseline V(s) subtracted inside A to reduce variance, Sutton & Barto 2018, sec. 13.4).
    """
    return -weighted_mean(log_prob * advantages, weights)


def surrogate_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unclipped importance-sampled surrogate, negated: -mean(rho * A), rho = pi / pi_old.

    Its gradient at pi = pi_old is the policy gradient; away from pi_old nothing stops it from
    growing without bound, which is what PPO-Penalty's KL term (or PPO-Clip's clip) is for.
    """
    return -weighted_mean(torch.exp(log_prob - old_log_prob) * advantages, weights)


def adaptive_kl_coef(
    beta: float,
    kl: float,
    kl_target: float,
    factor: float = 2.0,
    tolerance: float = 1.5,
    bounds: tuple[float, float] = (0.0, float("inf")),
) -> float:
    """PPO-Penalty's beta rule (Schulman et al. 2017, sec. 4), applied once per iteration.

    beta * factor  if KL > tolerance * d_targ   (the policy moved too far: penalise more)
    beta / factor  if KL < d_targ / tolerance   (it barely moved: penalise less)
    beta           otherwise;                   then clipped to ``bounds``.
    The paper uses factor 2 and tolerance 1.5.
    """
    if kl > tolerance * kl_target:
        beta *= factor
    elif kl < kl_target / tolerance:
        beta /= factor
    return min(max(beta, bounds[0]), bounds[1])


class KLEstimates(NamedTuple):
    """Sample estimates of KL(q || p) from log r = log p(x) - log q(x), x ~ q: of KL(pi_old || pi)
    with r = pi / pi_old on a rollout's actions, of KL(pi || pi_ref) with r = pi_ref / pi."""

    k1: torch.Tensor
    k2: torch.Tensor
    k3: torch.Tensor


def kl_terms(log_ratio: torch.Tensor) -> KLEstimates:
    """Schulman's three estimators ("Approximating KL Divergence", 2020), one per sample.

    k1 = -log r: unbiased, high variance, can be negative on a finite batch.
    k2 = 0.5 * (log r)^2: biased but low variance, always >= 0; exact to second order.
    k3 = (r - 1) - log r: unbiased, low variance, always >= 0 (r - 1 >= log r).
    """
    return KLEstimates(-log_ratio, 0.5 * log_ratio.square(), torch.expm1(log_ratio) - log_ratio)


def kl_estimates(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, weights: torch.Tensor | None = None
) -> KLEstimates:
    """:func:`kl_terms` of KL(pi_old || pi), log r = log pi(a|s) - log pi_old(a|s), averaged over
    the batch."""
    return KLEstimates(*(weighted_mean(term, weights) for term in kl_terms(log_prob - old_log_prob)))


def clip_fraction(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of samples whose ratio lies outside [1 - eps, 1 + eps_high] (``clip_eps_high``
    defaults to ``clip_eps``), the range :func:`clipped_surrogate_loss` clamps to."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(log_prob - old_log_prob)
    return weighted_mean(((ratio < 1.0 - clip_eps) | (ratio > 1.0 + high)).float(), weights)


def dual_clip_fraction(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    dual_clip: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of samples where dual-clip PPO's bound holds the term at c * A: A < 0 and rho > c."""
    ratio = torch.exp(log_prob - old_log_prob)
    return weighted_mean(((advantages < 0) & (ratio > dual_clip)).float(), weights)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better than a constant, < 0 worse."""
    var_targets = targets.var()
    if var_targets == 0:
        return float("nan")
    return float(1.0 - (targets - predictions).var() / var_targets)
