"""Which jobs of a sweep train together as one population (``hydra/launcher=population``).

A population stacks its members along a leading tensor dimension, so its members must agree on
everything that shapes the tensors and the loop (env, network, batch geometry, variant, budget)
and may differ only in values that enter the computation as per-member numbers: the seed and the
scalar hyperparameters of :data:`MEMBER_KEYS`. Jobs whose checked configs are equal apart from
those keys form one group, in job order; a group larger than ``max_members`` is split into
consecutive groups of near-equal size.

Some jobs cannot join a population at all (:data:`NOT_BATCHED`, one reason each); the launcher
runs them as ordinary single runs. Everything here takes the jobs' checked
:class:`~ppo_cli.config.TrainConfig` and returns plain values: no Hydra, nothing trained.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from numbers import Real
from typing import Any

from ppo_cli.config import TrainConfig, flatten

# Keys that may differ between the members of one population: each member's value is a number
# of its own (a variant without the key simply does not have it).
MEMBER_KEYS = frozenset(
    {
        "seed",
        "algo.learning_rate",
        "algo.adam_eps",
        "algo.clip_eps",
        "algo.ent_coef",
        "algo.vf_coef",
        "algo.max_grad_norm",
        "algo.gamma",
        "algo.gae_lambda",
        "algo.kl_target",
        "algo.kl_coef",
        "algo.beta_factor",
        "algo.target_kl",
    }
)
# Keys that do not shape training at all (the progress bar is off in every job of a sweep).
IGNORED_KEYS = frozenset({"progress"})


def _shared_trunk(cfg: TrainConfig) -> bool:
    return cfg.agent.shared_trunk


def _reference_policy(cfg: TrainConfig) -> bool:
    return bool(getattr(cfg.algo, "ref_kl_coef", 0.0))


def _under_torchrun(cfg: TrainConfig) -> bool:
    from ppo_cli.distributed import DataParallel  # torch.distributed: only when asked

    return DataParallel.current().active


# Why a job cannot join a population, first match wins: (test, the reason in one short phrase).
# The batched trainer grows; so shrinks this table.
NOT_BATCHED: tuple[tuple[Callable[[TrainConfig], bool], str], ...] = (
    (
        lambda cfg: cfg.algo.name == "grpo",
        "GRPO's per-step loss weights (algo.loss_agg) are not batched yet",
    ),
    (_shared_trunk, "a shared trunk (CNN, LSTM/GRU) is not batched yet"),
    (_reference_policy, "a reference policy (algo.ref_kl_coef > 0) is not batched yet"),
    (lambda cfg: cfg.seeds_per_job > 1, "seeds_per_job > 1 trains its seeds one after the other"),
    (lambda cfg: cfg.init_from is not None, "init_from (a starting agent per member) is not batched yet"),
    (
        lambda cfg: cfg.tracking.backend != "none",
        "tracking (mlflow, wandb) keeps one active run per process",
    ),
    (_under_torchrun, "torchrun's ranks train one run together"),
)


def why_not_batched(cfg: TrainConfig) -> str | None:
    """Why the job of ``cfg`` cannot be a member of a population (one short phrase), or None."""
    return next((reason for test, reason in NOT_BATCHED if test(cfg)), None)


def _kind(value: Any) -> Hashable:
    """What must agree between members for a member key: numbers vary freely, but a number and
    None (``target_kl=null``: no early stop) are different programs."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return "number"
    return _frozen(value)


def _frozen(value: Any) -> Hashable:
    """``value`` (a config value: lists, mappings such as ``env.kwargs``) as a hashable one."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    return value


def group_key(cfg: TrainConfig) -> tuple[tuple[str, Hashable], ...]:
    """What every member of ``cfg``'s population shares: each key's value, or for a member key
    only the kind of its value."""
    flat = flatten(dataclasses.asdict(cfg))
    key = []
    for name, value in sorted(flat.items()):
        if name in IGNORED_KEYS:
            continue
        key.append((name, _kind(value) if name in MEMBER_KEYS else _frozen(value)))
    return tuple(key)


def split_evenly(members: Sequence[int], max_members: int) -> list[list[int]]:
    """``members`` cut into the fewest consecutive groups of at most ``max_members``, their sizes
    differing by at most one (10 with 8 at most: 5 + 5, not 8 + 2)."""
    parts = math.ceil(len(members) / max_members)
    size, extra = divmod(len(members), parts) if parts else (0, 0)
    groups, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        groups.append(list(members[start:end]))
        start = end
    return groups


def form_groups(configs: Sequence[TrainConfig], max_members: int) -> list[list[int]]:
    """The populations of the jobs ``configs`` (indices into it): jobs equal but for member keys,
    in job order, split to at most ``max_members`` each; groups ordered by their first job.

    Every index appears once; a job with a :func:`why_not_batched` reason is left to the caller
    (pass only the batchable ones). A group of one is still a population of one."""
    if max_members < 1:
        raise ValueError(f"max_members must be >= 1, not {max_members}")
    by_key: dict[tuple[tuple[str, Hashable], ...], list[int]] = {}
    for index, cfg in enumerate(configs):
        by_key.setdefault(group_key(cfg), []).append(index)
    return [part for members in by_key.values() for part in split_evenly(members, max_members)]
