"""Rollout collection under both autoreset conventions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from support import algo_config

from ppo_cli import load_agent
from ppo_cli.agent import ActorCritic
from ppo_cli.algos.whole_episodes import GroupCollector
from ppo_cli.batch import Batch
from ppo_cli.config import AgentConfig, EnvConfig, EvalConfig, TrainConfig
from ppo_cli.envs import finished_episodes, make_vector_env, uses_next_step_autoreset
from ppo_cli.rollout import Collector, RolloutStorage
from ppo_cli.train import train

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_rollout")

COUNTER_ID = "PpoCliTestCounter-v0"
CPU = torch.device("cpu")


class CounterEnv(gym.Env):
    """Observation [k, 1] after k steps; reward 1; never terminates (a time limit ends it)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return np.array([0.0, 1.0], dtype=np.float32), {}

    def step(self, action):
        self.k += 1
        return np.array([float(self.k), 1.0], dtype=np.float32), 1.0, False, False, {}


@pytest.fixture(scope="module", autouse=True)
def _register_counter():
    gym.register(id=COUNTER_ID, entry_point=CounterEnv)
    yield
    gym.registry.pop(COUNTER_ID, None)


def _storage(num_steps, envs, agent) -> RolloutStorage:
    return RolloutStorage(num_steps, envs.num_envs, agent, CPU)


def _agent(envs) -> ActorCritic:
    cfg = AgentConfig(actor_hidden=[8], critic_hidden=[16], activation="tanh")
    agent = ActorCritic(envs.single_observation_space, envs.single_action_space, cfg)
    with torch.no_grad():  # make V depend strongly on the step counter
        agent.critic[0].weight[:, 0].mul_(3.0)
    return agent


def test_same_step_truncation_bootstraps_from_final_obs() -> None:
    limit, num_steps = 3, 8
    cfg = EnvConfig(
        id=COUNTER_ID,
        num_envs=2,
        num_steps=num_steps,
        vectorization="sync",
        max_episode_steps=limit,
    )
    envs = make_vector_env(cfg)
    try:
        assert not uses_next_step_autoreset(envs)
        agent = _agent(envs)
        storage = _storage(num_steps, envs, agent)
        collector = Collector(envs, agent, storage, device=CPU, seed=0)
        stats = collector.collect()
    finally:
        envs.close()

    def V(k: float) -> float:
        return agent.value(torch.tensor([[k, 1.0]])).item()

    v_final, v_reset = V(float(limit)), V(0.0)
    assert abs(v_final - v_reset) > 1e-3  # the check below can tell them apart
    # Observed counters: 0,1,2 | 0,1,2 | 0,1  (reset obs is stored, never the final one)
    expected_k = [t % limit for t in range(num_steps)]
    np.testing.assert_array_equal(storage.obs[:, :, 0].numpy(), np.array([expected_k] * 2).T)
    trunc_steps = [t for t in range(num_steps) if t % limit == limit - 1]
    expected_trunc = np.zeros((num_steps, 2), dtype=bool)
    expected_trunc[trunc_steps] = True
    np.testing.assert_array_equal(storage.truncated.numpy(), expected_trunc)
    assert not storage.terminated.any()
    assert storage.valid.all()
    for t in trunc_steps:
        for n in range(2):
            assert storage.next_values[t, n].item() == pytest.approx(v_final, abs=1e-6)
            assert storage.next_values[t, n].item() != pytest.approx(v_reset, abs=1e-4)
    for t in range(num_steps - 1):
        if t not in trunc_steps:
            torch.testing.assert_close(storage.next_values[t], storage.values[t + 1])
    last_k = float((num_steps) % limit)
    assert storage.next_values[-1, 0].item() == pytest.approx(V(last_k), abs=1e-6)
    torch.testing.assert_close(storage.values[:, 0], storage.values[:, 1])
    assert stats.episodes.lengths == [limit] * (2 * len(trunc_steps))
    assert stats.episodes.returns == [float(limit)] * (2 * len(trunc_steps))


def test_same_step_truncation_without_bootstrap_flag_keeps_reset_value() -> None:
    cfg = EnvConfig(id=COUNTER_ID, num_envs=1, num_steps=4, vectorization="sync", max_episode_steps=2)
    envs = make_vector_env(cfg)
    try:
        agent = _agent(envs)
        storage = _storage(4, envs, agent)
        Collector(envs, agent, storage, device=CPU, seed=0, bootstrap_truncated=False).collect()
    finally:
        envs.close()
    assert storage.truncated[1, 0] and storage.truncated[3, 0]
    torch.testing.assert_close(storage.next_values[1], storage.values[2])


