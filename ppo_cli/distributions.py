"""The action distributions, as closed-form functions of their parameter tensors.

A policy's distribution pi(.|s) is represented by one tensor of parameters per sample (see
``ActorCritic.policy_params``): the logits of a Categorical, the concatenated logits of several
independent Categoricals (MultiDiscrete actions), or [mean, log_std] of a diagonal Gaussian.
Everything PPO needs (sampling, log-probabilities, entropy, the exact KL between an old and a new
policy) is a short formula of those tensors, written out here instead of going through
``torch.distributions``: building a distribution object costs several tensor operations of its
own (normalising logits, broadcasting), and these functions run at every env step and in every
minibatch, where such overheads are most of the time. ``tests/test_distributions.py`` checks
every formula against ``torch.distributions``.

Sampling takes its randomness as an argument (``noise``), drawn for a whole rollout with one call
of :meth:`draw_noise`, so that each env step does only the arithmetic.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
PAD_LOGIT = -1e8  # a logit whose probability is exactly 0 in float32, next to logits of order 1


class ActionDistribution(ABC):
    """Formulas for one family of distributions; ``params`` has the parameters in its last dim."""

    param_dim: int  # size of the parameter vector of one sample
    action_shape: tuple[int, ...]  # shape of one action
    action_dtype: torch.dtype

    @abstractmethod
    def draw_noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Randomness for ``shape`` samples, to be turned into actions by :meth:`sample`."""

    @abstractmethod
    def sample(self, params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Actions drawn from pi(.|params), given noise from :meth:`draw_noise`."""

    @abstractmethod
    def mode(self, params: torch.Tensor) -> torch.Tensor:
        """The most likely action (the argmax, or the mean)."""

    @abstractmethod
    def log_prob(self, params: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log pi(a|params) per sample (summed over the dimensions of a vector action)."""

    @abstractmethod
    def entropy(self, params: torch.Tensor) -> torch.Tensor:
        """H(pi(.|params)) per sample."""

    def log_prob_entropy(
        self, params: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both of the above (a subclass may share work between them)."""
        return self.log_prob(params, action), self.entropy(params)

    @abstractmethod
    def kl(self, old_params: torch.Tensor, new_params: torch.Tensor) -> torch.Tensor:
        """KL(pi_old || pi_new) per sample, exactly."""


class Categorical(ActionDistribution):
    """pi(a) = softmax(logits)_a over ``n`` actions."""

    action_shape = ()
    action_dtype = torch.long

    def __init__(self, n: int) -> None:
        self.param_dim = n

    def draw_noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Gumbel(0, 1) noise, -log(-log U) with U uniform on [0, 1), one value per action."""
        return torch.rand((*shape, self.param_dim), device=device).log_().neg_().log_().neg_()

    def sample(self, params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The Gumbel-max trick: argmax_a (logits_a + g_a) with g_a ~ Gumbel(0, 1) i.i.d. is
        distributed as softmax(logits) (Gumbel 1954; e.g. Maddison et al. 2014, sec. 2)."""
        return torch.argmax(params + noise, dim=-1)

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        return torch.argmax(params, dim=-1)

    def log_prob(self, params: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return params.log_softmax(-1).gather(-1, action.unsqueeze(-1)).squeeze(-1)

    def log_prob_entropy(
        self, params: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one log-softmax: H = -sum_a p_a log p_a."""
        log_p = params.log_softmax(-1)
        return log_p.gather(-1, action.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)

    def entropy(self, params: torch.Tensor) -> torch.Tensor:
        log_p = params.log_softmax(-1)
        return -(log_p.exp() * log_p).sum(-1)

    def kl(self, old_params: torch.Tensor, new_params: torch.Tensor) -> torch.Tensor:
        """sum_a p_old(a) (log p_old(a) - log p_new(a))."""
        old_log_p = old_params.log_softmax(-1)
        return (old_log_p.exp() * (old_log_p - new_params.log_softmax(-1))).sum(-1)


class MultiCategorical(ActionDistribution):
    """Independent Categoricals, one per action component (gymnasium's MultiDiscrete):
    pi(a) = prod_k softmax(logits_k)_{a_k}, where ``params`` concatenates the components' logits.

    The components are laid out as rows of a (K, max n) table, the rows of smaller components
    padded with PAD_LOGIT: a logit so low that its probability is exactly 0 in float32 (unlike
    -inf, it keeps p * log p at 0 instead of NaN), so every formula is one operation on the table.
    """

    action_dtype = torch.long

    def __init__(self, nvec: list[int]) -> None:
        self.nvec = list(nvec)
        self.param_dim = sum(self.nvec)
        self.action_shape = (len(self.nvec),)
        width = max(self.nvec)
        self.uniform = all(n == width for n in self.nvec)
        # Where each cell of the table comes from in [params, PAD_LOGIT]: a logit, or the pad.
        index, offset = [], 0
        for n in self.nvec:
            index.append([offset + i if i < n else self.param_dim for i in range(width)])
            offset += n
        self.index = torch.tensor(index)
        self.table_shape = (len(self.nvec), width)

    def table(self, params: torch.Tensor) -> torch.Tensor:
        """The logits as a (..., K, max n) table (a view when all components have the same size)."""
        if self.uniform:
            return params.unflatten(-1, self.table_shape)
        padded = torch.cat([params, params.new_full((*params.shape[:-1], 1), PAD_LOGIT)], dim=-1)
        return padded[..., self.index.to(params.device)]

    def draw_noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Gumbel(0, 1) noise for every cell of the table."""
        return torch.rand((*shape, *self.table_shape), device=device).log_().neg_().log_().neg_()

    def sample(self, params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Gumbel-max per component (see :meth:`Categorical.sample`); pads never win."""
        return torch.argmax(self.table(params) + noise, dim=-1)

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        return torch.argmax(self.table(params), dim=-1)

    def log_prob(self, params: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """sum_k log softmax(logits_k)_{a_k}."""
        log_p = self.table(params).log_softmax(-1)
        return log_p.gather(-1, action.unsqueeze(-1)).squeeze(-1).sum(-1)

    def log_prob_entropy(
        self, params: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one log-softmax of the table; the entropy of independent components adds up."""
        log_p = self.table(params).log_softmax(-1)
        log_prob = log_p.gather(-1, action.unsqueeze(-1)).squeeze(-1).sum(-1)
        return log_prob, -(log_p.exp() * log_p).sum((-2, -1))

    def entropy(self, params: torch.Tensor) -> torch.Tensor:
        log_p = self.table(params).log_softmax(-1)
        return -(log_p.exp() * log_p).sum((-2, -1))

    def kl(self, old_params: torch.Tensor, new_params: torch.Tensor) -> torch.Tensor:
        """The sum of the components' KLs (independent components)."""
        old_log_p = self.table(old_params).log_softmax(-1)
        new_log_p = self.table(new_params).log_softmax(-1)
        return (old_log_p.exp() * (old_log_p - new_log_p)).sum((-2, -1))


class DiagonalGaussian(ActionDistribution):
    """Independent normals N(mean_i, exp(log_std_i)^2); ``params`` = [mean, log_std]."""

    action_dtype = torch.float32

    def __init__(self, action_dim: int) -> None:
        self.param_dim = 2 * action_dim
        self.action_shape = (action_dim,)

    def draw_noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Standard normal noise, one value per action dimension."""
        return torch.randn((*shape, *self.action_shape), device=device)

    def sample(self, params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I)."""
        mean, log_std = params.chunk(2, dim=-1)
        return torch.addcmul(mean, log_std.exp(), noise)

    def mode(self, params: torch.Tensor) -> torch.Tensor:
        return params.chunk(2, dim=-1)[0]

    def log_prob(self, params: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """sum_i -((a_i - mean_i) / std_i)^2 / 2 - log std_i - log sqrt(2 pi)."""
        mean, log_std = params.chunk(2, dim=-1)
        z = (action - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std).sum(-1) - LOG_SQRT_2PI * mean.shape[-1]

    def entropy(self, params: torch.Tensor) -> torch.Tensor:
        """sum_i log std_i + 1/2 + log sqrt(2 pi)."""
        log_std = params.chunk(2, dim=-1)[1]
        return log_std.sum(-1) + (0.5 + LOG_SQRT_2PI) * log_std.shape[-1]

    def kl(self, old_params: torch.Tensor, new_params: torch.Tensor) -> torch.Tensor:
        """sum_i log(std_new / std_old) + (std_old^2 + (mean_old - mean_new)^2) / (2 std_new^2) - 1/2."""
        old_mean, old_log_std = old_params.chunk(2, dim=-1)
        new_mean, new_log_std = new_params.chunk(2, dim=-1)
        variance_ratio = torch.exp(2 * (old_log_std - new_log_std))
        mean_term = ((old_mean - new_mean) * torch.exp(-new_log_std)).square()
        return (new_log_std - old_log_std + 0.5 * (variance_ratio + mean_term - 1)).sum(-1)
