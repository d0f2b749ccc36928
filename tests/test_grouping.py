"""Which jobs of a sweep form one population (grouping.py), and which cannot join one."""

from __future__ import annotations

import itertools

import pytest
from support import compose_config

from ppo_cli.config import TrainConfig
from ppo_cli.grouping import NOT_BATCHED, form_groups, split_evenly, why_not_batched


def _configs(*jobs: tuple[str, ...]) -> list[TrainConfig]:
    return [compose_config(*overrides) for overrides in jobs]


def test_a_seed_sweep_is_one_group() -> None:
    configs = _configs(*[(f"seed={seed}",) for seed in range(4)])
    assert form_groups(configs, 16) == [[0, 1, 2, 3]]


def test_scalar_hyperparameters_and_seeds_vary_inside_one_group() -> None:
    grid = itertools.product(("1e-4", "3e-4"), ("0.1", "0.2"), ("0", "1", "2"))
    configs = _configs(
        *[(f"algo.learning_rate={lr}", f"algo.clip_eps={eps}", f"seed={seed}") for lr, eps, seed in grid]
    )
    assert form_groups(configs, 16) == [list(range(12))]


def test_every_member_key_of_the_penalty_variant_varies_inside_one_group() -> None:
    base = ("algo=penalty", "algo.target_kl=0.01")
    varied = (
        "algo.adam_eps=1e-8", "algo.ent_coef=0.05", "algo.vf_coef=0.25", "algo.max_grad_norm=1",
        "algo.gamma=0.9", "algo.gae_lambda=0.8", "algo.kl_target=0.02", "algo.kl_coef=2",
        "algo.beta_factor=3",
    )  # fmt: skip
    configs = _configs(base, *[(*base, key) for key in varied], ("algo=penalty", "algo.target_kl=0.05"))
    assert form_groups(configs, 16) == [list(range(len(varied) + 2))]


@pytest.mark.parametrize(
    "other",
    [
        ("env=Acrobot",),
        ("env.num_envs=8",),
        ("algo=a2c",),
        ("total_timesteps=4096",),
        ("agent.activation=relu",),
    ],
)
def test_jobs_that_differ_in_anything_else_form_separate_groups(other: tuple[str, ...]) -> None:
    configs = _configs(("seed=0",), (*other, "seed=1"), ("seed=2",))
    assert form_groups(configs, 16) == [[0, 2], [1]]


def test_target_kl_none_and_a_number_are_separate_groups() -> None:
    configs = _configs(("algo.target_kl=null",), ("algo.target_kl=0.01",), ("algo.target_kl=0.02",))
    assert form_groups(configs, 16) == [[0], [1, 2]]


def test_progress_does_not_keep_jobs_apart() -> None:
    configs = _configs(("progress=true",), ("progress=false", "seed=1"))
    assert form_groups(configs, 16) == [[0, 1]]


@pytest.mark.parametrize(
    ("count", "max_members", "sizes"),
    [(10, 8, [5, 5]), (10, 16, [10]), (17, 16, [9, 8]), (3, 1, [1, 1, 1]), (7, 3, [3, 2, 2]), (1, 4, [1])],
)
def test_a_large_group_is_split_evenly_into_consecutive_groups(
    count: int, max_members: int, sizes: list[int]
) -> None:
    groups = split_evenly(list(range(count)), max_members)
    assert [len(group) for group in groups] == sizes
    assert [num for group in groups for num in group] == list(range(count))


def test_max_members_splits_the_groups_that_form_groups_makes() -> None:
    configs = _configs(*[(f"seed={seed}",) for seed in range(10)])
    assert form_groups(configs, 8) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="max_members"):
        form_groups(configs, 0)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (("algo=grpo",), "GRPO's per-step loss weights (algo.loss_agg) are not batched yet"),
        (("agent=lstm", "env.num_envs=4", "algo.num_minibatches=2"), "a shared trunk (CNN, LSTM/GRU)"),
        (("algo.ref_kl_coef=0.1",), "a reference policy"),
        (("seeds_per_job=2",), "seeds_per_job > 1"),
        (("init_from=runs/some_run",), "init_from"),
    ],
)
def test_why_not_batched_names_the_reason(overrides: tuple[str, ...], reason: str) -> None:
    found = why_not_batched(compose_config(*overrides))
    assert found is not None and found.startswith(reason)


def test_an_ordinary_job_can_be_batched() -> None:
    assert why_not_batched(compose_config("algo=clip")) is None
    assert why_not_batched(compose_config("algo=a2c")) is None
    assert why_not_batched(compose_config("algo=penalty")) is None
    assert why_not_batched(compose_config("algo=trpo")) is None
    assert why_not_batched(compose_config("algo=pg")) is None


def test_a_tracker_and_torchrun_cannot_be_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from ppo_cli.distributed import DataParallel

    cfg = compose_config()
    tracked = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, backend="wandb"))
    assert why_not_batched(tracked) == "tracking (mlflow, wandb) keeps one active run per process"
    monkeypatch.setattr(DataParallel, "current", classmethod(lambda cls: cls(0, 2)))
    assert why_not_batched(cfg) == "torchrun's ranks train one run together"


def test_every_reason_is_one_short_phrase() -> None:
    for _, reason in NOT_BATCHED:
        assert "\n" not in reason and len(reason) < 90
