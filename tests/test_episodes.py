"""Episode metrics: counted per env, pooled over ranks in order, logged under their tags."""

from __future__ import annotations

import numpy as np
import pytest

from ppo_cli.episodes import EpisodeCounter, EpisodeLog


def test_counter_reports_each_episode_when_it_ends_and_skips_fake_steps() -> None:
    counter, finished = EpisodeCounter(2), EpisodeLog()
    steps = [  # (rewards, valid, done) of two envs
        ([1.0, 2.0], [True, True], [False, False]),
        ([1.0, 2.0], [True, True], [True, False]),
        ([9.0, 2.0], [False, True], [False, True]),  # env 0's fake step counts for nothing
        ([0.5, 1.0], [True, True], [True, False]),
    ]
    for rewards, valid, done in steps:
        counter.step(np.array(rewards), np.array(valid), np.array(done), finished)
    assert finished.returns == [2.0, 6.0, 0.5]
    assert finished.lengths == [2, 3, 1]
    assert counter.returns.tolist() == [0.0, 1.0] and counter.lengths.tolist() == [0, 1]


def test_logs_pool_in_rank_order_and_log_every_metric_under_its_tag() -> None:
    rank0, rank1 = EpisodeLog([1.0, 3.0], [10, 30]), EpisodeLog([5.0], [50])
    pooled = EpisodeLog.pooled([rank0, rank1])
    assert pooled == EpisodeLog([1.0, 3.0, 5.0], [10, 30, 50])
    assert rank0 == EpisodeLog([1.0, 3.0], [10, 30])  # the parts are left as they were
    assert pooled.mean_scalars() == {
        "charts/episodic_return": pytest.approx(3.0),
        "charts/episodic_length": pytest.approx(30.0),
    }
    assert EpisodeLog.pooled([EpisodeLog(), EpisodeLog()]).mean_scalars() == {}
