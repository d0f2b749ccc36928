"""Sweeps through the CLI: parallel jobs, a failing job that does not stop the others, Optuna."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from support import compose_config, ppo_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from ppo_cli.sweep import SUMMARY_CSV, SUMMARY_MD, collect_jobs, record_failure, train_seeds

TESTS = Path(__file__).resolve().parent
SMALL = ["env.num_envs=8", "total_timesteps=512", "eval.episodes=2"]  # 2 iterations of 8 x 32


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / SUMMARY_CSV) as f:
        return list(csv.DictReader(f))


def _job_summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


@pytest.mark.slow
def test_joblib_runs_a_2x2_sweep_in_parallel_processes(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = ppo_train(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "algo.clip_eps=0.1,0.2", "seed=0,1",
        "torch_threads=0", *SMALL, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = _job_summaries(sweep_dir)
    assert len(summaries) == 4
    assert {s["status"] for s in summaries.values()} == {"completed"}
    assert {(s["config"]["algo"]["clip_eps"], s["config"]["seed"]) for s in summaries.values()} == {
        (0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)
    }  # fmt: skip
    # torch_threads=0 (every core) became each job's share of the cores: 2 jobs at once.
    assert {s["config"]["torch_threads"] for s in summaries.values()} == {max(1, (os.cpu_count() or 1) // 2)}
    rows = _rows(sweep_dir)
    assert [row["job"] for row in rows] == ["0", "1", "2", "3"]
    for row in rows:
        job_summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert float(row["eval_mean"]) == pytest.approx(job_summary["eval_mean"])
    # Progress gives way to log lines naming their job.
    assert "job 3 (" in result.stdout


def _hparams_columns(run_dir: Path) -> list[str]:
    """The HParams dashboard's columns of a run, in the order its event file lists them."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    data = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    return [info.name for info in plugin_data_pb2.HParamsPluginData.FromString(data).experiment.hparam_infos]


