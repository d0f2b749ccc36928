"""Atomic checkpoint writes and validated reads.

A checkpoint is a dict of tensors and plain Python values only (no pickled classes), so that
``torch.load(..., weights_only=True)`` reads it and nothing inside it can run code. It is written
to a temporary file in the same directory, flushed to disk, then ``os.replace``-d over the final
name: a crash or kill at any moment leaves either the old checkpoint or the new one, never half of
one.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from ppo_cli.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
LAST = "last.pt"
BEST = "best.pt"  # the agent of the best evaluation so far: for ppo-eval and load_agent, never resumed
CHOSEN = {"last": LAST, "best": BEST}  # what a run directory's checkpoint may be chosen by
PERIODIC = re.compile(r"step_(\d+)\.pt")
TEMP_GLOB = ".*.tmp-*"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _own_storage(tree: Any) -> Any:
    """``tree`` with every tensor that views a larger storage copied out: torch.save writes a
    view's whole storage, and a population member's parameters and Adam moments are rows of
    tensors shared with the other members (``stacked.py``), whose values have no place in its file."""
    if isinstance(tree, torch.Tensor):
        return tree.clone() if tree.untyped_storage().nbytes() > tree.nbytes else tree
    if isinstance(tree, dict):
        return {key: _own_storage(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        values = [_own_storage(value) for value in tree]
        return type(tree)(*values) if hasattr(tree, "_fields") else type(tree)(values)
    return tree


def save_atomic(payload: dict[str, Any], path: Path, kept: str | None = None) -> None:
    """Write ``payload`` to ``path`` so that readers only ever see a complete file.

    A write the system refuses (a full disk, a quota, a vanished mount) is a one-line UserError
    that says what is left to resume from: ``kept``, by default the previous ``path`` if there
    was one. torch.save reports such a write as a RuntimeError raised while handling the OSError
    ("enforce fail at inline_container.cc"), so the OSError is looked for behind it.
    """
    if kept is None:
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written yet"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(_own_storage(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        cause = _os_error(exc)
        if cause is None:  # torch failed for another reason: a bug
            raise
        raise UserError(f"{path}: cannot write the checkpoint ({cause.strerror or cause}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _os_error(exc: BaseException) -> OSError | None:
    """``exc`` if it is an OSError, else the nearest OSError it was raised from or while handling."""
    current: BaseException | None = exc
    while current is not None and not isinstance(current, OSError):
        current = current.__cause__ or current.__context__
    return current


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX only; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(payload: dict[str, Any], run_dir: Path, keep: int, periodic: bool) -> Path:
    """Write ``last.pt`` and, if ``periodic``, ``step_<global_step>.pt``, keeping ``keep`` of those."""
    directory = checkpoint_dir(run_dir)
    payload = {"format_version": FORMAT_VERSION, **payload}
    last = directory / LAST
    save_atomic(payload, last)
    if periodic and keep > 0:
        save_atomic(payload, directory / f"step_{payload['global_step']:010d}.pt", f"{last} holds this step")
        for old in periodic_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return last


def save_best(payload: dict[str, Any], run_dir: Path) -> Path:
    """Write ``best.pt``: the agent alone (no optimizer, envs or random generators), so that
    nothing resumes from it; it is neither periodic nor ``last.pt``, so it is never pruned."""
    path = checkpoint_dir(run_dir) / BEST
    kept = "the previous best.pt is intact" if path.exists() else "no best.pt was written yet"
    save_atomic({"format_version": FORMAT_VERSION, **payload}, path, kept)
    return path


def periodic_checkpoints(directory: Path) -> list[Path]:
    """Periodic checkpoints, oldest first."""
    found = [p for p in directory.glob("step_*.pt") if PERIODIC.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(PERIODIC.fullmatch(p.name).group(1)))  # type: ignore[union-attr]


def remove_stale_temp_files(directory: Path) -> None:
    """Delete temp files left by a writer that was killed mid-write (never a complete checkpoint)."""
    for stale in directory.glob(TEMP_GLOB):
        stale.unlink(missing_ok=True)


def newest_valid_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads: ``last.pt``, else the periodic ones from
    the newest down. Each unreadable file is reported in one log line and skipped."""
    candidates = [directory / LAST, *reversed(periodic_checkpoints(directory))]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            return candidate, load_checkpoint(candidate)
        except UserError as exc:
            log.warning("skipping %s", exc)
    return None


