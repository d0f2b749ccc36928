"""Running statistics, observation normalisation and reward scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppo_cli.normalization import ObservationNormalizer, RewardScaler, RunningMeanStd, split_moments

PRIOR = 1e-4  # the prior count (mean 0, variance 1) every RunningMeanStd starts from


def with_prior(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Closed-form mean / variance of ``data`` merged once with the prior pseudo-sample."""
    n = data.shape[0]
    m, v = data.mean(axis=0), data.var(axis=0)
    total = n + PRIOR
    mean = m * n / total
    var = (PRIOR * 1.0 + v * n + m**2 * PRIOR * n / total) / total
    return mean, var, total


def test_running_mean_std_matches_concatenation() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=[5.0, -3.0, 0.0], scale=[2.0, 0.5, 10.0], size=(n, 3)) for n in (5, 17, 1, 30)]
    rms = RunningMeanStd((3,))
    for b in batches:
        rms.fold_in(torch.as_tensor(b, dtype=torch.float32))
    data = np.concatenate(batches).astype(np.float32).astype(np.float64)
    # Against numpy, within what the 1e-4 prior count (mean 0, var 1) can move the estimate:
    # O(prior / n) times the mean, and O(prior / n) times (1 + mean^2 + var) for the variance.
    n, m, v = data.shape[0], data.mean(axis=0), data.var(axis=0)
    assert (np.abs(rms.mean.numpy() - m) <= 2 * PRIOR / n * np.abs(m) + 1e-12).all()
    assert (np.abs(rms.var.numpy() - v) <= 2 * PRIOR / n * (1 + m**2 + v)).all()
    assert not np.allclose(rms.var.numpy(), data.var(axis=0, ddof=1), rtol=1e-3)  # population var
    # And exactly, with the prior accounted for.
    mean, var, count = with_prior(data)
    np.testing.assert_allclose(rms.mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(rms.var.numpy(), var, rtol=1e-10)
    assert rms.count.item() == pytest.approx(count, rel=1e-12)
    assert rms.mean.dtype == rms.var.dtype == torch.float64


def test_split_moments_recovers_what_was_added() -> None:
    """What a stream added after a snapshot, recovered from the snapshot and the final statistics,
    are the added samples' own count, mean and variance (data-parallel ranks exchange these)."""
    rng = np.random.default_rng(1)
    before, added = rng.normal(3.0, 2.0, size=(1000, 2)), rng.normal(-1.0, 0.5, size=(37, 2))
    rms = RunningMeanStd((2,))
    rms.fold_in(before)
    snapshot = (rms.count.clone(), rms.mean.clone(), rms.var.clone())
    for chunk in np.array_split(added, 5):
        rms.fold_in(chunk)
    count, mean, var = split_moments(rms.count, rms.mean, rms.var, *snapshot)
    assert count.item() == pytest.approx(37, abs=1e-9)
    np.testing.assert_allclose(mean.numpy(), added.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(var.numpy(), added.var(axis=0), rtol=1e-8)


def test_running_mean_std_ignores_empty_batch_and_starts_at_prior() -> None:
    rms = RunningMeanStd((2,))
    assert rms.mean.tolist() == [0.0, 0.0]
    assert rms.var.tolist() == [1.0, 1.0]
    assert rms.count.item() == pytest.approx(PRIOR)
    rms.fold_in(torch.empty(0, 2))
    assert rms.mean.tolist() == [0.0, 0.0]
    assert rms.count.item() == pytest.approx(PRIOR)


def test_running_mean_std_scalar_shape() -> None:
    rms = RunningMeanStd(())
    values = np.array([1.0, 4.0, -2.0, 7.0, 0.5])
    for chunk in (values[:2], values[2:3], values[3:]):
        rms.fold_in(torch.as_tensor(chunk))
    mean, var, _ = with_prior(values)
    assert rms.mean.item() == pytest.approx(mean, rel=1e-10)
    assert rms.var.item() == pytest.approx(var, rel=1e-10)


def test_observation_normalizer_normalises_and_clips() -> None:
    norm = ObservationNormalizer((3,), clip=2.5)
    norm.stats.mean.copy_(torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    norm.stats.var.copy_(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    obs = torch.tensor([[2.0, -1.5, 0.1], [100.0, -100.0, 0.0], [-100.0, 100.0, 5.0]])
    out = norm(obs)
    assert out.dtype == torch.float32
    std = torch.sqrt(torch.tensor([4.0, 1.0, 0.25]) + 1e-8)
    torch.testing.assert_close(out[0], (obs[0] - torch.tensor([1.0, -1.0, 0.0])) / std)
    torch.testing.assert_close(out[1], torch.tensor([2.5, -2.5, 0.0]))
    torch.testing.assert_close(out[2], torch.tensor([-2.5, 2.5, 2.5]))
    assert out.abs().max().item() == 2.5


def test_observation_normalizer_forward_does_not_update() -> None:
    norm = ObservationNormalizer((2,), clip=10.0)
    norm(torch.randn(8, 2) * 5 + 3)
    assert norm.stats.count.item() == pytest.approx(PRIOR)
    assert norm.stats.mean.tolist() == [0.0, 0.0]


def _reward_stream(steps: int, num_envs: int, seed: int):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(1.0, 2.0, size=(steps, num_envs)).astype(np.float32)
    dones = rng.random((steps, num_envs)) < 0.25
    return rewards, dones


def _scale_step(scaler: RewardScaler, rewards: object, dones: object, valid: object) -> np.ndarray:
    """One step's rewards through the scaler, as a rollout of length 1."""
    as_row = lambda x: np.asarray(x)[None]  # noqa: E731
    return scaler(as_row(rewards).astype(np.float32), as_row(dones), as_row(valid))[0]


def test_reward_scaler_on_a_rollout_equals_step_by_step() -> None:
    rewards, dones = _reward_stream(30, 4, seed=2)
    valid = np.random.default_rng(3).random((30, 4)) < 0.9
    whole, stepwise = RewardScaler(4, 0.95, clip=5.0), RewardScaler(4, 0.95, clip=5.0)
    out = whole(rewards, dones, valid)
    expected = np.stack([_scale_step(stepwise, rewards[t], dones[t], valid[t]) for t in range(30)])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    torch.testing.assert_close(whole.state_dict(), stepwise.state_dict())


def test_reward_scaler_divides_by_return_std_and_resets_on_done() -> None:
    gamma, num_envs = 0.9, 3
    rewards, dones = _reward_stream(40, num_envs, seed=1)
    assert dones.any()
    scaler = RewardScaler(num_envs, gamma, clip=1e6)
    valid = torch.ones(num_envs, dtype=torch.bool)
    G = np.zeros(num_envs)
    seen: list[float] = []
    for t in range(len(rewards)):
        G = gamma * G + rewards[t].astype(np.float64)
        seen.extend(G.tolist())
        G[dones[t]] = 0.0
        out = _scale_step(scaler, torch.as_tensor(rewards[t]), torch.as_tensor(dones[t]), valid)
        _, var, _ = with_prior(np.array(seen))
        expected = rewards[t] / np.sqrt(var + 1e-8)
        np.testing.assert_allclose(out, expected, rtol=1e-5)
        np.testing.assert_allclose(scaler.returns.numpy(), G, rtol=1e-6, atol=1e-6)
        assert (scaler.returns.numpy()[dones[t]] == 0.0).all()
    # The divisor is the std of the return, not of the reward, and not of the reward's mean.
    final_std = math.sqrt(scaler.stats.var.item())
    assert final_std == pytest.approx(np.std(seen), rel=1e-3)
    assert final_std != pytest.approx(np.std(rewards), rel=1e-2)


def test_reward_scaler_reset_starts_a_fresh_return() -> None:
    scaler = RewardScaler(2, gamma=0.5, clip=100.0)
    valid = torch.ones(2, dtype=torch.bool)
    _scale_step(scaler, torch.tensor([1.0, 1.0]), torch.tensor([False, False]), valid)
    _scale_step(scaler, torch.tensor([2.0, 2.0]), torch.tensor([True, False]), valid)
    # env 0 finished: its return restarts from 0; env 1 keeps accumulating
    assert scaler.returns.tolist() == [0.0, 2.5]
    _scale_step(scaler, torch.tensor([4.0, 4.0]), torch.tensor([False, False]), valid)
    assert scaler.returns.tolist() == [4.0, 5.25]
    # values folded into the statistics: 1, 1, 2.5, 2.5, 4, 5.25
    _, var, _ = with_prior(np.array([1.0, 1.0, 2.5, 2.5, 4.0, 5.25]))
    assert scaler.stats.var.item() == pytest.approx(var, rel=1e-10)


def test_reward_scaler_masks_invalid_steps_and_clips() -> None:
    scaler = RewardScaler(3, gamma=0.99, clip=0.5)
    out = _scale_step(
        scaler,
        torch.tensor([10.0, -10.0, 0.1]),
        torch.zeros(3, dtype=torch.bool),
        torch.tensor([True, False, True]),
    )
    assert scaler.stats.count.item() == pytest.approx(2 + PRIOR)
    _, var, _ = with_prior(np.array([10.0, 0.1]))
    np.testing.assert_allclose(out[:2], [0.5, -0.5])
    assert out[2] == pytest.approx(0.1 / math.sqrt(var + 1e-8), rel=1e-5)
    # the sign of every reward survives (no mean subtraction)
    assert (np.sign(out) == [1.0, -1.0, 1.0]).all()


def test_statistics_are_buffers_in_state_dict() -> None:
    rms = RunningMeanStd((2,))
    assert set(rms.state_dict()) == {"mean", "var", "count"}
    assert not list(rms.parameters())

    norm = ObservationNormalizer((2,), clip=5.0)
    norm.stats.fold_in(torch.randn(10, 2) * 3 + 1)
    state = norm.state_dict()
    assert set(state) == {"stats.mean", "stats.var", "stats.count"}
    fresh = ObservationNormalizer((2,), clip=5.0)
    fresh.load_state_dict(state)
    obs = torch.randn(4, 2) * 3
    torch.testing.assert_close(fresh(obs), norm(obs))

    scaler = RewardScaler(2, gamma=0.9, clip=10.0)
    all_valid = torch.ones(2, dtype=torch.bool)
    _scale_step(scaler, torch.tensor([1.0, 3.0]), torch.tensor([False, False]), all_valid)
    state = scaler.state_dict()
    assert set(state) == {"stats.mean", "stats.var", "stats.count", "returns"}
    restored = RewardScaler(2, gamma=0.9, clip=10.0)
    restored.load_state_dict(state)
    assert restored.returns.tolist() == [1.0, 3.0]
    assert restored.stats.count.item() == pytest.approx(2 + PRIOR)
