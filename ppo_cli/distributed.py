"""One run trained by several processes: data-parallel PPO under ``torchrun``.

``torchrun --standalone --nproc_per_node=K --no-python ppo-train ...`` starts K copies of
``ppo-train``, the *ranks* of one run. They train one agent together:

* Each rank steps its own ``env.num_envs`` envs. Rank r's are seeded from ``seed + r * num_envs``
  on, so the K x N envs get the seeds one process with K * N envs would give them; exploration
  noise and minibatch order come from per-rank generators.
* Every optimizer step averages the gradient over the ranks (one all-reduce of the packed
  gradients, with the loss riding along), so every rank takes the same step. The agents start
  identical (every rank builds them from ``seed``) and so stay identical.
* While collecting, each rank folds its own observations (and returns) into its copy of the
  normalisation statistics; then the ranks exchange what they added, and every copy becomes the
  statistics of all ranks' data (:class:`StatisticsExchange`).
* Every decision that depends on data is taken on values averaged over the ranks: ``target_kl``'s
  early stop, PPO-Penalty's beta, TRPO's line search, a non-finite loss, a stop signal. Ranks that
  decided differently would wait forever, each in a different collective.
* Only rank 0 writes: TensorBoard, checkpoints (holding every rank's envs and random state, so a
  resumed run continues exactly), ``summary.json`` and the final evaluation.

How the config reads under K ranks: ``env.num_envs`` and ``num_minibatches`` are per rank, so one
iteration collects K x ``num_envs`` x ``num_steps`` steps and a minibatch of the whole group is K
times a rank's; ``total_timesteps`` counts the steps of all ranks. Advantages are normalised per
rank's minibatch, and the minibatches of the ranks, which may differ by the few fake steps each
drops (see ``rollout.py``), weigh equally in the averaged gradient.

Collectives run on gloo for CPU tensors and NCCL for GPU ones (each rank uses the GPU numbered by
its ``LOCAL_RANK``). A single process is a group of one, for which every method does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ppo_cli.errors import UserError
from ppo_cli.normalization import RunningMeanStd, merge_moments, split_moments

# Hydra overrides for ranks other than 0: they must not make a run directory, a .hydra/ or a log
# file of their own (the run's is rank 0's, see DataParallel.main_run_dir), and log warnings only.
OTHER_RANK_OVERRIDES = (
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=stdout",
    "hydra.job_logging.root.level=WARNING",
)


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks of one run, and the collectives the run needs."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> DataParallel:
        """The group :func:`process_group` joined, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def env_seed(self, seed: int, num_envs: int) -> int:
        """The reset seed of this rank's first env (env i of the rank gets this + i)."""
        return seed + self.rank * num_envs

    def rank_seed(self, seed: int) -> int:
        """A seed for this rank's own random generators, independent of the other ranks'."""
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def hydra_overrides(self) -> list[str]:
        return [] if self.is_main else list(OTHER_RANK_OVERRIDES)

    def main_run_dir(self, run_dir: Path) -> Path:
        """Rank 0's run directory, on every rank (Hydra's timestamps may differ between ranks)."""
        if not self.active:
            return run_dir
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        return Path(shared[0])

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor (all on one device) by its mean over the ranks, in one all-reduce."""
        if not self.active or not tensors:
            return
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        for tensor, mean in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(mean.view_as(tensor))

    def average_gradients(self, params: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Replace the gradients of ``params`` (those that have one) by their mean over the ranks,
        with ``loss`` riding along in the same all-reduce; returns the ranks' mean loss (``loss``
        itself, detached, in a single process), non-finite if any rank's loss was."""
        if not self.active:
            return loss.detach()
        mean_loss = loss.detach().reshape(1).clone()
        self.average_([*(p.grad for p in params if p.grad is not None), mean_loss])
        return mean_loss

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s mean over the ranks (``tensor`` itself in a single process)."""
        if not self.active:
            return tensor
        mean = tensor.detach().clone()
        self.average_([mean])
        return mean

    def average_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each value's mean over the ranks (the keys must be the same on every rank)."""
        if not self.active:
            return metrics
        values = torch.tensor(list(metrics.values()), dtype=torch.float64)
        self.average_([values])
        return dict(zip(metrics, values.tolist(), strict=True))

    def all_gather(self, part: Any) -> list[Any]:
        """Every rank's ``part`` (any picklable object) in rank order, on every rank."""
        if not self.active:
            return [part]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, part)
        return parts

    def any_signal(self, signum: int | None) -> int | None:
        """The stop signal some rank received (the highest number, if several), or None."""
        if not self.active:
            return signum
        received = torch.tensor([signum or 0])
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return int(received) or None

    def gather_on_main(self, part: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``part`` in rank order on rank 0; an empty list on the others."""
        if not self.active:
            return [part]
        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(part, parts, dst=0)
        return parts or []


SINGLE_PROCESS = DataParallel()


class StatisticsExchange:
    """Keeps every rank's copy of running statistics (observation and reward normalisation) the
    statistics of all ranks' data.

    Each rank folds its own data into its copy (when its envs reset, and at every step it
    collects). :meth:`merge` then sends what each rank added since the statistics the ranks last
    shared (:meth:`mark`), and every rank merges all of it, in rank order, into that shared
    state: the same float64 arithmetic on the same numbers, so the copies come out bit-identical.
    """

    def __init__(self, parallel: DataParallel, stats: Sequence[RunningMeanStd]) -> None:
        """Call before any rank folds data of its own in: the statistics are then shared."""
        self.parallel = parallel
        self.stats = list(stats)
        self.mark()

    def mark(self) -> None:
        """Record the current statistics as the state all ranks share (e.g. just loaded)."""
        self.shared = [_moments(s) for s in self.stats] if self.parallel.active else []

    def merge(self) -> None:
        """Give every rank the statistics of all ranks' data (a collective)."""
        if not self.shared:
            return
        pairs = zip(self.stats, self.shared, strict=True)
        added = [split_moments(*_moments(s), *shared) for s, shared in pairs]
        local = torch.cat([torch.cat([n.reshape(1), m.reshape(-1), v.reshape(-1)]) for n, m, v in added])
        gathered = [torch.empty_like(local) for _ in range(self.parallel.world_size)]
        dist.all_gather(gathered, local)
        offset = 0
        for s, (count, mean, var) in zip(self.stats, self.shared, strict=True):
            size = mean.numel()
            for row in gathered:
                n, part = int(row[offset]), row[offset + 1 : offset + 1 + 2 * size]
                if n > 0:
                    part_mean, part_var = part[:size].view_as(mean), part[size:].view_as(var)
                    count, mean, var = merge_moments(count, mean, var, n, part_mean, part_var)
            offset += 1 + 2 * size
            for buffer, value in zip((s.count, s.mean, s.var), (count, mean, var), strict=True):
                buffer.copy_(value)
        self.mark()


def _moments(stats: RunningMeanStd) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, var) of ``stats``, copied to the CPU (float64)."""
    return stats.count.cpu().clone(), stats.mean.cpu().clone(), stats.var.cpu().clone()


@contextmanager
def process_group(argv: Sequence[str]) -> Iterator[DataParallel]:
    """Join the group of ranks torchrun started (it sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``
    and the rendezvous address) for the block; outside torchrun, a group of one.

    ``argv`` is ppo-train's command line: a sweep (``-m``) is refused, since its jobs would each
    need a group of their own.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield DataParallel()
        return
    if {"-m", "--multirun"} & set(argv):
        raise UserError("-m: a sweep cannot run under torchrun, whose ranks train one run together")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    try:
        yield DataParallel.current()
    finally:
        dist.destroy_process_group()
