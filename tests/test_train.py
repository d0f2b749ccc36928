"""The training loop end to end, in process, on tiny problems whose answer is known."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from support import compose_config, one_line_failure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from ppo_cli import cli, load_agent
from ppo_cli.checkpoint import load_checkpoint
from ppo_cli.config import TrainConfig
from ppo_cli.errors import UserError
from ppo_cli.train import train

# Its module fixture is built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_train")

GAMMA = 0.9


class EndlessRewardEnv(gym.Env[np.ndarray, int]):
    """Reward 1 at every step, forever: only the time limit ends an episode.

    The state never changes, so the true value is sum_k gamma^k = 1 / (1 - gamma) as long as
    truncation is bootstrapped; treating the time limit as terminal teaches a smaller value.
    """

    observation_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(1, dtype=np.float32), 1.0, False, False, {}


gym.register("ppo-test/EndlessReward-v0", entry_point=EndlessRewardEnv, max_episode_steps=20)


def endless_config(bootstrap: bool) -> TrainConfig:
    return compose_config(
        "env.id=ppo-test/EndlessReward-v0",
        "env.vectorization=sync",
        "env.num_envs=4",
        "env.num_steps=64",
        "total_timesteps=12800",  # seeds 0-2: 10.00 bootstrapped, 6.43 / 6.36 / 6.51 not
        f"algo.gamma={GAMMA}",
        f"algo.bootstrap_truncated={bootstrap}",
        "algo.anneal_lr=false",
        "algo.learning_rate=3e-3",
        "algo.clip_vloss=false",
        "algo.num_minibatches=4",
        "algo.update_epochs=10",
        "eval.episodes=0",
    )


@pytest.mark.slow
def test_time_limit_bootstrap_learns_the_infinite_horizon_value(tmp_path: Path) -> None:
    train(endless_config(bootstrap=True), tmp_path / "bootstrap")
    value = load_agent(tmp_path / "bootstrap").value(np.zeros(1, dtype=np.float32))
    assert value == pytest.approx(1 / (1 - GAMMA), rel=0.05)

    # The old behaviour (truncation treated as termination) underestimates it.
    train(endless_config(bootstrap=False), tmp_path / "terminal")
    truncated_value = load_agent(tmp_path / "terminal").value(np.zeros(1, dtype=np.float32))
    assert truncated_value < 0.85 / (1 - GAMMA)


def small_cartpole(seed: int = 0) -> TrainConfig:
    return compose_config(
        "env=CartPole",
        "env.num_envs=8",  # 256 steps per iteration
        f"seed={seed}",
        "total_timesteps=4096",
        "eval.episodes=2",
        "checkpoint.interval=4",
        "checkpoint.keep=2",
    )


@pytest.fixture(scope="module")
def small_cartpole_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, dict]]:
    """small_cartpole(seed) trained once per module under each name: (its run dir, its summary).
    The tests below read different facts of the same runs (its files and curves, its
    hyperparameters, its determinism), so each run is trained once."""
    done: dict[tuple[int, str], tuple[Path, dict]] = {}

    def get(seed: int, name: str = "run") -> tuple[Path, dict]:
        if (seed, name) not in done:
            run_dir = tmp_path_factory.mktemp(f"cartpole_s{seed}_{name}")
            done[seed, name] = run_dir, train(small_cartpole(seed), run_dir)
        return done[seed, name]

    return get


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_run_dir_holds_events_checkpoints_and_summary(
    small_cartpole_run: Callable[..., tuple[Path, dict]],
) -> None:
    run_dir, summary = small_cartpole_run(2)
    assert summary["status"] == "completed"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "completed"
    assert on_disk["global_step"] == 4096 == summary["global_step"]
    assert {"eval_mean", "eval_std", "sps", "wall_time_s", "config"} <= on_disk.keys()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == [
        "step_0000003072.pt",  # iteration 12 of 16 (256 steps each); iterations 4 and 8 rotated out
        "step_0000004096.pt",
    ]
    tags = scalars(run_dir)
    expected = {
        "charts/episodic_return",
        "charts/episodic_length",
        "charts/learning_rate",
        "charts/SPS",
        "losses/policy_loss",
        "losses/value_loss",
        "losses/entropy",
        "losses/old_approx_kl",
        "losses/approx_kl",
        "losses/clipfrac",
        "losses/explained_variance",
        "kl/k1",
        "kl/k2",
        "kl/k3",
        "kl/exact",
        "diagnostics/minibatch_updates",
        "diagnostics/early_stop",
        "eval/episodic_return",
    }
    assert expected <= tags.keys()
    steps = [step for step, _ in tags["losses/policy_loss"]]
    assert steps == list(range(256, 4097, 256))
    # Linear annealing: the last iteration runs at 1/16 of the initial rate (the CartPole tuning's).
    initial_lr = tags["charts/learning_rate"][0][1]
    assert initial_lr == pytest.approx(small_cartpole().algo.learning_rate)
    assert tags["charts/learning_rate"][-1][1] == pytest.approx(initial_lr / 16)


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("algo", ["clip", "penalty", "a2c", "pg", "trpo", "grpo"])
@pytest.mark.slow
def test_every_tag_a_variant_logs_is_listed_in_the_readme_under_its_section(
    algo: str, tmp_path: Path
) -> None:
    """Only CleanRL's names and loss terms under losses/: KL estimates under kl/, the update's
    bookkeeping under diagnostics/; the README's list names every tag of every variant."""
    cfg = compose_config(
        f"algo={algo}", "env.num_envs=4", "env.num_steps=16", "total_timesteps=64", "eval.episodes=1"
    )
    train(cfg, tmp_path)
    tags = scalars(tmp_path).keys()
    cleanrl = {"policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"}
    losses = {tag.removeprefix("losses/") for tag in tags if tag.startswith("losses/")}
    assert losses <= cleanrl | {"explained_variance", "surrogate_loss"}
    assert {"kl/k1", "kl/k2", "kl/k3", "kl/exact"} <= tags
    assert {tag.partition("/")[0] for tag in tags} <= {"charts", "losses", "kl", "diagnostics", "eval"}
    readme = README.read_text()
    assert [tag for tag in sorted(tags) if f"`{tag}`" not in readme] == []


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_on_cpu(
    small_cartpole_run: Callable[..., tuple[Path, dict]],
) -> None:
    runs = small_cartpole_run(2), small_cartpole_run(2, "again"), small_cartpole_run(4)
    a, b, c = (scalars(run_dir) for run_dir, _ in runs)
    timing = {"charts/SPS"}
    for tag in a.keys() - timing:
        assert a[tag] == b[tag], tag
    assert a["losses/value_loss"] != c["losses/value_loss"]


