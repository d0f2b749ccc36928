"""Typed schemas for the Hydra config tree, with range checks.

The YAML files under ``configs/`` hold every default a user sees; the dataclasses here only fix the
*shape* (which keys exist and their types) and the *allowed ranges*. Hydra merges each YAML file onto
these schemas, so a misspelt key or a wrong type fails at composition time, and
``hydra_config.to_train_config`` turns the composed ``DictConfig`` into dataclass objects, which
runs every ``__post_init__`` check before any environment or network is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import MISSING

from ppo_cli.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
VECTORIZATIONS = ("auto", "sync", "async", "vector_entry_point")
ACTIVATIONS = ("tanh", "relu")
ENCODERS = ("flat", "nature_cnn")
RECURRENT_CORES = ("none", "lstm", "gru")


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(key, f"got {value!r}, allowed: {allowed}")


@dataclass
class AtariConfig:
    """The Atari preprocessing (``atari.py``), off for other environments."""

    enabled: bool = False
    noop_max: int = 30
    frame_skip: int = 4
    screen_size: int = 84
    frame_stack: int = 4
    episodic_life: bool = True
    clip_rewards: bool = True

    def __post_init__(self) -> None:
        _require(self.noop_max >= 0, "env.atari.noop_max", "an integer >= 0", self.noop_max)
        for key in ("frame_skip", "screen_size", "frame_stack"):
            _require(getattr(self, key) >= 1, f"env.atari.{key}", "an integer >= 1", getattr(self, key))


@dataclass
class EnvConfig:
    """Which environment, how many copies, and how observations and rewards are normalised."""

    id: str = MISSING
    num_envs: int = MISSING
    num_steps: int = MISSING
    vectorization: str = "auto"
    max_episode_steps: int | None = None
    normalize_obs: bool = False
    normalize_reward: bool = False
    clip_obs: float = 10.0
    clip_reward: float = 10.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    atari: AtariConfig = field(default_factory=AtariConfig)

    def __post_init__(self) -> None:
        _require(bool(self.id), "env.id", "a registered gymnasium id", self.id)
        _require(self.num_envs >= 1, "env.num_envs", "an integer >= 1", self.num_envs)
        _require(self.num_steps >= 1, "env.num_steps", "an integer >= 1", self.num_steps)
        _require(
            self.vectorization in VECTORIZATIONS,
            "env.vectorization",
            "|".join(VECTORIZATIONS),
            self.vectorization,
        )
        _require(
            self.max_episode_steps is None or self.max_episode_steps >= 1,
            "env.max_episode_steps",
            "null or an integer >= 1",
            self.max_episode_steps,
        )
        _require(self.clip_obs > 0, "env.clip_obs", "a number > 0", self.clip_obs)
        _require(self.clip_reward > 0, "env.clip_reward", "a number > 0", self.clip_reward)


def _require_divides_batch(key: str, value: int, env: EnvConfig) -> None:
    batch_size = env.num_envs * env.num_steps
    if batch_size % value:
        raise ConfigError(
            key, f"got {value}, allowed: a divisor of the batch env.num_envs * env.num_steps = {batch_size}"
        )


@dataclass
class AlgoConfig:
    """Keys every variant of the family uses. Each variant's schema adds its own keys, so a key
    that the chosen variant does not use is an unknown key, not a silently ignored one.

    Class attributes say what a variant can train: ``shared_trunk``, a network whose actor and
    critic share layers (not where the policy is stepped apart from the critic: pg, trpo);
    ``recurrent``, a recurrent core replaying whole sequences (not with GRPO's masked steps).
    """

    shared_trunk: ClassVar[bool] = True
    recurrent: ClassVar[bool] = True

    name: str = MISSING
    learning_rate: float = MISSING
    anneal_lr: bool = MISSING
    adam_eps: float = MISSING
    max_grad_norm: float = MISSING
    ent_coef: float = MISSING

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "algo.learning_rate", "a number > 0", self.learning_rate)
        _require(self.adam_eps > 0, "algo.adam_eps", "a number > 0", self.adam_eps)
        _require(self.max_grad_norm > 0, "algo.max_grad_norm", "a number > 0", self.max_grad_norm)
        _require(self.ent_coef >= 0, "algo.ent_coef", "a number >= 0", self.ent_coef)

    def check_env(self, env: EnvConfig) -> None:
        """Checks that need the env config (e.g. the rollout size); none by default."""


@dataclass
class ActorCriticConfig(AlgoConfig):
    """Variants with a learned critic and GAE advantages."""

    gamma: float = MISSING
    gae_lambda: float = MISSING
    bootstrap_truncated: bool = MISSING
    norm_adv: bool = MISSING
    vf_coef: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 < self.gamma <= 1, "algo.gamma", "a number in (0, 1]", self.gamma)
        _require(0 <= self.gae_lambda <= 1, "algo.gae_lambda", "a number in [0, 1]", self.gae_lambda)
        _require(self.vf_coef >= 0, "algo.vf_coef", "a number >= 0", self.vf_coef)


@dataclass
class EpochKeys:
    """The keys of every variant that takes epochs of minibatch steps on each rollout (clip,
    penalty, grpo); a variant lists it first among its bases, so the keys follow its others."""

    update_epochs: int = MISSING
    num_minibatches: int = MISSING
    target_kl: float | None = None

    def _check_epoch_keys(self) -> None:
        _require(self.update_epochs >= 1, "algo.update_epochs", "an integer >= 1", self.update_epochs)
        _require(self.num_minibatches >= 1, "algo.num_minibatches", "an integer >= 1", self.num_minibatches)
        _require(
            self.target_kl is None or self.target_kl > 0,
            "algo.target_kl",
            "null (no early stop) or a number > 0",
            self.target_kl,
        )


@dataclass
class SurrogateConfig(EpochKeys, ActorCriticConfig):
    """Variants that take epochs of minibatch steps on a ratio objective (clip, penalty)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_epoch_keys()

    def check_env(self, env: EnvConfig) -> None:
        _require_divides_batch("algo.num_minibatches", self.num_minibatches, env)


@dataclass
class ClipConfig(SurrogateConfig):
    """PPO-Clip: the clipped surrogate objective."""

    clip_eps: float = MISSING
    clip_vloss: bool = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.clip_eps > 0, "algo.clip_eps", "a number > 0", self.clip_eps)


