"""The episodes that finish while collecting: counted per env, reported per iteration.

:class:`EpisodeLog` is the one place that says which per-episode metrics exist: each field is a
list (one value per finished episode) and names the TensorBoard tag its mean is logged under.
Pooling over the ranks of a data-parallel run and logging read the fields, so a new metric is a
new field here and the line that counts it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class EpisodeLog:
    """Episodes that finished during one collection (raw returns, before any reward scaling)."""

    returns: list[float] = field(default_factory=list, metadata={"tag": "charts/episodic_return"})
    lengths: list[int] = field(default_factory=list, metadata={"tag": "charts/episodic_length"})

    def add(self, returns: np.ndarray, lengths: np.ndarray) -> None:
        """Record the episodes whose returns and lengths these are (in the order given)."""
        self.returns += returns.tolist()
        self.lengths += lengths.tolist()

    @classmethod
    def pooled(cls, logs: Iterable[EpisodeLog]) -> EpisodeLog:
        """One log of all the episodes of ``logs``, in their order."""
        pooled = cls()
        for log in logs:
            for f in dataclasses.fields(cls):
                getattr(pooled, f.name).extend(getattr(log, f.name))
        return pooled

    def mean_scalars(self) -> dict[str, float]:
        """``{tag: mean}`` of every metric, or nothing when no episode finished."""
        if not self.returns:
            return {}
        return {f.metadata["tag"]: float(np.mean(getattr(self, f.name))) for f in dataclasses.fields(self)}


class EpisodeCounter:
    """The return (raw rewards) and length of each env's episode in progress.

    What gymnasium's ``RecordEpisodeStatistics`` wrapper reports, counted here from the rewards
    and flags the collector holds anyway: the wrapper costs a noticeable share of a step of
    numpy-vectorised CartPoles (``benchmarks/RESULTS.md``).
    """

    def __init__(self, num_envs: int) -> None:
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def step(self, rewards: np.ndarray, valid: np.ndarray, done: np.ndarray, finished: EpisodeLog) -> None:
        """Count one step (fake steps, ``valid`` False, count for nothing); episodes that ended
        with it go into ``finished``."""
        self.returns += rewards * valid
        self.lengths += valid
        if done.any():
            finished.add(self.returns[done], self.lengths[done])
            self.returns[done] = 0.0
            self.lengths[done] = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "returns": torch.from_numpy(self.returns.copy()),
            "lengths": torch.from_numpy(self.lengths.copy()),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.returns[:] = state["returns"].numpy()
        self.lengths[:] = state["lengths"].numpy()

    def reset(self) -> None:
        self.returns[:] = 0.0
        self.lengths[:] = 0
