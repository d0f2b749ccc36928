"""ppo-export: the exported files act as ``load_agent``'s agent does, in TorchScript and in ONNX
(run with onnxruntime, as a deployment would), and bad input is one line."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import onnxruntime
import pytest
import torch
from support import compose_config, console_script, one_line_failure, run

from ppo_cli import cli, load_agent
from ppo_cli.agent import ActorCritic
from ppo_cli.checkpoint import load_checkpoint
from ppo_cli.config import AgentConfig
from ppo_cli.export import export_checkpoint, export_policy
from ppo_cli.policy import TrainedAgent
from ppo_cli.train import train

pytestmark = [
    # torch calls TorchScript deprecated, yet reads it: loading the files is what deployments do.
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
    # Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
    pytest.mark.xdist_group("test_export"),
]

# torch's ONNX exporter takes seconds per file (torch.export, then the translation): slow tier.
FORMATS = ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)]
TINY = (
    "env.num_envs=2",
    "env.num_steps=16",
    "total_timesteps=64",
    "eval.episodes=0",
    "algo.num_minibatches=2",
)


def run_exported(path: Path, fmt: str, **inputs: np.ndarray) -> list[np.ndarray]:
    """The outputs of an exported file, loaded as a deployment would: ``torch.jit.load`` or an
    onnxruntime session, whose input names are checked to be the documented ones, in order."""
    if fmt == "torchscript":
        outputs = torch.jit.load(str(path))(*(torch.as_tensor(x) for x in inputs.values()))
        return [out.numpy() for out in (outputs if isinstance(outputs, tuple) else (outputs,))]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == list(inputs)
    return session.run(None, inputs)


def random_obs(size: int, dim: int) -> np.ndarray:
    """Observations on several scales, one far enough out for the normaliser to clip it."""
    obs = np.random.default_rng(1).normal(size=(size, dim)) * np.logspace(-1, 1, dim)
    obs[0] = 1e4
    return obs.astype(np.float32)


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CartPole agent trained for two iterations, observations normalised."""
    run_dir = tmp_path_factory.mktemp("cartpole")
    train(compose_config("env=CartPole", "env.normalize_obs=true", *TINY), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def pendulum_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Pendulum agent trained for two iterations (observations normalised, as its preset does),
    saved with its actor's last layer scaled up: means beyond the action bounds, so that the
    clipping is exercised."""
    run_dir = tmp_path_factory.mktemp("pendulum")
    train(compose_config("env=Pendulum", *TINY), run_dir)
    payload = load_checkpoint(run_dir)
    payload["agent"][f"actor.{2 * len(payload['config']['agent']['actor_hidden'])}.weight"] *= 300.0
    widened = run_dir / "widened.pt"
    torch.save(payload, widened)
    return widened


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_discrete_policy_takes_load_agents_actions(cartpole_run: Path, fmt: str) -> None:
    out, signature = export_checkpoint(cartpole_run, fmt)
    assert signature == "obs (B, 4) float32 -> action (B,) int64"
    assert out == cartpole_run / f"policy.{fmt}"
    obs = random_obs(64, 4)
    expected = load_agent(cartpole_run).act(obs, deterministic=True)
    assert set(expected.tolist()) == {0, 1}
    (actions,) = run_exported(out, fmt, obs=obs)
    assert actions.dtype == np.int64
    np.testing.assert_array_equal(actions, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_continuous_policy_takes_load_agents_clipped_means(
    pendulum_checkpoint: Path, fmt: str, tmp_path: Path
) -> None:
    out, signature = export_checkpoint(pendulum_checkpoint, fmt, tmp_path / f"pendulum.{fmt}")
    assert signature == "obs (B, 3) float32 -> action (B, 1) float32"
    obs = random_obs(64, 3)
    expected = load_agent(pendulum_checkpoint).act(obs, deterministic=True)
    assert (np.abs(expected) == 2.0).any() and (np.abs(expected) < 2.0).any()  # clipped, and not
    (actions,) = run_exported(out, fmt, obs=obs)
    assert actions.shape == (64, 1)
    np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_export_samples_around_the_mean_within_the_bounds(
    cartpole_run: Path, pendulum_checkpoint: Path, fmt: str, tmp_path: Path
) -> None:
    """--stochastic: the same observation gives different actions, centred on the deterministic one
    (the untrained Pendulum agent's mean is near 0, its std exp(log_std_init) = 1)."""
    out, _ = export_checkpoint(
        pendulum_checkpoint.parent, fmt, tmp_path / f"stochastic.{fmt}", deterministic=False
    )
    obs = np.repeat(random_obs(1, 3), 2000, axis=0)
    (actions,) = run_exported(out, fmt, obs=obs)
    mean = load_agent(pendulum_checkpoint.parent).act(obs[0], deterministic=True)
    assert np.all(np.abs(actions) <= 2.0)
    assert 0.5 < actions.std() < 1.0  # N(mean, 1) clipped to [-2, 2]: 0.88 near mean 0
    assert abs(actions.mean() - mean[0]) < 0.1
    default, _ = export_checkpoint(cartpole_run, fmt, deterministic=False)
    assert default == cartpole_run / f"policy-stochastic.{fmt}"
    (discrete,) = run_exported(default, fmt, obs=np.repeat(random_obs(1, 4), 200, axis=0))
    assert set(discrete.tolist()) == {0, 1}


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_recurrent_policy_carries_its_state(fmt: str, tmp_path: Path) -> None:
    """An LSTM agent: the state is an input and the next state an output; stepped through an
    episode, the file takes the actions load_agent's agent takes with its state carried."""
    agent_cfg = AgentConfig(actor_hidden=[8], critic_hidden=[8], recurrent="lstm", recurrent_size=8)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    network = ActorCritic(obs_space, gym.spaces.Box(-1.0, 1.0, (2,), np.float32), agent_cfg, True)
    with torch.no_grad():
        network.actor.linear_layers[-1].weight.mul_(100.0)
    agent = TrainedAgent(network, (3,), {}, 0)
    out = tmp_path / f"lstm.{fmt}"
    signature = export_policy(agent, out, fmt)
    assert (
        signature
        == "obs (B, 3) float32, state (B, 16) float32 -> action (B, 2) float32, next_state (B, 16) float32"
    )
    state = agent.initial_state(5)
    exported_state = state.numpy().copy()
    for step in range(4):
        obs = random_obs(5, 3) + step
        expected = agent.act(obs, state=state)
        actions, exported_state = run_exported(out, fmt, obs=obs, state=exported_state)
        np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(exported_state, state.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(exported_state).max() > 0.1


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_masked_policy_takes_the_allowed_actions(fmt: str, tmp_path: Path) -> None:
    """--action-mask adds a bool input; MultiDiscrete actions come per component, in the space's
    own numbering (from its start)."""
    space = gym.spaces.MultiDiscrete([3, 4], start=[1, -2])
    network = ActorCritic(gym.spaces.Box(-1.0, 1.0, (5,)), space, AgentConfig(actor_hidden=[8]))
    agent = TrainedAgent(network, (5,), {}, 0)
    out = tmp_path / f"masked.{fmt}"
    signature = export_policy(agent, out, fmt, masked=True)
    assert signature == "obs (B, 5) float32, action_mask (B, 7) bool -> action (B, 2) int64"
    obs = random_obs(32, 5)
    masks = np.random.default_rng(2).random((32, 7)) < 0.5
    masks[:, [0, 3]] = True  # one allowed action per component at least
    (actions,) = run_exported(out, fmt, obs=obs, action_mask=masks)
    np.testing.assert_array_equal(actions, agent.act(obs, action_mask=masks))
    assert all(space.contains(a) for a in actions)
    allowed = [masks[np.arange(32), actions[:, 0] - 1], masks[np.arange(32), 3 + actions[:, 1] + 2]]
    assert np.all(allowed)
    assert not np.array_equal(actions, agent.act(obs))  # the mask made a difference


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_cnn_policy_takes_uint8_pixels(fmt: str, tmp_path: Path) -> None:
    image = gym.spaces.Box(0, 255, (2, 36, 36), np.uint8)
    network = ActorCritic(image, gym.spaces.Discrete(6), AgentConfig(actor_hidden=[], encoder="nature_cnn"))
    with torch.no_grad():
        network.actor.linear_layers[-1].weight.mul_(100.0)
    agent = TrainedAgent(network, (2, 36, 36), {}, 0)
    out = tmp_path / f"cnn.{fmt}"
    assert export_policy(agent, out, fmt) == "obs (B, 2, 36, 36) uint8 -> action (B,) int64"
    pixels = np.random.default_rng(3).integers(0, 256, (16, 2, 36, 36), dtype=np.uint8)
    (actions,) = run_exported(out, fmt, obs=pixels)
    expected = agent.act(pixels)
    assert len(set(expected.tolist())) > 1
    np.testing.assert_array_equal(actions, expected)


EXPORT_BAD_INPUTS = [
    (["DIR/nothing", "--format", "onnx"], "DIR/nothing: no such checkpoint"),
    (["RUN", "--format", "tflite"], "--format: got 'tflite', allowed: torchscript, onnx"),
    (["RUN", "--format", "onnx", "--action-mask"], "--action-mask: the agent's actions are continuous"),
    (
        ["RUN", "--format", "torchscript", "--out", "DIR/no/such/dir/p.pt"],
        "DIR/no/such/dir/p.pt: cannot write",
    ),
]


@pytest.mark.parametrize(("args", "expected"), EXPORT_BAD_INPUTS, ids=[a[-1] for a, _ in EXPORT_BAD_INPUTS])
def test_ppo_export_bad_input_is_one_line_and_writes_nothing(
    args: list[str],
    expected: str,
    pendulum_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = pendulum_checkpoint.parent
    before = sorted(run_dir.rglob("*"))
    argv = [arg.replace("DIR", str(tmp_path)).replace("RUN", str(run_dir)) for arg in args]
    code, line = one_line_failure(cli.export_main, ["ppo-export", *argv], monkeypatch, capsys)
    assert code == 2
    assert line.startswith(f"ppo-export: error: {expected.replace('DIR', str(tmp_path))}")
    assert sorted(run_dir.rglob("*")) == before
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.slow
def test_ppo_export_console_script_writes_the_policy_into_the_run(cartpole_run: Path, tmp_path: Path) -> None:
    result = run([console_script("ppo-export"), str(cartpole_run), "--format", "torchscript"], tmp_path, 120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""
    out = cartpole_run / "policy.torchscript"
    assert result.stdout == f"wrote {out}: obs (B, 4) float32 -> action (B,) int64\n"
    obs = random_obs(8, 4)
    np.testing.assert_array_equal(
        run_exported(out, "torchscript", obs=obs)[0], load_agent(cartpole_run).act(obs)
    )
