"""A run's checkpoints as training state: what a payload holds and how it is laid out, both ways.

``checkpoint.py`` moves payloads to and from disk (atomically); this module decides what goes in
one and puts it back into a :class:`~ppo_cli.iteration.TrainingState`:

    {"config", "spaces",                       # what the run is, checked on resume and by ppo-eval
     "agent", "optimizer", "updater",          # the same on every rank
     "global_step", "iteration", "recent_returns", "best_eval",
     "collector", "rng", "reward_scaler",      # rank 0's own parts (PER_RANK_KEYS)
     "other_ranks": [{collector, rng, reward_scaler} of rank 1, 2, ...]}   # under torchrun only

Only rank 0 writes; the other ranks send it their own parts. A run resumed by more ranks than
wrote it restarts the envs of ranks the checkpoint holds nothing for, from a derived seed.

``best.pt`` holds the first group and the counters only (:meth:`Checkpointer.save_best`): an
agent to evaluate, not a state to resume.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ppo_cli import supervisor
from ppo_cli.checkpoint import (
    LAST,
    checkpoint_dir,
    describe_spaces,
    load_matching,
    save_best,
    save_checkpoint,
)
from ppo_cli.errors import UserError
from ppo_cli.iteration import TrainingState, seed_everything
from ppo_cli.packing import packed_optimizer_state

# The parts of the training state that differ between the ranks of a data-parallel run (their envs,
# their random generators, their envs' discounted returns); everything else is the same on all.
PER_RANK_KEYS = ("collector", "rng", "reward_scaler")


class Checkpointer:
    """Saves ``run_dir``'s checkpoints (keeping ``keep`` periodic ones beside ``last.pt``) and
    restores training state from them; remembers the newest one on disk."""

    def __init__(self, run_dir: Path, plain_config: dict[str, Any], keep: int) -> None:
        self.run_dir = run_dir
        self.plain_config = plain_config
        self.keep = keep
        self.last_saved: Path | None = None  # the one resumed from, then each one written

    def save(self, state: TrainingState, periodic: bool) -> None:
        """Save ``state`` (a collective under torchrun: every rank calls it, rank 0 writes)."""
        payload = self.payload(state)
        parallel = state.parallel
        parts = parallel.gather_on_main({key: payload[key] for key in PER_RANK_KEYS})
        self.last_saved = checkpoint_dir(self.run_dir) / LAST
        if not parallel.is_main:
            return
        if parallel.active:
            payload["other_ranks"] = parts[1:]
        self.last_saved = save_checkpoint(payload, self.run_dir, self.keep, periodic)
        supervisor.checkpoint_saved(self.last_saved, state.global_step)

    def save_best(self, state: TrainingState) -> Path:
        """Write ``best.pt``: the agent that scored ``state.best_eval``, with its step and score
        (rank 0 only: the evaluations are its own, and the agent is the same on every rank)."""
        return save_best(self.agent_payload(state), self.run_dir)

    def agent_payload(self, state: TrainingState) -> dict[str, Any]:
        """What ppo-eval and load_agent read: the run's config and spaces, the agent, the counters."""
        envs = state.collector.envs
        return {
            "config": self.plain_config,
            "spaces": describe_spaces(envs.single_observation_space, envs.single_action_space),
            "agent": state.agent.state_dict(),
            "global_step": state.global_step,
            "iteration": state.iteration,
            "best_eval": state.best_eval,
        }

    def payload(self, state: TrainingState) -> dict[str, Any]:
        """This rank's whole checkpoint payload (rank 0's is the one written)."""
        return {
            **self.agent_payload(state),
            "optimizer": state.optimizer.state_dict(),
            "reward_scaler": None if state.reward_scaler is None else state.reward_scaler.state_dict(),
            "updater": state.updater.state_dict(),
            "collector": state.collector.state_dict(),
            "rng": rng_state(),
            "recent_returns": list(state.recent_returns),
        }

    def restore(self, state: TrainingState, payload: dict[str, Any], source: Path, env_seed: int) -> bool:
        """Load ``payload`` (read from ``source``) into ``state``; True if this rank's envs continue
        their episodes exactly.

        Where they cannot (see ``env_state.py``), its envs restart from a seed derived from
        ``env_seed`` and the checkpoint's step, so a resumed run is still reproducible. So do those
        of a rank the checkpoint holds no state for (resumed by more ranks than wrote it).
        """
        self.last_saved = source
        _restore_shared(state, payload, source)
        reset_seed = int(np.random.SeedSequence([env_seed, state.global_step]).generate_state(1)[0])
        own = _own_part(state, payload)
        scaler_state = (own or payload)["reward_scaler"]
        if state.reward_scaler is not None and scaler_state is not None:
            load_matching(state.reward_scaler, scaler_state, "reward scaler", source)
        state.statistics.mark()  # every rank loaded the same statistics
        if own is None:
            state.collector.restart(reset_seed)
            seed_everything(reset_seed)
            return False
        try:
            exact = state.collector.load_state_dict(own["collector"], reset_seed)
        except KeyError as exc:  # another collector's state: a variant that changed how it collects
            raise UserError(
                f"{source}: the checkpoint's collector state does not fit this run's (it lacks {exc}: "
                "written by an older ppo-cli whose variant collected differently); start a new run"
            ) from None
        set_rng_state(own["rng"])  # last: building the run above drew from the generators
        return exact


def _restore_shared(state: TrainingState, payload: dict[str, Any], source: Path) -> None:
    """The parts every rank shares: network, optimizer, the variant's state, the counters."""
    load_matching(state.agent, payload["agent"], "network", source)
    optimizer_state = payload["optimizer"]
    if len(optimizer_state["param_groups"][0]["params"]) != len(state.agent.packs):  # before packing
        params = list(state.agent.parameters())
        optimizer_state = packed_optimizer_state(optimizer_state, params, state.agent.packs)
    state.optimizer.load_state_dict(optimizer_state)
    try:
        state.updater.load_state_dict(payload["updater"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{source}: the checkpoint's algorithm state does not fit this run's ({exc})"
        ) from None
    state.global_step, state.iteration = int(payload["global_step"]), int(payload["iteration"])
    state.recent_returns.extend(payload["recent_returns"])
    state.best_eval = payload.get("best_eval")  # absent from checkpoints of versions before it


def _own_part(state: TrainingState, payload: dict[str, Any]) -> dict[str, Any] | None:
    """This rank's own parts: rank 0's are the payload's top level, the other ranks' are listed
    beside it; None for a rank the checkpoint holds nothing for."""
    parallel = state.parallel
    others = payload.get("other_ranks", [])
    if parallel.rank and len(others) == parallel.world_size - 1:
        return cast(dict[str, Any], others[parallel.rank - 1])
    return payload if parallel.is_main else None


def rng_state() -> dict[str, Any]:
    """Every global random generator the training loop draws from, as checkpoint-safe data."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states only where the same GPUs are present)."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
