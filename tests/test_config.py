"""The config tree composes into checked dataclasses, and every kind of bad input is one line."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import MISSING, OmegaConf
from support import compose_config, one_line_failure

from ppo_cli import cli
from ppo_cli.config import ALGO_SCHEMAS, GRPOConfig, flatten, role_of

CONFIG_DIR = cli.find_config_dir()
ENV_PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "env").glob("*.yaml"))


@pytest.mark.parametrize("preset", ENV_PRESETS)
def test_every_env_preset_composes_and_validates(preset: str) -> None:
    game = ["env.id=SpaceInvadersNoFrameskip-v4"] if preset == "Atari" else []  # any game: name one
    cfg = compose_config(f"env={preset}", *game)
    assert cfg.env.id.endswith(("-v0", "-v1", "-v3", "-v4", "-v5"))
    assert cfg.batch_size % cfg.algo.num_minibatches == 0


def test_required_presets_exist() -> None:
    required = {"CartPole", "Acrobot", "MountainCar", "LunarLander", "Pendulum", "BipedalWalker"}
    required |= {"HalfCheetah", "Hopper", "Walker2d", "Ant", "Humanoid", "Breakout", "Pong", "BeamRider"}
    assert required <= set(ENV_PRESETS)


def test_env_preset_overrides_algo_defaults_and_command_line_wins() -> None:
    assert compose_config("env=HalfCheetah").algo.clip_eps == pytest.approx(0.1)
    assert compose_config("env=HalfCheetah", "algo.clip_eps=0.3").algo.clip_eps == pytest.approx(0.3)
    assert compose_config("env=HalfCheetah").env.normalize_obs is True
    assert compose_config("env=CartPole").env.normalize_obs is False


BAD_INPUTS = [
    (["algo.gamma=1.5"], "algo.gamma: got 1.5, allowed: a number in (0, 1]"),
    (["algo.gamma=0"], "algo.gamma: got 0.0, allowed: a number in (0, 1]"),
    (["algo.gae_lambda=1.1"], "algo.gae_lambda: got 1.1, allowed: a number in [0, 1]"),
    (["algo.clip_eps=0"], "algo.clip_eps: got 0.0, allowed: a number > 0"),
    (["algo.clip_eps=-0.2"], "algo.clip_eps: got -0.2, allowed: a number > 0"),
    (["algo.num_minibatches=3"], "algo.num_minibatches: got 3, allowed: a divisor of the batch"),
    (["algo.gamma=abc"], "algo.gamma: Value 'abc' of type 'str' could not be converted to Float"),
    (
        ["env.num_envs=two"],
        "env.num_envs: Value 'two' of type 'str' could not be converted to Integer",
    ),
    (["algo.clp_eps=0.1"], "algo.clp_eps: not a config key; allowed keys under algo:"),
    (["+typo=1"], "typo: not a config key; allowed keys: agent, algo,"),
    (["+algo.foo=2"], "algo.foo: not a config key; allowed keys under algo:"),
    (["env.id=???"], "env.id: missing value"),
    (["total_timesteps=???"], "total_timesteps: missing value"),
    (["total_timesteps=10"], "total_timesteps: got 10, allowed: an integer >="),
    (["device=tpu"], "device: got 'tpu', allowed: auto|cpu|cuda"),
    (["agent.activation=gelu"], "agent.activation: got 'gelu', allowed: tanh|relu"),
    (["env=Nope"], "env=Nope: no such option; available: Acrobot, Ant,"),
    (["algo=nope"], "algo=nope: no such option; available: a2c, clip, grpo, penalty, pg, trpo"),
    (["algo=grpo", "algo.group_size=3"], "algo.group_size: got 3, allowed: a divisor of env.num_envs = 8"),
    (
        ["algo=grpo", "env.normalize_reward=true"],
        "env.normalize_reward: got True, allowed: false with algo=grpo",
    ),
    (["algo=grpo", "algo.gae_lambda=0.9"], "algo.gae_lambda: not a config key; allowed keys under algo:"),
    (
        ["algo=grpo", "env.vectorization=vector_entry_point"],
        "env.vectorization: got 'vector_entry_point', allowed: auto|sync|async with algo=grpo",
    ),
    (["algo=grpo", "algo.baseline=value"], "algo.baseline: got 'value', allowed: group_mean|leave_one_out"),
    (["algo=grpo", "algo.adv_std=batch"], "algo.adv_std: got 'batch', allowed: group|none"),
    (
        ["algo=grpo", "algo.dynamic_sampling_max_passes=-1"],
        "algo.dynamic_sampling_max_passes: got -1, allowed: an integer >= 0 (0 = off)",
    ),
    (["algo=clip", "algo.adv_std=none"], "algo.adv_std: not a config key; allowed keys under algo:"),
    (
        ["algo=a2c", "algo.dynamic_sampling_max_passes=1"],
        "algo.dynamic_sampling_max_passes: not a config key; allowed keys under algo:",
    ),
    (
        ["algo=grpo", "algo.clip_eps_low=1"],
        "algo.clip_eps_low: got 1.0, allowed: null (= algo.clip_eps) or a number in (0, 1)",
    ),
    (
        ["algo=grpo", "algo.clip_eps_high=0"],
        "algo.clip_eps_high: got 0.0, allowed: null (= algo.clip_eps) or",
    ),
    (
        ["algo=grpo", "algo.loss_agg=sum"],
        "algo.loss_agg: got 'sum', allowed: token_mean|episode_mean|constant",
    ),
    (["algo=grpo", "algo.kl_loss=k1"], "algo.kl_loss: got 'k1', allowed: k3|k2|k1_in_reward"),
    (["algo=clip", "algo.ref_kl_coef=-1"], "algo.ref_kl_coef: got -1.0, allowed: a number >= 0"),
    (["algo=clip", "algo.loss_agg=constant"], "algo.loss_agg: not a config key; allowed keys under algo:"),
    (
        ["algo=penalty", "algo.ref_kl_coef=0.1"],
        "algo.ref_kl_coef: not a config key; allowed keys under algo:",
    ),
    (["algo=a2c", "algo.kl_loss=k2"], "algo.kl_loss: not a config key; allowed keys under algo:"),
    (["algo=pg", "algo.returns=gt"], "algo.returns: got 'gt', allowed: episode|reward_to_go"),
    (["algo=pg", "algo.baseline=critic"], "algo.baseline: got 'critic', allowed: none|mean|value"),
    (["algo=pg", "algo.gae_lambda=0.9"], "algo.gae_lambda: not a config key; allowed keys under algo:"),
    (
        ["algo=pg", "algo.bootstrap_truncated=false"],
        "algo.bootstrap_truncated: not a config key; allowed keys under algo:",
    ),
    (
        ["algo=pg", "env.num_envs=2", "algo.value_minibatches=3"],
        "algo.value_minibatches: got 3, allowed: an integer <= env.num_envs = 2 (episodes per batch)",
    ),
    (["algo=pg", "env.normalize_reward=true"], "env.normalize_reward: got True, allowed: false with algo=pg"),
    (
        ["algo=pg", "env.vectorization=vector_entry_point"],
        "env.vectorization: got 'vector_entry_point', allowed: auto|sync|async with algo=pg",
    ),
    (["algo=a2c", "algo.baseline=value"], "algo.baseline: not a config key; allowed keys under algo:"),
    (["algo=trpo", "algo.returns=episode"], "algo.returns: not a config key; allowed keys under algo:"),
    (["algo=penalty", "algo.clip_eps=0.1"], "algo.clip_eps: not a config key; allowed keys under algo:"),
    (["algo=clip", "algo.kl_target=0.1"], "algo.kl_target: not a config key; allowed keys under algo:"),
    (["algo=penalty", "algo.kl_estimator=k4"], "algo.kl_estimator: got 'k4', allowed: k1|k2|k3|exact"),
    (["algo=trpo", "algo.critic_target=n_step"], "algo.critic_target: got 'n_step', allowed: gae|td|mc"),
    (["algo=grpo", "algo.critic_target=mc"], "algo.critic_target: not a config key; allowed keys under"),
    (["algo=pg", "algo.critic_target=mc"], "algo.critic_target: not a config key; allowed keys under"),
    (["algo=penalty", "algo.kl_target=0"], "algo.kl_target: got 0.0, allowed: a number > 0"),
    (["algo.dual_clip=1"], "algo.dual_clip: got 1.0, allowed: null (off) or a number > 1"),
    (["algo.objective=ppo"], "algo.objective: got 'ppo', allowed: clip|spo"),
    (
        ["algo.objective=spo", "algo.dual_clip=3"],
        "algo.dual_clip: got 3.0, allowed: null with algo.objective=spo (the dual clip bounds the clipped",
    ),
    (["algo=penalty", "algo.dual_clip=3"], "algo.dual_clip: not a config key; allowed keys under algo:"),
    (["algo=grpo", "algo.objective=spo"], "algo.objective: not a config key; allowed keys under algo:"),
    (["env.vectorization=gpu"], "env.vectorization: got 'gpu', allowed: auto|sync|async"),
    (["agent=lstm", "algo=trpo"], "algo: got 'trpo', allowed: clip|penalty|a2c|grpo with a shared trunk"),
    (["agent=gru", "algo=grpo"], "algo: got 'grpo', allowed: clip|penalty|a2c with agent.recurrent"),
    (
        ["agent=lstm", "env.num_steps=10", "algo.num_minibatches=40"],
        "algo.num_minibatches: got 40, allowed: with agent.recurrent, a number M whose ceil(M / env",
    ),
    (
        ["agent=lstm", "env.vectorization=vector_entry_point"],
        "env.vectorization: got 'vector_entry_point', allowed: auto|sync|async with agent.recurrent",
    ),
    (["agent.recurrent=rnn"], "agent.recurrent: got 'rnn', allowed: none|lstm|gru"),
    (["agent.encoder=resnet"], "agent.encoder: got 'resnet', allowed: flat|nature_cnn"),
    (
        ["env=Breakout", "env.normalize_obs=true"],
        "env.normalize_obs: got True, allowed: false with agent.encoder=nature_cnn",
    ),
    (["env.num_envs=2.5"], "env.num_envs: Value '2.5' of type 'float' could not be converted to Integer"),
]


# Refused when the env is first made (its id, its constructor's parameters), after composing.
ENV_REFUSALS = [
    (
        ["env.id=CartPol-v1"],
        "env.id: 'CartPol-v1' is not a registered gymnasium environment; did you mean",
    ),
    (["env.id=nosuchmodule:Env-v0"], "env.id: cannot import module 'nosuchmodule'"),
    (["env.atari.enabled=true"], "env.atari.enabled: CartPole-v1 is not an Atari game of ale-py"),
    (
        ["+env.kwargs.foo=1"],
        "env.kwargs.foo: CartPoleEnv (CartPole-v1) takes no parameter 'foo'; "
        "its parameters: sutton_barto_reward, render_mode",
    ),
    (
        ["env.id=FrozenLake-v1", "+env.kwargs.is_slippery=false", "+env.kwargs.success_rate=high"],
        "env.kwargs.success_rate: FrozenLakeEnv (FrozenLake-v1) fails with success_rate='high' (str): "
        "unsupported operand type(s) for -: 'float' and 'str'",
    ),
]

# One case of each way a config is refused, through ppo-train itself: a value of the wrong type, an
# unknown key (in a group, at the root), a missing value, an option that does not exist, a range.
THROUGH_PPO_TRAIN = {"algo.gamma=abc", "algo.clp_eps=0.1", "+typo=1", "env.id=???", "algo=nope"}
THROUGH_PPO_TRAIN |= {"algo.gamma=1.5"}
THROUGH_PPO_TRAIN_CASES = [case for case in BAD_INPUTS if case[0][-1] in THROUGH_PPO_TRAIN] + ENV_REFUSALS


def test_each_key_s_role_decides_resume_comparisons_and_hparams() -> None:
    """Which keys may change on resume, tell experiments apart in ppo-compare and are HParams
    columns; a key no schema has (from an older ppo-cli, or a mapping's entry) shapes what is
    learned unless its group says otherwise."""
    config = OmegaConf.to_container(OmegaConf.structured(compose_config("env=CartPole")))
    assert isinstance(config, dict)
    algo_keys = {f"algo.{name}" for schema in ALGO_SCHEMAS.values() for name in schema.__dataclass_fields__}
    unknown = {"checkpoint.old", "eval.old", "algo.old", "old", "env.kwargs.size"}
    keys = set(flatten(config)) | algo_keys | unknown
    operational = {"progress", "torch_threads", "device", "resume", "resume_allow_changes"}
    operational |= {"checkpoint.interval", "checkpoint.keep", "checkpoint.old"}
    operational |= {"tracking.backend", "tracking.mlflow.tracking_uri", "tracking.mlflow.experiment_name"}
    operational |= {"tracking.mlflow.artifact_location", "tracking.wandb.project", "tracking.wandb.entity"}
    operational |= {"tracking.wandb.mode", "tracking.wandb.dir"}
    evaluation = {"eval.episodes", "eval.interval", "eval.deterministic", "eval.old"}
    free = {key for key in keys if role_of(key).free_on_resume}
    not_factors = {key for key in keys if not role_of(key).factor}
    not_hparams = {key for key in keys if not role_of(key).hparam}
    assert free == operational | evaluation | {"total_timesteps"}
    assert not_factors == operational | evaluation | {"seed", "seeds_per_job"}
    assert not_hparams == operational


@pytest.mark.parametrize(("overrides", "expected"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_config_is_refused_as_bad_input_naming_the_key(overrides: list[str], expected: str) -> None:
    """Composing the config refuses it, and what ppo-train reports for that refusal (the same
    function, ``cli.expected_outcome``) names the key and what is allowed, with exit code 2.
    Composing alone: ppo-train's own path is taken by the cases below."""
    with pytest.raises(Exception) as refused:
        compose_config(*overrides)
    outcome = cli.expected_outcome(refused.value)
    assert outcome is not None, refused.value  # bad input, not a bug with its traceback
    report, code = outcome
    assert code == 2
    assert report.startswith("error: ")
    assert expected in report


@pytest.mark.parametrize(
    ("overrides", "expected"), THROUGH_PPO_TRAIN_CASES, ids=[" ".join(o) for o, _ in THROUGH_PPO_TRAIN_CASES]
)
def test_bad_input_is_one_line_naming_the_key(
    overrides: list[str],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    argv = ["ppo-train", *overrides, f"hydra.run.dir={run_dir}"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert code == 2
    assert line.startswith("ppo-train: error: ")
    assert expected in line
    assert not (run_dir / "checkpoints").exists()  # stopped before training


def test_unsupported_space_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Blackjack-v1 observes a Tuple of Discrete spaces.
    argv = ["ppo-train", "env.id=Blackjack-v1", f"hydra.run.dir={tmp_path}"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert code == 2
    assert line.startswith("ppo-train: error: env.id: Blackjack-v1 has a Tuple observation space")
    assert "supported:" in line


@pytest.mark.slow
def test_every_algo_schema_has_a_preset_and_a_variant() -> None:
    from ppo_cli.algos import VARIANTS
    from ppo_cli.config import ALGO_SCHEMAS

    presets = {p.stem for p in (Path(CONFIG_DIR) / "algo").glob("*.yaml")}
    assert presets == set(ALGO_SCHEMAS) == {"clip", "penalty", "pg", "a2c", "trpo", "grpo"}
    assert set(VARIANTS) == set(ALGO_SCHEMAS.values())
    for name in presets:
        assert compose_config(f"algo={name}").algo.name == name


def test_schema_defaults_of_variant_keys_are_their_preset_values() -> None:
    """Keys added to a variant later carry a schema default, the behaviour before them (what a
    resumed older run counts them as): the preset must say the same."""
    checked = set()
    for name, schema in ALGO_SCHEMAS.items():
        preset = compose_config(f"algo={name}", "~tuned").algo
        for field in dataclasses.fields(schema):
            if field.default not in (dataclasses.MISSING, MISSING):
                assert getattr(preset, field.name) == field.default, (name, field.name)
                checked.add(f"{name}.{field.name}")
    new_keys = {
        "grpo.clip_eps_low",
        "grpo.clip_eps_high",
        "grpo.loss_agg",
        "grpo.kl_loss",
        "clip.ref_kl_coef",
    }
    assert new_keys | {"clip.kl_loss"} <= checked
    grpo = compose_config("algo=grpo", "~tuned").algo
    assert isinstance(grpo, GRPOConfig)
    assert (grpo.loss_agg, grpo.kl_loss, grpo.clip_range) == ("token_mean", "k3", (0.2, 0.2))


def test_unwritable_run_dir_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    argv = ["ppo-train", f"hydra.run.dir={blocker / 'run'}"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert (code, line) == (2, f"ppo-train: error: {blocker / 'run'}: Not a directory")


SEARCH_PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("preset", SEARCH_PRESETS)
def test_every_search_preset_searches_keys_that_exist(preset: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={preset}"], return_hydra_config=True)
    train_cfg = compose_config(f"hparams_search={preset}")
    env_preset, algo = preset.split("_")
    assert train_cfg.algo.name == algo
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize"
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key
    assert compose_config(f"env={env_preset}").env.id == train_cfg.env.id


def test_a_constructor_that_fails_whatever_it_is_given_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TypeError that the env's constructor raises without the user's kwargs too is a bug of
    the env, not a bad kwarg: it is not reported as one."""
    env = ["env.id=faulty_envs:BuggyConstructor-v0", "+env.kwargs.size=3"]
    argv = ["ppo-train", *env, f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(TypeError, match="object of type 'int' has no len"):
        cli.train_main()


def test_integer_keys_take_integral_floats() -> None:
    cfg = compose_config("total_timesteps=1e6", "env.num_envs=4.0", "checkpoint.interval=2e1")
    values = (cfg.total_timesteps, cfg.env.num_envs, cfg.checkpoint.interval)
    assert values == (1000000, 4, 20)
    assert all(type(value) is int for value in values)


@pytest.mark.slow
def test_integral_floats_in_a_preset_and_a_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    presets = tmp_path / "configs" / "env"
    presets.mkdir(parents=True)
    (presets / "Tiny.yaml").write_text(
        "# @package _global_\nenv:\n  id: CartPole-v1\n  num_envs: 2.0\n  num_steps: 16\n"
        "total_timesteps: 3.2e1\nalgo:\n  num_minibatches: 2\n"
    )
    sweep_dir = tmp_path / "sweep"
    argv = [
        "ppo-train", "-m", "--config-dir", str(tmp_path / "configs"), "env=Tiny", "total_timesteps=32,6.4e1",
        "eval.episodes=0", "progress=false", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    cli.train_main()
    summaries = [json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")]
    assert sorted(s["global_step"] for s in summaries) == [32, 64]
    assert {s["config"]["env"]["num_envs"] for s in summaries} == {2}
    assert "error" not in capsys.readouterr().err