def test_failure_is_recorded_in_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_update(*args: object, **kwargs: object) -> dict[str, float]:
        raise RuntimeError("boom")

    monkeypatch.setattr("ppo_cli.algos.clip.ClipUpdater.update", broken_update)
    with pytest.raises(RuntimeError, match="boom"):
        train(small_cartpole(), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == "RuntimeError: boom"


@pytest.mark.slow
def test_continuous_actions_train_and_reload(tmp_path: Path) -> None:
    cfg = compose_config(
        "env=Pendulum",
        "env.num_envs=2",
        "env.num_steps=256",
        "total_timesteps=2048",
        "algo.num_minibatches=8",
        "eval.episodes=1",
    )
    train(cfg, tmp_path)
    agent = load_agent(tmp_path)
    obs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 8.0]], dtype=np.float32)
    action = agent.act(obs, deterministic=True)
    assert action.shape == (2, 1)
    assert np.all(np.abs(action) <= 2.0)
    assert torch.is_tensor(agent.network.obs_normalizer.stats.mean)  # type: ignore[union-attr]


@pytest.mark.slow
def test_async_vector_env_gives_the_same_run_as_sync(tmp_path: Path) -> None:
    """Vectorisation changes where envs run, not what they return."""
    base = (
        "env.id=Acrobot-v1",
        "env.num_envs=2",
        "env.num_steps=64",
        "total_timesteps=512",
        "algo.num_minibatches=2",
        "eval.episodes=0",
    )
    train(compose_config(*base, "env.vectorization=sync"), tmp_path / "sync")
    train(compose_config(*base, "env.vectorization=async"), tmp_path / "async")
    sync_run, async_run = scalars(tmp_path / "sync"), scalars(tmp_path / "async")
    assert sync_run["losses/value_loss"] == async_run["losses/value_loss"]
    assert sync_run["losses/policy_loss"] == async_run["losses/policy_loss"]


