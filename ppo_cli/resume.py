"""What ``resume=`` means: which checkpoint, which config, and the random state to continue from.

``ppo-train resume=<run dir or checkpoint>`` re-runs the original command line (read from the run's
``.hydra/overrides.yaml``) plus whatever the user adds, in the original run dir. ``resume=auto``
continues the run dir Hydra picked if it holds a checkpoint and starts fresh otherwise, so that
re-launching a preempted job with a fixed ``hydra.run.dir`` (or ``hydra.sweep.dir``) just goes on.

A run directory is untrusted input (a colleague's run, a download, a shared disk), and Hydra
overrides can choose code: a ``hydra.callbacks`` entry or any ``_target_`` is instantiated, and a
preset name such as ``env=../../elsewhere/x`` loads a YAML file from outside the config tree, which
may set ``hydra.*`` itself. So the saved overrides are data: each must set a key of the training
schema or pick a preset by plain name, with no interpolation and no ``_target_``; anything else is
refused, naming the entry (:func:`saved_overrides`); so is an env id of the form ``module:Env``,
which imports the module. The resumed config must then match the
checkpoint's own (weights-only) config, key for key (:func:`check_config_changes`).

A resumed run must be indistinguishable from one that never stopped, so everything that shapes
the future is restored: weights, optimizer, normalisation statistics, the variant's own state, the
step counters (which also place the learning-rate schedule), the envs (see ``env_state.py``) and
the Python / numpy / torch random generators.
"""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra._internal.utils import get_args_parser  # hydra-core is pinned to 1.3.x
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

from ppo_cli.checkpoint import (
    LAST,
    checkpoint_dir,
    describe_spaces,
    load_checkpoint,
    newest_valid_checkpoint,
    remove_stale_temp_files,
)
from ppo_cli.config import TRAIN_KEYS, flatten, role_of
from ppo_cli.errors import ConfigError, UserError
from ppo_cli.hydra_config import CONFIG_GROUPS, schema_defaults

if TYPE_CHECKING:  # the objects resume_state is handed; importing them would import torch
    from ppo_cli.checkpointer import Checkpointer
    from ppo_cli.config import TrainConfig
    from ppo_cli.iteration import TrainingState

log = logging.getLogger(__name__)

AUTO = "auto"
RESUME_KEYS = ("resume", "resume_allow_changes")

KEY_PATH = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)*")  # no _target_, no hydra/x
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a file in ppo-cli's config tree, not a path