KL_ESTIMATORS = ("k1", "k2", "k3", "exact")


@dataclass
class PenaltyConfig(SurrogateConfig):
    """PPO-Penalty: the unclipped surrogate minus beta * KL(pi_old || pi), beta adaptive or fixed."""

    kl_estimator: str = MISSING
    adaptive: bool = MISSING
    kl_coef: float = MISSING
    kl_target: float = MISSING
    beta_factor: float = MISSING
    kl_tolerance: float = MISSING
    beta_min: float = MISSING
    beta_max: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.kl_estimator in KL_ESTIMATORS,
            "algo.kl_estimator",
            "|".join(KL_ESTIMATORS),
            self.kl_estimator,
        )
        _require(self.kl_coef >= 0, "algo.kl_coef", "a number >= 0", self.kl_coef)
        _require(self.kl_target > 0, "algo.kl_target", "a number > 0", self.kl_target)
        _require(self.beta_factor > 1, "algo.beta_factor", "a number > 1", self.beta_factor)
        _require(self.kl_tolerance > 1, "algo.kl_tolerance", "a number > 1", self.kl_tolerance)
        _require(self.beta_min > 0, "algo.beta_min", "a number > 0", self.beta_min)
        _require(
            self.beta_max >= self.beta_min,
            "algo.beta_max",
            f"a number >= algo.beta_min = {self.beta_min}",
            self.beta_max,
        )


@dataclass
class RegressedCriticConfig(ActorCriticConfig):
    """Variants whose critic is fitted separately, by regression on the returns (pg, trpo)."""

    shared_trunk: ClassVar[bool] = False  # the policy step would move the critic's layers too
    recurrent: ClassVar[bool] = False

    value_epochs: int = MISSING
    value_minibatches: int = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.value_epochs >= 1, "algo.value_epochs", "an integer >= 1", self.value_epochs)
        _require(
            self.value_minibatches >= 1, "algo.value_minibatches", "an integer >= 1", self.value_minibatches
        )

    def check_env(self, env: EnvConfig) -> None:
        _require_divides_batch("algo.value_minibatches", self.value_minibatches, env)


