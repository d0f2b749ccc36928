"""``init_from=<run dir or checkpoint>``: a new run that starts from a trained agent.

What is copied is what the agent *is*: its weights and its observation statistics (a policy
trained on normalised inputs is meaningless without them), and the reward scaler's statistics of
the discounted return when both runs scale rewards (the critic learned in those units). What
belongs to the old run's *training* starts afresh: the optimizer, the step counters (and so the
learning-rate schedule), the random generators, the envs and the variant's own state. The agent
is loaded before the updater is built (``iteration.build_state``), so a reference policy taken
then (GRPO's, a KL to a frozen reference) is the loaded agent, not a random one.

A run directory or checkpoint is untrusted input: it is read weights-only, as ``ppo-eval`` reads
it (the newest readable checkpoint of a run directory, or the file given, ``best.pt`` included),
and checked against this run before anything is copied: the envs' spaces, the network's keys
(``agent.*``, ``env.normalize_obs``), then every tensor's shape. Each refusal is one line naming
``init_from``.

Only a new run reads it. A resumed run's weights are in its own checkpoints, so resuming never
reads ``init_from`` again (its source may have moved or gone by then; see ``train.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gymnasium.vector import VectorEnv

from ppo_cli.agent import ActorCritic
from ppo_cli.checkpoint import describe_spaces, load_matching
from ppo_cli.config import AgentConfig, TrainConfig, flatten
from ppo_cli.errors import UserError
from ppo_cli.evaluate import checkpoint_to_evaluate
from ppo_cli.normalization import RewardScaler

log = logging.getLogger(__name__)

# agent.log_std_init only sets the log-std the trained one replaced: not part of the network's shape.
NOT_NETWORK_KEYS = frozenset({"agent.log_std_init"})


@dataclass(frozen=True)
class StartingPoint:
    """The checkpoint a new run starts from, read (weights-only) from ``source``."""

    source: Path
    payload: dict[str, Any]

    def load_into(
        self, agent: ActorCritic, reward_scaler: RewardScaler | None, envs: VectorEnv, cfg: TrainConfig
    ) -> None:
        """Copy the agent (and the reward statistics) into this run's freshly built ones, after
        checking that they are the same network for the same spaces."""
        spaces = describe_spaces(envs.single_observation_space, envs.single_action_space)
        if self.payload["spaces"] != spaces:
            self._refuse(
                f"its agent was trained on spaces {self.payload['spaces']}, env.id={cfg.env.id} has "
                f"{spaces}; start from a run of this env"
            )
        changes = network_changes(self.payload["config"], cfg)
        if changes:
            self._refuse(
                f"its network differs from this run's ({'; '.join(changes)}); set these keys as "
                "that run had them"
            )
        try:
            load_matching(agent, self.payload["agent"], "network", self.source)
            scaler_state = self.payload.get("reward_scaler")  # absent from best.pt
            if reward_scaler is not None and scaler_state is not None:
                # The statistics only: its other buffer, each env's running return, was of its envs.
                stats = {
                    k.removeprefix("stats."): v for k, v in scaler_state.items() if k.startswith("stats.")
                }
                load_matching(reward_scaler.stats, stats, "reward statistics", self.source)
        except UserError as exc:
            raise UserError(f"init_from: {exc}") from None
        log.info(
            "starting from the agent of %s (its step %d): weights and normalisation statistics; "
            "optimizer, steps and random generators fresh",
            self.source,
            int(self.payload["global_step"]),
        )

    def _refuse(self, problem: str) -> None:
        raise UserError(f"init_from: {self.source}: {problem}")


def starting_point(init_from: str | None) -> StartingPoint | None:
    """The checkpoint ``init_from`` names, read weights-only; None without one."""
    if init_from is None:
        return None
    try:
        source, payload = checkpoint_to_evaluate(Path(init_from))
    except UserError as exc:
        raise UserError(f"init_from: {exc}") from None
    return StartingPoint(source, payload)


def network_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """``key: theirs -> ours`` for each key that decides the network (``agent.*`` but
    :data:`NOT_NETWORK_KEYS`, and ``env.normalize_obs``); keys added to the agent's schema
    since the checkpoint was saved count as their defaults."""
    defaults = dataclasses.asdict(AgentConfig())
    theirs = flatten(
        {
            "agent": {**defaults, **saved.get("agent", {})},
            "env": {"normalize_obs": saved.get("env", {}).get("normalize_obs")},
        }
    )
    ours = flatten({"agent": dataclasses.asdict(cfg.agent), "env": {"normalize_obs": cfg.env.normalize_obs}})
    return [
        f"{key}: {theirs.get(key)} -> {ours[key]}"
        for key in ours
        if key not in NOT_NETWORK_KEYS and theirs.get(key) != ours[key]
    ]
