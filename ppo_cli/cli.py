"""Console entry points: parse, call, and turn user errors into one line on stderr.

Hydra is asked to re-raise instead of printing (``HYDRA_FULL_ERROR=1``) so that this module alone
decides how an error looks: bad input becomes ``ppo-train: error: <key>: <problem>`` and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ppo_cli.config import register_schemas, to_train_config, unknown_key_error
from ppo_cli.errors import UserError
from ppo_cli.logger import write_summary
from ppo_cli.train import train

USER_ERROR_EXIT = 2


def find_config_dir() -> str:
    """``ppo_cli/configs`` in an installed wheel, ``<repo>/configs`` in a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"ppo-cli's config tree is missing next to {package}")


def slug(text: str) -> str:
    """A string safe as one path component: 'pkg.mod:Env-v0' -> 'pkg.mod_Env-v0'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


register_schemas()
OmegaConf.register_new_resolver("slug", slug, replace=True)


@hydra.main(version_base="1.3", config_path=find_config_dir(), config_name="train")
def _train_task(cfg: DictConfig) -> float | None:
    """One Hydra job: validate, train, return the final evaluation mean (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        try:
            train_cfg = to_train_config(cfg)
        except Exception as exc:
            write_summary(run_dir, {"status": "failed", "global_step": 0, "error": one_line_error(exc)})
            raise
        summary = train(train_cfg, run_dir)
    except Exception as exc:
        # In a single run, report here: past this function Hydra prints its own banner first.
        message = user_error_message(exc)
        if message is not None and hydra_cfg.mode == RunMode.RUN:
            _exit_with_error("ppo-train", message)
        raise
    print(f"run dir: {run_dir}")
    if "eval_mean" in summary:
        print(f"evaluation: {summary['eval_mean']:.2f} +/- {summary['eval_std']:.2f}")
    return summary.get("eval_mean")


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message if ``exc`` was caused by bad input, None if it is a bug."""
    user_types = (UserError, HydraException, OmegaConfBaseException)
    if any(isinstance(err, user_types) for err in _chain(exc)):
        return one_line_error(exc)
    return None


def _exit_with_error(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def one_line_error(exc: BaseException) -> str:
    """Condense a config/Hydra/user error into ``<key>: <problem>``; unknown errors as their text."""
    for err in _chain(exc):
        if isinstance(err, UserError):
            return str(err)
    for err in _chain(exc):
        if isinstance(err, MissingConfigException):
            return _missing_option(err)
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            return _omegaconf_error(err)
    first = str(exc).strip().splitlines()
    return first[0] if first else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _missing_option(err: MissingConfigException) -> str:
    text = str(err)
    match = re.search(r"Could not find '([^']+)'", text)
    missing = match.group(1) if match else "config"
    group, _, option = missing.rpartition("/")
    options = err.options or []
    if group:
        return f"{group}={option}: no such option; available: {', '.join(sorted(options))}"
    return f"{missing}: no such config file"


def _omegaconf_error(err: OmegaConfBaseException) -> str:
    key = str(getattr(err, "full_key", ""))
    if isinstance(err, MissingMandatoryValue) and not key.endswith(str(getattr(err, "key", ""))):
        key = f"{key}.{err.key}" if key else str(err.key)
    message = str(getattr(err, "msg", "") or err).strip().splitlines()[0]
    if re.search(r"not in struct|not in '|not found", message, re.IGNORECASE):
        return str(unknown_key_error(key, getattr(err, "object_type", None)))
    if "missing mandatory value" in message.lower():
        return f"{key}: missing value; set it on the command line ({key}=...)"
    return f"{key}: {message}"


def _run_cli(task: Callable[[], Any], prog: str) -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        task()
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        _exit_with_error(prog, message)


def train_main() -> None:
    """``ppo-train``: compose the config from the command line and train."""
    _run_cli(_train_task, "ppo-train")


if __name__ == "__main__":
    train_main()