def test_next_step_autoreset_marks_fake_steps_invalid() -> None:
    num_envs, num_steps = 4, 24
    cfg = EnvConfig(
        id="CartPole-v1",
        num_envs=num_envs,
        num_steps=num_steps,
        vectorization="vector_entry_point",
        max_episode_steps=10,
    )
    envs = make_vector_env(cfg)
    try:
        assert uses_next_step_autoreset(envs)
        agent = _agent(envs)
        with torch.no_grad():  # mostly push right: quick terminations, some time-limit cuts
            agent.actor[-1].bias[1] = 3.0
        storage = _storage(num_steps, envs, agent)
        collector = Collector(envs, agent, storage, device=CPU, seed=3)
        collector.collect()
        first = {k: getattr(storage, k).clone() for k in ("terminated", "truncated", "valid")}
        stats = collector.collect()
    finally:
        envs.close()

    for s in (first, storage.__dict__):
        done = s["terminated"] | s["truncated"]
        assert done.sum() >= num_envs
        # The step right after each episode end is fake, every other step is real.
        torch.testing.assert_close(s["valid"][1:], ~done[:-1])
    assert first["valid"][0].all()  # the very first step follows a reset
    # Across the iteration boundary the mask carries over.
    first_done = first["terminated"][-1] | first["truncated"][-1]
    torch.testing.assert_close(storage.valid[0], ~first_done)
    assert storage.truncated.any() and storage.terminated[:-2].any()
    # Fake steps carry no reward; real CartPole steps earn 1.
    assert (storage.rewards[~storage.valid] == 0).all()
    assert (storage.rewards[storage.valid] == 1).all()
    # The observation stored at a fake step is the final one: after a termination it lies
    # outside CartPole's bounds (|x| > 2.4 or |theta| > 12 deg), unlike any reset observation.
    for t, n in storage.terminated[:-1].nonzero().tolist():
        x, _, theta, _ = storage.obs[t + 1, n].tolist()
        assert abs(x) > 2.4 or abs(theta) > 12 * 2 * np.pi / 360
        if t + 2 < num_steps:
            assert storage.obs[t + 2, n].abs().max() <= 0.05  # then the reset observation
    # A truncated step bootstraps from the fake step's observation, i.e. the final one.
    torch.testing.assert_close(storage.next_values[:-1], storage.values[1:])
    assert stats.episodes.lengths and all(1 <= n <= 10 for n in stats.episodes.lengths)

    # Batch.from_storage drops exactly the fake steps, keeping time-major order.
    T, N = num_steps, num_envs
    advantages = torch.arange(T * N, dtype=torch.float32).reshape(T, N)
    returns = advantages + 0.5
    batch = Batch.from_storage(storage, advantages, returns)
    keep = storage.valid.flatten()
    assert (~keep).any()
    assert len(batch) == int(keep.sum())
    torch.testing.assert_close(batch.advantages, advantages.flatten()[keep])
    torch.testing.assert_close(batch.returns, returns.flatten()[keep])
    torch.testing.assert_close(batch.obs, storage.obs.flatten(0, 1)[keep])
    torch.testing.assert_close(batch.actions, storage.actions.flatten()[keep])
    torch.testing.assert_close(batch.log_probs, storage.log_probs.flatten()[keep])
    torch.testing.assert_close(batch.values, storage.values.flatten()[keep])


def test_batch_keeps_everything_when_all_valid() -> None:
    obs_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
    agent = ActorCritic(obs_space, gym.spaces.Discrete(2), AgentConfig([4], [4]))
    storage = RolloutStorage(3, 2, agent, CPU)
    storage.obs.copy_(torch.randn(3, 2, 4))
    adv = torch.randn(3, 2)
    batch = Batch.from_storage(storage, adv, adv + 1)
    assert len(batch) == 6
    torch.testing.assert_close(batch.obs, storage.obs.reshape(6, 4))
    torch.testing.assert_close(batch.advantages, adv.reshape(6))


