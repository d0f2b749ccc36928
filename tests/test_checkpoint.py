"""Checkpoint files: rotation, safe loading, atomic writes, and the load_agent round trip."""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from support import algo_config, compose_config, console_script

from ppo_cli import checkpoint as ckpt
from ppo_cli import load_agent
from ppo_cli.agent import ActorCritic
from ppo_cli.checkpointer import Checkpointer
from ppo_cli.config import AgentConfig, EnvConfig, TrainConfig
from ppo_cli.distributed import SINGLE_PROCESS
from ppo_cli.envs import make_vector_env
from ppo_cli.errors import UserError
from ppo_cli.iteration import build_state
from ppo_cli.normalization import RewardScaler
from ppo_cli.train import train


def _payload(step: int, **extra) -> dict:
    return {"global_step": step, "weights": torch.full((3,), float(step)), **extra}


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_writes_last_and_rotates_periodic(tmp_path: Path) -> None:
    steps = [8, 16, 24, 1000, 2048]
    for step in steps:
        last = ckpt.save_checkpoint(_payload(step), tmp_path, keep=2, periodic=True)
    directory = ckpt.checkpoint_dir(tmp_path)
    assert last == directory / "last.pt"
    assert _files(directory) == ["last.pt", "step_0000001000.pt", "step_0000002048.pt"]
    assert ckpt.load_checkpoint(tmp_path)["global_step"] == 2048
    assert ckpt.load_checkpoint(directory / "step_0000001000.pt")["global_step"] == 1000
    assert [p.name for p in ckpt.periodic_checkpoints(directory)] == [
        "step_0000001000.pt",
        "step_0000002048.pt",
    ]


def test_non_periodic_save_writes_only_last(tmp_path: Path) -> None:
    ckpt.save_checkpoint(_payload(1), tmp_path, keep=3, periodic=True)
    ckpt.save_checkpoint(_payload(2), tmp_path, keep=3, periodic=False)
    ckpt.save_checkpoint(_payload(3), tmp_path, keep=0, periodic=True)
    directory = ckpt.checkpoint_dir(tmp_path)
    assert _files(directory) == ["last.pt", "step_0000000001.pt"]
    assert ckpt.load_checkpoint(directory / "last.pt")["global_step"] == 3


def test_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    last = ckpt.save_checkpoint(
        _payload(5, config={"a": [1, 2], "b": None}), tmp_path, keep=1, periodic=False
    )
    payload = torch.load(last, weights_only=True)
    assert payload["format_version"] == ckpt.FORMAT_VERSION
    assert payload["global_step"] == 5
    assert payload["config"] == {"a": [1, 2], "b": None}
    torch.testing.assert_close(payload["weights"], torch.full((3,), 5.0))


def test_truncated_file_is_user_error_naming_file(tmp_path: Path) -> None:
    last = ckpt.save_checkpoint(_payload(5), tmp_path, keep=1, periodic=False)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as info:
        ckpt.load_checkpoint(last)
    assert str(info.value) == (
        f"{last}: not a readable ppo-cli checkpoint: truncated or not a checkpoint file "
        "(failed finding central directory)"
    )


def test_missing_and_foreign_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save({"something": 1}, other)
    with pytest.raises(UserError, match=str(other)):
        ckpt.load_checkpoint(other)


