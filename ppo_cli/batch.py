"""The batch an update learns from: one rollout's valid transitions with their advantage targets.

:class:`Batch` flattens the (steps, envs) rollout into single transitions; :class:`SequenceBatch`
keeps a recurrent agent's env sequences whole. Both cut themselves into shuffled minibatches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ppo_cli.rollout import RolloutStorage
from ppo_cli.trunk import Memory


@dataclass
class Batch:
    """The valid transitions of one rollout, flattened to (B, ...), with their advantage targets.

    Minibatches are drawn along :attr:`SAMPLE_AXIS`: single transitions here, whole env
    sequences in :class:`SequenceBatch`.
    """

    SAMPLE_AXIS = 0

    obs: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    policy_params: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    action_masks: torch.Tensor | None = None  # allowed actions, when the envs report them
    weights: torch.Tensor | None = None  # each step's weight in the loss's mean (losses.weighted_mean)

    @classmethod
    def from_storage(
        cls,
        storage: RolloutStorage,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        chunks: int = 1,
        weights: torch.Tensor | None = None,
    ) -> Batch:
        """Flatten time and env dimensions and drop the fake steps of NEXT_STEP autoreset (a
        recurrent agent's storage gives a :class:`SequenceBatch` of ``chunks`` sequences per env
        instead). ``weights`` (T, N), if any, weigh the steps in the loss."""
        if storage.states is not None:
            return SequenceBatch.of_sequences(storage, advantages, returns, chunks, weights)
        valid = storage.valid.flatten()
        keep = None if bool(valid.all()) else valid.nonzero().squeeze(-1)

        def flat(x: torch.Tensor) -> torch.Tensor:
            x = x.flatten(0, 1)
            return x if keep is None else x[keep]

        return cls(
            flat(storage.obs),
            flat(storage.actions),
            flat(storage.log_probs),
            flat(storage.policy_params),
            flat(storage.values),
            flat(advantages),
            flat(returns),
            None if storage.action_masks is None else flat(storage.action_masks),
            None if weights is None else flat(weights),
        )

    @property
    def memory(self) -> Memory | None:
        """What a recurrent agent replays its sequences from (none here: no sequences)."""
        return None

    def __len__(self) -> int:
        return self.obs.shape[self.SAMPLE_AXIS]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with ``fn`` applied to every field (that holds a tensor)."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        mapped: list[Any] = [None if x is None else fn(x) for x in values]
        return type(self)(*mapped)

    def shuffled_minibatches(self, num_minibatches: int) -> Iterator[Batch]:
        """The batch in a fresh random order, cut into ``num_minibatches`` consecutive parts
        whose sizes differ by at most one (like ``torch.tensor_split``).

        Each field is gathered once per call; the minibatches are views of the gathered copy.
        """
        axis = self.SAMPLE_AXIS
        order = torch.randperm(len(self), device=self.obs.device)
        shuffled = self.map(lambda field: field.index_select(axis, order))
        size, extra = divmod(len(self), num_minibatches)
        start = 0
        for i in range(num_minibatches):
            length = size + (i < extra)
            yield shuffled.map(lambda field: field.narrow(axis, start, length))  # noqa: B023 (used at once)
            start += length


@dataclass
class SequenceBatch(Batch):
    """A recurrent agent's rollout as env sequences: every field keeps its (steps, sequences, ...)
    shape, so that minibatches are sets of sequences (axis 1), each replayed from the state the
    agent held at its first step (trunk.py). The losses are elementwise: they take (L, n) as
    they take (B,).

    Each env's T steps are one sequence, or ``chunks`` consecutive ones of T / chunks steps
    when more minibatches are asked for than there are envs (truncated backpropagation through
    time, starting each chunk from the state stored while acting).
    """

    SAMPLE_AXIS = 1
    initial_state: torch.Tensor | None = None  # (1, sequences, state_dim): axis 1 is the sequence
    starts: torch.Tensor | None = None  # (L, sequences)

    @classmethod
    def of_sequences(
        cls,
        storage: RolloutStorage,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        chunks: int,
        weights: torch.Tensor | None = None,
    ) -> SequenceBatch:
        assert storage.states is not None and storage.starts is not None
        assert bool(storage.valid.all())  # same-step autoreset: no fake steps inside a sequence
        length = storage.num_steps // chunks

        def cut(x: torch.Tensor) -> torch.Tensor:
            """(T, N, ...) -> (T / chunks, chunks * N, ...): chunk c of env n is sequence c * N + n."""
            pieces = x.reshape(chunks, length, *x.shape[1:]).transpose(0, 1)
            return pieces.reshape(length, -1, *x.shape[2:])

        return cls(
            cut(storage.obs),
            cut(storage.actions),
            cut(storage.log_probs),
            cut(storage.policy_params),
            cut(storage.values),
            cut(advantages),
            cut(returns),
            None if storage.action_masks is None else cut(storage.action_masks),
            None if weights is None else cut(weights),
            cut(storage.states)[:1],
            cut(storage.starts),
        )

    @property
    def memory(self) -> Memory:
        assert self.initial_state is not None and self.starts is not None
        return Memory(self.initial_state[0], self.starts)
