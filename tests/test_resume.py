"""Kill a run, resume it, and get the run that never stopped: same weights, same curves."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from support import compose_config, console_script, one_line_failure, ppo_train, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from ppo_cli import checkpoint as ckpt
from ppo_cli import cli
from ppo_cli.errors import ConfigError, Interrupted, UserError
from ppo_cli.logger import RunLogger
from ppo_cli.resume import config_changes, expand_resume_argv
from ppo_cli.train import train

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_resume")

# Runs itself as ppo-train, and SIGKILLs itself once it has logged step KILL_AT: no handler, no
# cleanup, exactly what the OOM killer or a preempting scheduler does.
KILL_SCRIPT = """
import os, signal, sys
from ppo_cli import cli
from ppo_cli.logger import RunLogger

kill_at = int(sys.argv[1])
log_scalars = RunLogger.scalars

def log_then_die(self, values, step):
    log_scalars(self, values, step)
    if step >= kill_at:
        self.flush()  # these events outlive the checkpoint, as they can after a real crash
        os.kill(os.getpid(), signal.SIGKILL)

RunLogger.scalars = log_then_die
sys.argv = ["ppo-train", *sys.argv[2:]]
cli.train_main()
"""

STEPS_PER_ITERATION = 256  # 8 x 32 for CartPole, 4 x 64 for Pendulum below
TOTAL = 8 * STEPS_PER_ITERATION
CHECKPOINT_EVERY = 3  # iterations: checkpoints at steps 768, 1536 and at the end
KILL_AT = 5 * STEPS_PER_ITERATION  # between the first and the second checkpoint

# The CartPole case evaluates every 2 iterations (checkpoints every 3): the killed run evaluated at
# iteration 4 after its checkpoint at 3, so the one kill checks resumed evaluations and best.pt too.
EVALUATING = ["eval.interval=2", "eval.episodes=2"]
CASES = {
    # gymnasium's numpy-vectorised CartPole: NEXT_STEP autoreset, discrete actions
    "CartPole": ["env=CartPole", "env.num_envs=8", *EVALUATING],
    # sync vector env, an LSTM whose state the checkpoint carries
    "CartPole-lstm": [
        "env=CartPole",
        "env.num_envs=8",
        "agent=lstm",
        "agent.recurrent_size=16",
        "eval.episodes=0",
    ],
    # sync vector env, Gaussian policy, observation normalisation and reward scaling
    "Pendulum": [
        "env=Pendulum",
        "env.num_steps=64",
        "env.normalize_reward=true",
        "algo.num_minibatches=4",
        "eval.episodes=0",
    ],
}


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: every scalar tag's (step, value) points, purges applied."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _raw_steps(run_dir: Path, tag: str) -> list[int]:
    """Every step written for ``tag`` in every event file, without TensorBoard's purging."""
    steps = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def _assert_same_state(a: dict, b: dict) -> None:
    """Bit-for-bit equal weights, normalisation statistics and optimizer tensors."""
    assert a["agent"].keys() == b["agent"].keys()
    for name in a["agent"]:
        assert torch.equal(a["agent"][name], b["agent"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, b["optimizer"]["state"][index][key]), (index, key)
    if a["reward_scaler"] is not None:
        for name, tensor in a["reward_scaler"].items():
            assert torch.equal(tensor, b["reward_scaler"][name]), name


@dataclass(frozen=True)
class KilledAndResumed:
    """A case trained whole, and again SIGKILLed at KILL_AT then resumed; what the killed run left."""

    whole: Path
    killed: Path
    checkpoint_step: int  # of the newest checkpoint the killed run left
    raw_steps: dict[str, list[int]]  # every step the killed run wrote for a tag, before resuming


def _kill_and_resume(case: str, cwd: Path) -> KilledAndResumed:
    overrides = [*CASES[case], f"total_timesteps={TOTAL}", f"checkpoint.interval={CHECKPOINT_EVERY}"]
    whole, killed = cwd / "whole", cwd / "killed"
    assert ppo_train(*overrides, f"hydra.run.dir={whole}", cwd=cwd).returncode == 0
    result = run(
        [sys.executable, "-c", KILL_SCRIPT, str(KILL_AT), *overrides, f"hydra.run.dir={killed}"], cwd
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpoint_step = ckpt.load_checkpoint(killed)["global_step"]
    raw_steps = {tag: _raw_steps(killed, tag) for tag in ("losses/value_loss", "eval/episodic_return")}
    resumed = ppo_train(f"resume={killed}", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return KilledAndResumed(whole, killed, checkpoint_step, raw_steps)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], KilledAndResumed]:
    """Each case killed and resumed once per module: the two tests below check different facts of
    the CartPole one (its state and curves; its evaluations and best.pt), so it runs once."""
    done: dict[str, KilledAndResumed] = {}

    def get(case: str) -> KilledAndResumed:
        if case not in done:
            done[case] = _kill_and_resume(case, tmp_path_factory.mktemp(case))
        return done[case]

    return get


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_sigkill_then_resume_is_the_uninterrupted_run(
    case: str, killed_and_resumed: Callable[[str], KilledAndResumed]
) -> None:
    runs = killed_and_resumed(case)
    whole, killed = runs.whole, runs.killed
    checkpoint_step = CHECKPOINT_EVERY * STEPS_PER_ITERATION
    assert runs.checkpoint_step == checkpoint_step
    # The killed run logged past its checkpoint: those points must not show twice after resuming.
    assert max(runs.raw_steps["losses/value_loss"]) == KILL_AT

    final_whole, final_resumed = ckpt.load_checkpoint(whole), ckpt.load_checkpoint(killed)
    assert final_whole["global_step"] == final_resumed["global_step"] == TOTAL
    _assert_same_state(final_whole, final_resumed)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["resumed_from"] == {
        "checkpoint": str(killed / "checkpoints" / "last.pt"),
        "global_step": checkpoint_step,
        "exact_env_state": True,
    }

    expected, got = _scalars(whole), _scalars(killed)
    assert expected.keys() == got.keys()
    for tag, points in got.items():
        steps = [step for step, _ in points]
        assert all(a < b for a, b in itertools.pairwise(steps)), tag  # no duplicates
        assert steps == [step for step, _ in expected[tag]], tag  # nothing missing
        if tag != "charts/SPS":
            assert points == expected[tag], tag


@pytest.mark.slow
def test_sigkill_then_resume_logs_the_same_evaluations_and_keeps_the_same_best(
    killed_and_resumed: Callable[[str], KilledAndResumed],
) -> None:
    """Evaluations every 2 iterations, checkpoints every 3: the killed run evaluated at iteration 4
    (and may have written best.pt) after its checkpoint at 3. Resumed, it logs every evaluation
    point of the run that never stopped, once, and ends with the same best.pt."""
    runs = killed_and_resumed("CartPole")
    whole, killed = runs.whole, runs.killed
    assert max(runs.raw_steps["eval/episodic_return"]) == 4 * STEPS_PER_ITERATION  # after the checkpoint

    expected, got = _scalars(whole), _scalars(killed)
    every_other = range(2 * STEPS_PER_ITERATION, TOTAL, 2 * STEPS_PER_ITERATION)
    eval_steps = [*every_other, TOTAL]  # iterations 2, 4, 6, and the end
    assert [step for step, _ in expected["eval/episodic_return"]] == eval_steps
    assert expected.keys() == got.keys()
    for tag in expected.keys() - {"charts/SPS"}:
        assert got[tag] == expected[tag], tag
    best_whole, best_resumed = (
        ckpt.load_checkpoint(run / "checkpoints" / "best.pt") for run in (whole, killed)
    )
    assert best_resumed["global_step"] == best_whole["global_step"]
    assert best_resumed["best_eval"] == best_whole["best_eval"]
    for name, tensor in best_whole["agent"].items():
        assert torch.equal(tensor, best_resumed["agent"][name]), name
    assert ckpt.load_checkpoint(killed)["best_eval"] == ckpt.load_checkpoint(whole)["best_eval"]


def _cartpole(algo: str, *extra: str) -> list[str]:
    return [
        f"algo={algo}",
        "env=CartPole",
        "env.num_envs=8",  # 256 steps per iteration, whatever the variant's tuning
        "total_timesteps=3072",
        "checkpoint.interval=4",
        "eval.episodes=0",
        *extra,
    ]


def _interrupt_at(step: int, signum: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the run send itself ``signum`` once it has logged ``step``."""
    log_scalars = RunLogger.scalars

    def log_then_signal(self: RunLogger, values: dict[str, float], at: int) -> None:
        log_scalars(self, values, at)
        if at >= step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(RunLogger, "scalars", log_then_signal)


@pytest.mark.parametrize("algo", ["clip", "penalty", "pg", "a2c", "trpo", "grpo"])
@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resume_matches(
    algo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train(compose_config(*_cartpole(algo)), whole)

    _interrupt_at(1100, signal.SIGTERM, monkeypatch)
    with pytest.raises(Interrupted) as info:
        train(compose_config(*_cartpole(algo)), stopped)
    monkeypatch.undo()
    assert info.value.exit_code == 128 + signal.SIGTERM
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    # The checkpoint is the one of the iteration that was running, not the last periodic one.
    assert ckpt.load_checkpoint(stopped)["global_step"] == summary["global_step"] >= 1100
    assert f"at step {summary['global_step']}" in str(info.value)

    train(compose_config(*_cartpole(algo), f"resume={stopped}"), stopped)
    _assert_same_state(ckpt.load_checkpoint(whole), ckpt.load_checkpoint(stopped))


def test_second_signal_stops_at_once_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_scalars = RunLogger.scalars

    def log_then_signal_twice(self: RunLogger, values: dict[str, float], at: int) -> None:
        log_scalars(self, values, at)
        if at >= 1100:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, Ctrl-C

    monkeypatch.setattr(RunLogger, "scalars", log_then_signal_twice)
    with pytest.raises(Interrupted, match="stopped by SIGINT"):
        train(compose_config(*_cartpole("clip")), tmp_path)
    assert ckpt.load_checkpoint(tmp_path)["global_step"] == 1024  # the periodic one, iteration 4
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_continues(tmp_path: Path) -> None:
    first = train(compose_config(*_cartpole("clip", "resume=auto")), tmp_path)
    assert "resumed_from" not in first and first["global_step"] == 3072
    # Re-launched after it finished: nothing to redo.
    again = train(compose_config(*_cartpole("clip", "resume=auto")), tmp_path)
    assert again["resumed_from"]["global_step"] == 3072
    assert again["train_time_s"] == first["train_time_s"]
    # A longer budget continues the same run; total_timesteps may change without permission.
    longer = train(compose_config(*_cartpole("clip", "resume=auto", "total_timesteps=4096")), tmp_path)
    assert longer["global_step"] == 4096
    steps = [step for step, _ in _scalars(tmp_path)["losses/value_loss"]]
    assert steps == list(range(256, 4097, 256))


def _evil_checkpoint(path: Path, sentinel: Path) -> None:
    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch '{sentinel}'",))

    torch.save({"format_version": ckpt.FORMAT_VERSION, "agent": Payload()}, path)


@pytest.mark.parametrize("damage", ["truncated", "malicious"])
@pytest.mark.slow
def test_resume_auto_skips_a_bad_last_checkpoint(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train(compose_config(*_cartpole("clip")), whole)
    _interrupt_at(1100, signal.SIGTERM, monkeypatch)
    with pytest.raises(Interrupted):
        train(compose_config(*_cartpole("clip")), stopped)
    monkeypatch.undo()
    last = stopped / "checkpoints" / "last.pt"
    sentinel = tmp_path / "pwned"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        _evil_checkpoint(last, sentinel)

    with caplog.at_level(logging.WARNING):
        summary = train(compose_config(*_cartpole("clip", "resume=auto")), stopped)
    assert not sentinel.exists()
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"skipping {last}")]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert summary["resumed_from"]["checkpoint"] == str(stopped / "checkpoints" / "step_0000001024.pt")
    # Every periodic checkpoint holds the whole state, so even the older one resumes exactly.
    _assert_same_state(ckpt.load_checkpoint(whole), ckpt.load_checkpoint(stopped))


def test_resume_removes_temp_files_of_a_killed_writer(tmp_path: Path) -> None:
    train(compose_config(*_cartpole("clip", "total_timesteps=1024")), tmp_path)
    stale = tmp_path / "checkpoints" / ".last.pt.tmp-12345"
    stale.write_bytes(b"half a checkpoint")
    train(compose_config(*_cartpole("clip", "resume=auto", "total_timesteps=1536")), tmp_path)
    assert not stale.exists()


@pytest.mark.slow
def test_async_envs_resume_from_a_derived_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Env state in worker processes cannot be saved: the envs restart, the run still completes."""
    overrides = _cartpole("clip", "env.vectorization=async", "env.num_envs=2", "env.num_steps=128")
    _interrupt_at(1100, signal.SIGTERM, monkeypatch)
    with pytest.raises(Interrupted):
        train(compose_config(*overrides), tmp_path)
    monkeypatch.undo()
    summary = train(compose_config(*overrides, "resume=auto"), tmp_path)
    assert summary["resumed_from"]["exact_env_state"] is False
    assert summary["global_step"] == 3072
    steps = [step for step, _ in _scalars(tmp_path)["losses/value_loss"]]
    assert steps == list(range(256, 3073, 256))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny completed run made by ppo-train, to resume with bad input."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = ppo_train(
        *_cartpole("clip", "total_timesteps=512"), f"hydra.run.dir={run_dir}", cwd=run_dir.parent
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_resume_rewrites_the_command_line_from_the_run(finished_run: Path) -> None:
    saved = yaml.safe_load((finished_run / ".hydra" / "overrides.yaml").read_text())
    argv = expand_resume_argv([f"resume={finished_run}", "total_timesteps=1024", "--cfg", "job"])
    kept = [o for o in saved if not o.startswith("total_timesteps=")]
    assert argv == [*kept, f"resume={finished_run}", "total_timesteps=1024", "--cfg", "job",
                    f"hydra.run.dir={finished_run}"]  # fmt: skip
    assert expand_resume_argv(["resume=auto", "seed=1"]) == ["resume=auto", "seed=1"]
    assert expand_resume_argv(["seed=1"]) == ["seed=1"]


@pytest.mark.slow
def test_changed_keys_are_refused_then_allowed(finished_run: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "copy"
    shutil.copytree(finished_run / "checkpoints", resumed / "checkpoints")
    changed = _cartpole("clip", "total_timesteps=1024", "algo.clip_eps=0.1", f"resume={resumed}")
    with pytest.raises(ConfigError) as info:
        train(compose_config(*changed), resumed)
    message = str(info.value)
    assert message.startswith("resume: the config differs from the checkpoint's")
    assert "algo.clip_eps: 0.2 -> 0.1" in message and "resume_allow_changes=true" in message
    summary = train(compose_config(*changed, "resume_allow_changes=true"), resumed)
    assert summary["global_step"] == 1024 and summary["config"]["algo"]["clip_eps"] == 0.1


RESUME_BAD_INPUTS = [
    (["resume=RUN/nope"], "resume: RUN/nope: no such run directory or checkpoint"),
    (["resume=RUN", "algo.clip_eps=0.1"], "resume: the config differs from the checkpoint's in keys"),
    (
        ["resume=RUN", "agent.actor_hidden=[16]", "resume_allow_changes=true"],
        "RUN/checkpoints/last.pt: the checkpoint's network does not fit this run's: actor.0.bias is [",
    ),
    (
        ["resume=RUN", "env.id=Acrobot-v1", "resume_allow_changes=true"],
        "RUN/checkpoints/last.pt: the checkpoint was trained on spaces",
    ),
    (["resume=RUN/checkpoints/broken.pt"], "RUN/checkpoints/broken.pt: not a readable ppo-cli checkpoint"),
    (
        ["resume=RUN/.hydra/config.yaml"],
        "resume: RUN/.hydra/config.yaml is not in a run directory's checkpoints/",
    ),
    (["-m", "resume=RUN"], "resume: a path continues one run; in a sweep use resume=auto"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), RESUME_BAD_INPUTS, ids=[" ".join(o) for o, _ in RESUME_BAD_INPUTS]
)
@pytest.mark.slow
def test_bad_resume_input_is_one_line(
    overrides: list[str],
    expected: str,
    finished_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (finished_run / "checkpoints" / "broken.pt").write_bytes(b"PK\x03\x04 not really")
    before = (finished_run / "checkpoints" / "last.pt").read_bytes()
    args = [arg.replace("RUN", str(finished_run)) for arg in overrides]
    code, line = one_line_failure(cli.train_main, ["ppo-train", *args], monkeypatch, capsys)
    assert code == 2
    assert line.startswith("ppo-train: error: ")
    assert expected.replace("RUN", str(finished_run)) in line
    assert (finished_run / "checkpoints" / "last.pt").read_bytes() == before  # nothing overwritten


def test_user_errors_are_plain_exceptions_in_python(tmp_path: Path) -> None:
    """The Python API raises; only the console entry points turn errors into exit codes."""
    with pytest.raises(UserError, match="no such run directory or checkpoint"):
        train(compose_config(*_cartpole("clip"), f"resume={tmp_path / 'missing'}"), tmp_path)


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
    ids=["SIGTERM to the trainer", "Ctrl-C to the process group", "SIGTERM to the process group"],
)
@pytest.mark.slow
def test_signal_checkpoints_the_current_step_and_exits_within_seconds(
    signum: int, to_group: bool, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = _cartpole("clip", "total_timesteps=100000000", "checkpoint.interval=5", f"hydra.run.dir={run_dir}")
    if to_group:  # the group includes the async env workers
        args += ["env.vectorization=async", "env.num_envs=2", "env.num_steps=128"]
    process = subprocess.Popen(
        [console_script("ppo-train"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job has
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    sent = time.monotonic()
    if to_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr  # neither the trainer nor an env worker crashed on the signal
    assert stdout.count(f"{signal.Signals(signum).name} received") == 1  # only the trainer reacted
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    step = summary["global_step"]
    assert ckpt.load_checkpoint(run_dir)["global_step"] == step
    assert stderr.strip().splitlines()[-1] == (
        f"ppo-train: stopped by {signal.Signals(signum).name} at step {step}; "
        f"checkpoint: {run_dir / 'checkpoints' / 'last.pt'}; resume with: ppo-train resume={run_dir}"
    )


@pytest.mark.slow
def test_a_new_run_never_overwrites_an_old_one(finished_run: Path, tmp_path: Path) -> None:
    before = (finished_run / "checkpoints" / "last.pt").read_bytes()
    summary_before = (finished_run / "summary.json").read_text()
    with pytest.raises(UserError) as info:
        train(compose_config(*_cartpole("clip")), finished_run)
    assert str(info.value) == (
        f"{finished_run} already holds a run's checkpoints; continue it with resume=auto, "
        "or choose another hydra.run.dir"
    )
    assert (finished_run / "checkpoints" / "last.pt").read_bytes() == before
    assert (finished_run / "summary.json").read_text() == summary_before


def test_keys_added_since_a_run_was_saved_count_as_their_defaults() -> None:
    """A run saved before agent.recurrent and env.atari existed resumes under a newer ppo-cli
    with their defaults, and only a real change is reported."""
    current = OmegaConf.to_container(OmegaConf.structured(compose_config("env=CartPole")))
    assert isinstance(current, dict)
    saved = copy.deepcopy(current)
    for key in ("encoder", "recurrent", "recurrent_size"):
        del saved["agent"][key]
    del saved["env"]["atari"]
    assert config_changes(saved, current) == []
    current["agent"]["recurrent"] = "lstm"
    assert config_changes(saved, current) == ["agent.recurrent: none -> lstm"]


@pytest.mark.slow
def test_grpo_dynamic_sampling_counts_every_step_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TiedBySeed (see test_rollout's dynamic sampling test): every iteration plays 3 passes of
    2 steps x 4 envs and replaces one tied group, leaving one tied group every other iteration.
    Stopped halfway and resumed, the run is the one that never stopped."""
    overrides = [
        "algo=grpo",
        "algo.group_size=2",
        "algo.dynamic_sampling_max_passes=2",
        "env.id=synthetic_envs:TiedBySeed-v0",
        "env.num_envs=4",
        "env.num_steps=2",
        "total_timesteps=144",
        "eval.episodes=0",
    ]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert train(compose_config(*overrides), whole)["global_step"] == 6 * 3 * 2 * 4
    expected = _scalars(whole)
    assert expected["diagnostics/dropped_groups"] == [(24 * i, 1.0) for i in range(1, 7)]
    assert [value for _, value in expected["diagnostics/tied_groups"]] == [1.0, 0.0] * 3

    _interrupt_at(72, signal.SIGTERM, monkeypatch)
    with pytest.raises(Interrupted):
        train(compose_config(*overrides), stopped)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(stopped)["global_step"] == 72
    train(compose_config(*overrides, f"resume={stopped}"), stopped)
    _assert_same_state(ckpt.load_checkpoint(whole), ckpt.load_checkpoint(stopped))
    got = _scalars(stopped)
    assert got.keys() == expected.keys()
    for tag in expected.keys() - {"charts/SPS"}:  # GRPO's explained variance is NaN (no critic)
        np.testing.assert_array_equal(got[tag], expected[tag], err_msg=tag)


@pytest.mark.parametrize(
    ("algo", "added", "change"),
    [
        (
            "grpo",
            ["baseline", "adv_std", "dynamic_sampling_max_passes", "clip_eps_low", "clip_eps_high",
             "loss_agg", "kl_loss"],
            ("adv_std", "group", "none"),
        ),
        (
            "clip",
            ["ref_kl_coef", "kl_loss", "critic_target", "objective", "dual_clip"],
            ("dual_clip", None, 3.0),
        ),
        ("trpo", ["critic_target"], ("critic_target", "gae", "mc")),
    ],
)  # fmt: skip
def test_keys_added_to_a_variant_since_a_run_was_saved_count_as_their_defaults(
    algo: str, added: list[str], change: tuple[str, Any, Any]
) -> None:
    """A run saved before them resumes with those keys' defaults (the behaviour it was trained
    with: its variant's schema holds them); only a real change is reported."""
    current = OmegaConf.to_container(OmegaConf.structured(compose_config(f"algo={algo}")))
    assert isinstance(current, dict)
    saved = copy.deepcopy(current)
    for key in added:
        del saved["algo"][key]
    assert config_changes(saved, current) == []
    key, before, after = change
    current["algo"][key] = after
    assert config_changes(saved, current) == [f"algo.{key}: {before} -> {after}"]


# algo=pg before it became Monte-Carlo REINFORCE: GAE(lambda = 1) bootstrapped at the end of each
# env.num_steps rollout, collected by the fixed-length Collector (its state has no "iteration").
OLD_PG = {
    "name": "pg", "learning_rate": 1e-3, "anneal_lr": True, "adam_eps": 1e-5, "gamma": 0.99,
    "gae_lambda": 1.0, "bootstrap_truncated": True, "norm_adv": True, "ent_coef": 0.0, "vf_coef": 1.0,
    "max_grad_norm": 0.5, "value_epochs": 5, "value_minibatches": 4,
}  # fmt: skip


@pytest.mark.slow
def test_a_run_of_the_old_bootstrapping_pg_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    result = ppo_train(*_cartpole("pg", "total_timesteps=256"), f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    last = run_dir / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    payload["config"]["algo"] = OLD_PG
    old_collector = {"obs": torch.zeros(8, 4), "prev_done": torch.zeros(8, dtype=torch.bool)}
    payload["collector"] = {**old_collector, "action_mask": None, "recurrent_state": None, "envs": None}
    torch.save(payload, last)

    code, line = one_line_failure(cli.train_main, ["ppo-train", f"resume={run_dir}"], monkeypatch, capsys)
    assert code == 2
    assert line.startswith("ppo-train: error: resume: the config differs from the checkpoint's")
    assert "algo.baseline: <unset> -> value" in line and "algo.gae_lambda: 1.0 -> <unset>" in line
    argv = ["ppo-train", f"resume={run_dir}", "resume_allow_changes=true"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert code == 2
    assert line == (
        f"ppo-train: error: {last}: the checkpoint's collector state does not fit this run's (it lacks "
        "'iteration': written by an older ppo-cli whose variant collected differently); start a new run"
    )