class _CreateSentinel:
    """Unpickling this calls open(path, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _ShellSentinel:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.mark.parametrize(
    ("payload_cls", "global_name"), [(_CreateSentinel, "io.open"), (_ShellSentinel, f"{os.name}.system")]
)
def test_pickled_code_is_refused(tmp_path: Path, payload_cls, global_name: str) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": ckpt.FORMAT_VERSION, "x": payload_cls(sentinel)}, evil)
    with pytest.raises(UserError) as info:
        ckpt.load_checkpoint(evil)
    # What is wrong, never torch's advice to load it unsafely.
    assert str(info.value) == (
        f"{evil}: not a readable ppo-cli checkpoint: it holds pickled Python objects "
        f"(GLOBAL {global_name}), which ppo-cli checkpoints never contain; not loaded"
    )
    assert not sentinel.exists()


def test_skipped_checkpoints_are_logged_with_what_is_wrong(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (1, 2):
        ckpt.save_checkpoint(_payload(step), tmp_path, keep=3, periodic=True)
    directory = ckpt.checkpoint_dir(tmp_path)
    torch.save(
        {"format_version": ckpt.FORMAT_VERSION, "x": _ShellSentinel(tmp_path / "pwned")},
        directory / "last.pt",
    )
    newest = directory / "step_0000000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        path, payload = ckpt.newest_valid_checkpoint(directory)  # type: ignore[misc]
    assert (path.name, payload["global_step"]) == ("step_0000000001.pt", 1)
    assert [record.getMessage() for record in caplog.records] == [
        f"skipping {directory / 'last.pt'}: not a readable ppo-cli checkpoint: it holds pickled Python "
        f"objects (GLOBAL {os.name}.system), which ppo-cli checkpoints never contain; not loaded",
        f"skipping {newest}: not a readable ppo-cli checkpoint: truncated or not a checkpoint file "
        "(failed finding central directory)",
    ]
    assert not (tmp_path / "pwned").exists()


def test_pickled_code_payload_is_live(tmp_path: Path) -> None:
    """Control for the test above: an unsafe load really would create the sentinel."""
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": ckpt.FORMAT_VERSION, "x": _CreateSentinel(sentinel)}, evil)
    loaded = torch.load(evil, weights_only=False)
    loaded["x"].close()
    assert sentinel.exists()


FILE_SIZE_LIMIT = 50_000  # bytes: less than any checkpoint below, or a CartPole run's


def _file_size_limit() -> None:
    """In the child: a write past FILE_SIZE_LIMIT fails (EFBIG) as one on a full disk does
    (ENOSPC); SIGXFSZ, which would kill the process instead, is ignored."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