@pytest.mark.slow
def test_penalty_logs_beta_and_saves_it_in_checkpoints(tmp_path: Path) -> None:
    cfg = compose_config("algo=penalty", "total_timesteps=2048", "eval.episodes=0", "algo.num_minibatches=4")
    train(cfg, tmp_path)
    betas = [value for _, value in scalars(tmp_path)["kl/beta"]]
    assert len(betas) == 8
    assert betas[0] == pytest.approx(1.0)
    # Each logged beta is the previous one doubled, halved or kept (the adaptive rule).
    for before, after in itertools.pairwise(betas):
        assert after / before == pytest.approx(2.0) or after / before == pytest.approx(0.5) or after == before
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["updater"]["beta"] > 0


@pytest.mark.parametrize("algo", ["grpo", "pg"])  # whole episodes per iteration
def test_whole_episode_variants_refuse_an_env_without_episodes(algo: str, tmp_path: Path) -> None:
    gym.register("ppo-test/EndlessNoLimit-v0", entry_point=EndlessRewardEnv)
    try:
        cfg = compose_config(f"algo={algo}", "env.id=ppo-test/EndlessNoLimit-v0", "env.vectorization=sync")
        with pytest.raises(UserError, match=rf"algo={algo} needs episodic envs; .* has no time limit"):
            train(cfg, tmp_path)
    finally:
        gym.registry.pop("ppo-test/EndlessNoLimit-v0")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


class PoisonedEnv(EndlessRewardEnv):
    """Reward 1 and observation 0, except that the env reset with seed 2 turns one of them NaN at
    its 150th step: a broken simulator in one of the vector env's copies."""

    field = "reward"

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            self.poisoned, self.steps = seed == 2, 0
        return super().reset(seed=seed)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps += 1
        if self.poisoned and self.steps == 150:
            if self.field == "reward":
                reward = float("nan")
            else:
                obs = np.full(1, np.inf, dtype=np.float32)
        return obs, reward, terminated, truncated, info


class PoisonedObservationEnv(PoisonedEnv):
    field = "observation"


gym.register("ppo-test/PoisonedReward-v0", entry_point=PoisonedEnv)
gym.register("ppo-test/PoisonedObservation-v0", entry_point=PoisonedObservationEnv)