class GridCounterEnv(gym.Env):
    """Like CounterEnv, with a (2, 2) observation: Box spaces of any shape pass check_spaces."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2, 2), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return self._obs(), {}

    def step(self, action):
        self.k += 1
        return self._obs(), 1.0, False, False, {}

    def _obs(self):
        return np.array([[self.k, 1.0], [-self.k, 2.0]], dtype=np.float32)


@pytest.mark.parametrize("normalize_obs", [False, True])
def test_train_on_multidimensional_box_observations(tmp_path, normalize_obs: bool) -> None:
    env_id = "PpoCliTestGridCounter-v0"
    gym.register(id=env_id, entry_point=GridCounterEnv)
    try:
        env = EnvConfig(
            id=env_id,
            num_envs=2,
            num_steps=4,
            vectorization="sync",
            max_episode_steps=3,
            normalize_obs=normalize_obs,
        )
        algo = algo_config("clip", update_epochs=1, num_minibatches=1)
        cfg = TrainConfig(
            env=env,
            algo=algo,
            agent=AgentConfig(actor_hidden=[4], critic_hidden=[4]),
            eval=EvalConfig(episodes=0),
            total_timesteps=8,
            device="cpu",
            torch_threads=0,
            progress=False,
        )
        summary = train(cfg, tmp_path)
    finally:
        gym.registry.pop(env_id, None)
    assert summary["status"] == "completed"
    assert summary["global_step"] == 8
    agent = load_agent(tmp_path)
    obs = np.array([[[k, 1.0], [-k, 2.0]] for k in range(3)], dtype=np.float32)
    assert agent.act(obs).shape == (3,)
    assert np.shape(agent.act(obs[0])) == ()


def test_group_collector_starts_each_group_from_one_seed() -> None:
    cfg = EnvConfig(id="CartPole-v1", num_envs=6, num_steps=500)
    envs = make_vector_env(cfg, per_env_seeds=True)
    agent = _agent(envs)
    storage = RolloutStorage(500, 6, agent, CPU)
    collector = GroupCollector(envs, agent, storage, group_size=3, seed=0)
    for _ in range(2):
        stats = collector.collect()
        first = storage.obs[0]
        torch.testing.assert_close(first[0], first[1])
        torch.testing.assert_close(first[0], first[2])
        assert not torch.equal(first[0], first[3])
        # One episode per env: valid up to and including its last step, never after.
        lengths = storage.valid.sum(dim=0)
        assert lengths.tolist() == stats.episodes.lengths
        for env in range(6):
            assert storage.valid[: lengths[env], env].all()
            assert not storage.valid[lengths[env] :, env].any()
            done = storage.terminated[:, env] | storage.truncated[:, env]
            assert done[lengths[env] - 1]
        assert stats.env_steps == int(lengths.max()) * 6
    envs.close()


def test_dynamic_sampling_replaces_tied_groups_up_to_its_cap() -> None:
    """TiedBySeed: 2 groups of 2 envs, pass p resets its groups from seeds 2p and 2p + 1, and
    only a seed s with s % 4 == 3 gives a group whose returns differ. Iteration 1: passes 0-2
    (seeds 0-5) find one such group (seed 3), which replaces the first tied group; the cap of
    2 extra passes leaves the second. Iteration 2: passes 3-5 (seeds 6-11) find seeds 7 and 11,
    the batch is full. Every pass is 2 steps of 4 envs."""
    cfg = EnvConfig(id="synthetic_envs:TiedBySeed-v0", num_envs=4, num_steps=2)
    envs = make_vector_env(cfg, per_env_seeds=True)
    agent = _agent(envs)
    storage = RolloutStorage(2, 4, agent, CPU)
    collector = GroupCollector(envs, agent, storage, group_size=2, seed=0, max_passes=2)
    try:
        first = collector.collect()
        assert first.counts == {"dropped_groups": 1, "tied_groups": 1}
        assert first.env_steps == 3 * 2 * 4 and len(first.episodes.returns) == 3 * 4
        assert storage.obs[0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # seed 3's group, then a tied one
        returns = (storage.rewards * storage.valid).sum(dim=0)
        assert returns[0] != returns[1] and returns[2] == returns[3] == pytest.approx(0.6)
        assert storage.valid.all()
        # The copied columns are the whole of seed 3's episodes, as pi_old saw them.
        log_probs = agent.dist.log_prob(agent.policy_params(storage.obs), storage.actions)
        torch.testing.assert_close(storage.log_probs, log_probs)
        second = collector.collect()
        assert second.counts == {"dropped_groups": 1, "tied_groups": 0}
        assert second.env_steps == 3 * 2 * 4
        assert collector.state_dict() == {"passes": 6}
        off = GroupCollector(envs, agent, storage, group_size=2, seed=0)  # the default: no resampling
        plain = off.collect()
        assert plain.counts == {"tied_groups": 2} and plain.env_steps == 2 * 4
        off.load_state_dict({"iteration": 7}, reset_seed=0)  # a checkpoint saved before "passes"
        assert off.state_dict() == {"passes": 7}
    finally:
        envs.close()


@pytest.mark.parametrize("vectorization", ["vector_entry_point", "sync"])
def test_episode_statistics_match_gymnasiums_wrapper(vectorization: str) -> None:
    """The collector counts episodes itself; it must report what RecordEpisodeStatistics reports,
    under both autoreset conventions and across iteration boundaries."""
    cfg = EnvConfig(id="CartPole-v1", num_envs=3, num_steps=40, vectorization=vectorization,
                    max_episode_steps=30)  # fmt: skip
    envs = RecordEpisodeStatistics(make_vector_env(cfg))
    wrapper_returns: list[float] = []
    wrapper_lengths: list[int] = []
    step = envs.step

    def recording_step(actions: np.ndarray):  # type: ignore[no-untyped-def]
        result = step(actions)
        _, returns, lengths = finished_episodes(result[4])
        wrapper_returns.extend(returns.tolist())
        wrapper_lengths.extend(lengths.tolist())
        return result

    envs.step = recording_step  # type: ignore[method-assign]
    try:
        agent = _agent(envs)
        collector = Collector(envs, agent, _storage(cfg.num_steps, envs, agent), device=CPU, seed=5)
        stats = [collector.collect() for _ in range(3)]
    finally:
        envs.close()
    assert len(wrapper_lengths) >= 6 and 30 in wrapper_lengths  # terminations and truncations
    assert [r for st in stats for r in st.episodes.returns] == wrapper_returns
    assert [n for st in stats for n in st.episodes.lengths] == wrapper_lengths
