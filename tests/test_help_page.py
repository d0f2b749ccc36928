"""ppo-train's questions (--help, --cfg, --info, completion) answered at once, without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import one_line_failure, ppo_train

from ppo_cli import cli

# Runs ppo-train's console entry point with the arguments that follow, then (in the trainer
# process, the one that answers: launch.py forks a supervisor first) says what was imported.
ENTRY_POINT = (
    "import sys; from ppo_cli.launch import train_main; train_main(); "
    "print('imported:', {m for m in ('torch', 'gymnasium') if m in sys.modules})"
)


@pytest.mark.parametrize(
    ("args", "comp_line", "answer"),
    [
        (["--help"], None, "Groups (the default in brackets):"),
        (["env=Pendulum", "--cfg", "job"], None, "id: Pendulum-v1"),
        (["--info", "defaults"], None, "Defaults List"),
        (["-sc", "query=bash"], "ppo-train env=P", "env=Pendulum env=Pong"),
    ],
)
def test_questions_are_answered_without_importing_torch(
    args: list[str], comp_line: str | None, answer: str, tmp_path: Path
) -> None:
    env = {} if comp_line is None else {"COMP_LINE": comp_line, "COMP_POINT": str(len(comp_line))}
    result = subprocess.run(
        [sys.executable, "-c", ENTRY_POINT, *args],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert answer in result.stdout
    assert "imported: set()" in result.stdout


def test_help_lists_the_groups_a_user_picks_keys_and_examples(tmp_path: Path) -> None:
    result = ppo_train("--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    page = result.stdout
    assert page.startswith("ppo-train: train an agent")
    assert "a2c, [clip], grpo, penalty, pg, trpo" in page  # every algo preset, the default marked
    assert "hparams_search: " in page and "CartPole_clip" in page
    assert "algo.learning_rate=X" in page and "resume=<run dir>|auto" in page
    assert "ppo-train -m algo=clip,penalty" in page and "torchrun " in page
    # Internal groups are not offered, and there is no config dump.
    assert "schemas/" not in page and "tuned:" not in page and "clip_eps: 0.2" not in page


def test_a_bare_shell_completion_says_what_to_add_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = one_line_failure(cli.train_main, ["ppo-train", "--shell-completion"], monkeypatch, capsys)
    assert code == 2
    assert line.startswith("ppo-train: error: --shell-completion: add one of install=bash")
    assert 'eval "$(ppo-train -sc install=bash)"' in line


def test_completion_offers_the_groups_a_user_picks_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COMP_LINE", "ppo-train ")
    monkeypatch.setenv("COMP_POINT", "10")
    monkeypatch.setattr(sys, "argv", ["ppo-train", "-sc", "query=bash"])
    cli.train_main()
    offered = capsys.readouterr().out.split()
    assert {"algo=", "agent=", "env=", "hparams_search=", "seed=", "total_timesteps="} <= set(offered)
    assert "tuned=" not in offered and not [word for word in offered if word.startswith("schemas/")]
