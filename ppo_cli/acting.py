"""How the agent acts during a rollout: at each env step, the actor's output and V(s) for the
current observations, written into the rollout storage, and the action sampled from them.

With the small MLPs PPO uses on vector observations, one env step's forward pass is a few matrix
products on a few rows: it costs the overhead of each call, not arithmetic. Two things cut it:

* :class:`JointForward` runs actor and critic as one MLP, one matrix product per layer instead of two;
* on the CPU, :class:`NumpyActing` runs that pass in numpy, on arrays that share memory with the
  storage's tensors: a numpy call on arrays this small costs a few microseconds less than a torch
  operation (what that saves is measured in ``benchmarks/RESULTS.md``).

On an accelerator, :class:`TorchActing` runs the same pass in torch, next to the storage on the
device. Either way the weights are a snapshot: build a new acting object for every rollout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ppo_cli.agent import ActorCritic
from ppo_cli.distributions import PAD_LOGIT, Categorical, DiagonalGaussian


class JointForward:
    """The actor's output and V(s) in one pass, for acting during rollouts (no gradients).

    Actor and critic MLPs of the same depth are one MLP whose first weight matrix stacks both
    networks' first layers and whose later ones are block-diagonal: [W_actor, 0; 0, W_critic].
    Each env step then runs one matrix product per layer instead of two, which matters because
    for these tiny networks the cost of a tensor operation is its overhead, not its arithmetic.
    The weights are a snapshot: build a new one after every update. MLPs of different depths are
    run one after the other instead.
    """

    def __init__(self, agent: ActorCritic) -> None:
        self.agent = agent
        actor, critic = agent.actor.linear_layers, agent.critic.linear_layers
        self.activation = agent.actor.activation
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.joinable(agent):
            with torch.no_grad():
                for depth, (a, c) in enumerate(zip(actor, critic, strict=True)):
                    if depth == 0:
                        weight = torch.cat([a.weight, c.weight])
                    else:
                        weight = torch.block_diag(a.weight, c.weight)
                    # Stored transposed, as addmm takes it: F.linear would transpose at every call.
                    self.layers.append((weight.t().contiguous(), torch.cat([a.bias, c.bias])))

    @staticmethod
    def joinable(agent: ActorCritic) -> bool:
        """Whether actor and critic have the same depth, and so run as one MLP."""
        return len(agent.actor.linear_layers) == len(agent.critic.linear_layers)

    def __call__(self, obs: torch.Tensor, out: torch.Tensor) -> None:
        """Write [actor output, V(s)] for each row of ``obs`` into ``out`` (batch, actor_out_dim + 1)."""
        if not self.layers:
            out[:, :-1] = self.agent.actor(obs)
            out[:, -1] = self.agent.value(obs)
            return
        x = obs
        for weight_t, bias in self.layers[:-1]:
            x = self.activation(torch.addmm(bias, x, weight_t))
        weight_t, bias = self.layers[-1]
        torch.addmm(bias, x, weight_t, out=out)


class ActingBuffers(NamedTuple):
    """The storage tensors of one rollout that acting writes into, and the exploration noise
    (``ActorCritic.exploration_noise``) drawn for all its steps up front."""

    obs: torch.Tensor  # (T, N, obs_dim)
    outputs: torch.Tensor  # (T, N, actor_out_dim + 1): [actor output, V(s)]
    actions: torch.Tensor  # (T, N, *action_shape)
    noise: torch.Tensor  # (T, N, ...)
    masks: torch.Tensor | None = None  # (T, N, actor_out_dim): allowed discrete actions, if reported
    state: torch.Tensor | None = None  # (N, state_dim): a recurrent agent's state, updated in place
    starts: torch.Tensor | None = None  # (T, N): where the state is zeroed first (episode starts)


class Acting(ABC):
    """Acts for every step ``t`` of one rollout, into :class:`ActingBuffers`."""

    @abstractmethod
    def __call__(self, t: int, obs: torch.Tensor) -> np.ndarray:
        """Record ``obs`` as step ``t``'s observations and what the agent does with them; returns
        the actions to send to the envs (clipped to the bounds for Box spaces)."""


class TorchActing(Acting):
    """Acting with torch operations, wherever the storage lives; the only one for agents with a
    trunk (``trunk.py``), whose output the actor and critic MLPs read instead of the observations."""

    def __init__(self, agent: ActorCritic, buffers: ActingBuffers) -> None:
        self.agent = agent
        self.forward = JointForward(agent)
        # Per-step views made once: indexing the tensors at every step would cost an operation each.
        self.obs, self.outputs, self.actions = (x.unbind(0) for x in buffers[:3])
        self.actor_out, self.noise = buffers.outputs[..., :-1].unbind(0), buffers.noise.unbind(0)
        self.masks = None if buffers.masks is None else buffers.masks.unbind(0)
        self.state = buffers.state
        self.starts = None if buffers.starts is None else buffers.starts.unsqueeze(-1).unbind(0)

    def __call__(self, t: int, obs: torch.Tensor) -> np.ndarray:
        self.obs[t].copy_(obs)
        features = self.obs[t]
        if self.agent.has_trunk:
            if self.starts is not None:
                assert self.state is not None
                self.state.masked_fill_(self.starts[t], 0.0)
            features = self.agent.step_features(features, self.state)
        self.forward(features, self.outputs[t])
        if self.masks is not None:  # stored masked: log pi_old is then the masked policy's
            self.actor_out[t].masked_fill_(~self.masks[t], PAD_LOGIT)
        self.agent.noisy_action(self.actor_out[t], self.noise[t], out=self.actions[t])
        return self.agent.env_action(self.actions[t])


def _relu(x: np.ndarray, out: np.ndarray) -> None:
    np.maximum(x, 0.0, out=out)


NUMPY_ACTIVATIONS: dict[str, Callable[..., object]] = {"tanh": np.tanh, "relu": _relu}


class NumpyActing(Acting):
    """The same pass and draw as :class:`TorchActing` (a test checks it), in numpy, for CPU storage."""

    def __init__(self, agent: ActorCritic, buffers: ActingBuffers) -> None:
        self.layers = [(weight_t.numpy(), bias.numpy()) for weight_t, bias in JointForward(agent).layers]
        self.activation = NUMPY_ACTIVATIONS[agent.actor.activation_name]
        self.obs, self.outputs, self.actions, self.noise = (x.numpy() for x in buffers[:4])
        self.masks = None if buffers.masks is None else buffers.masks.numpy()
        self.bounds = (agent.action_low.numpy(), agent.action_high.numpy()) if agent.continuous else None
        self.start = agent.action_start

    def __call__(self, t: int, obs: torch.Tensor) -> np.ndarray:
        x = self.obs[t]
        np.copyto(x, obs.numpy())
        for weight_t, bias in self.layers[:-1]:
            x = x @ weight_t
            x += bias
            self.activation(x, out=x)
        weight_t, bias = self.layers[-1]
        outputs = self.outputs[t]
        np.matmul(x, weight_t, out=outputs)
        outputs += bias
        return self.draw(t)

    def draw(self, t: int) -> np.ndarray:
        """Step ``t``'s actions from its outputs, as stored (masked first, if the envs report masks)."""
        outputs, actions = self.outputs[t], self.actions[t]
        if self.masks is not None:
            np.copyto(outputs[:, :-1], PAD_LOGIT, where=~self.masks[t])
        if self.bounds is None:  # Gumbel-max, as Categorical.sample
            np.argmax(outputs[:, :-1] + self.noise[t], axis=-1, out=actions)
            return actions if self.start is None else actions + self.start
        np.add(outputs[:, :-1], self.noise[t], out=actions)  # mean + std * eps
        return np.clip(actions, *self.bounds)


