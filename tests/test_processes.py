"""The process tree of a run, as a user meets it: an env that hangs or crashes, a signal while
ppo-train starts, a reader that goes away. Each case ends in one line, the right exit code, and
no process left behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import console_script

from ppo_cli import checkpoint as ckpt

pytestmark = pytest.mark.slow  # every test here trains through the CLI

TESTS = Path(__file__).resolve().parent
# 2 envs x 16 steps = 32 steps an iteration; the faulty envs fail at their 50th step, i.e. in the
# 4th iteration, after the checkpoint of step 96.
FAULTY = ["env=CartPole", "env.num_envs=2", "env.num_steps=16", "total_timesteps=100000", "eval.episodes=1"]
LAST_GOOD_STEP = 96


STARTED: list[int] = []  # process groups a test started, killed after it whatever its outcome


@pytest.fixture(autouse=True)
def _kill_leftovers() -> Iterator[None]:
    yield
    while STARTED:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(STARTED.pop(), signal.SIGKILL)


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        [console_script("ppo-train"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job has
    )
    STARTED.append(process.pid)
    return process


def _wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    """The pids of ``pid``'s children and their children (pgrep: Linux and macOS)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10).stdout
    children = [int(line) for line in found.split()]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped counts as gone)."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
    return bool(state.stdout.strip()) and not state.stdout.strip().startswith("Z")