def resolve_checkpoint(path: str | Path, chosen: str = "last") -> Path:
    """A checkpoint file, or a run directory's ``checkpoints/last.pt`` (``chosen="last"``) or
    ``checkpoints/best.pt`` (``"best"``)."""
    path = Path(path)
    if chosen not in CHOSEN:
        raise UserError(f"checkpoint: got {chosen!r}, allowed: {'|'.join(CHOSEN)}")
    if path.is_dir():
        path = checkpoint_dir(path) / CHOSEN[chosen]
        if chosen == "best" and not path.is_file():
            raise UserError(
                f"{path}: no best checkpoint yet (evaluations during training write it: every "
                "eval.interval iterations and at the end, unless eval.episodes=0); use the last one"
            )
    elif chosen != "last" and path.is_file():
        raise UserError(
            f"{path}: a checkpoint file is used as it is; choosing {chosen} needs a run directory"
        )
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint (give a run directory or a .pt file)")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and sanity-check a checkpoint; any unreadable file is a one-line UserError."""
    file = resolve_checkpoint(path)
    try:
        with warnings.catch_warnings():  # a plain pickle (no zip) makes torch ask for a bug report
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"{file}: not a readable ppo-cli checkpoint: {_unreadable(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{file}: not a ppo-cli checkpoint of format {FORMAT_VERSION}")
    return payload


def _unreadable(exc: Exception) -> str:
    """What is wrong with a file that ``torch.load(weights_only=True)`` refused, in our words.

    torch's own message for a refused pickle advises re-running with ``weights_only=False``, which
    would run whatever code the file carries: it is never shown, only the global it names.
    """
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"Python objects (GLOBAL {found.group(1)})" if found else "data other than tensors and values"
        return f"it holds pickled {what}, which ppo-cli checkpoints never contain; not loaded"
    if isinstance(exc, OSError):  # the file itself is fine, perhaps, but cannot be read
        return str(exc.strerror or exc)
    zip_problem = re.search(r"failed reading zip archive: ([^.]+)", str(exc))
    return "truncated or not a checkpoint file" + (f" ({zip_problem.group(1)})" if zip_problem else "")


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: Path) -> None:
    """``module.load_state_dict(state)``, or one UserError naming every tensor that does not fit
    (a checkpoint from another env, or from a network of another shape)."""
    own = module.state_dict()
    problems = []
    for name in sorted(own.keys() | state.keys()):
        if name not in state:
            problems.append(f"{name} missing from the checkpoint")
        elif name not in own:
            problems.append(f"{name} not in this run's {what}")
        elif own[name].shape != state[name].shape:
            problems.append(f"{name} is {list(state[name].shape)} there, {list(own[name].shape)} here")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"{source}: the checkpoint's {what} does not fit this run's: {shown}")
    module.load_state_dict(state)


def describe_spaces(observation_space: gym.spaces.Space, action_space: gym.spaces.Space) -> dict[str, Any]:
    """The spaces as plain data, enough to rebuild the agent without the environment."""
    assert isinstance(observation_space, gym.spaces.Box)
    action: dict[str, Any]
    if isinstance(action_space, gym.spaces.Discrete):
        action = {"type": "discrete", "n": int(action_space.n)}
        if action_space.start:  # (absent from checkpoints of versions that ignored it)
            action["start"] = int(action_space.start)
    elif isinstance(action_space, gym.spaces.MultiDiscrete):
        nvec, start = action_space.nvec.tolist(), action_space.start.tolist()
        action = {"type": "multidiscrete", "nvec": nvec, "start": start}
    else:
        assert isinstance(action_space, gym.spaces.Box)
        action = {
            "type": "box",
            "low": action_space.low.tolist(),
            "high": action_space.high.tolist(),
        }
    return {"observation_shape": list(observation_space.shape), "action": action}


def rebuild_spaces(described: dict[str, Any]) -> tuple[gym.spaces.Box, gym.spaces.Space]:
    """Inverse of :func:`describe_spaces` (observation bounds are not needed by the agent)."""
    obs = gym.spaces.Box(-np.inf, np.inf, shape=tuple(described["observation_shape"]), dtype=np.float32)
    action = described["action"]
    if action["type"] == "discrete":
        return obs, gym.spaces.Discrete(action["n"], start=action.get("start", 0))
    if action["type"] == "multidiscrete":
        return obs, gym.spaces.MultiDiscrete(action["nvec"], start=action["start"])
    low = np.asarray(action["low"], dtype=np.float32)
    return obs, gym.spaces.Box(low, np.asarray(action["high"], dtype=np.float32), dtype=np.float32)