def run_dir_of(target: Path) -> Path:
    """The run directory that a ``resume=`` target belongs to."""
    if target.is_dir():
        return target
    if target.is_file() and target.parent.name == checkpoint_dir(Path()).name:
        return target.parent.parent
    if target.is_file():
        raise UserError(f"resume: {target} is not in a run directory's checkpoints/ folder")
    raise UserError(f"resume: {target}: no such run directory or checkpoint")


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value that parses back to exactly ``text``: as it is when it
    does, else quoted. Quoting escapes quotes, the backslashes Hydra reads as escapes, and
    ``${`` (so that a path never becomes an interpolation), and admits any character."""
    if "${" not in text and _parses(text) and _parsed_value(text) == text:
        return text
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)  # OmegaConf's escape
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{text}'"


def _parsed_value(text: str) -> Any:
    """What Hydra reads from ``key=<text>`` (a HydraException if it cannot)."""
    return OverridesParser.create().parse_override(f"k={text}").value()


def resume_command(run_dir: Path) -> str:
    """The shell command that continues ``run_dir``, quoted so that it works as printed."""
    return f"ppo-train {shlex.quote(f'resume={run_dir}')}"


def _with_path_values(argv: list[str]) -> list[str]:
    """``resume=<path>`` as the shell passed it: a path that Hydra's grammar cannot read as it is
    (spaces, non-ASCII letters, quotes) is quoted for it, so the command we print works as is."""
    fixed = []
    for arg in argv:
        raw = arg.partition("=")[2]
        if (
            arg.startswith("resume=")
            and raw not in (AUTO, "null")
            and (Path(raw).exists() or not _parses(raw))
        ):
            arg = f"resume={hydra_value(raw)}"
        fixed.append(arg)
    return fixed


def _parses(text: str) -> bool:
    try:
        _parsed_value(text)
    except HydraException:
        return False
    return True


def expand_resume_argv(argv: list[str]) -> list[str]:
    """Rewrite ``ppo-train resume=<path> [overrides]`` into the original run's overrides, the new
    ones, and ``hydra.run.dir=<that run>``; other command lines come back unchanged.

    The original overrides are read from ``.hydra/overrides.yaml`` as data (:func:`saved_overrides`).
    An override given again on the command line replaces the original one.
    """
    if not any(arg.startswith("resume=") for arg in argv):
        return argv
    argv = _with_path_values(argv)
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
    replaced = {o.key_or_group for o in given} | set(RESUME_KEYS)
    kept = [line for line, o in saved_overrides(run_dir) if o.key_or_group not in replaced]
    return [*kept, *argv, f"hydra.run.dir={hydra_value(str(run_dir))}"]


def saved_overrides(run_dir: Path) -> list[tuple[str, Override]]:
    """The run's command line from ``.hydra/overrides.yaml`` (plain YAML, loaded safely), each
    entry checked to be a setting of the training schema; the first that is not is refused in one
    line naming it."""
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    if not saved_file.is_file():
        raise UserError(f"resume: {saved_file} is missing; resume needs a run directory made by ppo-train")
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"resume: {saved_file}: not readable as a list of overrides ({reason})") from None
    saved = saved or []
    if not (isinstance(saved, list) and all(isinstance(line, str) for line in saved)):
        raise UserError(f"resume: {saved_file}: not a list of overrides (key=value lines)")
    checked = []
    parser = OverridesParser.create()
    for line in saved:
        try:
            override = parser.parse_override(line)
        except HydraException as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"resume: {saved_file}: entry {line!r} does not parse ({reason})") from None
        problem = _untrusted(override)
        if problem:
            raise UserError(
                f"resume: {saved_file}: refusing entry {line!r}: {problem}; nothing read from a run "
                "directory may choose code (delete the entry if you trust it)"
            )
        checked.append((line, override))
    return checked


def _untrusted(override: Override) -> str | None:
    """Why ``override``, read from a run directory, could do more than set a training key; None
    if it cannot."""
    key = override.key_or_group
    if key.split(".")[0].split("/")[0] == "hydra":
        return "hydra.* keys choose code to run (callbacks, launchers)"
    if override.package is not None or not KEY_PATH.fullmatch(key):
        return "not a key of the training schema (a key like _target_ names code to run)"
    if key.split(".")[0] not in (*TRAIN_KEYS, *CONFIG_GROUPS):
        return "not a key of the training schema"
    if override.is_sweep_override():
        return "a sweep, not one run's value"
    value = override.value()
    if key == "env.id" and ":" in str(value):  # module:Env imports the module (as ppo-eval refuses too)
        return f"it imports the module {str(value).partition(':')[0]!r} (type env.id={value} yourself)"
    if key in CONFIG_GROUPS and not (value is None or PRESET_NAME.fullmatch(str(value))):
        return "a preset is named, not given as a path (which can load a file from outside ppo-cli's configs)"
    return _untrusted_value(value)


def _untrusted_value(value: Any) -> str | None:
    if isinstance(value, str) and "${" in value:
        return "an interpolation reads beyond the run's config"
    if isinstance(value, dict):
        if any(str(key).startswith("_") for key in value):
            return "a mapping key like _target_ names code to run"
        return next(filter(None, map(_untrusted_value, value.values())), None)
    if isinstance(value, list):
        return next(filter(None, map(_untrusted_value, value)), None)
    return None


def find_checkpoint(resume: str, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: the newest valid one in ``run_dir`` for ``auto`` (None if
    there is none yet), the given file, or the newest valid one of the given run directory."""
    target = run_dir if resume == AUTO else Path(resume)
    if resume != AUTO:
        run_dir_of(target)  # exists, and is a run directory or one of its checkpoints
    if target.is_file():
        payload = load_checkpoint(target)
        if "optimizer" not in payload:
            raise UserError(
                f"resume: {target} holds the agent only (a best.pt, for ppo-eval and load_agent), "
                f"not a training state; resume from the run directory: resume={run_dir_of(target)}"
            )
        return target, payload
    found = newest_valid_checkpoint(checkpoint_dir(target))
    if found is None and resume != AUTO:
        raise UserError(f"resume: {checkpoint_dir(target) / LAST}: no readable checkpoint in {target}")
    return found


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each key that shapes the model, the envs or the updates (not free
    on resume: see ``config.role_of``) whose value differs. A key that did not exist when the run
    was saved (added by a later ppo-cli) had its default then."""
    saved_algo = saved.get("algo")
    algo_name = saved_algo.get("name") if isinstance(saved_algo, dict) else None
    old, new = {**schema_defaults(algo_name), **flatten(saved)}, flatten(current)
    return [
        f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}"
        for key in sorted(old.keys() | new.keys())
        if not role_of(key).free_on_resume and old.get(key) != new.get(key)
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


def resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint that ``cfg.resume`` names, read; None for a new run. Looked for before
    anything is built: a new run may start from ``init_from``, a resumed one never reads it.

    Without ``resume``, a run directory that already holds checkpoints is refused: starting over
    there would overwrite them and write a second set of points into the same curves.
    """
    if cfg.resume is None:
        if any(checkpoint_dir(run_dir).glob("*.pt")):
            raise UserError(
                f"{run_dir} already holds a run's checkpoints; continue it with resume=auto, "
                "or choose another hydra.run.dir"
            )
        return None
    found = find_checkpoint(cfg.resume, run_dir)
    if found is None:
        log.info("resume=auto: no checkpoint in %s yet, starting a new run", run_dir)
    return found


def resume_state(
    cfg: TrainConfig,
    plain_config: dict[str, Any],
    state: TrainingState,
    checkpointer: Checkpointer,
    found: tuple[Path, dict[str, Any]] | None,
) -> dict[str, Any] | None:
    """Load the checkpoint :func:`resume_checkpoint` ``found`` into ``state``; what was resumed,
    or None for a new run.

    A checkpoint is refused when its config differs in keys that shape the run (unless
    ``resume_allow_changes``) or its envs' spaces differ.
    """
    if found is None:
        return None
    path, payload = found
    for change in check_config_changes(payload["config"], plain_config, cfg.resume_allow_changes):
        log.warning("resuming with a changed key: %s", change)
    envs = state.collector.envs
    spaces = describe_spaces(envs.single_observation_space, envs.single_action_space)
    if payload["spaces"] != spaces:
        raise UserError(
            f"{path}: the checkpoint was trained on spaces {payload['spaces']}, "
            f"env.id={cfg.env.id} has {spaces}"
        )
    _warn_of_other_world_size(payload, state)
    env_seed = state.parallel.env_seed(cfg.seed, cfg.env.num_envs)
    exact = checkpointer.restore(state, payload, path, env_seed)
    remove_stale_temp_files(path.parent)
    log.info(
        "resumed from %s at step %d (%s)",
        path,
        state.global_step,
        "episodes continue exactly" if exact else "envs restarted from a derived seed",
    )
    return {"checkpoint": str(path), "global_step": state.global_step, "exact_env_state": exact}


def _warn_of_other_world_size(payload: dict[str, Any], state: TrainingState) -> None:
    saved_ranks = 1 + len(payload.get("other_ranks", []))
    if saved_ranks != state.parallel.world_size and state.parallel.is_main:
        log.warning(
            "the checkpoint was written by %d process(es), this run has %d: the global batch changes, "
            "and ranks the checkpoint holds no state for restart their envs",
            saved_ranks,
            state.parallel.world_size,
        )