def _gone_within(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _hung_run(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """A run whose async env workers hang in their step, right after the checkpoint of step 96."""
    run_dir = tmp_path / "run"
    args = [*FAULTY, "env.id=faulty_envs:Hanging-v0", "env.vectorization=async", "checkpoint.interval=1"]
    process = _start([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(run_dir / "checkpoints" / f"step_{LAST_GOOD_STEP:010d}.pt", process)
    time.sleep(1.0)  # the next iteration starts, and hangs in its second step
    return process, run_dir


def test_a_hung_env_stops_within_seconds_of_the_second_signal(tmp_path: Path) -> None:
    process, run_dir = _hung_run(tmp_path)
    workers = _descendants(process.pid)
    assert workers, "the async env workers"
    process.send_signal(signal.SIGTERM)
    time.sleep(2.0)
    assert process.poll() is None  # the iteration cannot end: the env hangs
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert time.monotonic() - sent < 10, stderr[-2000:]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("ppo-train: stopped by SIGTERM"), stderr[-2000:]
    assert "SIGTERM received: stopping after this iteration (send it again to stop at once)" in stdout
    assert "did not answer within 5 s of closing: killed" in stdout
    assert ckpt.load_checkpoint(run_dir)["global_step"] == LAST_GOOD_STEP  # intact, and readable
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert _gone_within(workers, 5)


def test_env_workers_die_with_their_killed_trainer(tmp_path: Path) -> None:
    process, _ = _hung_run(tmp_path)
    workers = _descendants(process.pid)
    assert workers, "the async env workers"
    process.kill()
    process.communicate(timeout=30)
    assert _gone_within(workers, 5), "env workers outlived their trainer"


def test_a_crash_of_the_trainer_is_one_line_and_recorded_in_the_run(tmp_path: Path) -> None:
    """An env that segfaults in the trainer's own process (sync vectorisation): no Python runs after
    that, so ppo-train's supervising parent reports it and records it in summary.json."""
    run_dir = tmp_path / "run"
    args = [*FAULTY, "env.id=faulty_envs:Segfaulting-v0", "env.vectorization=sync", "checkpoint.interval=1"]
    process = _start([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGSEGV, stderr[-2000:]
    log = run_dir / "train.log"
    assert stderr.strip().splitlines() == [
        f"ppo-train: error: {run_dir}: the training process died of SIGSEGV (a crash in native code: "
        f"an env, a simulator, torch); its stack trace is in {log}; last checkpoint: "
        f"{run_dir / 'checkpoints' / 'last.pt'}; resume with: ppo-train resume={run_dir}"
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == "the training process died of SIGSEGV"
    assert summary["global_step"] == LAST_GOOD_STEP == ckpt.load_checkpoint(run_dir)["global_step"]
    assert summary["config"]["env"]["id"] == "faulty_envs:Segfaulting-v0"
    # faulthandler's trace, down to the env's faulty line, is in the run's log
    assert "Fatal Python error: Segmentation fault" in log.read_text()
    assert "faulty_envs.py" in log.read_text()


def test_a_crash_of_an_async_env_worker_is_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*FAULTY, "env.id=faulty_envs:Segfaulting-v0", "env.vectorization=async", "checkpoint.interval=1"]
    process = _start([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-2000:]
    (line,) = stderr.strip().splitlines()
    worker = r"env worker \d \(pid \d+\) died of SIGSEGV"  # the first found dead, or both
    expected = f"ppo-train: error: iteration 4: env Segfaulting-v0: {worker}(, {worker})?; "
    assert re.fullmatch(expected + re.escape(f"last good checkpoint: {run_dir}/checkpoints/last.pt"), line)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "died of SIGSEGV" in summary["error"]


def test_a_signal_while_ppo_train_starts_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C (to the process group, as a terminal sends it) while torch is being imported."""
    for delay in (0.5, 1.0, 2.0):  # all within the imports (several seconds here)
        process = _start(["env=CartPole", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert (process.returncode, stderr) == (128 + signal.SIGINT, "ppo-train: stopped by SIGINT\n"), delay
    assert not (tmp_path / "run").exists()


def test_a_reader_that_goes_away_stops_the_run_as_sigpipe(tmp_path: Path) -> None:
    """``ppo-train ... | head -1``: the run stops at the end of the iteration with a checkpoint."""
    run_dir = tmp_path / "run"
    process = _start(["env=CartPole", "total_timesteps=1000000", f"hydra.run.dir={run_dir}"], tmp_path)
    assert process.stdout is not None
    assert "presets: " in process.stdout.readline()  # the run's first line
    assert "step" in process.stdout.readline()  # the first progress line; then the reader leaves
    process.stdout.close()
    process.wait(timeout=60)
    assert process.stderr is not None
    stderr = process.stderr.read()
    assert process.returncode == 128 + signal.SIGPIPE, stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    step = summary["global_step"]
    assert ckpt.load_checkpoint(run_dir)["global_step"] == step
    assert stderr.splitlines() == [
        f"ppo-train: stopped by SIGPIPE at step {step}; checkpoint: {run_dir / 'checkpoints' / 'last.pt'}; "
        f"resume with: ppo-train resume={run_dir}"
    ]


def test_a_crash_in_a_sweep_is_recorded_in_the_job_that_was_running(tmp_path: Path) -> None:
    """The basic launcher runs the jobs one after the other in the trainer's process."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "env.id=CartPole-v1,faulty_envs:Segfaulting-v0", "env.vectorization=sync"]
    args += [*FAULTY[:3], "total_timesteps=200", "checkpoint.interval=1", f"hydra.sweep.dir={sweep_dir}"]
    process = _start(args, tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGSEGV, stderr[-2000:]
    (line,) = stderr.strip().splitlines()
    summaries = {
        json.loads(path.read_text())["config"]["env"]["id"]: json.loads(path.read_text())
        for path in sweep_dir.glob("*/summary.json")
    }
    assert summaries["CartPole-v1"]["status"] == "completed"
    crashed = summaries["faulty_envs:Segfaulting-v0"]
    assert (crashed["status"], crashed["global_step"]) == ("failed", LAST_GOOD_STEP)
    assert "Segfaulting-v0" in line and "died of SIGSEGV" in line


def test_the_trainer_killed_from_outside_is_one_line_and_recorded(tmp_path: Path) -> None:
    """The out-of-memory killer picks the biggest process, the trainer, and sends it SIGKILL."""
    run_dir = tmp_path / "run"
    process = _start(["env=CartPole", "total_timesteps=1000000", f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(run_dir / "checkpoints" / "last.pt", process)
    trainer = (_descendants(process.pid) or [process.pid])[0]  # ppo-train's child, the trainer
    os.kill(trainer, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGKILL, stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["error"]) == ("failed", "the training process died of SIGKILL")
    assert summary["global_step"] == ckpt.load_checkpoint(run_dir)["global_step"]
    assert stderr.splitlines() == [
        f"ppo-train: error: {run_dir}: the training process died of SIGKILL (killed from outside: the "
        f"out-of-memory killer, or kill -9); last checkpoint: {run_dir / 'checkpoints' / 'last.pt'}; "
        f"resume with: ppo-train resume={run_dir}"
    ]
