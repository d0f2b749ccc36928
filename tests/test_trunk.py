"""The shared trunk: the Nature CNN on pixels, and recurrent cores that remember across steps."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from support import compose_config

from ppo_cli import load_agent
from ppo_cli.agent import ActorCritic
from ppo_cli.batch import Batch, SequenceBatch
from ppo_cli.checkpoint import load_checkpoint
from ppo_cli.config import AgentConfig
from ppo_cli.distributed import SINGLE_PROCESS
from ppo_cli.envs import make_vector_env
from ppo_cli.evaluate import evaluate_checkpoint
from ppo_cli.iteration import build_state
from ppo_cli.train import train
from ppo_cli.trunk import Memory, NatureCNN

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_trunk")

PIXELS = gym.spaces.Box(0, 255, shape=(2, 36, 36), dtype=np.uint8)
CNN_AGENT = AgentConfig(actor_hidden=[], critic_hidden=[16], encoder="nature_cnn")
CUE = ["env.id=synthetic_envs:RememberCue-v0", "env.num_envs=8", "env.num_steps=32", "~tuned"]
# 8192 steps (32 iterations): measured on seeds 0-2, the LSTM and the GRU score 1.0 and the MLP
# 0.375, as they did at 16384.
CUE_TRAINING = [
    "algo.update_epochs=4", "algo.num_minibatches=4", "algo.learning_rate=0.003", "total_timesteps=8192",
]  # fmt: skip


def test_nature_cnn_takes_flat_pixels_with_any_leading_dimensions() -> None:
    """The same image gives the same features flattened or not, alone or in a (T, B) batch, and
    pixels are scaled to [0, 1]: 255 is 1.0 for the first layer."""
    torch.manual_seed(0)
    cnn = NatureCNN((2, 36, 36))
    images = torch.randint(0, 256, (3, 4, 2 * 36 * 36), dtype=torch.uint8)
    sequence = cnn(images)
    assert sequence.shape == (3, 4, 512)
    torch.testing.assert_close(sequence[1, 2], cnn(images[1, 2:3])[0])
    x = torch.ones(1, 2, 36, 36)  # a white image, as the network should see it
    for conv in cnn.convs:
        x = torch.relu(conv(x))
    assert x.shape == (1, 64, 1, 1)  # 36 -> 8 -> 3 -> 1
    white = torch.full((1, 2 * 36 * 36), 255, dtype=torch.uint8)
    torch.testing.assert_close(cnn(white), torch.relu(cnn.linear(x.flatten(1))))


@pytest.mark.parametrize("loss_of", ["value", "policy"])
def test_a_shared_trunk_gets_gradients_from_both_heads_and_each_head_only_its_own(loss_of: str) -> None:
    agent = ActorCritic(PIXELS, gym.spaces.Discrete(3), CNN_AGENT)
    obs = torch.randint(0, 256, (5, int(np.prod(PIXELS.shape))), dtype=torch.uint8)
    loss = agent.value(obs).sum() if loss_of == "value" else agent.policy_params(obs).sum()
    loss.backward()
    own, other = (agent.critic, agent.actor) if loss_of == "value" else (agent.actor, agent.critic)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.trunk_parameters())
    assert all(p.grad is not None for p in own.parameters())
    assert all(p.grad is None for p in other.parameters())


def test_pixels_are_stored_as_bytes_exactly_as_the_env_returned_them() -> None:
    cfg = compose_config(
        "env.id=synthetic_envs:BrightSide-v0", "env.num_envs=2", "env.num_steps=4", "~tuned",
        "algo.num_minibatches=1", "agent.encoder=nature_cnn", "agent.actor_hidden=[]",
        "agent.critic_hidden=[]",
    )  # fmt: skip
    with closing(make_vector_env(cfg.env, training=True)) as envs:
        state = build_state(cfg, envs, torch.device("cpu"), SINGLE_PROCESS)
        first = state.collector.obs.clone()
        state.collector.collect()
    storage = state.collector.storage
    assert storage.obs.dtype == torch.uint8 and storage.obs.shape == (4, 2, 36 * 36)
    torch.testing.assert_close(storage.obs[0], first)
    assert set(storage.obs.unique().tolist()) == {0, 255}


@pytest.mark.slow
def test_cnn_policy_learns_which_side_the_square_is_on(tmp_path: Path) -> None:
    """BrightSide: reading the image scores 8 per episode, guessing 4 (seeds 0-2: 8.0)."""
    cfg = compose_config(
        "env.id=synthetic_envs:BrightSide-v0", "env.num_envs=8", "env.num_steps=32", "~tuned",
        "agent.encoder=nature_cnn", "agent.actor_hidden=[]", "agent.critic_hidden=[]",
        "algo.update_epochs=4", "algo.num_minibatches=4", "algo.learning_rate=0.001", "algo.ent_coef=0.0",
        "total_timesteps=8192", "eval.episodes=10",
    )  # fmt: skip
    assert train(cfg, tmp_path)["eval_mean"] >= 7.5


@pytest.mark.parametrize("core", ["lstm", "gru"])
def test_the_update_replays_the_states_the_policy_acted_with(core: str) -> None:
    """After a rollout, replaying the stored sequences from the stored initial state gives back
    the log-probabilities and values recorded while acting, for the whole batch and for a
    minibatch of envs; forgetting where episodes started does not (the test can tell)."""
    cfg = compose_config(*CUE, f"agent={core}", "agent.recurrent_size=16")
    with closing(make_vector_env(cfg.env, training=True, sequences=True)) as envs:
        state = build_state(cfg, envs, torch.device("cpu"), SINGLE_PROCESS)
        state.collector.collect()  # the second rollout starts from a state carried over
        state.collector.collect()
    storage, agent = state.collector.storage, state.agent
    zeros = torch.zeros_like(storage.log_probs)
    batch = Batch.from_storage(storage, zeros, zeros)
    assert isinstance(batch, SequenceBatch) and batch.obs.shape[:2] == (32, 8)  # one sequence per env
    assert batch.starts is not None and batch.starts.any() and bool(batch.memory.state.abs().sum() > 0)
    with torch.no_grad():
        replay = agent.evaluate(batch.obs, batch.actions, None, batch.memory)
        torch.testing.assert_close(replay.log_prob, storage.log_probs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(replay.value, storage.values, rtol=1e-4, atol=1e-5)
        mb = next(batch.shuffled_minibatches(4))
        assert mb.obs.shape[:2] == (32, 2)
        torch.testing.assert_close(agent.evaluate(mb.obs, mb.actions, None, mb.memory).log_prob, mb.log_probs)
        # Cut into 4 sequences of 8 steps per env, each replayed from the state stored at its start.
        chunked = Batch.from_storage(storage, zeros, zeros, chunks=4)
        assert chunked.obs.shape[:2] == (8, 32)
        torch.testing.assert_close(chunked.obs[:, 8 + 3], storage.obs[8:16, 3])  # chunk 1 of env 3
        chunked_replay = agent.evaluate(chunked.obs, chunked.actions, None, chunked.memory)
        torch.testing.assert_close(chunked_replay.log_prob, chunked.log_probs, rtol=1e-4, atol=1e-5)
        forgetful = Memory(batch.memory.state, torch.zeros_like(batch.memory.starts))
        forgotten = agent.evaluate(batch.obs, batch.actions, None, forgetful)
        assert not torch.allclose(forgotten.value, storage.values)


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("lstm")
    cfg = compose_config(*CUE, *CUE_TRAINING, "agent=lstm", "eval.episodes=40")
    return run_dir, train(cfg, run_dir)


@pytest.mark.slow
def test_lstm_remembers_the_cue(lstm_run: tuple[Path, dict]) -> None:
    """RememberCue: the cue is shown at the first step and scored at the fourth (seeds 0-2: 1.0)."""
    assert lstm_run[1]["eval_mean"] >= 0.9


@pytest.mark.parametrize("agent", ["gru", "mlp"])
@pytest.mark.slow
def test_gru_remembers_the_cue_and_a_feed_forward_policy_cannot(agent: str, tmp_path: Path) -> None:
    """Seeds 0-2: the GRU scores 1.0, the MLP 0.38 (it answers the same whatever the cue was)."""
    cfg = compose_config(*CUE, *CUE_TRAINING, f"agent={agent}", "eval.episodes=40")
    score = train(cfg, tmp_path)["eval_mean"]
    if agent == "mlp":
        assert score <= 0.7  # a guess: the cue is gone when it is scored
    else:
        assert score >= 0.9


@pytest.mark.slow
def test_a_saved_recurrent_agent_carries_its_state(lstm_run: tuple[Path, dict]) -> None:
    """The checkpoint holds the collector's recurrent state; load_agent and ppo-eval act with a
    state carried from step to step, and without it the agent is back to guessing."""
    run_dir, _ = lstm_run
    payload = load_checkpoint(run_dir)
    assert payload["collector"]["recurrent_state"].shape == (8, 256)  # [h, c] of 128 units
    agent = load_agent(run_dir)
    env = gym.make("synthetic_envs:RememberCue-v0")
    scores = {"carried": 0.0, "reset every step": 0.0}
    for mode in scores:
        for episode in range(60):
            obs, _ = env.reset(seed=episode)
            state, done = agent.initial_state(), False
            while not done:
                if mode != "carried":
                    state.zero_()
                obs, reward, done, _, _ = env.step(int(agent.act(obs, state=state)))
                scores[mode] += float(reward) / 60
    assert scores["carried"] >= 0.9 and scores["reset every step"] <= 0.7
    # The critic reads the state too, and leaves it as it was: the value of a cued start is
    # the discounted reward of answering right (gamma 0.99, three steps away), about 0.97.
    obs, _ = env.reset(seed=0)
    state = agent.initial_state()
    before = state.clone()
    assert 0.8 <= agent.value(obs, state=state) <= 1.1
    torch.testing.assert_close(state, before)
    assert evaluate_checkpoint(run_dir, 20, True, trusted_modules=("synthetic_envs",))["mean"] >= 0.9