@pytest.mark.slow
def test_hparams_columns_start_with_the_keys_the_sweep_varies(tmp_path: Path) -> None:
    """A key set alike for every job (algo.gae_lambda) is not among them; a swept config group
    stands for the key that tells its presets apart (agent -> agent.recurrent)."""
    sweep_dir = tmp_path / "sweep"
    result = ppo_train(
        "-m", "env=Acrobot", "algo.gae_lambda=0.9", "agent=mlp,lstm", "env.num_envs=2", "env.num_steps=16",
        "total_timesteps=32", "eval.episodes=0", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert len(runs) == 2
    for run in runs:
        columns = _hparams_columns(run)
        assert columns[:4] == ["agent.recurrent", "env.id", "algo.name", "seed"]
        assert len(columns) == len(set(columns)) > 20  # each key once, the rest after them


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_others(launcher: str, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = ppo_train(
        "-m", f"hydra/launcher={launcher}", "env.id=faulty_envs:Exploding-v0,CartPole-v1",
        "env.vectorization=sync", *SMALL, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"ppo-train: error: 1 of 2 jobs did not complete; see {sweep_dir / SUMMARY_MD}"
    )
    rows = _rows(sweep_dir)
    (failed,) = [row for row in rows if "Exploding-v0" in row["overrides"]]
    (completed,) = [row for row in rows if "CartPole-v1" in row["overrides"]]
    assert completed["status"] == "completed" and completed["global_step"] == "512"
    assert failed["status"] == "failed"
    assert "env Exploding-v0 raised in step (RuntimeError: the simulator exploded)" in failed["error"]
    log = (Path(failed["run_dir"]) / "train.log").read_text()
    assert "Traceback" in log and "RuntimeError: the simulator exploded" in log
    assert "the simulator exploded" in (sweep_dir / SUMMARY_MD).read_text()


@pytest.mark.slow
def test_a_killed_job_process_is_reported_in_one_line(tmp_path: Path) -> None:
    """A job whose process the OS kills (here: SIGKILL from its env) makes the launcher raise;
    ppo-train reports it as a job that did not complete, in one line with the launcher's words."""
    sweep_dir = tmp_path / "sweep"
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = ppo_train(
        "-m", "hydra/launcher=joblib", "env.id=faulty_envs:Killed-v0", "env.vectorization=sync", *SMALL,
        f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    # (loky's resource tracker may warn after it about the dead worker's semaphores)
    (report,) = [line for line in result.stderr.splitlines() if line.startswith("ppo-train:")]
    assert report.startswith("ppo-train: error: 1 of 1 jobs did not complete (A worker process"), report
    assert report.endswith(f"; see {sweep_dir / SUMMARY_MD}")
    assert [row["status"] for row in _rows(sweep_dir)] == ["killed"]


@pytest.mark.slow
def test_a_segfault_in_a_joblib_sweep_leaves_every_job_in_its_true_state(tmp_path: Path) -> None:
    """Job 1 segfaults while job 0 trains (2 at a time): loky then kills job 0 (SIGKILL) and never
    starts jobs 2 and 3. The table lists all four as what happened to them, and the crashed job's
    stack lands in a file named there instead of on the terminal."""
    sweep_dir = tmp_path / "sweep"
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = ppo_train(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "env.id=CartPole-v1,faulty_envs:Segfaulting-v0,Acrobot-v1,MountainCar-v0", "env.vectorization=sync",
        "total_timesteps=100000", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    (report,) = [line for line in result.stderr.splitlines() if line.startswith("ppo-train:")]
    assert report.startswith("ppo-train: error: 4 of 4 jobs did not complete (A worker process"), report
    assert "Fatal Python error" not in result.stderr
    rows = _rows(sweep_dir)
    assert [(row["job"], row["status"]) for row in rows] == [
        ("0", "stopped by the launcher"), ("1", "killed (SIGSEGV)"), ("2", "not run"), ("3", "not run")
    ]  # fmt: skip
    assert [row["overrides"].split()[0].removeprefix("env.id=") for row in rows] == [
        "CartPole-v1", "faulty_envs\\:Segfaulting-v0", "Acrobot-v1", "MountainCar-v0"
    ]  # fmt: skip
    assert rows[0]["error"] == "killed by the launcher when job 1 died"
    assert Path(rows[0]["run_dir"]).parent == sweep_dir and rows[2]["run_dir"] == rows[3]["run_dir"] == ""
    crash_file = Path(rows[1]["error"].removeprefix("Python's stack at the crash: "))
    assert crash_file.read_text().startswith("Fatal Python error: Segmentation fault")
    assert "| 2 | env.id=Acrobot-v1 " in (sweep_dir / SUMMARY_MD).read_text()


def test_each_job_state_comes_from_what_its_process_left(tmp_path: Path) -> None:
    """The table's rules, on the files jobs leave: a summary written since the job started, a
    failure recorded before its run began, a fatal signal's report, nothing, or no start at all."""
    jobs = tmp_path / ".jobs"
    jobs.mkdir()
    run_dirs = [tmp_path / f"seed={n}" for n in range(5)]
    for num in range(4):
        run_dirs[num].mkdir()
        (run_dirs[num] / "summary.json").write_text(json.dumps({"status": "completed", "global_step": 64}))
        os.utime(run_dirs[num] / "summary.json", (1e9, 1e9))  # written by an earlier sweep
        (jobs / f"{num}.json").write_text(
            json.dumps({"overrides": [f"seed={num}"], "run_dir": str(run_dirs[num])})
        )
    (run_dirs[0] / "summary.json").write_text(
        json.dumps({"status": "completed", "global_step": 64, "eval_mean": 9.5})
    )
    (jobs / "1.crash").write_text("Fatal Python error: Aborted\n\nCurrent thread ...\n")
    (jobs / "2.crash").write_text("")
    record_failure(
        OmegaConf.create({"sweep": {"dir": str(tmp_path)}, "job": {"num": 3}}), "algo.gamma: got 1.5"
    )
    planned = {num: f"seed={num}" for num in range(5)}

    rows = collect_jobs(tmp_path, planned, launcher_gave_up=True)
    assert [(row.job, row.overrides, row.status, row.global_step, row.eval_mean) for row in rows] == [
        (0, "seed=0", "completed", 64, 9.5),
        (1, "seed=1", "killed (SIGABRT)", 0, None),
        (2, "seed=2", "stopped by the launcher", 0, None),
        (3, "seed=3", "failed", 0, None),
        (4, "seed=4", "not run", 0, None),
    ]
    assert [row.error for row in rows] == [
        "",
        f"Python's stack at the crash: {jobs / '1.crash'}",
        "killed by the launcher when job 1 died",
        "algo.gamma: got 1.5",
        "",
    ]
    assert [row.run_dir for row in rows] == [*map(str, run_dirs[:4]), ""]
    # Where the sweep ended by itself, a job that died without a trace was not stopped by it.
    assert collect_jobs(tmp_path, planned, launcher_gave_up=False)[2].status == "killed"
    # Optuna plans nothing ahead: the jobs that started are the table.
    assert [row.job for row in collect_jobs(tmp_path, None, launcher_gave_up=True)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_optuna_search_finds_and_reports_the_best_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "search"
    result = ppo_train(
        "-m", "hparams_search=CartPole_clip", "hydra.sweeper.n_trials=3", "total_timesteps=1024",
        "eval.episodes=3", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}",
        f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    rows = _rows(sweep_dir)
    assert len(rows) == 3 and {row["status"] for row in rows} == {"completed"}
    winner = max(rows, key=lambda row: float(row["eval_mean"]))
    assert best["best_value"] == pytest.approx(float(winner["eval_mean"]))
    for key, value in best["best_params"].items():
        assert f"{key}={value}" in winner["overrides"].split()
    assert (tmp_path / "study.db").stat().st_size > 0


@pytest.mark.slow
def test_seeds_per_job_reports_the_mean_over_seeds(tmp_path: Path) -> None:
    summary = train_seeds(compose_config(*SMALL, "seed=3", "seeds_per_job=2"), tmp_path)
    seeds = {seed: json.loads((tmp_path / f"seed_{seed}" / "summary.json").read_text()) for seed in (3, 4)}
    assert {s["config"]["seed"] for s in seeds.values()} == {3, 4}
    assert summary["seeds"] == {str(seed): s["eval_mean"] for seed, s in seeds.items()}
    assert summary["eval_mean"] == pytest.approx((seeds[3]["eval_mean"] + seeds[4]["eval_mean"]) / 2)
    assert json.loads((tmp_path / "summary.json").read_text())["eval_mean"] == summary["eval_mean"]
