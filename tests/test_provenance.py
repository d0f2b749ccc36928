"""What a run says it is: the preset line, the tuned-file warning, and summary.json's provenance."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from support import ppo_train

from ppo_cli import cli
from ppo_cli.provenance import git_state, log_presets

TINY = (
    "env.num_envs=2",
    "env.num_steps=16",
    "total_timesteps=64",
    "eval.episodes=1",
    "algo.num_minibatches=2",
)


def git(*args: str, cwd: Path) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git repository with one commit of one tracked file."""
    git("init", "-q", cwd=tmp_path)
    (tmp_path / "notes.txt").write_text("a\n")
    git("add", "notes.txt", cwd=tmp_path)
    git("commit", "-q", "-m", "first", cwd=tmp_path)
    return tmp_path


@pytest.mark.slow  # a CLI subprocess training
def test_a_run_logs_its_presets_warns_of_a_missing_tuned_file_and_records_provenance(checkout: Path) -> None:
    result = ppo_train("algo=penalty", "env=Pendulum", *TINY, cwd=checkout, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (checkout / "runs").iterdir()
    for text in (result.stdout, (run_dir / "train.log").read_text()):
        assert "presets: algo/penalty.yaml, agent/mlp.yaml, env/Pendulum.yaml, tracking/none.yaml\n" in text
        assert "no tuned/penalty_Pendulum.yaml: algo=penalty env=Pendulum" in text
        assert "tuned values for env=Pendulum exist with algo=clip" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["versions"]) == {"ppo-cli", "python", "torch", "gymnasium", "numpy", "hydra-core"}
    assert summary["git_commit"] == git("rev-parse", "HEAD", cwd=checkout).strip()
    assert summary["git_dirty"] is False  # runs/ is untracked
    assert summary["host"]
    assert summary["argv"][-len(TINY) - 2 :] == ["algo=penalty", "env=Pendulum", *TINY]
    assert summary["argv"][1].endswith("ppo-train")


def test_git_state_is_the_commit_and_dirtiness_inside_a_checkout_only(
    checkout: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = git("rev-parse", "HEAD", cwd=checkout).strip()
    assert git_state(checkout) == {"git_commit": head, "git_dirty": False}
    (checkout / "notes.txt").write_text("b\n")
    assert git_state(checkout) == {"git_commit": head, "git_dirty": True}
    outside = tmp_path_factory.mktemp("outside")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(outside.parent))  # whatever holds the temp dirs
    assert git_state(outside) == {}
    monkeypatch.setenv("PATH", str(outside))  # no git at all
    assert git_state(checkout) == {}


@pytest.mark.parametrize(
    ("overrides", "files", "warning"),
    [
        (
            ["env=Pendulum"],
            "algo/clip.yaml, agent/mlp.yaml, env/Pendulum.yaml, tuned/clip_Pendulum.yaml, tracking/none.yaml",
            None,
        ),
        (
            ["algo=trpo", "env=Acrobot"],
            "algo/trpo.yaml, agent/mlp.yaml, env/Acrobot.yaml, tracking/none.yaml",
            "no tuned/trpo_Acrobot.yaml",
        ),
        (
            ["env=CartPole", "~tuned"],
            "algo/clip.yaml, agent/mlp.yaml, env/CartPole.yaml, tracking/none.yaml",
            None,
        ),
    ],
)
def test_presets_line_names_the_composed_files(
    overrides: list[str], files: str, warning: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with initialize_config_dir(config_dir=cli.find_config_dir(), version_base="1.3"):
        hydra_cfg = compose("train", overrides=overrides, return_hydra_config=True).hydra
    with caplog.at_level(logging.INFO, logger="ppo_cli.provenance"):
        log_presets(hydra_cfg)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == f"presets: {files}"
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == ([] if warning is None else [warning])
