"""init_from=: a new run starts from a trained agent (weights, normalisation statistics) with a fresh
optimizer, step count and random state; a source that does not fit is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from support import compose_config, one_line_failure

from ppo_cli import checkpoint as ckpt
from ppo_cli import cli
from ppo_cli.distributed import SINGLE_PROCESS
from ppo_cli.init_from import starting_point
from ppo_cli.iteration import build_state, training_envs
from ppo_cli.policy import TrainedAgent, load_agent
from ppo_cli.resume import config_changes
from ppo_cli.train import train

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_init_from")

TINY = [
    "env=CartPole",
    "env.num_envs=2",
    "env.num_steps=16",
    "algo.num_minibatches=2",
    "total_timesteps=64",
    "eval.episodes=1",
    "env.normalize_obs=true",
    "env.normalize_reward=true",
]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained CartPole agent with observation and reward statistics (tests copy it to change it)."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    train(compose_config(*TINY), run_dir)
    return run_dir


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_a_new_run_starts_from_the_agent_with_fresh_training_state(source_run: Path) -> None:
    """The same weights and statistics (the observation statistics with this run's first
    observations folded in, as every run does when its envs reset), so the same actions; but no
    optimizer moments, step 0, and the envs' running returns at zero."""
    cfg = compose_config(*TINY, f"init_from={source_run}", "seed=7")
    payload = ckpt.load_checkpoint(source_run)
    with training_envs(cfg) as envs:
        state = build_state(cfg, envs, torch.device("cpu"), SINGLE_PROCESS, starting_point(cfg.init_from))
    obs = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    trained, started = load_agent(source_run), TrainedAgent(state.agent, (4,), {}, 0)
    assert np.array_equal(started.act(obs), trained.act(obs))
    loaded = state.agent.state_dict()
    statistics = {name for name in payload["agent"] if name.startswith("obs_normalizer.")}
    assert len(statistics) == 3
    for name in payload["agent"].keys() - statistics:
        assert torch.equal(loaded[name], payload["agent"][name]), name
    reset_observations = cfg.env.num_envs
    assert (
        loaded["obs_normalizer.stats.count"]
        == payload["agent"]["obs_normalizer.stats.count"] + reset_observations
    )
    assert state.reward_scaler is not None
    for name in ("mean", "var", "count"):
        assert torch.equal(
            getattr(state.reward_scaler.stats, name), payload["reward_scaler"][f"stats.{name}"]
        )
    assert payload["reward_scaler"]["returns"].abs().sum() > 0  # the source's envs were mid-episode
    assert not state.reward_scaler.returns.any()
    assert state.optimizer.state_dict()["state"] == {}
    assert (state.global_step, state.iteration, state.best_eval) == (0, 0, None)


def test_the_updater_s_reference_policy_is_the_loaded_agent(source_run: Path) -> None:
    """The weights are loaded before the updater is built: GRPO's frozen reference is the
    trained agent, not the random initialisation. (From best.pt: a file, the agent alone.)"""
    best = source_run / "checkpoints" / "best.pt"
    cfg = compose_config(*TINY[:-1], "algo=grpo", "algo.group_size=2", f"init_from={best}")
    with training_envs(cfg) as envs:
        state = build_state(cfg, envs, torch.device("cpu"), SINGLE_PROCESS, starting_point(cfg.init_from))
    loaded = ckpt.load_checkpoint(best)["agent"]
    reference = state.updater.reference.frozen.state_dict()  # type: ignore[attr-defined]
    assert all(torch.equal(reference[name], tensor) for name, tensor in loaded.items())


def test_a_run_started_from_an_agent_resumes_without_it(source_run: Path, tmp_path: Path) -> None:
    """Its checkpoints hold the loaded weights: resuming never reads init_from again, so the
    source may be gone. The new run counts its own steps from 0."""
    source = tmp_path / "source"
    shutil.copytree(source_run, source)
    run_dir = tmp_path / "finetuned"
    summary = train(compose_config(*TINY, f"init_from={source}"), run_dir)
    assert summary["global_step"] == 64 and summary["config"]["init_from"] == str(source)
    shutil.rmtree(source)
    resumed = train(
        compose_config(*TINY, f"init_from={source}", "resume=auto", "total_timesteps=128"), run_dir
    )
    assert resumed["resumed_from"]["global_step"] == 64
    assert resumed["global_step"] == 128


def test_init_from_may_not_change_on_resume() -> None:
    """It shapes what is learned: a resume that names another source is a change of config."""
    current = OmegaConf.to_container(OmegaConf.structured(compose_config(*TINY, "init_from=runs/b")))
    assert isinstance(current, dict)
    saved = {**current, "init_from": None}
    assert config_changes(saved, current) == ["init_from: None -> runs/b"]


class _WritesMarker:
    """A pickle payload: unpickling it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.mark.slow
def test_each_source_that_does_not_fit_is_one_line(
    source_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2, one line naming init_from and what to do; nothing read from the source runs, the
    source is left as it was, and the new run writes no checkpoint."""
    last = source_run / "checkpoints" / "last.pt"
    not_a_checkpoint = tmp_path / "truncated.pt"  # a download cut short
    not_a_checkpoint.write_bytes(last.read_bytes()[:1000])
    marker = tmp_path / "PWNED"
    pickled = tmp_path / "pickled.pt"
    torch.save(_WritesMarker(marker), pickled)
    nope, unreadable = tmp_path / "nope", "not a readable ppo-cli checkpoint"
    spaces = "{'observation_shape': [%d], 'action': {'type': 'discrete', 'n': %d}}"
    cases = [
        ([f"init_from={nope}"], f"{nope}: no such checkpoint (give a run directory or a .pt file)"),
        (
            [f"init_from={not_a_checkpoint}"],
            f"{not_a_checkpoint}: {unreadable}: truncated or not a checkpoint file",
        ),
        ([f"init_from={pickled}"], f"{pickled}: {unreadable}: it holds pickled Python objects"),
        (
            [f"init_from={source_run}", "env=Acrobot"],
            f"{last}: its agent was trained on spaces {spaces % (4, 2)}, env.id=Acrobot-v1 has "
            f"{spaces % (6, 3)}; start from a run of this env",
        ),
        (
            [f"init_from={source_run}", "agent.actor_hidden=[32]", "env.normalize_obs=false"],
            f"{last}: its network differs from this run's (agent.actor_hidden: [64, 64] -> [32]; "
            "env.normalize_obs: True -> False); set these keys as that run had them",
        ),
    ]
    before = _snapshot(source_run)
    for number, (overrides, expected) in enumerate(cases):
        run_dir = tmp_path / f"run{number}"
        argv = ["ppo-train", *TINY[:-2], *overrides, f"hydra.run.dir={run_dir}"]
        code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
        assert code == 2
        assert line.startswith(f"ppo-train: error: init_from: {expected}"), line
        assert not (run_dir / "checkpoints").exists()
        # A new run refused: recorded as failed, as for any bad value (test_cli's algo.gamma=1.5).
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and "init_from: " in summary["error"]
    assert not marker.exists()
    assert _snapshot(source_run) == before