@dataclass
class PGConfig(RegressedCriticConfig):
    """REINFORCE with a learned baseline: one policy-gradient step per rollout, then the critic is
    fitted to the returns by regression."""


@dataclass
class TRPOConfig(RegressedCriticConfig):
    """TRPO: a natural-gradient policy step inside the trust region mean KL <= max_kl."""

    max_kl: float = MISSING
    cg_iterations: int = MISSING
    cg_damping: float = MISSING
    line_search_steps: int = MISSING
    backtrack_coef: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.max_kl > 0, "algo.max_kl", "a number > 0", self.max_kl)
        _require(self.cg_iterations >= 1, "algo.cg_iterations", "an integer >= 1", self.cg_iterations)
        _require(self.cg_damping >= 0, "algo.cg_damping", "a number >= 0", self.cg_damping)
        _require(
            self.line_search_steps >= 1, "algo.line_search_steps", "an integer >= 1", self.line_search_steps
        )
        _require(
            0 < self.backtrack_coef < 1, "algo.backtrack_coef", "a number in (0, 1)", self.backtrack_coef
        )


@dataclass
class A2CConfig(ActorCriticConfig):
    """Synchronous advantage actor-critic: one step on policy + value loss per (short) rollout."""


@dataclass
class GRPOConfig(EpochKeys, AlgoConfig):
    """GRPO: critic-free; each episode's advantage is its return standardised within its group of
    envs that started from the same reset seed; clipped ratio plus a KL to a frozen reference."""

    recurrent: ClassVar[bool] = False  # its masked steps would cut sequences

    group_size: int = MISSING
    clip_eps: float = MISSING
    kl_coef: float = MISSING
    ref_update_every: int = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.group_size >= 2, "algo.group_size", "an integer >= 2", self.group_size)
        self._check_epoch_keys()
        _require(self.clip_eps > 0, "algo.clip_eps", "a number > 0", self.clip_eps)
        _require(self.kl_coef >= 0, "algo.kl_coef", "a number >= 0", self.kl_coef)
        _require(
            self.ref_update_every >= 0,
            "algo.ref_update_every",
            "an integer >= 0 (0 keeps the initial policy as reference)",
            self.ref_update_every,
        )

    def check_env(self, env: EnvConfig) -> None:
        if env.num_envs % self.group_size:
            raise ConfigError(
                "algo.group_size",
                f"got {self.group_size}, allowed: a divisor of env.num_envs = {env.num_envs}",
            )
        if env.normalize_reward:
            raise ConfigError(
                "env.normalize_reward",
                "got True, allowed: false with algo=grpo (returns are standardised within each group)",
            )


ALGO_SCHEMAS: dict[str, type[AlgoConfig]] = {
    "clip": ClipConfig,
    "penalty": PenaltyConfig,
    "pg": PGConfig,
    "a2c": A2CConfig,
    "trpo": TRPOConfig,
    "grpo": GRPOConfig,
}


@dataclass
class AgentConfig:
    """Network shapes: actor and critic MLPs, after an optional shared trunk (encoder, recurrent core)."""

    actor_hidden: list[int] = field(default_factory=lambda: [64, 64])
    critic_hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    log_std_init: float = 0.0
    encoder: str = "flat"
    recurrent: str = "none"
    recurrent_size: int = 128

    def __post_init__(self) -> None:
        for key in ("actor_hidden", "critic_hidden"):
            sizes = getattr(self, key)
            _require(all(s >= 1 for s in sizes), f"agent.{key}", "a list of integers >= 1", list(sizes))
        _require(
            self.activation in ACTIVATIONS,
            "agent.activation",
            "|".join(ACTIVATIONS),
            self.activation,
        )
        _require(self.encoder in ENCODERS, "agent.encoder", "|".join(ENCODERS), self.encoder)
        cores = "|".join(RECURRENT_CORES)
        _require(self.recurrent in RECURRENT_CORES, "agent.recurrent", cores, self.recurrent)
        _require(self.recurrent_size >= 1, "agent.recurrent_size", "an integer >= 1", self.recurrent_size)

    @property
    def shared_trunk(self) -> bool:
        return self.encoder != "flat" or self.recurrent != "none"


