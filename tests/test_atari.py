"""Atari through ale-py: the preprocessing, whole games reported, and a smoke run of the CLI."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
from support import compose_config, console_script, ppo_train, run

from ppo_cli.atari import EpisodicLife, FireReset
from ppo_cli.distributed import SINGLE_PROCESS
from ppo_cli.envs import make_vector_env
from ppo_cli.iteration import build_state

BREAKOUT = ["env=Breakout", "env.num_envs=2", "env.num_steps=128"]


def test_training_envs_end_episodes_at_lost_lives_but_play_on_and_report_whole_games() -> None:
    """Breakout has 5 lives: in training each lost life terminates an episode for the learner,
    the reset after it continues the same game, and the collector reports whole games (raw
    returns), not lives."""
    cfg = compose_config(*BREAKOUT, "env.num_steps=400", "algo.num_minibatches=1")
    with closing(make_vector_env(cfg.env, training=True)) as envs:
        assert envs.single_observation_space.shape == (4, 84, 84)
        assert envs.single_observation_space.dtype == np.uint8
        state = build_state(cfg, envs, torch.device("cpu"), SINGLE_PROCESS)
        rollout = state.collector.collect()
        chain = _wrappers(envs.envs[0])
    assert any(isinstance(w, EpisodicLife) for w in chain) and any(isinstance(w, FireReset) for w in chain)
    lives_lost = int(state.collector.storage.terminated.sum())
    assert len(rollout.episodes.returns) >= 1  # a random Breakout game lasts about 200 steps
    assert lives_lost >= 5 * len(rollout.episodes.returns)  # each finished game ended 5 lives
    assert min(rollout.episodes.lengths) > 50  # whole games: a single life is far shorter
    assert all(float(r).is_integer() and r >= 0 for r in rollout.episodes.returns)


def _wrappers(env: object) -> list[object]:
    chain = [env]
    while hasattr(chain[-1], "env"):
        chain.append(chain[-1].env)  # type: ignore[attr-defined]
    return chain


def test_evaluation_envs_play_whole_games_with_raw_rewards() -> None:
    cfg = compose_config("env=Breakout")
    with closing(make_vector_env(cfg.env, num_envs=1)) as envs:
        chain = _wrappers(envs.envs[0])
    names = {type(w).__name__ for w in chain}
    assert "EpisodicLife" not in names and "ClipReward" not in names
    assert {"AtariPreprocessing", "FireReset", "FrameStackObservation"} <= names


@pytest.mark.slow
def test_atari_smoke_run_through_the_cli(tmp_path: Path) -> None:
    """A few thousand frames of Breakout with the preset (2 envs), then ppo-eval on the run."""
    run_dir = tmp_path / "run"
    args = [*BREAKOUT, "total_timesteps=768", "eval.episodes=1", f"hydra.run.dir={run_dir}"]
    result = ppo_train(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 768
    assert summary["eval_episodes"] == 1 and float(summary["eval_mean"]).is_integer()  # a game's points
    evaluated = run([console_script("ppo-eval"), str(run_dir), "--episodes", "1"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["episodes"] == 1 and report["deterministic"] is False  # as the preset evaluates
    assert len(report["lengths"]) == 1 and report["lengths"][0] > 50  # a whole game: one life is far shorter
