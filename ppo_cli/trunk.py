"""Layers that actor and critic share before their heads: the Nature CNN for pixels and a recurrent
core (LSTM or GRU) for partially observed tasks.

Recurrent state and sequences
-----------------------------
A recurrent core's state summarises the episode so far. It is carried from step to step through a
rollout and zeroed where an episode starts. The update must see the same states the policy acted
with, so the rollout stores the state before every step, and the update replays env sequences:
from the state stored at a sequence's first step, the observations one step at a time, zeroing
the state at the same steps (:class:`Memory`). Gradients flow back through each sequence
(truncated BPTT: a whole rollout of ``num_steps`` steps, or a chunk of it; see
``update.SequenceBatch``), as in the recurrent PPO of CleanRL and Stable-Baselines3-contrib.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class Memory(NamedTuple):
    """What a recurrent core needs to replay a batch of env sequences (T steps x B envs)."""

    state: torch.Tensor  # (B, state_dim): the state before the first step
    starts: torch.Tensor  # (T, B) bool: an episode starts at this step (the state is zeroed first)


class NatureCNN(nn.Module):
    """The convolutional network of Mnih et al. 2015 (Methods, "Model architecture"): 32 8x8
    filters with stride 4, 64 4x4 stride 2, 64 3x3 stride 1, a 512-unit linear layer, ReLU after
    each. Takes flattened pixels 0..255 and scales them to [0, 1]; orthogonal weights with
    gain sqrt(2) and zero biases, as PPO's Atari implementations initialise it."""

    out_dim = 512

    def __init__(self, obs_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(obs_shape) != 3:
            raise ValueError(f"the Nature CNN takes (channels, height, width) images, not shape {obs_shape}")
        self.obs_shape = obs_shape
        convs = [nn.Conv2d(obs_shape[0], 32, 8, 4), nn.Conv2d(32, 64, 4, 2), nn.Conv2d(64, 64, 3, 1)]
        self.convs = nn.ModuleList(convs)
        with torch.no_grad():
            flat = self._conv(torch.zeros(1, *obs_shape)).shape[1]
        self.linear = nn.Linear(flat, self.out_dim)
        layers: list[nn.Conv2d | nn.Linear] = [*convs, self.linear]
        for layer in layers:
            assert layer.bias is not None
            nn.init.orthogonal_(layer.weight, math.sqrt(2))
            nn.init.zeros_(layer.bias)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.flatten(1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(..., C * H * W) flattened pixels -> (..., 512) features."""
        x = obs.reshape(-1, *self.obs_shape).float() / 255.0
        return F.relu(self.linear(self._conv(x))).reshape(*obs.shape[:-1], self.out_dim)


class RecurrentCore(nn.Module):
    """An LSTM or GRU cell stepped over a sequence, its state zeroed where an episode starts.

    The state is one tensor per env: [h, c] side by side for the LSTM, h for the GRU. Weights are
    orthogonal and biases zero (as in CleanRL's recurrent PPO).
    """

    def __init__(self, kind: str, in_dim: int, size: int) -> None:
        super().__init__()
        self.lstm = kind == "lstm"
        self.cell: nn.LSTMCell | nn.GRUCell = (nn.LSTMCell if self.lstm else nn.GRUCell)(in_dim, size)
        self.size = size
        self.state_dim = 2 * size if self.lstm else size
        for name, param in self.cell.named_parameters():
            if name.startswith("weight"):
                nn.init.orthogonal_(param, 1.0)
            else:
                nn.init.zeros_(param)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One step for a batch: (B, in_dim), (B, state_dim) -> the new state (B, state_dim);
        its first ``size`` columns are the output h."""
        if self.lstm:
            h, c = self.cell(x, state.chunk(2, dim=-1))
            return torch.cat([h, c], dim=-1)
        return self.cell(x, state)

    def forward(self, x: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay (T, B, in_dim) inputs from ``memory``: the outputs (T, B, size) and the state
        after the last step."""
        state = memory.state
        keep = (~memory.starts).unsqueeze(-1).to(x.dtype)
        outputs = []
        for t in range(x.shape[0]):
            state = self.step(x[t], state * keep[t])
            outputs.append(state[:, : self.size])
        return torch.stack(outputs), state