@pytest.mark.parametrize(("env_id", "field", "value"), [
    ("ppo-test/PoisonedReward-v0", "reward", "nan"),
    ("ppo-test/PoisonedObservation-v0", "observation", "[inf]"),
])  # fmt: skip
def test_non_finite_env_output_stops_the_run_and_keeps_the_last_checkpoint(
    env_id: str, field: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # 4 envs x 64 steps per iteration: each env takes its 150th step in iteration 3.
    overrides = [f"env.id={env_id}", "env.vectorization=sync", "env.num_envs=4", "env.num_steps=64",
                 "algo.num_minibatches=4", "total_timesteps=2048", "checkpoint.interval=1"]  # fmt: skip
    argv = ["ppo-train", *overrides, f"hydra.run.dir={tmp_path}"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert code == 3
    last = tmp_path / "checkpoints" / "last.pt"
    assert line == (
        f"ppo-train: error: iteration 3: env 2 returned a non-finite {field}: {value}; training stopped "
        f"before the optimizer step, last good checkpoint: {last}"
    )
    assert load_checkpoint(last)["global_step"] == 512  # iteration 2's, untouched
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "iteration 3: env 2" in summary["error"]


TINY = ["env.num_envs=2", "env.num_steps=16", "algo.num_minibatches=2", "total_timesteps=256",
        "eval.episodes=0", "progress=false"]  # fmt: skip


def _env_failure(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of a ppo-train run that an env ends."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.train_main()
    assert isinstance(exit_info.value.code, int)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.slow
def test_an_env_that_raises_leads_with_one_line_then_its_own_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each of the 2 envs fails at its 50th step (faulty_envs.FAILING_STEP): in iteration 4 of 16 steps.
    argv = ["ppo-train", "env.id=faulty_envs:Exploding-v0", "env.vectorization=sync", *TINY,
            "checkpoint.interval=2", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    code, lines = _env_failure(argv, monkeypatch, capsys)
    last = tmp_path / "checkpoints" / "last.pt"
    assert code == 1
    assert lines[0] == (
        "ppo-train: error: iteration 4: env Exploding-v0 raised in step (RuntimeError: the simulator "
        f"exploded); last good checkpoint: {last}"
    )
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: the simulator exploded"
    traceback = "\n".join(lines[1:])
    assert 'faulty_envs.py", line' in traceback  # the env's own code
    assert f"{os.sep}ppo_cli{os.sep}" not in traceback  # not ours
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and lines[0].removeprefix("ppo-train: error: ") in summary["error"]

    # Resumed, the run fails again (its envs restart): the checkpoint it resumed from is the last good one.
    code, lines = _env_failure([*argv, "resume=auto"], monkeypatch, capsys)
    assert code == 1
    assert lines[0].startswith("ppo-train: error: iteration 6: env Exploding-v0 raised in step")
    assert lines[0].endswith(f"; last good checkpoint: {last}")


def test_an_env_that_raises_in_reset_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ppo-train", "env.id=faulty_envs:Unstartable-v0", *TINY, f"hydra.run.dir={tmp_path}"]
    code, lines = _env_failure(argv, monkeypatch, capsys)
    assert code == 1
    assert lines[0] == (
        "ppo-train: error: env Unstartable-v0 raised in reset (RuntimeError: the simulator would not start)"
    )
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: the simulator would not start"


def test_an_env_whose_observations_change_shape_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ppo-train", "env.id=faulty_envs:Growing-v0", *TINY, f"hydra.run.dir={tmp_path}"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert (code, line) == (
        1,
        "ppo-train: error: iteration 4: env Growing-v0 returned an observation of shape (5,) in step; "
        "its observation space has shape (4,); last good checkpoint: none written yet",
    )


@pytest.mark.slow
def test_hparams_are_written_into_the_run_itself(
    small_cartpole_run: Callable[..., tuple[Path, dict]],
) -> None:
    run_dir, _ = small_cartpole_run(2)
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["checkpoints"]  # no stray runs
    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    assert set(content) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["eval/episodic_return", "charts/episodic_return"]
    # What tells runs apart comes first: the dashboard shows only the first few columns at once.
    assert [h.name for h in experiment.hparam_infos][:3] == ["env.id", "algo.name", "seed"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["algo.name"].string_value == "clip"
    assert hparams["seed"].number_value == 2
    assert hparams["algo.clip_eps"].number_value == pytest.approx(0.2)
    assert hparams["agent.actor_hidden"].string_value == "[64, 64]"
    assert not any(key.startswith(("checkpoint.", "progress", "resume")) for key in hparams)
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == api_pb2.Status.Value("STATUS_SUCCESS")
