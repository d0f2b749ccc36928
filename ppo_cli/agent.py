"""Actor-critic networks and the action distributions they parameterise.

Actor and critic are separate MLPs (no shared trunk), initialised as in the PPO implementations
studied by Andrychowicz et al. 2021 ("What Matters in On-Policy RL", sec. 3): orthogonal weights
with gain sqrt(2) on hidden layers, 0.01 on the policy head (so the initial policy is close to
uniform / zero-mean) and 1 on the value head, zero biases.

Discrete actions use a Categorical over logits. Box actions use a diagonal Gaussian whose log-std is
a learned vector independent of the state. The sampled (raw) action is what the agent stores and
learns from; only the copy sent to the environment is clipped to the action bounds, so the
log-probabilities in the update refer to the action that was actually sampled.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal, kl_divergence
from torch.nn import functional as F

from ppo_cli.config import AgentConfig
from ppo_cli.normalization import ObservationNormalizer

# Argument validation costs a host sync per distribution; the networks never produce bad arguments.
Distribution.set_default_validate_args(False)

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
ACTIVATION_FUNCTIONS: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Tanh: torch.tanh,
    nn.ReLU: torch.relu,
}


class MLP(nn.Sequential):
    """Linear layers and activations, like ``nn.Sequential``, with a forward that calls the
    functions directly: these tiny networks run at every env step, where calling each submodule
    costs as much as its arithmetic (about 15% of a forward pass for 64-64 MLPs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, nn.Linear):
                x = F.linear(x, layer.weight, layer.bias)
            else:
                x = ACTIVATION_FUNCTIONS[type(layer)](x)
        return x


def mlp(in_dim: int, hidden: list[int], out_dim: int, activation: str, out_gain: float) -> MLP:
    """Linear layers with the given activation between them, orthogonally initialised."""
    layers: list[nn.Module] = []
    sizes = [in_dim, *hidden]
    for a, b in itertools.pairwise(sizes):
        layers += [_orthogonal(nn.Linear(a, b), math.sqrt(2)), ACTIVATIONS[activation]()]
    layers.append(_orthogonal(nn.Linear(sizes[-1], out_dim), out_gain))
    return MLP(*layers)


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActionSample(NamedTuple):
    """What the rollout needs from one forward pass."""

    action: torch.Tensor
    log_prob: torch.Tensor
    value: torch.Tensor
    policy_params: torch.Tensor  # enough to rebuild pi_old(.|s) later: see ``policy_params``


class Evaluation(NamedTuple):
    """What the update needs for a minibatch of stored (obs, action) pairs."""

    log_prob: torch.Tensor
    entropy: torch.Tensor
    value: torch.Tensor
    distribution: Distribution