@dataclass
class CheckpointConfig:
    """How often to save, and how many periodic checkpoints to keep beside ``last.pt``."""

    interval: int = 10
    keep: int = 3

    def __post_init__(self) -> None:
        _require(
            self.interval >= 0,
            "checkpoint.interval",
            "an integer >= 0 (iterations; 0 saves only at the end)",
            self.interval,
        )
        _require(self.keep >= 0, "checkpoint.keep", "an integer >= 0", self.keep)


@dataclass
class EvalConfig:
    """The evaluation that ends every training run."""

    episodes: int = 10
    deterministic: bool = True

    def __post_init__(self) -> None:
        _require(self.episodes >= 0, "eval.episodes", "an integer >= 0 (0 skips it)", self.episodes)


@dataclass
class TrainConfig:
    """The whole run: one of each group plus the run-level keys."""

    env: EnvConfig = MISSING
    algo: AlgoConfig = MISSING
    agent: AgentConfig = field(default_factory=AgentConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
    torch_threads: int = 1
    total_timesteps: int = MISSING
    progress: bool = True
    resume: str | None = None
    resume_allow_changes: bool = False
    seeds_per_job: int = 1

    def __post_init__(self) -> None:
        _require(self.device in DEVICES, "device", "|".join(DEVICES), self.device)
        _require(self.seeds_per_job >= 1, "seeds_per_job", "an integer >= 1", self.seeds_per_job)
        _require(
            self.torch_threads >= 0,
            "torch_threads",
            "an integer >= 0 (0 keeps torch's default)",
            self.torch_threads,
        )
        _require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        _require(
            self.total_timesteps >= self.batch_size,
            "total_timesteps",
            f"an integer >= env.num_envs * env.num_steps = {self.batch_size}",
            self.total_timesteps,
        )
        self.algo.check_env(self.env)
        self._check_agent()

    def _check_agent(self) -> None:
        """The agent's trunk against the algorithm and the envs."""
        agent, name = self.agent, self.algo.name
        if agent.shared_trunk:
            able = [variant for variant, schema in ALGO_SCHEMAS.items() if schema.shared_trunk]
            _require(
                type(self.algo).shared_trunk,
                "algo",
                f"{'|'.join(able)} with a shared trunk (agent.encoder={agent.encoder}, "
                f"agent.recurrent={agent.recurrent}): {name} steps the policy apart from the critic",
                name,
            )
        if agent.encoder == "nature_cnn":
            _require(
                not self.env.normalize_obs,
                "env.normalize_obs",
                "false with agent.encoder=nature_cnn (it scales pixels to [0, 1] itself)",
                True,
            )
        if agent.recurrent == "none":
            return
        able = [variant for variant, schema in ALGO_SCHEMAS.items() if schema.recurrent]
        _require(type(self.algo).recurrent, "algo", f"{'|'.join(able)} with agent.recurrent", name)
        _require(
            self.env.vectorization != "vector_entry_point",
            "env.vectorization",
            "auto|sync|async with agent.recurrent (its sequences need same-step autoreset)",
            self.env.vectorization,
        )
        _require(
            self.env.num_steps % self.sequence_chunks == 0,
            "algo.num_minibatches",
            f"with agent.recurrent, a number M whose ceil(M / env.num_envs) divides env.num_steps = "
            f"{self.env.num_steps} (each env's rollout is cut into that many sequences)",
            getattr(self.algo, "num_minibatches", 1),
        )

    @property
    def sequence_chunks(self) -> int:
        """Into how many sequences a recurrent agent's rollout of each env is cut: one, or as many
        as it takes for every minibatch to get at least one (see ``update.SequenceBatch``)."""
        minibatches = getattr(self.algo, "num_minibatches", 1)
        return -(-minibatches // self.env.num_envs)

    @property
    def batch_size(self) -> int:
        """Transitions per iteration: every env steps ``num_steps`` times."""
        return self.env.num_envs * self.env.num_steps


# The keys at the top of the training config.
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A plain nested config as ``{"algo.clip_eps": 0.2, ...}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
