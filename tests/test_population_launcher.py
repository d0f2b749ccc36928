"""``hydra/launcher=population``: the plugin is found, jobs are grouped into populations, the jobs
that cannot be batched run alone, and every job ends as an ordinary job of a sweep.

Until the batched trainer is there, ``ppo_cli.population`` is stood in for by a fake that trains
its members one after another with the ordinary ``train`` (or fails them as told), and sweeps run
in this process so that the fake is the one the launcher finds.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn
from support import ppo_train

from ppo_cli import cli, rundir
from ppo_cli.config import TrainConfig
from ppo_cli.errors import NonFiniteError
from ppo_cli.logger import write_summary
from ppo_cli.sweep import JOBS_DIR, SUMMARY_CSV, SweepSummary
from ppo_cli.train import train

TINY = [
    "env.num_envs=2",
    "env.num_steps=16",
    "total_timesteps=64",
    "eval.episodes=1",
    "checkpoint.interval=0",
]


@dataclass(frozen=True)
class MemberJob:
    cfg: TrainConfig
    run_dir: Path
    label: str = ""
    swept: Sequence[str] = ()


class FakePopulation:
    """``ppo_cli.population`` as the launcher calls it: records each population it gets; trains
    its members one by one (``trains``) or just writes a completed summary, and fails the members
    whose seed is in ``fail_seeds`` as the trainer would (summary failed, the exception returned)."""

    def __init__(self, trains: bool = False, fail_seeds: Sequence[int] = ()) -> None:
        self.populations: list[list[MemberJob]] = []
        self.trains = trains
        self.fail_seeds = set(fail_seeds)
        self.threads: int | None = None

    def module(self) -> types.ModuleType:
        module = types.ModuleType("ppo_cli.population")
        module.MemberJob = MemberJob  # type: ignore[attr-defined]
        module.train_population = self.train_population  # type: ignore[attr-defined]
        return module

    def train_population(
        self, jobs: Sequence[MemberJob], threads: int | None = None
    ) -> list[dict[str, Any] | BaseException]:
        self.populations.append(list(jobs))
        self.threads = threads
        results: list[dict[str, Any] | BaseException] = []
        for job in jobs:
            # As the trainer does: accept the run (held by the launcher), log its lines to its log.
            with rundir.hold(job.run_dir) as directory, rundir.logging_for(job.run_dir):
                if not self.trains:
                    directory.accept()
                if job.cfg.seed in self.fail_seeds:
                    error = NonFiniteError("iteration 1: loss is nan")
                    write_summary(job.run_dir, {"status": "failed", "global_step": 16, "error": str(error)})
                    results.append(error)
                elif self.trains:
                    results.append(train(job.cfg, job.run_dir, job.label, job.swept))
                else:
                    summary = {
                        "status": "completed",
                        "global_step": 64,
                        "eval_mean": float(job.cfg.seed),
                        "eval_std": 0.0,
                    }
                    write_summary(job.run_dir, summary)
                    results.append(summary)
        return results


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakePopulation]:
    def install(**kwargs: Any) -> FakePopulation:
        population = FakePopulation(**kwargs)
        monkeypatch.setitem(sys.modules, "ppo_cli.population", population.module())
        return population

    return install


@pytest.fixture
def job_returns(monkeypatch: pytest.MonkeyPatch) -> dict[int, JobReturn]:
    """Every job's JobReturn, as Hydra's callbacks get it (on_job_end), by job number."""
    returns: dict[int, JobReturn] = {}
    on_job_end = SweepSummary.on_job_end

    def record(self: SweepSummary, config: Any, job_return: JobReturn, **kwargs: Any) -> None:
        returns[int(config.hydra.job.num)] = job_return
        on_job_end(self, config, job_return, **kwargs)

    monkeypatch.setattr(SweepSummary, "on_job_end", record)
    return returns


def _sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, Path]:
    """``ppo-train -m hydra/launcher=population <args>`` in this process: (exit code, its console
    output, the sweep dir)."""
    sweep_dir = tmp_path / "sweep"
    argv = ["ppo-train", "-m", "hydra/launcher=population", *TINY, *args, f"hydra.sweep.dir={sweep_dir}"]
    argv.append("hydra.sweep.subdir=job${hydra.job.num}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    try:
        cli.train_main()
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err, sweep_dir


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / SUMMARY_CSV) as f:
        return list(csv.DictReader(f))


def test_the_launcher_is_a_hydra_plugin_with_max_members() -> None:
    with initialize_config_dir(config_dir=cli.find_config_dir(), version_base="1.3"):
        default = compose("train", ["hydra/launcher=population"], return_hydra_config=True)
        capped = compose("train", ["hydra/launcher=population", "hydra.launcher.max_members=4"], True)
    assert default.hydra.launcher._target_.startswith("hydra_plugins.ppo_cli_population.")
    assert default.hydra.launcher.max_members == 16
    assert default.hydra.launcher.torch_threads == 0
    assert capped.hydra.launcher.max_members == 4


@pytest.mark.slow
def test_a_seed_sweep_is_one_population_of_ordinary_jobs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake: Callable[..., FakePopulation],
    job_returns: dict[int, JobReturn],
) -> None:
    population = fake(trains=True)
    code, output, sweep_dir = _sweep(tmp_path, monkeypatch, capsys, "seed=0,1,2")
    assert code == 0, output
    assert "population of 3: jobs 0-2" in output
    [members] = population.populations
    assert [member.cfg.seed for member in members] == [0, 1, 2]
    assert all(member.label.startswith(f"job {n} (") for n, member in enumerate(members))
    assert all(f"seed={n}" in member.label for n, member in enumerate(members))
    assert all(list(member.swept) == ["seed"] for member in members)
    assert all(member.cfg.progress is False for member in members)  # configured as a sweep's job
    for num, member in enumerate(members):
        run_dir = sweep_dir / f"job{num}"
        assert member.run_dir == run_dir
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert (run_dir / "checkpoints" / "last.pt").is_file()
        assert (run_dir / ".hydra" / "overrides.yaml").read_text().strip().endswith(f"- seed={num}")
        hydra_yaml = (run_dir / ".hydra" / "hydra.yaml").read_text()
        assert f"num: {num}\n" in hydra_yaml and f"output_dir: {run_dir}" in hydra_yaml
        log = (run_dir / "train.log").read_text()
        assert "presets: " in log and f"job {num} (" in log
        assert not any(f"job {other} (" in log for other in range(3) if other != num)  # its own lines only
        assert job_returns[num].return_value == summary["eval_mean"]
    rows = _rows(sweep_dir)
    assert [(row["job"], row["status"]) for row in rows] == [
        ("0", "completed"),
        ("1", "completed"),
        ("2", "completed"),
    ]
    assert sorted(p.name for p in (sweep_dir / JOBS_DIR).iterdir()) == [
        "0.json",
        "1.json",
        "2.json",
        "swept.json",
    ]


def test_max_members_splits_a_group_and_each_member_returns_its_result(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake: Callable[..., FakePopulation],
    job_returns: dict[int, JobReturn],
) -> None:
    population = fake()
    args = ("seed=0,1,2", "hydra.launcher.max_members=2", "hydra.launcher.torch_threads=3")
    code, output, sweep_dir = _sweep(tmp_path, monkeypatch, capsys, *args)
    assert code == 0, output
    assert [[m.cfg.seed for m in members] for members in population.populations] == [[0, 1], [2]]
    assert population.threads == 3
    assert "population of 2: jobs 0-1" in output and "population of 1: job 2" in output
    assert {num: ret.return_value for num, ret in job_returns.items()} == {n: float(n) for n in range(3)}
    assert {row["status"] for row in _rows(sweep_dir)} == {"completed"}


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("hydra.launcher.max_members=0", "hydra.launcher.max_members: an integer >= 1, not 0"),
        (
            "hydra.launcher.torch_threads=-1",
            "hydra.launcher.torch_threads: an integer >= 0 (0: one per core), not -1",
        ),
    ],
)
def test_a_launcher_setting_out_of_range_is_refused_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    override: str,
    error: str,
) -> None:
    code, output, _ = _sweep(tmp_path, monkeypatch, capsys, "seed=0,1", override)
    assert code == 2
    assert output.strip().splitlines()[-1] == f"ppo-train: error: {error}"


@pytest.mark.slow
def test_a_mixed_sweep_runs_the_job_it_cannot_batch_alone_and_completes_both(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake: Callable[..., FakePopulation],
) -> None:
    population = fake()
    code, output, sweep_dir = _sweep(tmp_path, monkeypatch, capsys, "algo.ref_kl_coef=0,0.1")
    assert code == 0, output
    assert "job 1 runs alone: a reference policy (algo.ref_kl_coef > 0) is not batched yet" in output
    assert "population of 1: job 0" in output
    assert [[m.cfg.algo.ref_kl_coef for m in members] for members in population.populations] == [[0.0]]
    alone = sweep_dir / "job1"
    assert json.loads((alone / "summary.json").read_text())["status"] == "completed"
    assert (alone / "checkpoints" / "last.pt").is_file() and (alone / ".hydra").is_dir()
    assert [(row["job"], row["status"]) for row in _rows(sweep_dir)] == [
        ("0", "completed"),
        ("1", "completed"),
    ]


def test_a_refused_job_fails_alone_in_one_line_and_the_others_go_on(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake: Callable[..., FakePopulation],
    job_returns: dict[int, JobReturn],
) -> None:
    population = fake()
    code, output, sweep_dir = _sweep(tmp_path, monkeypatch, capsys, "algo.clip_eps=0.2,-1,0.3")
    assert code == 1
    refusal = "algo.clip_eps: "
    assert f"job 1 runs alone: its config is refused ({refusal}" in output
    assert output.strip().splitlines()[-1] == (
        f"ppo-train: error: 1 of 3 jobs did not complete; see {sweep_dir / 'sweep_summary.md'}"
    )
    assert [[m.cfg.algo.clip_eps for m in members] for members in population.populations] == [[0.2, 0.3]]
    summary = json.loads((sweep_dir / "job1" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith(refusal)
    assert "\n" not in summary["error"]
    rows = _rows(sweep_dir)
    assert [row["status"] for row in rows] == ["completed", "failed", "completed"]
    assert rows[1]["error"] == summary["error"]
    assert math.isnan(job_returns[1].return_value)


def test_a_member_that_fails_fails_alone_and_the_sweep_exits_as_with_single_jobs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake: Callable[..., FakePopulation],
    job_returns: dict[int, JobReturn],
) -> None:
    fake(fail_seeds=[1])
    code, output, sweep_dir = _sweep(tmp_path, monkeypatch, capsys, "seed=0,1,2")
    assert code == 1, output
    rows = _rows(sweep_dir)
    assert [row["status"] for row in rows] == ["completed", "failed", "completed"]
    assert rows[1]["error"] == "iteration 1: loss is nan"
    assert (sweep_dir / JOBS_DIR / "1.error").read_text() == "iteration 1: loss is nan"
    assert math.isnan(job_returns[1].return_value) and job_returns[2].return_value == 2.0
    assert "job 1 failed: iteration 1: loss is nan" in (sweep_dir / "job1" / "train.log").read_text()
    assert "job 1 failed" not in (sweep_dir / "job0" / "train.log").read_text()


def test_a_signal_stops_the_population_with_the_exit_code_of_a_signal(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake: Callable[..., FakePopulation],
) -> None:
    population = fake()

    def interrupted(jobs: Sequence[MemberJob], threads: int | None) -> list[dict[str, Any] | BaseException]:
        raise KeyboardInterrupt

    monkeypatch.setattr(population, "train_population", interrupted)
    monkeypatch.setitem(sys.modules, "ppo_cli.population", population.module())
    code, output, sweep_dir = _sweep(tmp_path, monkeypatch, capsys, "seed=0,1")
    assert code == 130
    assert output.strip().splitlines()[-1] == "ppo-train: interrupted"
    assert not (sweep_dir / "job0" / rundir.LOCK_FILE).exists()  # released, and never accepted


def test_a_member_whose_run_directory_is_in_use_fails_alone(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake: Callable[..., FakePopulation],
) -> None:
    population = fake()
    lock = tmp_path / "sweep" / "job1" / rundir.LOCK_FILE
    lock.parent.mkdir(parents=True)
    hold = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    hold += "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, output, sweep_dir = _sweep(tmp_path, monkeypatch, capsys, "seed=0,1,2")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert code == 1, output
    assert [[m.cfg.seed for m in members] for members in population.populations] == [[0, 2]]
    rows = _rows(sweep_dir)
    assert [row["status"] for row in rows] == ["completed", "failed", "completed"]
    assert rows[1]["error"].startswith(f"{sweep_dir / 'job1'}: in use by process {holder.pid}")


@pytest.mark.slow
def test_a_real_population_leaves_ordinary_runs_and_a_sweep_summary(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = ppo_train(
        "-m", "seed=0,1", "hydra/launcher=population", "env=CartPole", "env.num_envs=2",
        "env.num_steps=16", "total_timesteps=128", "eval.episodes=1", "progress=false",
        f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=job${hydra.job.num}", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "population of 2: jobs 0-1" in result.stdout + result.stderr
    for num in (0, 1):
        run_dir = sweep_dir / f"job{num}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["global_step"] == 128
        assert summary["config"]["seed"] == num
        assert (run_dir / "checkpoints" / "last.pt").is_file()
        recorded = {p.name for p in (run_dir / ".hydra").iterdir()}
        assert recorded == {"config.yaml", "hydra.yaml", "overrides.yaml"}
        assert list(run_dir.glob("events.out.tfevents.*"))
        log = (run_dir / "train.log").read_text()
        assert f"job {num} (" in log and f"job {1 - num} (" not in log
    rows = _rows(sweep_dir)
    assert [(row["job"], row["status"]) for row in rows] == [("0", "completed"), ("1", "completed")]