class ActorCritic(nn.Module):
    """Policy pi(a|s) and value V(s) for one Box observation space and a Discrete or Box action space."""

    action_low: torch.Tensor
    action_high: torch.Tensor

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        action_space: gym.spaces.Space,
        cfg: AgentConfig,
        normalize_obs: bool = False,
        clip_obs: float = 10.0,
    ) -> None:
        super().__init__()
        # Observations of any Box shape are flattened to one vector per sample.
        obs_dim = self.obs_dim = int(np.prod(observation_space.shape))
        self.obs_normalizer = ObservationNormalizer((obs_dim,), clip_obs) if normalize_obs else None
        self.critic = mlp(obs_dim, list(cfg.critic_hidden), 1, cfg.activation, out_gain=1.0)
        self.continuous = isinstance(action_space, gym.spaces.Box)
        if self.continuous:
            assert isinstance(action_space, gym.spaces.Box)
            act_dim = int(action_space.shape[0])
            self.policy_param_dim = 2 * act_dim
            self.action_shape: tuple[int, ...] = (act_dim,)
            self.actor = mlp(obs_dim, list(cfg.actor_hidden), act_dim, cfg.activation, out_gain=0.01)
            self.log_std = nn.Parameter(torch.full((act_dim,), float(cfg.log_std_init)))
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))
        else:
            assert isinstance(action_space, gym.spaces.Discrete)
            self.policy_param_dim = int(action_space.n)
            self.action_shape = ()
            self.actor = mlp(obs_dim, list(cfg.actor_hidden), int(action_space.n), cfg.activation, 0.01)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """Apply the observation statistics (frozen: updating them is the rollout's job)."""
        obs = obs.flatten(1)
        return obs if self.obs_normalizer is None else self.obs_normalizer(obs)

    def actor_parameters(self) -> list[nn.Parameter]:
        """The parameters of pi alone (the actor MLP and, for Box actions, the log-std)."""
        extra = [self.log_std] if self.continuous else []
        return [*self.actor.parameters(), *extra]

    def policy_params(self, obs: torch.Tensor) -> torch.Tensor:
        """pi(.|s) as one tensor per sample: logits, or [mean, log_std] for the Gaussian.

        Stored with each transition so that the exact KL(pi_old || pi) can be computed later.
        """
        out = self.actor(obs)
        if self.continuous:
            return torch.cat([out, self.log_std.expand_as(out)], dim=-1)
        return out

    def distribution_from_params(self, params: torch.Tensor) -> Distribution:
        """Inverse of :meth:`policy_params`."""
        if self.continuous:
            mean, log_std = params.chunk(2, dim=-1)
            return Normal(mean, log_std.exp())
        return Categorical(logits=params)

    def distribution(self, obs: torch.Tensor) -> Distribution:
        """pi(.|s) for a batch of normalised observations."""
        return self.distribution_from_params(self.policy_params(obs))

    def exact_kl(self, old_params: torch.Tensor, new: Distribution) -> torch.Tensor:
        """KL(pi_old || pi) per sample, in closed form (summed over the dimensions of a Gaussian)."""
        kl = kl_divergence(self.distribution_from_params(old_params), new)
        return kl.sum(-1) if self.continuous else kl

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s) for a batch of normalised observations, shape (batch,)."""
        return self.critic(obs).squeeze(-1)

    def log_prob_entropy(self, dist: Distribution, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint log-probability and entropy: a diagonal Gaussian sums over action dimensions."""
        if self.continuous:
            return dist.log_prob(action).sum(-1), dist.entropy().sum(-1)
        return dist.log_prob(action), dist.entropy()

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, deterministic: bool = False) -> ActionSample:
        """Sample actions for a batch of normalised observations, with log pi(a|s) and V(s)."""
        params = self.policy_params(obs)
        if not self.continuous:
            # What Categorical(logits).sample() and .log_prob() compute, without building one:
            # this runs at every env step. (The same multinomial draw: a test checks it.)
            log_probs = params.log_softmax(-1)
            if deterministic:
                action = params.argmax(-1)
            else:
                action = torch.multinomial(log_probs.exp(), 1, replacement=True).squeeze(-1)
            log_prob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
            return ActionSample(action, log_prob, self.value(obs), params)
        dist = self.distribution_from_params(params)
        action = dist.mean if deterministic else dist.sample()
        log_prob = dist.log_prob(action).sum(-1)  # no entropy: this runs at every env step
        return ActionSample(action, log_prob, self.value(obs), params)

    def evaluate(self, obs: torch.Tensor, action: torch.Tensor) -> Evaluation:
        """log pi(a|s), entropy and V(s) with gradients, for the update."""
        dist = self.distribution(obs)
        log_prob, entropy = self.log_prob_entropy(dist, action)
        return Evaluation(log_prob, entropy, self.value(obs), dist)

    def env_action(self, action: torch.Tensor) -> np.ndarray:
        """The action as the environment takes it: clipped to the bounds for Box spaces."""
        if self.continuous:
            action = torch.clamp(action, self.action_low, self.action_high)
        return action.cpu().numpy()
