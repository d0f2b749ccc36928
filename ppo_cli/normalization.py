"""Running statistics for observation normalisation and reward scaling.

Both are ``nn.Module`` s whose statistics are *buffers*, so they travel with ``state_dict()`` into
every checkpoint and to the right device. Observation statistics are part of the agent (a policy
trained on normalised inputs is meaningless without them); evaluation uses them frozen.
"""

from __future__ import annotations

import torch
from torch import nn


class RunningMeanStd(nn.Module):
    """Mean and variance of a stream of batches, merged with Chan et al.'s parallel formula.

    For two sets with counts n_a, n_b, means m_a, m_b and variances v_a, v_b, the union has
    mean m_a + d * n_b / n and variance (v_a * n_a + v_b * n_b + d^2 * n_a * n_b / n) / n,
    where d = m_b - m_a and n = n_a + n_b. Stored in float64 so long runs do not drift.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        # A tiny prior count avoids dividing by zero before the first update, as in OpenAI baselines.
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        """Fold a batch (first dimension = samples) into the statistics."""
        batch = batch.to(torch.float64)
        n_b = batch.shape[0]
        if n_b == 0:
            return
        mean_b = batch.mean(dim=0)
        var_b = batch.var(dim=0, unbiased=False)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.var.copy_((self.var * self.count + var_b * n_b + delta.square() * self.count * n_b / n) / n)
        self.count.copy_(n)


class ObservationNormalizer(nn.Module):
    """obs -> clip((obs - mean) / sqrt(var + eps), -clip, clip), statistics updated only on demand."""

    def __init__(self, shape: tuple[int, ...], clip: float, eps: float = 1e-8) -> None:
        super().__init__()
        self.stats = RunningMeanStd(shape)
        self.clip = clip
        self.eps = eps

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(self.stats.var + self.eps).to(obs.dtype)
        return torch.clamp((obs - self.stats.mean.to(obs.dtype)) / std, -self.clip, self.clip)


class RewardScaler(nn.Module):
    """Divide rewards by the running std of the discounted return, then clip.

    The return G_t = gamma * G_{t-1} + r_t is accumulated per env and reset when an episode ends;
    scaling by its standard deviation (not the reward's) keeps the value targets of order one
    whatever the horizon (Engstrom et al. 2020, "Implementation Matters in Deep RL", sec. 3).
    The mean is not subtracted, so the sign of every reward is kept.
    """

    returns: torch.Tensor

    def __init__(self, num_envs: int, gamma: float, clip: float, eps: float = 1e-8) -> None:
        super().__init__()
        self.stats = RunningMeanStd(())
        self.register_buffer("returns", torch.zeros(num_envs, dtype=torch.float64))
        self.gamma = gamma
        self.clip = clip
        self.eps = eps

    @torch.no_grad()
    def forward(self, rewards: torch.Tensor, dones: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Scale a rollout's rewards, (T, N), step by step in time order: each step's returns join
        the statistics before that step's rewards are divided by their std. ``dones`` ends the
        accumulated return, ``valid`` masks fake steps out of the statistics."""
        scaled = torch.empty_like(rewards)
        for t in range(len(rewards)):
            self.returns.mul_(self.gamma).add_(rewards[t].to(torch.float64))
            self.stats.update(self.returns[valid[t]])
            self.returns.masked_fill_(dones[t], 0.0)
            scaled[t] = rewards[t] / torch.sqrt(self.stats.var + self.eps).to(rewards.dtype)
        return torch.clamp(scaled, -self.clip, self.clip)
