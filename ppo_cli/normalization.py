"""Running statistics for observation normalisation and reward scaling.

Both are ``nn.Module`` s whose statistics are *buffers*, so they travel with ``state_dict()`` into
every checkpoint. Observation statistics are part of the agent (a policy trained on normalised
inputs is meaningless without them); evaluation uses them frozen.

Host data (numpy arrays, as the envs return them) is folded into the statistics at every env
step. For buffers on the CPU the arithmetic runs in numpy on views of them: for one step's few
samples a numpy call costs a fraction of a torch call, and a reward-scaled MuJoCo rollout spent
most of its time here otherwise. The reward scaler, which only ever sees host rewards, stays on
the CPU whatever the training device.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import nn

Moments = TypeVar("Moments", np.ndarray, torch.Tensor)


def merge_moments(
    count: Moments, mean: Moments, var: Moments, batch_count: int, batch_mean: Moments, batch_var: Moments
) -> tuple[Moments, Moments, Moments]:
    """(count, mean, variance) of the union of two sets, by Chan et al.'s parallel formula.

    For counts n_a, n_b, means m_a, m_b and variances v_a, v_b, the union has mean
    m_a + d * n_b / n and variance (v_a * n_a + v_b * n_b + d^2 * n_a * n_b / n) / n, where
    d = m_b - m_a and n = n_a + n_b. Plain arithmetic: numpy arrays and tensors alike.
    """
    total = count + batch_count
    delta = batch_mean - mean
    new_mean = mean + delta * batch_count / total
    new_var = (var * count + batch_var * batch_count + delta * delta * count * batch_count / total) / total
    return total, new_mean, new_var


def split_moments(
    count: Moments, mean: Moments, var: Moments, part_count: Moments, part_mean: Moments, part_var: Moments
) -> tuple[Moments, Moments, Moments]:
    """(count, mean, variance) of the samples of a set that are not in its part: the inverse of
    :func:`merge_moments`, so ``merge_moments(*part, *split_moments(*merged, *part))`` is ``merged``.

    With n = n_a + n_b: n_b = n - n_a, m_b = (n m - n_a m_a) / n_b and
    v_b = (n v - n_a v_a - d^2 n_a n_b / n) / n_b with d = m_b - m_a. Counts must differ (n_b > 0).
    """
    rest = count - part_count
    rest_mean = (mean * count - part_mean * part_count) / rest
    delta = rest_mean - part_mean
    rest_var = (var * count - part_var * part_count - delta * delta * part_count * rest / count) / rest
    return rest, rest_mean, rest_var


class RunningMeanStd(nn.Module):
    """Mean and variance of a stream of batches (see :func:`merge_moments`), in float64 so that
    long runs do not drift."""

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        # A tiny prior count avoids dividing by zero before the first batch, as in OpenAI baselines.
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def fold_in(self, batch: np.ndarray) -> None:
        """Fold a batch of host data (first dimension = samples) into the statistics."""
        batch = np.asarray(batch, dtype=np.float64)
        n = len(batch)
        if n == 0:
            return
        # np.add.reduce: ndarray.mean/.var wrap it in Python code that costs more than the sums.
        batch_mean = np.add.reduce(batch, axis=0) / n
        batch_var = np.add.reduce(np.square(batch - batch_mean), axis=0) / n
        buffers = (self.count, self.mean, self.var)
        count, mean, var = arrays = [b.cpu().numpy() for b in buffers]  # views of CPU buffers, else copies
        merged = merge_moments(count, mean, var, n, batch_mean, batch_var)
        for buffer, array, value in zip(buffers, arrays, merged, strict=True):
            array[...] = value
            if buffer.device.type != "cpu":
                buffer.copy_(torch.from_numpy(array))


class ObservationNormalizer(nn.Module):
    """obs -> clip((obs - mean) / sqrt(var + eps), -clip, clip); data is folded in only on demand."""

    def __init__(self, shape: tuple[int, ...], clip: float, eps: float = 1e-8) -> None:
        super().__init__()
        self.stats = RunningMeanStd(shape)
        self.clip = clip
        self.eps = eps

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(self.stats.var + self.eps).to(obs.dtype)
        return torch.clamp((obs - self.stats.mean.to(obs.dtype)) / std, -self.clip, self.clip)

    def normalize_array(self, obs: np.ndarray) -> np.ndarray:
        """The same map on host data, in numpy (the rollout's per-step path), as float32."""
        mean, var = self.stats.mean.cpu().numpy(), self.stats.var.cpu().numpy()
        normalized = np.clip((obs - mean) / np.sqrt(var + self.eps), -self.clip, self.clip)
        return normalized.astype(np.float32)


class RewardScaler(nn.Module):
    """Divide rewards by the running std of the discounted return, then clip.

    The return G_t = gamma * G_{t-1} + r_t is accumulated per env and reset when an episode ends;
    scaling by its standard deviation (not the reward's) keeps the value targets of order one
    whatever the horizon (Engstrom et al. 2020, "Implementation Matters in Deep RL", sec. 3).
    The mean is not subtracted, so the sign of every reward is kept. Lives on the CPU.
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
    def forward(self, rewards: np.ndarray, dones: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Scale a rollout's rewards, (T, N), step by step in time order: each step's returns join
        the statistics before that step's rewards are divided by their std. ``dones`` ends the
        accumulated return, ``valid`` masks fake steps out of the statistics."""
        returns, var = self.returns.numpy(), self.stats.var.numpy()  # views of the buffers
        scaled = np.empty_like(rewards)
        for t in range(len(rewards)):
            returns *= self.gamma
            returns += rewards[t]
            self.stats.fold_in(returns[valid[t]])
            returns[dones[t]] = 0.0
            scaled[t] = rewards[t] / np.sqrt(var + self.eps)
        return np.clip(scaled, -self.clip, self.clip)
