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
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ppo_cli.config import register_schemas, to_train_config
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
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        train_cfg = to_train_config(cfg)
    except Exception as exc:
        write_summary(run_dir, {"status": "failed", "global_step": 0, "error": one_line_error(exc)})
        raise
    summary = train(train_cfg, run_dir)
    print(f"run dir: {run_dir}")
    if "eval_mean" in summary:
        print(f"evaluation: {summary['eval_mean']:.2f} +/- {summary['eval_std']:.2f}")
    return summary.get("eval_mean")


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
    message = str(getattr(err, "msg", "") or err).strip().splitlines()[0]
    if "not in struct" in message or "not found" in message.lower():
        parent = key.rpartition(".")[0]
        allowed = _schema_keys(parent)
        hint = f"; allowed keys{' under ' + parent if parent else ''}: {', '.join(allowed)}" if allowed else ""
        return f"{key}: not a config key{hint}"
    if "Missing mandatory value" in message:
        return f"{key}: missing value; set it on the command line ({key}=...)"
    message = re.sub(r"\s*full_key:.*$", "", message)
    return f"{key}: {message}"


def _schema_keys(parent: str) -> list[str]:
    """The keys the schema allows at ``parent`` ('' = top level)."""
    node: Any = OmegaConf.structured(_train_schema())
    for part in filter(None, parent.split(".")):
        if not isinstance(node, DictConfig) or part not in node:
            return []
        node = node[part]
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def _train_schema() -> type:
    from ppo_cli.config import TrainConfig

    return TrainConfig


def _run_cli(task: Callable[[], Any], prog: str) -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        task()
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        print(f"{prog}: error: {one_line_error(exc)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    except Exception as exc:
        # Composition errors arrive wrapped; a user error anywhere in the chain is still one line.
        if any(isinstance(e, UserError | OmegaConfBaseException) for e in _chain(exc)):
            print(f"{prog}: error: {one_line_error(exc)}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)
        raise


def train_main() -> None:
    """``ppo-train``: compose the config from the command line and train."""
    _run_cli(_train_task, "ppo-train")


if __name__ == "__main__":
    train_main()
