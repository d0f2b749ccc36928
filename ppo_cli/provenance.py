"""What a run is: the preset files it was composed from (one log line at its start), and, for its
``summary.json``, the versions, git commit, host and command line that produced it.

A run directory outlives the checkout and the environment that made it; these are what a reader
needs to tell two runs apart or to make one again. Nothing here may stop a run: a missing git, a
directory outside a checkout, a package without metadata each just leave their field out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.conf import HydraConf

import ppo_cli
from ppo_cli.hydra_config import CONFIG_GROUPS

log = logging.getLogger(__name__)

PACKAGES = ("torch", "gymnasium", "numpy", "hydra-core")  # versions recorded besides ppo-cli's
GIT_TIMEOUT_S = 2.0  # per git command: a slow network file system must not hold up the run


def provenance() -> dict[str, Any]:
    """``versions``, ``git_commit`` and ``git_dirty`` (when the working directory is in a git
    checkout), ``host``, and ``argv``: the command line as the process got it (``sys.orig_argv``,
    which ppo-train's rewriting of ``sys.argv`` for Hydra leaves alone)."""
    return {
        "versions": versions(),
        **git_state(Path.cwd()),
        "host": socket.gethostname(),
        "argv": list(sys.orig_argv),
    }


def versions() -> dict[str, str]:
    """The running ppo-cli's version (its own ``__version__``: a source checkout on PYTHONPATH may
    differ from the installed one), Python's, and each of :data:`PACKAGES` that is installed."""
    found = {"ppo-cli": ppo_cli.__version__, "python": platform.python_version()}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def git_state(directory: Path) -> dict[str, Any]:
    """``{"git_commit": <HEAD>, "git_dirty": <tracked files changed>}`` for a ``directory`` inside
    a git checkout; ``{}`` outside one, or without git. ``git_dirty`` is left out if ``git status``
    fails or is slow.

    ``git status`` runs without optional locks (the jobs of a sweep start at once, and the user may
    be committing) and without the fsmonitor hook (a program named by the repository's config)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    head = _git(["rev-parse", "HEAD"], directory, env)
    if head is None:
        return {}
    state: dict[str, Any] = {"git_commit": head.strip()}
    status = _git(
        ["-c", "core.fsmonitor=false", "status", "--porcelain", "--untracked-files=no"], directory, env
    )
    if status is not None:
        state["git_dirty"] = bool(status.strip())
    return state


def _git(args: list[str], directory: Path, env: dict[str, str]) -> str | None:
    """git's output, or None if git is missing, fails or takes longer than GIT_TIMEOUT_S."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def log_presets(hydra_cfg: HydraConf) -> None:
    """Log the preset files the run's config was composed from (``presets: algo/clip.yaml, ...``),
    and warn when no tuned preset exists for its algo and env: ``tuned`` is an optional group,
    which Hydra skips without a word."""
    choices = hydra_cfg.runtime.choices
    folders = [Path(source.path) for source in hydra_cfg.runtime.config_sources if source.schema == "file"]

    def found(group: str, pattern: str) -> list[str]:
        return sorted({path.stem for folder in folders for path in (folder / group).glob(pattern)})

    files = [
        f"{group}/{choices[group]}.yaml"
        for group in CONFIG_GROUPS
        if choices.get(group) and found(group, f"{choices[group]}.yaml")
    ]
    log.info("presets: %s", ", ".join(files))
    tuned, algo, env = choices.get("tuned"), choices.get("algo"), choices.get("env")
    if tuned and not found("tuned", f"{tuned}.yaml"):
        others = [name.removesuffix(f"_{env}") for name in found("tuned", f"*_{env}.yaml")]
        elsewhere = f"; tuned values for env={env} exist with algo={','.join(others)}" if others else ""
        log.warning(
            "no tuned/%s.yaml: algo=%s env=%s runs on the presets' generic values%s",
            tuned,
            algo,
            env,
            elsewhere,
        )
