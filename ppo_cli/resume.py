"""What ``resume=`` means: which checkpoint, which config, and the random state to continue from.

``ppo-train resume=<run dir or checkpoint>`` re-runs the original command line (read from the run's
``.hydra/overrides.yaml``) plus whatever the user adds, in the original run dir. ``resume=auto``
continues the run dir Hydra picked if it holds a checkpoint and starts fresh otherwise, so that
re-launching a preempted job with a fixed ``hydra.run.dir`` (or ``hydra.sweep.dir``) just goes on.

A resumed run must be indistinguishable from one that never stopped, so everything that shapes
the future is restored: weights, optimizer, normalisation statistics, the variant's own state, the
step counters (which also place the learning-rate schedule), the envs (see ``env_state.py``) and
the Python / numpy / torch random generators.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from hydra._internal.utils import get_args_parser  # hydra-core is pinned to 1.3.x
from hydra.core.override_parser.overrides_parser import OverridesParser

from ppo_cli.checkpoint import LAST, checkpoint_dir, load_checkpoint, newest_valid_checkpoint
from ppo_cli.config import flatten, schema_defaults
from ppo_cli.errors import ConfigError, UserError

AUTO = "auto"
RESUME_KEYS = ("resume", "resume_allow_changes")

# Keys that may differ between the checkpoint's config and the resumed one without
# resume_allow_changes: how long to train and how to checkpoint, evaluate, report and where to
# compute. Every other key shapes the model, the envs or the updates.
FREE_ON_RESUME = ("total_timesteps", "checkpoint.", "eval.", "progress", "torch_threads", "device", "resume")


def run_dir_of(target: Path) -> Path:
    """The run directory that a ``resume=`` target belongs to."""
    if target.is_dir():
        return target
    if target.is_file() and target.parent.name == checkpoint_dir(Path()).name:
        return target.parent.parent
    if target.is_file():
        raise UserError(f"resume: {target} is not in a run directory's checkpoints/ folder")
    raise UserError(f"resume: {target}: no such run directory or checkpoint")


def expand_resume_argv(argv: list[str]) -> list[str]:
    """Rewrite ``ppo-train resume=<path> [overrides]`` into the original run's overrides, the new
    ones, and ``hydra.run.dir=<that run>``; other command lines come back unchanged.

    The original overrides are read from ``.hydra/overrides.yaml`` (plain YAML, loaded safely).
    An override given again on the command line replaces the original one.
    """
    if not any(arg.startswith("resume=") for arg in argv):
        return argv
    cli = get_args_parser().parse_args(argv)  # Hydra's own command-line parser
    parser = OverridesParser.create()
    given = parser.parse_overrides(cli.overrides)
    values = [o.value() for o in given if o.key_or_group == "resume"]
    value = values[-1] if values else None
    if value is None or value == AUTO:
        return argv
    if cli.multirun:
        raise UserError(
            "resume: a path continues one run; in a sweep use resume=auto with a fixed hydra.sweep.dir"
        )
    run_dir = run_dir_of(Path(str(value)))
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    if not saved_file.is_file():
        raise UserError(f"resume: {saved_file} is missing; resume needs a run directory made by ppo-train")
    saved = yaml.safe_load(saved_file.read_text()) or []
    replaced = {o.key_or_group for o in given} | set(RESUME_KEYS)
    parsed = parser.parse_overrides(saved)
    kept = [line for line, o in zip(saved, parsed, strict=True) if o.key_or_group not in replaced]
    return [*kept, *argv, f"hydra.run.dir={run_dir}"]


def find_checkpoint(resume: str, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: the newest valid one in ``run_dir`` for ``auto`` (None if
    there is none yet), the given file, or the newest valid one of the given run directory."""
    target = run_dir if resume == AUTO else Path(resume)
    if resume != AUTO:
        run_dir_of(target)  # exists, and is a run directory or one of its checkpoints
    if target.is_file():
        return target, load_checkpoint(target)
    found = newest_valid_checkpoint(checkpoint_dir(target))
    if found is None and resume != AUTO:
        raise UserError(f"resume: {checkpoint_dir(target) / LAST}: no readable checkpoint in {target}")
    return found


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each key outside FREE_ON_RESUME whose value differs. A key that
    did not exist when the run was saved (added by a later ppo-cli) had its default then."""
    old, new = {**schema_defaults(), **flatten(saved)}, flatten(current)
    return [
        f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}"
        for key in sorted(old.keys() | new.keys())
        if not key.startswith(FREE_ON_RESUME) and old.get(key) != new.get(key)
    ]


def check_config_changes(saved: dict[str, Any], current: dict[str, Any], allow: bool) -> list[str]:
    """The changes; refused in one line unless ``allow``."""
    changes = config_changes(saved, current)
    if changes and not allow:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ConfigError(
            "resume",
            f"the config differs from the checkpoint's in keys that shape the model, envs or updates "
            f"({shown}); pass resume_allow_changes=true to continue with the new values",
        )
    return changes


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
