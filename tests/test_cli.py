"""ppo-train and ppo-eval as a user runs them: subprocesses, from any directory."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
import tty
import zipfile
from pathlib import Path

import gymnasium as gym
import imageio_ffmpeg
import pytest
import torch
from support import console_script, one_line_failure, ppo_train, run

from ppo_cli import checkpoint as ckpt
from ppo_cli import cli, load_agent
from ppo_cli.config import EnvConfig
from ppo_cli.errors import UserError
from ppo_cli.evaluate import evaluate, evaluate_checkpoint

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_cli")

REPO = Path(__file__).resolve().parents[1]


def only_run_dir(cwd: Path) -> Path:
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The README's first command, run once from an empty directory: (its result, its run dir)."""
    cwd = tmp_path_factory.mktemp("readme")
    result = ppo_train("env=CartPole", "algo=clip", cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result, only_run_dir(cwd)


@pytest.mark.slow
def test_default_cartpole_solves_from_any_directory(
    cartpole_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """The default CartPole preset reaches an evaluation mean >= 475."""
    result, run_dir = cartpole_run
    assert run_dir.name.startswith("CartPole-v1__clip__s0__")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["eval_mean"] >= 475, summary
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "evaluation: " in result.stdout
    # The saved agent plays as well as the run's own evaluation said.
    env = gym.make("CartPole-v1")
    agent = load_agent(run_dir)
    obs, _ = env.reset(seed=123)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(int(agent.act(obs)))
        total += float(reward)
        done = terminated or truncated
    assert total >= 400


@pytest.mark.slow
def test_ppo_eval_scores_the_run_and_records_playable_videos(
    cartpole_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run_dir = cartpole_run
    result = run([console_script("ppo-eval"), str(run_dir), "--episodes", "2", "--video"], cwd=run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["episodes"] == 2 and report["deterministic"] is True
    assert report["mean"] >= 475, report
    assert f"mean {report['mean']:.2f}" in result.stdout
    assert len(report["returns"]) == len(report["lengths"]) == 2
    assert report["min"] <= report["mean"] <= report["max"]
    videos = [Path(v) for v in report["videos"]]
    assert len(videos) == 2
    for video, length in zip(videos, report["lengths"], strict=True):
        assert video.parent.parent == run_dir / "videos"
        assert video.stat().st_size > 10_000
        # A frame per step plus the first observation's (the encoder may drop the last), at 50 fps.
        frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(video))
        assert length <= frames <= length + 1
        assert seconds == pytest.approx(frames / 50, abs=0.05)


@pytest.mark.slow
def test_ppo_eval_replays_the_run_evaluation_by_default(
    cartpole_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """Without --seed, ppo-eval replays the seeds of the run's own final evaluation."""
    _, run_dir = cartpole_run
    summary = json.loads((run_dir / "summary.json").read_text())
    report = evaluate_checkpoint(run_dir, episodes=10, deterministic=True)
    assert report["seed"] == summary["config"]["seed"] + 10_000
    assert report["mean"] == pytest.approx(summary["eval_mean"])
    assert report["std"] == pytest.approx(summary["eval_std"])
    last = run_dir / "checkpoints" / "last.pt"
    stochastic = evaluate_checkpoint(last, episodes=4, deterministic=False, seed=7)
    assert stochastic["deterministic"] is False and stochastic["seed"] == 7
    assert len(stochastic["returns"]) == 4


def on_a_terminal(command: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Run ``command`` with stdout and stderr on one pseudo-terminal, as in a user's shell (raw
    mode: what the program writes, unchanged); (exit code, everything it wrote there)."""
    controller, terminal = pty.openpty()
    tty.setraw(terminal)
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 0 x 0 otherwise
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=terminal, stderr=terminal) as process:
        os.close(terminal)
        output = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # read as it comes: a full terminal would block it
            try:
                chunk = os.read(controller, 65536) if select.select([controller], [], [], 1)[0] else b""
            except OSError:  # the terminal closed: the process is gone
                break
            output += chunk
            if not chunk and process.poll() is not None:
                break
        process.kill()
        code = process.wait(timeout=10)
    os.close(controller)
    return code, output.decode(errors="replace")


@pytest.mark.parametrize("progress", ["true", "false"])
@pytest.mark.slow
def test_progress_reaches_train_log_and_the_bar_ends_at_the_budget(progress: str, tmp_path: Path) -> None:
    """Every 5% a line in train.log, bar or not; the bar ends full (3 iterations of 32 steps
    overshoot the 80 asked for: its total becomes 96), and no log line is written onto it."""
    run_dir = tmp_path / "run"
    code, terminal = on_a_terminal(
        [console_script("ppo-train"), "env.num_envs=2", "env.num_steps=16", "total_timesteps=80",
         "eval.episodes=0", f"progress={progress}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, terminal[-2000:]
    log_lines = re.findall(r"step (\d+)/(\d+)  SPS", (run_dir / "train.log").read_text())
    assert log_lines == [("32", "80"), ("64", "80"), ("96", "96")]
    bars = re.findall(r"([\d.]+)/([\d.]+) \[", terminal)  # every state the bar was drawn in
    if progress == "false":
        assert bars == []
        return
    assert [float(n) for n in bars[-1]] == [96, 96]
    for line in terminal.split("\n"):
        shown = line.rstrip("\r").rsplit("\r", 1)[-1]  # what stays visible of a redrawn line
        assert not ("%|" in shown and "[ppo_cli" in shown), line


@pytest.mark.slow
def test_short_continuous_run(tmp_path: Path) -> None:
    result = ppo_train(
        "env=Pendulum", "total_timesteps=8192", "algo.num_minibatches=16", "eval.episodes=2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["global_step"] == 8192
    assert summary["eval_episodes"] == 2
    assert -2000 < summary["eval_mean"] <= 0  # Pendulum's rewards are never positive


# Not slow: the one quick test of the whole console path (launch.py, the supervisor and its trainer).
def test_bad_input_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = ppo_train("algo.gamma=1.5", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "ppo-train: error: algo.gamma: got 1.5, allowed: a number in (0, 1]"
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "algo.gamma" in summary["error"]


@pytest.mark.slow
def test_user_config_dir_adds_presets(tmp_path: Path) -> None:
    user_configs = tmp_path / "my_configs" / "env"
    user_configs.mkdir(parents=True)
    (user_configs / "TinyCart.yaml").write_text(
        "# @package _global_\nenv:\n  id: CartPole-v1\n  num_envs: 2\n  num_steps: 64\n"
        "total_timesteps: 512\nalgo:\n  num_minibatches: 2\n"
    )
    result = ppo_train(
        "--config-dir", str(tmp_path / "my_configs"), "env=TinyCart", "eval.episodes=1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["global_step"] == 512
    assert summary["config"]["env"]["num_envs"] == 2


def test_yaml_syntax_error_in_a_config_dir_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The line names the file, the line and column (counted from 1) and the parser's problem."""
    preset = tmp_path / "my_configs" / "env" / "Broken.yaml"
    preset.parent.mkdir(parents=True)
    preset.write_text("env:\n  id: CartPole-v1\n  num_envs: [2\n")
    run_dir = tmp_path / "run"
    argv = ["ppo-train", "--config-dir", str(preset.parent.parent), "env=Broken", f"hydra.run.dir={run_dir}"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert (code, line) == (
        2,
        f"ppo-train: error: {preset}: YAML syntax error at line 4, column 1: expected ',' or ']', but got "
        "'<stream end>' (while parsing a flow sequence started at line 3, column 13)",
    )
    assert not run_dir.exists()


HIDDEN_CONFIGS = [
    (
        "train.yaml",
        "never read, ppo-train's own train.yaml comes first; name yours otherwise and pass "
        "--config-name <that name> (begin it with 'defaults: [train, _self_]' to build on ppo-train's)",
    ),
    (
        "env/CartPole.yaml",
        "never read, ppo-train's own env/CartPole.yaml comes first; rename yours "
        "(e.g. env/my_CartPole.yaml) and select it with env=my_CartPole",
    ),
]


@pytest.mark.parametrize(("name", "expected"), HIDDEN_CONFIGS, ids=[name for name, _ in HIDDEN_CONFIGS])
def test_a_config_dir_file_hidden_by_ours_is_refused(
    name: str,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Hydra reads ppo-cli's own configs before a --config-dir's: a file of the same name there
    would be silently ignored, so the run is refused before anything is written."""
    hidden = tmp_path / "my_configs" / name
    hidden.parent.mkdir(parents=True)
    hidden.write_text("seed: 7\n")
    run_dir = tmp_path / "run"
    argv = ["ppo-train", "--config-dir", str(tmp_path / "my_configs"), f"hydra.run.dir={run_dir}"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert (code, line) == (2, f"ppo-train: error: {hidden}: {expected}")
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_config_dir_may_copy_ours_and_add_a_root_config(tmp_path: Path) -> None:
    """Identical copies hide nothing; the advice for a train.yaml of one's own works."""
    user_configs = tmp_path / "my_configs"
    shutil.copytree(cli.find_config_dir(), user_configs)
    (user_configs / "mine.yaml").write_text(
        "defaults: [train, _self_]\nseed: 7\ntotal_timesteps: 64\nenv:\n  num_envs: 2\n  num_steps: 16\n"
        "eval:\n  episodes: 1\n"
    )
    result = ppo_train("--config-dir", str(user_configs), "--config-name", "mine", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert (summary["config"]["seed"], summary["global_step"]) == (7, 64)


@pytest.mark.slow
def test_multirun_writes_one_dir_per_job(tmp_path: Path) -> None:
    result = ppo_train("-m", "seed=0,1", "total_timesteps=512", "eval.episodes=1", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep_dir,) = (tmp_path / "runs" / "multirun").iterdir()
    job_dirs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    # Each job's directory is named by its overrides (hydra.job.override_dirname).
    assert job_dirs == [f"eval.episodes=1,seed={s},total_timesteps=512" for s in (0, 1)]
    for seed, job in enumerate(job_dirs):
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["config"]["seed"] == seed


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the sources")
@pytest.mark.slow
def test_wheel_ships_configs_inside_the_package(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("ppo_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ppo_cli/configs/train.yaml" in names
    assert "ppo_cli/configs/env/HalfCheetah.yaml" in names
    assert "ppo_cli/configs/algo/clip.yaml" in names
    assert not any(name.startswith("configs/") for name in names)


class _Sentinel:
    """Unpickling this would run ``touch``: a stand-in for any code hidden in a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch '{self.path}'",))


def _custom_env_checkpoint(path: Path, source: Path) -> None:
    payload = torch.load(source, weights_only=True)
    payload["config"]["env"]["id"] = "my_envs.package:Custom-v0"
    torch.save(payload, path)


EVAL_BAD_INPUTS = [
    (["DIR/nope"], "DIR/nope: no such checkpoint (give a run directory or a .pt file)"),
    (["RUN", "--episodes", "0"], "--episodes: got 0, allowed: an integer >= 1"),
    (["RUN", "--video-episodes", "0"], "--video-episodes: got 0, allowed: an integer >= 1"),
    (["DIR/evil.pt"], "DIR/evil.pt: not a readable ppo-cli checkpoint"),
    (["DIR/custom.pt"], "env.id: 'my_envs.package:Custom-v0' needs module 'my_envs.package' imported"),
    (["DIR/custom.pt", "--import", "my_envs.package"], "--import: cannot import 'my_envs.package'"),
]


@pytest.mark.parametrize(("args", "expected"), EVAL_BAD_INPUTS, ids=[" ".join(a) for a, _ in EVAL_BAD_INPUTS])
@pytest.mark.slow
def test_ppo_eval_bad_input_is_one_line_and_runs_nothing(
    args: list[str],
    expected: str,
    cartpole_run: tuple[subprocess.CompletedProcess[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, run_dir = cartpole_run
    sentinel = tmp_path / "pwned"
    torch.save({"format_version": ckpt.FORMAT_VERSION, "agent": _Sentinel(sentinel)}, tmp_path / "evil.pt")
    _custom_env_checkpoint(tmp_path / "custom.pt", run_dir / "checkpoints" / "last.pt")
    argv = [arg.replace("DIR", str(tmp_path)).replace("RUN", str(run_dir)) for arg in args]
    code, line = one_line_failure(cli.eval_main, ["ppo-eval", *argv], monkeypatch, capsys)
    assert code == 2
    assert line.startswith("ppo-eval: error: ")
    assert expected.replace("DIR", str(tmp_path)) in line
    assert not sentinel.exists()


@pytest.mark.slow
def test_evaluating_on_an_env_the_agent_cannot_read_is_one_line(
    cartpole_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    trained = load_agent(cartpole_run[1])
    acrobot = EnvConfig(id="Acrobot-v1", num_envs=1, num_steps=1)
    with pytest.raises(
        UserError, match=r"env.id: Acrobot-v1 observes shape \(6,\); the agent takes 4 values"
    ):
        evaluate(trained.network, acrobot, 1, True, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-iteration CartPole run with last.pt and periodic checkpoints at steps 32 and 64."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    result = ppo_train(
        "env.num_envs=2", "env.num_steps=16", "total_timesteps=64", "eval.episodes=1",
        "checkpoint.interval=1", f"hydra.run.dir={run_dir}", cwd=run_dir.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_ppo_eval_records_the_first_video_episodes_and_prints_no_display_errors(
    tiny_run: Path, tmp_path: Path
) -> None:
    """``--video-episodes 2`` (which implies --video) records 2 of the 3 episodes it scores; on a
    headless machine (no DISPLAY, no XDG_RUNTIME_DIR) SDL, under pygame's renderers, prints no
    "XDG_RUNTIME_DIR is invalid" line (nor ALSA's): stderr stays empty."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    unset = {"DISPLAY", "WAYLAND_DISPLAY", "XDG_RUNTIME_DIR", "SDL_VIDEODRIVER", "SDL_AUDIODRIVER"}
    headless = {key: value for key, value in os.environ.items() if key not in unset}
    result = subprocess.run(
        [console_script("ppo-eval"), str(run_dir), "--episodes", "3", "--video-episodes", "2"],
        cwd=tmp_path, env=headless, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["episodes"] == len(report["returns"]) == 3
    assert [Path(video).name for video in report["videos"]] == ["eval-episode-0.mp4", "eval-episode-1.mp4"]


@pytest.mark.slow
def test_ppo_eval_falls_back_to_the_newest_readable_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    """As resume does: each unreadable checkpoint is named with its reason (no advice to load it
    unsafely), then the one evaluated instead; nothing in the malicious one runs."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    sentinel = tmp_path / "pwned"
    torch.save({"format_version": ckpt.FORMAT_VERSION, "agent": _Sentinel(sentinel)}, checkpoints / "last.pt")
    step_64 = checkpoints / "step_0000000064.pt"
    step_64.write_bytes(step_64.read_bytes()[:1000])
    result = run([console_script("ppo-eval"), str(run_dir), "--episodes", "1"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not sentinel.exists()
    skipped_last, skipped_64, used = result.stderr.strip().splitlines()
    assert skipped_last == (
        f"ppo-eval: skipping {checkpoints / 'last.pt'}: not a readable ppo-cli checkpoint: it holds pickled "
        "Python objects (GLOBAL posix.system), which ppo-cli checkpoints never contain; not loaded"
    )
    assert skipped_64 == (
        f"ppo-eval: skipping {step_64}: not a readable ppo-cli checkpoint: truncated or not a checkpoint "
        "file (failed finding central directory)"
    )
    assert "weights_only" not in result.stderr and "If you are seeing this error" not in result.stderr
    step_32 = checkpoints / "step_0000000032.pt"
    assert used == f"ppo-eval: evaluating {step_32} instead, the newest readable checkpoint"
    assert result.stdout.startswith(f"CartPole-v1 at step 32 ({step_32})\n")
    assert json.loads((run_dir / "eval.json").read_text())["checkpoint"] == str(step_32)


@pytest.mark.slow
def test_ppo_eval_shows_the_score_when_eval_json_cannot_be_written(tiny_run: Path, tmp_path: Path) -> None:
    """The score is printed before eval.json is written; then one line names the file, exit 2.
    (eval.json is made a directory: unlike a read-only run dir, that stops root as well.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "eval.json").mkdir()
    result = run([console_script("ppo-eval"), str(run_dir), "--episodes", "1"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"ppo-eval: error: {run_dir / 'eval.json'}: cannot write (Is a directory)"
    header, score = result.stdout.strip().splitlines()
    assert header == f"CartPole-v1 at step 64 ({run_dir / 'checkpoints' / 'last.pt'})"
    assert score.startswith("1 deterministic episodes: mean ")