SAVE_BIG_CHECKPOINT = """
import sys
from pathlib import Path
import torch
from ppo_cli import checkpoint as ckpt
from ppo_cli.errors import UserError
run_dir = Path(sys.argv[1])
if sys.argv[2] == "after_a_small_one":
    ckpt.save_checkpoint({"global_step": 1, "w": torch.ones(10)}, run_dir, keep=3, periodic=True)
try:
    ckpt.save_checkpoint({"global_step": 2, "w": torch.ones(100_000)}, run_dir, keep=3, periodic=True)
except UserError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    ("case", "left"),
    [("first", "no checkpoint was written yet"), ("after_a_small_one", "the previous checkpoint is intact")],
)
@pytest.mark.slow
def test_a_write_the_disk_refuses_is_one_line_saying_what_is_left(
    case: str, left: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SAVE_BIG_CHECKPOINT, str(tmp_path), case],
        preexec_fn=_file_size_limit, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    directory = ckpt.checkpoint_dir(tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{directory / 'last.pt'}: cannot write the checkpoint (File too large); {left}\n"
    if case == "first":
        assert _files(directory) == []  # no temp file left
    else:
        assert _files(directory) == ["last.pt", "step_0000000001.pt"]
        assert ckpt.load_checkpoint(tmp_path)["global_step"] == 1


@pytest.mark.slow
def test_ppo_train_on_a_full_disk_is_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tiny = ["env.num_envs=2", "env.num_steps=16", "total_timesteps=64", "eval.episodes=0", "progress=false"]
    result = subprocess.run(
        [console_script("ppo-train"), *tiny, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, preexec_fn=_file_size_limit, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    last = ckpt.checkpoint_dir(run_dir) / "last.pt"
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"ppo-train: error: {last}: cannot write the checkpoint (File too large); "
        "no checkpoint was written yet"
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "cannot write the checkpoint" in summary["error"]


def test_a_periodic_file_the_disk_refuses_names_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """last.pt is written, then the periodic copy fails on a full disk (writes go to /dev/full)."""
    ckpt.save_checkpoint(_payload(1), tmp_path, keep=3, periodic=False)

    def open_periodic_on_full_disk(file: Path, mode: str) -> io.BufferedWriter:
        return open("/dev/full" if file.name.startswith(".step_") else file, mode)

    monkeypatch.setattr(ckpt, "open", open_periodic_on_full_disk, raising=False)
    with pytest.raises(UserError) as info:
        ckpt.save_checkpoint(_payload(2, w=torch.ones(100_000)), tmp_path, keep=3, periodic=True)
    directory = ckpt.checkpoint_dir(tmp_path)
    assert str(info.value) == (
        f"{directory / 'step_0000000002.pt'}: cannot write the checkpoint (No space left on device); "
        f"{directory / 'last.pt'} holds this step"
    )
    monkeypatch.undo()
    assert _files(directory) == ["last.pt"]
    assert ckpt.load_checkpoint(tmp_path)["global_step"] == 2


VECTOR = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)


@pytest.mark.parametrize(
    ("obs_space", "act_space"),
    [
        (VECTOR, gym.spaces.Discrete(5)),
        (VECTOR, gym.spaces.Discrete(5, start=-2)),
        (VECTOR, gym.spaces.MultiDiscrete([3, 2], start=[1, 0])),
        (
            gym.spaces.Box(0.0, 1.0, shape=(2, 3), dtype=np.float32),
            gym.spaces.Box(
                np.array([-1.0, -0.5, 0.0], dtype=np.float32),
                np.array([1.0, 2.0, 3.0], dtype=np.float32),
            ),
        ),
    ],
)
def test_describe_rebuild_spaces_round_trip(obs_space, act_space) -> None:
    described = ckpt.describe_spaces(obs_space, act_space)
    # plain data only
    assert torch.load(_roundtrip_bytes(described), weights_only=True) == described
    obs, act = ckpt.rebuild_spaces(described)
    assert isinstance(obs, gym.spaces.Box)
    assert obs.shape == obs_space.shape
    assert type(act) is type(act_space)
    if isinstance(act_space, gym.spaces.Discrete):
        assert (act.n, act.start) == (act_space.n, act_space.start)
    elif isinstance(act_space, gym.spaces.MultiDiscrete):
        np.testing.assert_array_equal(act.nvec, act_space.nvec)
        np.testing.assert_array_equal(act.start, act_space.start)
    else:
        assert act.shape == act_space.shape
        np.testing.assert_array_equal(act.low, act_space.low)
        np.testing.assert_array_equal(act.high, act_space.high)
    assert ckpt.describe_spaces(obs, act)["action"] == described["action"]


def _roundtrip_bytes(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# --- load_agent round trip -----------------------------------------------------------------------


def _train_config(agent_cfg: AgentConfig) -> TrainConfig:
    env = EnvConfig(id="CartPole-v1", num_envs=2, num_steps=4, normalize_obs=True, clip_obs=3.0)
    algo = algo_config("clip", update_epochs=1, num_minibatches=1)
    return TrainConfig(env=env, algo=algo, agent=agent_cfg, total_timesteps=8)


OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
ACTION_SPACES = {
    "discrete": gym.spaces.Discrete(4),
    "box": gym.spaces.Box(np.array([-1.0, -0.2], dtype=np.float32), np.array([0.5, 2.0], dtype=np.float32)),
}


@pytest.mark.parametrize("kind", sorted(ACTION_SPACES))
def test_load_agent_round_trip(tmp_path: Path, kind: str) -> None:
    act_space = ACTION_SPACES[kind]
    agent_cfg = AgentConfig(actor_hidden=[8], critic_hidden=[6, 6], activation="relu", log_std_init=-0.3)
    cfg = _train_config(agent_cfg)
    plain_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    agent = ActorCritic(OBS_SPACE, act_space, cfg.agent, cfg.env.normalize_obs, cfg.env.clip_obs)
    stats = agent.obs_normalizer.stats
    stats.mean.copy_(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    stats.var.copy_(torch.tensor([4.0, 0.25, 9.0], dtype=torch.float64))
    stats.count.fill_(123.0)
    with torch.no_grad():
        agent.actor[-1].weight.mul_(200.0)  # large outputs: distinct argmaxes, means beyond bounds
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5, fused=True)  # as train.py
    agent.value(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    reward_scaler = RewardScaler(2, 0.99, 10.0)
    payload = {
        "config": plain_config,
        "spaces": ckpt.describe_spaces(OBS_SPACE, act_space),
        "agent": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "reward_scaler": reward_scaler.state_dict(),
        "global_step": 4096,
        "iteration": 7,
    }
    ckpt.save_checkpoint(payload, tmp_path, keep=3, periodic=True)

    rng = np.random.default_rng(0)
    obs = (rng.normal(size=(32, 3)) * [2.0, 0.5, 3.0] + [1.0, -2.0, 0.5]).astype(np.float32)
    obs[0] = [100.0, -100.0, 0.0]  # clipped by the normaliser
    mean = torch.tensor([1.0, -2.0, 0.5])
    std = torch.sqrt(torch.tensor([4.0, 0.25, 9.0]) + 1e-8)
    normed = torch.clamp((torch.as_tensor(obs) - mean) / std, -3.0, 3.0)
    with torch.no_grad():
        head = agent.actor(normed)
        expected_values = agent.critic(normed).squeeze(-1).numpy()
    if kind == "discrete":
        expected = head.argmax(-1).numpy()
        assert len(set(expected.tolist())) > 1
    else:
        expected = np.clip(head.numpy(), act_space.low, act_space.high)
        assert (head.numpy() < act_space.low).any() or (head.numpy() > act_space.high).any()

    for source in (tmp_path, ckpt.checkpoint_dir(tmp_path) / "step_0000004096.pt"):
        loaded = load_agent(source)
        assert loaded.global_step == 4096
        assert loaded.config == plain_config
        batch_actions = loaded.act(obs, deterministic=True)
        np.testing.assert_allclose(batch_actions, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(loaded.value(obs), expected_values, rtol=1e-5, atol=1e-6)
        for i in (0, 5):
            single = loaded.act(obs[i], deterministic=True)
            assert np.shape(single) == np.shape(expected[i])
            np.testing.assert_allclose(single, expected[i], rtol=1e-5, atol=1e-6)
            value = loaded.value(obs[i])
            assert isinstance(value, float)
            assert value == pytest.approx(float(expected_values[i]), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(loaded.network.obs_normalizer.stats.count, stats.count)


def test_load_agent_rejects_mismatched_network(tmp_path: Path) -> None:
    cfg = _train_config(AgentConfig(actor_hidden=[8], critic_hidden=[8]))
    plain_config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    act_space = gym.spaces.Discrete(2)
    other = ActorCritic(OBS_SPACE, act_space, AgentConfig(actor_hidden=[5], critic_hidden=[8]), True)
    payload = {
        "config": plain_config,
        "spaces": ckpt.describe_spaces(OBS_SPACE, act_space),
        "agent": other.state_dict(),
        "global_step": 1,
    }
    ckpt.save_checkpoint(payload, tmp_path, keep=0, periodic=False)
    with pytest.raises(UserError) as info:
        load_agent(tmp_path)
    message = str(info.value)
    last = tmp_path / "checkpoints" / "last.pt"
    assert message.startswith(f"{last}: the checkpoint's network does not fit")
    assert "actor.0.weight is [5, 3] there, [8, 3] here" in message
    assert "\n" not in message


# Saves step 1, then starts saving step 2 and stalls inside fsync: the parent SIGKILLs it there.
STALLED_WRITER = """
import os, sys, time
from pathlib import Path
import torch
from ppo_cli import checkpoint as ckpt