def make_acting(agent: ActorCritic, buffers: ActingBuffers) -> Acting:
    """Numpy acting for storage on the CPU (when actor and critic have the same depth, so that
    they run as one MLP on the observations, and the actions are one Categorical or a Gaussian),
    torch acting otherwise."""
    numpy_draws = isinstance(agent.dist, Categorical | DiagonalGaussian)
    on_cpu = buffers.obs.device.type == "cpu"
    if on_cpu and not agent.has_trunk and JointForward.joinable(agent) and numpy_draws:
        return NumpyActing(agent, buffers)
    return TorchActing(agent, buffers)


class PopulationActing:
    """The acting of a population's members (``population.py``), each a :class:`NumpyActing`,
    as one batched pass: at each step the members' observations are stacked and each layer is one
    ``np.matmul`` over (K, N, in) x (K, in, out), instead of K small ones. Each member then draws
    its actions from its own outputs and noise, and :meth:`member` hands them to its collector."""

    def __init__(self, members: list[NumpyActing]) -> None:
        self.members = members
        depth = len(members[0].layers)
        self.layers = [
            (
                np.stack([m.layers[i][0] for m in members]),
                np.stack([m.layers[i][1] for m in members])[:, None],
            )
            for i in range(depth)
        ]
        self.activation = members[0].activation
        self.obs = np.stack([m.obs[0] for m in members])  # (K, N, obs_dim), refilled at each step
        self.actions: list[np.ndarray] = [np.empty(0)] * len(members)

    def act(self, t: int, observations: list[torch.Tensor]) -> None:
        """Every member's outputs and actions for step ``t`` from its ``observations`` (N, obs_dim)."""
        for k, obs in enumerate(observations):
            self.obs[k] = obs.numpy()
        x = self.obs
        for weight_t, bias in self.layers[:-1]:
            x = np.matmul(x, weight_t)
            x += bias
            self.activation(x, out=x)
        weight_t, bias = self.layers[-1]
        outputs = np.matmul(x, weight_t)
        outputs += bias
        for k, member in enumerate(self.members):
            member.obs[t] = self.obs[k]
            member.outputs[t] = outputs[k]
            self.actions[k] = member.draw(t)

    def member(self, k: int) -> Acting:
        """Member ``k``'s acting for its collector: the actions :meth:`act` drew for it."""
        return _Drawn(self, k)


class _Drawn(Acting):
    def __init__(self, population: PopulationActing, k: int) -> None:
        self.population, self.k = population, k

    def __call__(self, t: int, obs: torch.Tensor) -> np.ndarray:
        return self.population.actions[self.k]
