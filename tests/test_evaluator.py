"""Evaluations during training: the eval curve, best.pt, and training that they leave alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import compose_config, one_line_failure, ppo_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppo_cli import checkpoint as ckpt
from ppo_cli import cli, load_agent
from ppo_cli.errors import UserError
from ppo_cli.train import train

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_evaluator")

STEPS_PER_ITERATION = 32  # 2 envs x 16 steps
ITERATIONS = 7
TINY = [
    "env=CartPole",
    "env.num_envs=2",
    "env.num_steps=16",
    f"total_timesteps={ITERATIONS * STEPS_PER_ITERATION}",
    "eval.episodes=3",
]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 iterations evaluated every 2 (and at the end); a checkpoint every iteration, one kept."""
    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    overrides = [*TINY, "eval.interval=2", "checkpoint.interval=1", "checkpoint.keep=1"]
    result = ppo_train(*overrides, f"hydra.run.dir={run_dir}", cwd=run_dir.parent, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_the_eval_curve_has_a_point_per_interval_and_best_pt_holds_its_best(evaluated_run: Path) -> None:
    tags = _scalars(evaluated_run)
    # Iterations 2, 4 and 6, then the final evaluation at the last step.
    expected_steps = [2 * STEPS_PER_ITERATION, 4 * STEPS_PER_ITERATION, 6 * STEPS_PER_ITERATION, 224]
    points = tags["eval/episodic_return"]
    assert [step for step, _ in points] == expected_steps
    assert [step for step, _ in tags["eval/episodic_return_std"]] == expected_steps
    summary = json.loads((evaluated_run / "summary.json").read_text())
    assert summary["eval_mean"] == pytest.approx(points[-1][1])  # the final evaluation, as before

    best_step, best_mean = max(points, key=lambda point: point[1])  # the first of equal bests
    best = ckpt.load_checkpoint(evaluated_run / "checkpoints" / "best.pt")
    assert best["global_step"] == best_step == summary["best_eval"]["global_step"]
    assert best["best_eval"]["eval_mean"] == pytest.approx(best_mean)
    assert best["best_eval"]["eval_episodes"] == 3
    assert "optimizer" not in best and "rng" not in best  # an agent to evaluate, not a run to resume
    # Kept beside one periodic checkpoint; never taken for one by resume or ppo-eval's fallback.
    checkpoints = evaluated_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt", "step_0000000224.pt"]
    found = ckpt.newest_valid_checkpoint(checkpoints)
    assert found is not None and found[0].name == "last.pt"


@pytest.mark.slow
def test_best_pt_loads_and_replays_its_score(
    evaluated_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    best = ckpt.load_checkpoint(evaluated_run / "checkpoints" / "best.pt")
    agent = load_agent(evaluated_run, checkpoint="best")
    assert agent.global_step == best["global_step"]
    for name, tensor in agent.network.state_dict().items():
        assert torch.equal(tensor, best["agent"][name]), name
    assert load_agent(evaluated_run).global_step == ITERATIONS * STEPS_PER_ITERATION  # last, by default

    # ppo-eval with the run's own seed and episode count scores it exactly as training did.
    monkeypatch.setattr(
        "sys.argv", ["ppo-eval", str(evaluated_run), "--checkpoint", "best", "--episodes", "3"]
    )
    cli.eval_main()
    out = capsys.readouterr().out
    assert out.startswith(
        f"CartPole-v1 at step {best['global_step']} ({evaluated_run / 'checkpoints' / 'best.pt'})"
    )
    assert f"mean {best['best_eval']['eval_mean']:.2f}  std {best['best_eval']['eval_std']:.2f}" in out


def test_a_run_without_best_pt_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "checkpoints").mkdir()
    code, line = one_line_failure(
        cli.eval_main, ["ppo-eval", str(tmp_path), "--checkpoint", "best"], monkeypatch, capsys
    )
    best = tmp_path / "checkpoints" / "best.pt"
    assert code == 2
    assert line.startswith(
        f"ppo-eval: error: {best}: no best checkpoint yet (evaluations during training write it"
    )
    with pytest.raises(UserError, match="no best checkpoint yet"):
        load_agent(tmp_path, checkpoint="best")
    with pytest.raises(UserError, match=r"checkpoint: got 'newest', allowed: last\|best"):
        load_agent(tmp_path, checkpoint="newest")


@pytest.mark.slow
def test_resuming_from_best_pt_is_refused_in_one_line(
    evaluated_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    best = evaluated_run / "checkpoints" / "best.pt"
    code, line = one_line_failure(cli.train_main, ["ppo-train", f"resume={best}"], monkeypatch, capsys)
    assert code == 2
    assert line == (
        f"ppo-train: error: resume: {best} holds the agent only (a best.pt, for ppo-eval and load_agent), "
        f"not a training state; resume from the run directory: resume={evaluated_run}"
    )


@pytest.mark.slow
def test_training_is_the_same_with_and_without_evaluations_on_the_way(tmp_path: Path) -> None:
    """Evaluations sample their actions here (the draws a greedy one would not make), at every
    iteration: the run trains exactly as one that evaluates only at the end, and ends with the
    same final evaluation."""
    runs = {}
    for interval in (1, 0):
        cfg = compose_config(*TINY, "eval.deterministic=false", f"eval.interval={interval}")
        runs[interval] = (train(cfg, tmp_path / str(interval)), _scalars(tmp_path / str(interval)))
    (evaluating, evaluating_tags), (plain, plain_tags) = runs[1], runs[0]
    assert len(evaluating_tags["eval/episodic_return"]) == ITERATIONS
    assert len(plain_tags["eval/episodic_return"]) == 1
    training_tags = {tag for tag in plain_tags if tag != "charts/SPS" and not tag.startswith("eval/")}
    assert training_tags == {
        tag for tag in evaluating_tags if tag != "charts/SPS" and not tag.startswith("eval/")
    }
    for tag in training_tags:
        assert evaluating_tags[tag] == plain_tags[tag], tag
    last = [ckpt.load_checkpoint(tmp_path / name) for name in ("1", "0")]
    for name, tensor in last[0]["agent"].items():
        assert torch.equal(tensor, last[1]["agent"][name]), name
    assert torch.equal(last[0]["rng"]["torch"], last[1]["rng"]["torch"])
    assert evaluating_tags["eval/episodic_return"][-1] == plain_tags["eval/episodic_return"][-1]
    assert evaluating["eval_mean"] == plain["eval_mean"]
