"""Typed schemas for the Hydra config tree: each key's type, allowed values and role, said once.

The YAML files under ``configs/`` hold every default a user sees; the dataclasses here only fix the
*shape* (which keys exist and their types), the *allowed values* and the *role* of each key (see
``config_fields.py``). Hydra merges each YAML file onto these schemas (``hydra_config.py``
registers them), so a misspelt key or a wrong type fails at composition time, and building the
dataclasses runs every check before any environment or network is built.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import MISSING

from ppo_cli.config_fields import (
    Check,
    CheckedFields,
    Role,
    integer_at_least,
    number_above,
    number_at_least,
    number_in,
    one_of,
    optional,
    require,
    role_of_field,
    setting,
)
from ppo_cli.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
VECTORIZATIONS = ("auto", "sync", "async", "vector_entry_point")
ACTIVATIONS = ("tanh", "relu")
ENCODERS = ("flat", "nature_cnn")
RECURRENT_CORES = ("none", "lstm", "gru")
KL_ESTIMATORS = ("k1", "k2", "k3", "exact")
GRPO_BASELINES = ("group_mean", "leave_one_out")
GRPO_ADV_STDS = ("group", "none")
CRITIC_TARGETS = ("gae", "td", "mc")  # see advantages.gae_and_critic_targets
KL_LOSSES = ("k3", "k2", "k1_in_reward")  # how KL(pi || pi_ref) enters the loss (reference.py)
LOSS_AGGREGATIONS = ("token_mean", "episode_mean", "constant")  # GRPO's mean over steps
CLIP_OBJECTIVES = ("clip", "spo")  # PPO-Clip's policy term: the clipped surrogate, or SPO's penalty
PG_RETURNS = ("episode", "reward_to_go")
PG_BASELINES = ("none", "mean", "value")
TRACKERS = {"none": None, "mlflow": "mlflow", "wandb": "wandb"}  # backend -> its package (and extra)
WANDB_MODES = ("online", "offline")

POSITIVE = number_above(0)
NON_NEGATIVE = number_at_least(0)
AT_LEAST_ONE = integer_at_least(1)


@dataclass
class AtariConfig(CheckedFields):
    """The Atari preprocessing (``atari.py``), off for other environments."""

    key_prefix: ClassVar[str] = "env.atari."

    enabled: bool = False
    noop_max: int = setting(30, check=integer_at_least(0))
    frame_skip: int = setting(4, check=AT_LEAST_ONE)
    screen_size: int = setting(84, check=AT_LEAST_ONE)
    frame_stack: int = setting(4, check=AT_LEAST_ONE)
    episodic_life: bool = True
    clip_rewards: bool = True


@dataclass
class EnvConfig(CheckedFields):
    """Which environment, how many copies, and how observations and rewards are normalised."""

    key_prefix: ClassVar[str] = "env."

    id: str = setting(check=Check(bool, "a registered gymnasium id"))
    num_envs: int = setting(check=AT_LEAST_ONE)
    num_steps: int = setting(check=AT_LEAST_ONE)
    vectorization: str = setting("auto", check=one_of(VECTORIZATIONS))
    max_episode_steps: int | None = setting(None, check=optional(AT_LEAST_ONE))
    normalize_obs: bool = False
    normalize_reward: bool = False
    clip_obs: float = setting(10.0, check=POSITIVE)
    clip_reward: float = setting(10.0, check=POSITIVE)
    kwargs: dict[str, Any] = field(default_factory=dict)
    atari: AtariConfig = field(default_factory=AtariConfig)


def _require_divides_batch(key: str, value: int, env: EnvConfig) -> None:
    batch_size = env.num_envs * env.num_steps
    if batch_size % value:
        raise ConfigError(
            key, f"got {value}, allowed: a divisor of the batch env.num_envs * env.num_steps = {batch_size}"
        )


@dataclass
class AlgoConfig(CheckedFields):
    """Keys every variant of the family uses. Each variant's schema adds its own keys, so a key
    that the chosen variant does not use is an unknown key, not a silently ignored one.

    Class attributes say what a variant can train: ``shared_trunk``, a network whose actor and
    critic share layers (not where the policy is stepped apart from the critic: pg, trpo);
    ``recurrent``, a recurrent core replaying whole sequences (not with GRPO's masked steps).
    """

    key_prefix: ClassVar[str] = "algo."
    shared_trunk: ClassVar[bool] = True
    recurrent: ClassVar[bool] = True

    name: str = MISSING
    learning_rate: float = setting(check=POSITIVE)
    anneal_lr: bool = MISSING
    adam_eps: float = setting(check=POSITIVE)
    max_grad_norm: float = setting(check=POSITIVE)
    ent_coef: float = setting(check=NON_NEGATIVE)

    def check_env(self, env: EnvConfig) -> None:
        """Checks that need the env config (e.g. the rollout size); none by default."""


@dataclass
class ActorCriticConfig(AlgoConfig):
    """Variants with a learned critic and GAE advantages (clip, penalty, a2c, trpo).

    ``critic_target`` picks the critic's regression target apart from the actor's advantages
    (``advantages.gae_and_critic_targets``); its schema default is also what a run saved before
    the key existed used (resume reads it from here)."""

    gamma: float = setting(check=number_in(0, 1, open_low=True))
    gae_lambda: float = setting(check=number_in(0, 1))
    bootstrap_truncated: bool = MISSING
    norm_adv: bool = MISSING
    vf_coef: float = setting(check=NON_NEGATIVE)
    critic_target: str = setting("gae", check=one_of(CRITIC_TARGETS))


@dataclass
class EpochKeys:
    """The keys of every variant that takes epochs of minibatch steps on each rollout (clip,
    penalty, grpo); a variant lists it first among its bases, so the keys follow its others."""

    update_epochs: int = setting(check=AT_LEAST_ONE)
    num_minibatches: int = setting(check=AT_LEAST_ONE)
    target_kl: float | None = setting(None, check=optional(POSITIVE, "null (no early stop)"))


@dataclass
class SurrogateConfig(EpochKeys, ActorCriticConfig):
    """Variants that take epochs of minibatch steps on a ratio objective (clip, penalty)."""

    def check_env(self, env: EnvConfig) -> None:
        _require_divides_batch("algo.num_minibatches", self.num_minibatches, env)


@dataclass
class ClipConfig(SurrogateConfig):
    """PPO-Clip: the clipped surrogate objective, or SPO's penalty on the same ratio
    (``objective``); dual-clip PPO's bound for negative advantages (``dual_clip``).

    Both new keys have schema defaults, so a run saved before they existed resumes with them."""

    clip_eps: float = setting(check=POSITIVE)
    clip_vloss: bool = MISSING
    # Keys added later carry a schema default, the value of the behaviour before them, so that a
    # run saved without them resumes unchanged (resume.config_changes).
    ref_kl_coef: float = setting(0.0, check=number_at_least(0))
    kl_loss: str = setting("k2", check=one_of(KL_LOSSES))
    objective: str = setting("clip", check=one_of(CLIP_OBJECTIVES))
    dual_clip: float | None = setting(None, check=optional(number_above(1), "null (off)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.dual_clip is None or self.objective == "clip",
            "algo.dual_clip",
            "null with algo.objective=spo (the dual clip bounds the clipped surrogate only)",
            self.dual_clip,
        )


@dataclass
class PenaltyConfig(SurrogateConfig):
    """PPO-Penalty: the unclipped surrogate minus beta * KL(pi_old || pi), beta adaptive or fixed."""

    kl_estimator: str = setting(check=one_of(KL_ESTIMATORS))
    adaptive: bool = MISSING
    kl_coef: float = setting(check=NON_NEGATIVE)
    kl_target: float = setting(check=POSITIVE)
    beta_factor: float = setting(check=number_above(1))
    kl_tolerance: float = setting(check=number_above(1))
    beta_min: float = setting(check=POSITIVE)
    beta_max: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.beta_max >= self.beta_min,
            "algo.beta_max",
            f"a number >= algo.beta_min = {self.beta_min}",
            self.beta_max,
        )


@dataclass
class RegressedCriticConfig(ActorCriticConfig):
    """Variants whose critic is fitted separately, by regression on the lambda-returns (trpo)."""

    shared_trunk: ClassVar[bool] = False  # the policy step would move the critic's layers too
    recurrent: ClassVar[bool] = False

    value_epochs: int = setting(check=AT_LEAST_ONE)
    value_minibatches: int = setting(check=AT_LEAST_ONE)

    def check_env(self, env: EnvConfig) -> None:
        _require_divides_batch("algo.value_minibatches", self.value_minibatches, env)


@dataclass
class PGConfig(AlgoConfig):
    """Monte-Carlo policy gradient (REINFORCE): whole episodes, one policy-gradient step per
    iteration on log pi weighted by the episode's return or the reward-to-go, minus a baseline;
    with the learned baseline, the critic is then fitted to those weights by regression.

    Not an actor-critic: nothing is bootstrapped, so it has no gae_lambda, no
    bootstrap_truncated (a time limit ends the episode like a termination)."""

    shared_trunk: ClassVar[bool] = False  # the policy step would move the critic's layers too
    recurrent: ClassVar[bool] = False  # its masked steps would cut sequences

    gamma: float = setting(check=number_in(0, 1, open_low=True))
    returns: str = setting(check=one_of(PG_RETURNS))
    baseline: str = setting(check=one_of(PG_BASELINES))
    norm_adv: bool = MISSING
    vf_coef: float = setting(check=NON_NEGATIVE)
    value_epochs: int = setting(check=AT_LEAST_ONE)
    value_minibatches: int = setting(check=AT_LEAST_ONE)

    def check_env(self, env: EnvConfig) -> None:
        # A batch holds at least one step of each env's episode, whatever their lengths.
        require(
            self.value_minibatches <= env.num_envs,
            "algo.value_minibatches",
            f"an integer <= env.num_envs = {env.num_envs} (episodes per batch)",
            self.value_minibatches,
        )
        require(
            not env.normalize_reward,
            "env.normalize_reward",
            "false with algo=pg (its weights are the episodes' own returns)",
            True,
        )
        require(
            env.vectorization != "vector_entry_point",
            "env.vectorization",
            "auto|sync|async with algo=pg (each env is reset with a seed of its own)",
            env.vectorization,
        )


@dataclass
class TRPOConfig(RegressedCriticConfig):
    """TRPO: a natural-gradient policy step inside the trust region mean KL <= max_kl."""

    max_kl: float = setting(check=POSITIVE)
    cg_iterations: int = setting(check=AT_LEAST_ONE)
    cg_damping: float = setting(check=NON_NEGATIVE)
    line_search_steps: int = setting(check=AT_LEAST_ONE)
    backtrack_coef: float = setting(check=number_in(0, 1, open_low=True, open_high=True))


@dataclass
class A2CConfig(ActorCriticConfig):
    """Synchronous advantage actor-critic: one step on policy + value loss per (short) rollout."""


@dataclass
class GRPOConfig(EpochKeys, AlgoConfig):
    """GRPO: critic-free; each episode's advantage is its return standardised within its group of
    envs that started from the same reset seed; clipped ratio plus a KL to a frozen reference."""

    recurrent: ClassVar[bool] = False  # its masked steps would cut sequences

    group_size: int = setting(check=integer_at_least(2))
    clip_eps: float = setting(check=POSITIVE)
    kl_coef: float = setting(check=NON_NEGATIVE)
    ref_update_every: int = setting(check=integer_at_least(0, "0 keeps the initial policy as reference"))
    # Defaults here too (equal to grpo.yaml's): a run saved before these keys existed resumes
    # with them (hydra_config.schema_defaults).
    baseline: str = setting("group_mean", check=one_of(GRPO_BASELINES))
    adv_std: str = setting("group", check=one_of(GRPO_ADV_STDS))
    dynamic_sampling_max_passes: int = setting(0, check=integer_at_least(0, "0 = off"))
    # Keys added later carry a schema default, the value of the behaviour before them, so that a
    # run saved without them resumes unchanged (resume.config_changes).
    clip_eps_low: float | None = setting(
        None, check=optional(number_in(0, 1, open_low=True, open_high=True), "null (= algo.clip_eps)")
    )
    clip_eps_high: float | None = setting(None, check=optional(POSITIVE, "null (= algo.clip_eps)"))
    loss_agg: str = setting("token_mean", check=one_of(LOSS_AGGREGATIONS))
    kl_loss: str = setting("k3", check=one_of(KL_LOSSES))

    @property
    def clip_range(self) -> tuple[float, float]:
        """(eps_low, eps_high): the ratio is clipped to [1 - eps_low, 1 + eps_high]."""
        low = self.clip_eps if self.clip_eps_low is None else self.clip_eps_low
        return low, self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    def check_env(self, env: EnvConfig) -> None:
        require(
            env.vectorization != "vector_entry_point",
            "env.vectorization",
            "auto|sync|async with algo=grpo (a group's envs reset from one seed each; "
            "numpy-vectorised envs share one random generator)",
            env.vectorization,
        )
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

LAYER_SIZES = Check(lambda sizes: all(size >= 1 for size in sizes), "a list of integers >= 1")


@dataclass
class AgentConfig(CheckedFields):
    """Network shapes: actor and critic MLPs, after an optional shared trunk (encoder, recurrent core)."""

    key_prefix: ClassVar[str] = "agent."

    actor_hidden: list[int] = setting(factory=lambda: [64, 64], check=LAYER_SIZES)
    critic_hidden: list[int] = setting(factory=lambda: [64, 64], check=LAYER_SIZES)
    activation: str = setting("tanh", check=one_of(ACTIVATIONS))
    log_std_init: float = 0.0
    encoder: str = setting("flat", check=one_of(ENCODERS))
    recurrent: str = setting("none", check=one_of(RECURRENT_CORES))
    recurrent_size: int = setting(128, check=AT_LEAST_ONE)

    @property
    def shared_trunk(self) -> bool:
        return self.encoder != "flat" or self.recurrent != "none"


@dataclass
class CheckpointConfig(CheckedFields):
    """How often to save, and how many periodic checkpoints to keep beside ``last.pt``."""

    key_prefix: ClassVar[str] = "checkpoint."

    interval: int = setting(10, check=integer_at_least(0, "iterations; 0 saves only at the end"))
    keep: int = setting(3, check=integer_at_least(0))


@dataclass
class EvalConfig(CheckedFields):
    """The evaluations of a run: every ``interval`` iterations, and the one that ends it."""

    key_prefix: ClassVar[str] = "eval."

    episodes: int = setting(10, check=integer_at_least(0, "0 skips every evaluation"))
    interval: int = setting(50, check=integer_at_least(0, "iterations; 0 evaluates only at the end"))
    deterministic: bool = True


@dataclass
class MlflowConfig(CheckedFields):
    """Where ``tracking=mlflow`` records the run."""

    key_prefix: ClassVar[str] = "tracking.mlflow."

    tracking_uri: str | None = None
    experiment_name: str = setting("ppo-cli", check=Check(bool, "a non-empty name"))
    artifact_location: str | None = None


@dataclass
class WandbConfig(CheckedFields):
    """Where ``tracking=wandb`` records the run."""

    key_prefix: ClassVar[str] = "tracking.wandb."

    project: str = setting("ppo-cli", check=Check(bool, "a non-empty name"))
    entity: str | None = None
    mode: str = setting("online", check=one_of(WANDB_MODES))
    dir: str | None = None


@dataclass
class TrackingConfig(CheckedFields):
    """An experiment tracker that mirrors TensorBoard's scalars, the hyperparameters and the final
    files (``tracking.py``). Its package is an optional extra: a missing one is refused with the
    other bad values, before any env is built, rather than when the tracker starts mid-run."""

    key_prefix: ClassVar[str] = "tracking."

    backend: str = setting("none", check=one_of(tuple(TRACKERS)))
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        package = TRACKERS[self.backend]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                "tracking",
                f"{self.backend} needs its package, not installed: pip install 'ppo-cli[{package}]'",
            )


@dataclass
class TrainConfig(CheckedFields):
    """The whole run: one of each group plus the run-level keys."""

    env: EnvConfig = MISSING
    algo: AlgoConfig = MISSING
    agent: AgentConfig = field(default_factory=AgentConfig)
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig, role=Role.OPERATIONAL)
    eval: EvalConfig = setting(factory=EvalConfig, role=Role.EVALUATION)
    tracking: TrackingConfig = setting(factory=TrackingConfig, role=Role.OPERATIONAL)
    seed: int = setting(0, check=integer_at_least(0), role=Role.REPLICATE)
    device: str = setting("auto", check=one_of(DEVICES), role=Role.OPERATIONAL)
    torch_threads: int = setting(
        1, check=integer_at_least(0, "0 keeps torch's default"), role=Role.OPERATIONAL
    )
    total_timesteps: int = setting(role=Role.LENGTH)  # at least one batch: checked below
    progress: bool = setting(True, role=Role.OPERATIONAL)
    # The agent a new run starts from (init_from.py) shapes what it learns, and so may not change on
    # resume without resume_allow_changes (a resumed run never reads it again: its checkpoint holds
    # the weights), and tells runs apart in comparisons.
    init_from: str | None = setting(None, role=Role.LEARNING)
    resume: str | None = setting(None, role=Role.OPERATIONAL)
    resume_allow_changes: bool = setting(False, role=Role.OPERATIONAL)
    seeds_per_job: int = setting(1, check=AT_LEAST_ONE, role=Role.REPLICATE)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
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
            require(
                type(self.algo).shared_trunk,
                "algo",
                f"{'|'.join(able)} with a shared trunk (agent.encoder={agent.encoder}, "
                f"agent.recurrent={agent.recurrent}): {name} steps the policy apart from the critic",
                name,
            )
        if agent.encoder == "nature_cnn":
            require(
                not self.env.normalize_obs,
                "env.normalize_obs",
                "false with agent.encoder=nature_cnn (it scales pixels to [0, 1] itself)",
                True,
            )
        if agent.recurrent == "none":
            return
        able = [variant for variant, schema in ALGO_SCHEMAS.items() if schema.recurrent]
        require(type(self.algo).recurrent, "algo", f"{'|'.join(able)} with agent.recurrent", name)
        require(
            self.env.vectorization != "vector_entry_point",
            "env.vectorization",
            "auto|sync|async with agent.recurrent (its sequences need same-step autoreset)",
            self.env.vectorization,
        )
        require(
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


@functools.cache
def role_of(flat_key: str) -> Role:
    """The role of a flat key (``algo.clip_eps``, ``checkpoint.keep``): its group's, where the
    group has one (it covers every key under it), else its own field's. A key that no schema
    has (one of a run saved by an older ppo-cli, an entry of ``env.kwargs``) counts as shaping
    what is learned, the safe side for resume and for comparisons."""
    role = Role.LEARNING
    schemas: list[type] = [TrainConfig]
    for name in flat_key.split("."):
        found = [(schema, f) for schema in schemas for f in dataclasses.fields(schema) if f.name == name]
        if not found:
            break
        schema, key_field = found[0]
        role = role_of_field(key_field)
        if role is not Role.LEARNING:
            break
        schemas = _schemas_under(schema, name)
    return role


def _schemas_under(schema: type, name: str) -> list[type]:
    """The schemas of the group ``name`` of ``schema``: every variant's for ``algo``, whose keys
    differ by variant; none for a plain key or a free-form mapping."""
    hint = typing.get_type_hints(schema)[name]
    if hint is AlgoConfig:
        return list(ALGO_SCHEMAS.values())
    return [hint] if isinstance(hint, type) and dataclasses.is_dataclass(hint) else []


# HParams columns shown first after those a sweep varies: what tells runs apart at a glance.
LEADING_HPARAMS = ("env.id", "algo.name", "seed")
# The key that tells a config group's presets apart, for a sweep over presets (``algo=clip,pg``).
GROUP_KEYS = {"env": "env.id", "algo": "algo.name", "agent": "agent.recurrent"}


def hyperparameters(plain_config: dict[str, Any], swept: Iterable[str] = ()) -> dict[str, Any]:
    """The flat keys and values of a plain config that are columns of TensorBoard's HParams
    table: all but those that do not change what is learned (checkpoints, progress, device...).

    In the order the dashboard shows them, since it shows only the first few columns at once:
    the keys ``swept`` names (those a sweep varies; a config group stands for its
    :data:`GROUP_KEYS` key), then :data:`LEADING_HPARAMS`, then the rest in schema order.
    """
    flat = {key: value for key, value in flatten(plain_config).items() if role_of(key).hparam}
    leading = [GROUP_KEYS.get(key, key) for key in swept] + list(LEADING_HPARAMS)
    return {**{key: flat[key] for key in leading if key in flat}, **flat}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A plain nested config as ``{"algo.clip_eps": 0.2, ...}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