run_dir = Path(sys.argv[1])
ckpt.save_checkpoint({"global_step": 1, "w": torch.ones(100_000)}, run_dir, keep=3, periodic=True)

def stall(fd):
    (run_dir / "writing").touch()
    time.sleep(120)

os.fsync = stall
ckpt.save_checkpoint({"global_step": 2, "w": torch.full((100_000,), 2.0)}, run_dir, keep=3, periodic=True)
"""


@pytest.mark.slow
def test_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "writing").exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never started step 2"
            time.sleep(0.05)
        writer.kill()
    finally:
        writer.wait(timeout=60)
    directory = ckpt.checkpoint_dir(tmp_path)
    # The new data sits in a temp file only; the final names still hold step 1, complete.
    leftovers = [p for p in directory.iterdir() if p.name.startswith(".last.pt.tmp-")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 100_000
    assert _files(directory) == sorted([leftovers[0].name, "last.pt", "step_0000000001.pt"])
    payload = ckpt.load_checkpoint(tmp_path)
    assert payload["global_step"] == 1
    assert torch.equal(payload["w"], torch.ones(100_000))
    assert ckpt.newest_valid_checkpoint(directory)[0] == directory / "last.pt"  # type: ignore[index]
    ckpt.remove_stale_temp_files(directory)
    assert _files(directory) == ["last.pt", "step_0000000001.pt"]


def _assert_equal_nested(saved: object, loaded: object, where: str = "") -> None:
    if isinstance(saved, torch.Tensor):
        assert isinstance(loaded, torch.Tensor) and torch.equal(saved, loaded), where
    elif isinstance(saved, dict):
        assert isinstance(loaded, dict) and saved.keys() == loaded.keys(), where
        for key in saved:
            _assert_equal_nested(saved[key], loaded[key], f"{where}.{key}")
    elif isinstance(saved, list | tuple):
        assert isinstance(loaded, list | tuple) and len(saved) == len(loaded), where
        for i, (a, b) in enumerate(zip(saved, loaded, strict=True)):
            _assert_equal_nested(a, b, f"{where}[{i}]")
    else:
        assert saved == loaded, where


@pytest.mark.parametrize("algo", ["clip", "penalty", "grpo"])
def test_save_load_keeps_the_whole_training_state(algo: str, tmp_path: Path) -> None:
    """Every parameter, optimizer tensor, normalisation statistic, the variant's state, the envs
    and the random generators: loaded into a fresh run, then saved again, nothing changed."""
    extra = [] if algo == "grpo" else ["env.normalize_reward=true"]
    cfg = compose_config(f"algo={algo}", "env=Pendulum", "env.num_steps=200", "algo.num_minibatches=4",
                         "total_timesteps=1600", "eval.episodes=0", *extra)  # fmt: skip
    train(cfg, tmp_path)
    path = ckpt.checkpoint_dir(tmp_path) / "last.pt"
    saved = ckpt.load_checkpoint(path)
    with closing(make_vector_env(cfg.env, per_env_seeds=algo == "grpo")) as envs:
        state = build_state(cfg, envs, torch.device("cpu"), SINGLE_PROCESS)
        checkpointer = Checkpointer(tmp_path, saved["config"], cfg.checkpoint.keep)
        assert checkpointer.restore(state, saved, path, cfg.seed)  # exact: Pendulum's state is all numpy
        again = checkpointer.payload(state)
    assert saved["agent"]["obs_normalizer.stats.count"] > 0
    assert (saved["reward_scaler"] is None) == (algo == "grpo")
    for key in again:
        _assert_equal_nested(saved[key], again[key], key)
