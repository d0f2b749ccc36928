"""Actor-critic networks and the action distributions they parameterise.

Actor and critic are MLP heads, initialised as in the PPO implementations studied by
Andrychowicz et al. 2021 ("What Matters in On-Policy RL", sec. 3): orthogonal weights with gain
sqrt(2) on hidden layers, 0.01 on the policy head (so the initial policy is close to uniform /
zero-mean) and 1 on the value head, zero biases. On vector observations they read the observation
itself, as two separate networks. Optionally a *trunk* shared by both comes first (see
``trunk.py``): the Nature CNN for image observations (``agent.encoder``) and/or an LSTM or GRU
(``agent.recurrent``), whose hidden state carries what earlier observations showed.

Discrete actions use a Categorical over logits, MultiDiscrete ones an independent Categorical per
component. Box actions use a diagonal Gaussian whose log-std is a learned vector independent of the
state (formulas in ``distributions.py``). The sampled (raw)
action is what the agent stores and learns from; only the copy sent to the environment is clipped
to the action bounds, so the log-probabilities in the update refer to the action actually sampled.
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
from torch.nn import functional as F

from ppo_cli.config import AgentConfig
from ppo_cli.distributions import (
    PAD_LOGIT,
    ActionDistribution,
    Categorical,
    DiagonalGaussian,
    MultiCategorical,
)
from ppo_cli.normalization import ObservationNormalizer
from ppo_cli.packing import PackedParameters
from ppo_cli.trunk import Memory, NatureCNN, RecurrentCore

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
}


class MLP(nn.Sequential):
    """Linear layers with an activation between them, like ``nn.Sequential``, with a forward that
    calls the functions directly: these tiny networks run at every env step, where calling each
    submodule costs as much as its arithmetic (measured in ``benchmarks/RESULTS.md``)."""

    def __init__(self, sizes: list[int], activation: str) -> None:
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            if layers:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(a, b))
        super().__init__(*layers)
        self.linear_layers = [layer for layer in layers if isinstance(layer, nn.Linear)]
        self.activation_name = activation
        self.activation = ACTIVATION_FUNCTIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for depth, layer in enumerate(self.linear_layers):
            if depth:
                x = self.activation(x)
            x = F.linear(x, layer.weight, layer.bias)
        return x


def mlp(in_dim: int, hidden: list[int], out_dim: int, activation: str, out_gain: float) -> MLP:
    """An MLP initialised orthogonally: gain sqrt(2) for hidden layers, ``out_gain`` for the last."""
    network = MLP([in_dim, *hidden, out_dim], activation)
    for layer in network.linear_layers[:-1]:
        _orthogonal(layer, math.sqrt(2))
    _orthogonal(network.linear_layers[-1], out_gain)
    return network


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class Evaluation(NamedTuple):
    """What the update needs for a minibatch of stored (obs, action) pairs."""

    log_prob: torch.Tensor
    entropy: torch.Tensor
    value: torch.Tensor
    policy_params: torch.Tensor  # pi(.|s) as parameters, for the exact KL to pi_old


class ActorCritic(nn.Module):
    """Policy pi(a|s) and value V(s) for one Box observation space and a Discrete, MultiDiscrete or
    Box action space."""

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
        # The shared trunk, if any (trunk.py): pixels are stored as they come, 1 byte each.
        self.encoder = NatureCNN(tuple(observation_space.shape)) if cfg.encoder == "nature_cnn" else None
        self.obs_dtype = torch.uint8 if self.encoder is not None else torch.float32
        feature_dim = obs_dim if self.encoder is None else self.encoder.out_dim
        self.core = None
        if cfg.recurrent != "none":
            self.core = RecurrentCore(cfg.recurrent, feature_dim, cfg.recurrent_size)
            feature_dim = cfg.recurrent_size
        self.critic = mlp(feature_dim, list(cfg.critic_hidden), 1, cfg.activation, out_gain=1.0)
        self.continuous = isinstance(action_space, gym.spaces.Box)
        self.dist: ActionDistribution
        if self.continuous:
            assert isinstance(action_space, gym.spaces.Box)
            act_dim = int(action_space.shape[0])
            self.dist = DiagonalGaussian(act_dim)
            self.actor = mlp(feature_dim, list(cfg.actor_hidden), act_dim, cfg.activation, out_gain=0.01)
            self.log_std = nn.Parameter(torch.full((act_dim,), float(cfg.log_std_init)))
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))
        else:
            self.dist = discrete_distribution(action_space)
            self.actor = mlp(feature_dim, list(cfg.actor_hidden), self.dist.param_dim, cfg.activation, 0.01)
        # The env numbers a discrete space's actions from its ``start``; the agent from 0.
        start = getattr(action_space, "start", 0)
        self.action_start = np.asarray(start, dtype=np.int64) if np.any(start) else None
        self.actor_out_dim = self.actor.linear_layers[-1].out_features
        self.packs: list[PackedParameters] = []

    @property
    def has_trunk(self) -> bool:
        """Whether observations pass through shared layers before the actor and critic MLPs."""
        return self.encoder is not None or self.core is not None

    @property
    def state_dim(self) -> int:
        """The size of the recurrent state of one env (0 without a recurrent core)."""
        return 0 if self.core is None else self.core.state_dim

    def initial_state(self, num_envs: int) -> torch.Tensor:
        """The recurrent state of ``num_envs`` envs at the start of their episodes: zeros."""
        return torch.zeros(num_envs, self.state_dim, device=self.critic.linear_layers[0].weight.device)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """The encoder's features of (normalised) observations, or the observations themselves
        without an encoder (the recurrent core, if any, comes after: see :meth:`features`)."""
        return obs if self.encoder is None else self.encoder(obs)

    def step_features(self, obs: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """The features of one step's observations (B, ...); a recurrent agent steps its core
        from ``state`` (B, state_dim), which is updated in place."""
        features = self.encode(obs)
        if self.core is None:
            return features
        if state is None:
            raise ValueError("a recurrent agent acts from a state: start from initial_state(num_envs)")
        state.copy_(self.core.step(features, state))
        return state[:, : self.core.size]

    def features(self, obs: torch.Tensor, memory: Memory | None = None) -> torch.Tensor:
        """What the actor and critic MLPs read: the (normalised) observations themselves, or the
        trunk's output. A recurrent agent takes (T, B, ...) sequences and their ``memory``."""
        features = self.encode(obs)
        if self.core is None:
            return features
        if memory is None:
            raise ValueError("a recurrent agent needs the memory (state, episode starts) of its sequences")
        return self.core(features, memory)[0]

    def pack_parameters(self) -> list[nn.Parameter]:
        """Pack the actor's, the critic's and the trunk's parameters into one tensor each (see
        ``packing.py``); returns the packed tensors, which are what the optimizer should step.
        Call once, after moving the agent to its device."""
        self.packs = [PackedParameters(self.actor_parameters()), PackedParameters(self.critic.parameters())]
        trunk = self.trunk_parameters()
        if trunk:
            self.packs.append(PackedParameters(trunk))
        return [pack.flat for pack in self.packs]

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The parameters actor and critic share (none without a trunk)."""
        return [p for module in (self.encoder, self.core) if module is not None for p in module.parameters()]

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """Apply the observation statistics (frozen: updating them is the rollout's job)."""
        obs = obs.flatten(1)
        return obs if self.obs_normalizer is None else self.obs_normalizer(obs)

    def actor_parameters(self) -> list[nn.Parameter]:
        """The parameters of pi alone (the actor MLP and, for Box actions, the log-std)."""
        extra = [self.log_std] if self.continuous else []
        return [*self.actor.parameters(), *extra]

    def policy_params(
        self, obs: torch.Tensor, mask: torch.Tensor | None = None, memory: Memory | None = None
    ) -> torch.Tensor:
        """pi(.|s) as one tensor per sample: logits, or [mean, log_std] for the Gaussian.

        Stored with each transition so that the exact KL(pi_old || pi) can be computed later.
        ``mask`` (discrete actions; True = allowed) removes the disallowed actions from the
        distribution: their logits become PAD_LOGIT, probability exactly 0.
        """
        return self._policy_params(self.features(obs, memory), mask)

    def _policy_params(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        params = self.params_from_actor_output(self.actor(features))
        return params if mask is None else params.masked_fill(~mask, PAD_LOGIT)

    def params_from_actor_output(self, out: torch.Tensor) -> torch.Tensor:
        """The policy parameters given the actor MLP's output (the Gaussian adds its log-std)."""
        if self.continuous:
            return torch.cat([out, self.log_std.expand_as(out)], dim=-1)
        return out

    def value(self, obs: torch.Tensor, memory: Memory | None = None) -> torch.Tensor:
        """V(s) for a batch of normalised observations, shape (batch,) (or (T, B) sequences)."""
        return self.critic(self.features(obs, memory)).squeeze(-1)

    def step_value(
        self, obs: torch.Tensor, state: torch.Tensor | None, starts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """V(s) of one step's observations (B, ...); a recurrent agent's from ``state`` (B,
        state_dim; left unchanged), zeroed first where ``starts`` (B,) is True."""
        if self.core is None:
            return self.value(obs)
        if state is None:
            raise ValueError("a recurrent agent values from a state: start from initial_state(num_envs)")
        starts = torch.zeros(len(obs), dtype=torch.bool, device=obs.device) if starts is None else starts
        return self.value(obs.unsqueeze(0), Memory(state, starts.unsqueeze(0))).squeeze(0)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        deterministic: bool = False,
        mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Actions for a batch of normalised observations: sampled, or the most likely ones
        (among the allowed ones, with a ``mask``). A recurrent agent also takes the envs'
        ``state`` (:meth:`initial_state` at episode starts), which this step updates in place."""
        params = self._policy_params(self.step_features(obs, state), mask)
        if deterministic:
            return self.dist.mode(params)
        return self.dist.sample(params, self.dist.draw_noise(params.shape[:-1], params.device))

    def exploration_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Randomness for ``shape`` actions, in the units of the actor's output (see
        :meth:`noisy_action`): Gumbel noise for logits, std * N(0, 1) for the Gaussian's mean.

        A rollout draws it all at once; the log-std does not change within a rollout.
        """
        noise = self.dist.draw_noise(shape, self.critic.linear_layers[0].weight.device)
        return noise * self.log_std.detach().exp() if self.continuous else noise

    def noisy_action(
        self, actor_out: torch.Tensor, noise: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The action sampled with ``noise`` (written into ``out`` if given): the same draw as
        ``dist.sample`` on the full parameters, from the actor's raw output (a test checks it)."""
        if self.continuous:
            return torch.add(actor_out, noise, out=out)
        action = self.dist.sample(actor_out, noise)  # the logits are the whole parameters
        return action if out is None else out.copy_(action)

    def evaluate(
        self,
        obs: torch.Tensor,
        action: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory: Memory | None = None,
    ) -> Evaluation:
        """log pi(a|s), entropy and V(s) with gradients, for the update (under the action masks
        the actions were sampled with, if any; recurrent agents replay sequences from ``memory``)."""
        features = self.features(obs, memory)
        params = self._policy_params(features, mask)
        log_prob, entropy = self.dist.log_prob_entropy(params, action)
        return Evaluation(log_prob, entropy, self.critic(features).squeeze(-1), params)

    def env_action(self, action: torch.Tensor) -> np.ndarray:
        """The action as the environment takes it (:meth:`env_action_tensor`), in numpy."""
        return self.env_action_tensor(action).cpu().numpy()

    def env_action_tensor(self, action: torch.Tensor) -> torch.Tensor:
        """The action as the environment takes it: clipped to the bounds for Box spaces, shifted
        by the space's ``start`` for discrete ones. A tensor: exported policies trace this."""
        if self.continuous:
            return torch.clamp(action, self.action_low, self.action_high)
        if self.action_start is None:
            return action
        return action + torch.as_tensor(self.action_start, device=action.device)


def discrete_distribution(action_space: gym.spaces.Space) -> Categorical | MultiCategorical:
    """The distribution of a Discrete or a (1-D) MultiDiscrete action space."""
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        return MultiCategorical([int(n) for n in action_space.nvec])
    assert isinstance(action_space, gym.spaces.Discrete), action_space
    return Categorical(int(action_space.n))
