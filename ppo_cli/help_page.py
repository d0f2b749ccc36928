"""``ppo-train --help``: what the command does, the groups a user picks and their options, the
keys most often set, and examples.

Written here rather than through Hydra's ``hydra.help.template``: Hydra composes the whole config
and lists every option of every group (its own included) for each help page, whether the template
shows them or not, which takes seconds; this page reads the group folders and the root config's
defaults list, and answers at once. Groups that only load presets (``tuned``, ``schemas/*``) are
internal and not listed.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

# The groups a user picks an option of, with what they choose.
USER_GROUPS = {
    "algo": "the objective: PPO-Clip, KL penalty, policy gradient, A2C, TRPO, GRPO",
    "agent": "the networks: an MLP, or an LSTM / GRU for partially observed tasks",
    "env": "the environment, its budget (total_timesteps) and its tuned defaults",
    "hparams_search": "an Optuna search over hyperparameters (with -m)",
}

KEYS = """\
  seed=0                     seeds python, numpy, torch and the envs
  total_timesteps=N          environment steps over all envs (each env preset sets one)
  device=auto                auto|cpu|cuda: where the networks and the update run
  env.num_envs=N             environments stepped in parallel
  env.num_steps=N            steps per env per iteration (the rollout length)
  algo.learning_rate=X       Adam's step size
  algo.gamma=X               discount factor
  algo.clip_eps=X            PPO-Clip's clipping range
  algo.ent_coef=X            entropy bonus coefficient
  eval.episodes=10           evaluation episodes after training (0 = skip)
  checkpoint.interval=10     save every N iterations (0 = only at the end)
  resume=<run dir>|auto      continue a stopped run where it stopped
  init_from=<run dir>|<.pt>  start a new run from a trained agent (fine-tuning)
  seeds_per_job=N            train N seeds one after the other in one job
  hydra.run.dir=DIR          where the run writes (default runs/<env>__<algo>__s<seed>__<time>)"""

EXAMPLES = """\
  ppo-train env=Pendulum                                   # PPO-Clip with its tuned Pendulum values
  ppo-train env=Acrobot algo=penalty seed=3 total_timesteps=2e5
  ppo-train -m algo=clip,penalty seed=0,1,2 env=Acrobot    # a sweep: 6 runs
  ppo-train -m hparams_search=CartPole_clip                # an Optuna search
  ppo-train -m hydra/launcher=joblib seed=0,1,2,3          # jobs in parallel processes
  ppo-train resume=runs/<run> total_timesteps=2e6          # go on with a larger budget
  torchrun --standalone --nproc_per_node=2 --no-python ppo-train env=LunarLander env.num_envs=8"""

MORE = """\
  ppo-train [overrides] --cfg job     the full config these overrides compose
  ppo-train --info                    Hydra's view: config search path, defaults tree
  ppo-train --hydra-help              Hydra's own flags and groups (launchers, sweepers)
  eval "$(ppo-train -sc install=bash)"    TAB completion of groups and keys (zsh, fish alike)
  ppo-eval <run dir>, ppo-compare <runs>  score a saved agent, compare runs; README.md for all"""


def help_text(config_dirs: list[Path]) -> str:
    """The page, with each group's options read from ``config_dirs`` (ppo-train's config tree
    first, then a ``--config-dir``); the first holds ``train.yaml``, whose defaults are marked."""
    defaults = _default_choices(config_dirs[0] / "train.yaml")
    groups = []
    for group, meaning in USER_GROUPS.items():
        options = sorted({path.stem for folder in config_dirs for path in (folder / group).glob("*.yaml")})
        listed = ", ".join(f"[{option}]" if option == defaults.get(group) else option for option in options)
        lines = textwrap.wrap(listed, width=80, initial_indent="    ", subsequent_indent="    ")
        groups.append(f"  {group}: {meaning}\n" + "\n".join(lines))
    return f"""\
ppo-train: train an agent with an algorithm of the PPO family on a gymnasium environment.
Pick a preset of a group with group=option and set any key with key=value (Hydra overrides; the
command line wins over the presets). Hyperparameters tuned for the algo and env pair
(tuned/<algo>_<env>.yaml) load by themselves where they exist. A run writes TensorBoard scalars,
checkpoints, train.log and summary.json into its directory under runs/.

Usage: ppo-train [group=option ...] [key=value ...] [-m] [--cfg job] [--info]

Groups (the default in brackets):
{chr(10).join(groups)}

Keys most often set:
{KEYS}

Examples:
{EXAMPLES}

More:
{MORE}"""


def _default_choices(root_config: Path) -> dict[str, str]:
    """``{group: option}`` from the root config's defaults list (its plain ``group: option``
    entries; ``optional`` and ``override`` ones are not a user's choice)."""
    defaults = yaml.safe_load(root_config.read_text()).get("defaults", [])
    return {
        group: option
        for entry in defaults
        if isinstance(entry, dict)
        for group, option in entry.items()
        if isinstance(option, str)
    }
