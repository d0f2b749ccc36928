"""A population of K seeds in one process against one single run, side by side in one invocation.

    python benchmarks/population.py --members 1 4 8 16                  # CartPole's preset
    python benchmarks/population.py --case HalfCheetah --members 5     # bench.py's case (b)
    python benchmarks/population.py --members 2 --total-timesteps 1024   # smoke
    python benchmarks/population.py algo=trpo --members 8               # overrides for every run

Each row is one whole ``ppo-train`` process (imports, env construction, evaluations included):
the single run ``ppo-train <case> seed=0``, and ``ppo-train -m <case> seed=0,...,K-1
hydra/launcher=population`` for each K, alternating single / population run by run, so that a
noisy machine's drifts hit both. Reported per row: the process's wall time and peak resident
memory (``wait4``), the members' final evaluations, and the ratios the issue asks for: the
population's wall time over one single run's (the median of the single runs), and the
throughput against K single runs in a row (K x single / population).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import CASES as BENCH_CASES  # the script's own directory is on sys.path
from bench import ppo_cli_command

PYTHON = sys.executable
PPO_TRAIN = str(Path(PYTHON).parent / "ppo-train")


def _case_b() -> list[str]:
    """Benchmark case (b) of ``bench.py`` (HalfCheetah-v5, 1 env x 2048 steps, 10 epochs x 32
    minibatches, 64-64 tanh MLPs, normalisation, 100k steps), without its run directory and seed."""
    command = ppo_cli_command(BENCH_CASES["b"], Path("unused"), 0)[1:]
    return [arg for arg in command if not arg.startswith(("hydra.run.dir=", "seed="))]


CASES: dict[str, list[str]] = {
    "CartPole": ["env=CartPole"],  # the preset with PPO-Clip's tuned settings: 100k steps
    "HalfCheetah": _case_b(),
}


def run_process(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of one whole process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:  # a smoke run in CI: show why
        raise RuntimeError(f"{command[:4]} exited {process.returncode}: {stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def evaluations(root: Path) -> list[float]:
    """The final evaluation of every run under ``root``, in seed order."""
    summaries = [json.loads(path.read_text()) for path in root.rglob("summary.json")]
    summaries.sort(key=lambda summary: summary["config"]["seed"])
    return [summary.get("eval_mean", float("nan")) for summary in summaries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="CartPole", choices=list(CASES))
    parser.add_argument("--members", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=1, help="single / population pairs per K")
    parser.add_argument("--total-timesteps", type=int, help="env steps of every run: a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", help="ppo-train overrides added to every run (algo=trpo)")
    args = parser.parse_args()
    shared = [*CASES[args.case], *args.overrides, f"device={args.device}", "progress=false"]
    if args.total_timesteps:
        shared.append(f"total_timesteps={args.total_timesteps}")
    rows: list[dict[str, Any]] = []
    singles: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for members in args.members:
                single_dir = Path(tmp) / f"single_{members}_{repeat}"
                wall, rss = run_process([PPO_TRAIN, *shared, "seed=0", f"hydra.run.dir={single_dir}"])
                singles.append(wall)
                rows.append(
                    {
                        "run": "single",
                        "members": 1,
                        "wall": wall,
                        "rss": rss,
                        "evals": evaluations(single_dir),
                    }
                )
                sweep_dir = Path(tmp) / f"population_{members}_{repeat}"
                seeds = ",".join(str(seed) for seed in range(members))
                command = [PPO_TRAIN, "-m", *shared, f"seed={seeds}", "hydra/launcher=population"]
                # Job directories named by number: case (b)'s overrides make too long a file name.
                sweep = [f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"]
                wall, rss = run_process([*command, *sweep])
                rows.append(
                    {
                        "run": "population",
                        "members": members,
                        "wall": wall,
                        "rss": rss,
                        "evals": evaluations(sweep_dir),
                    }
                )
                print(f"done: K={members}, repeat {repeat}", file=sys.stderr)
    single_wall = statistics.median(singles)
    extra = f" {' '.join(args.overrides)}" if args.overrides else ""
    print(f"case {args.case}{extra}; single run: median wall {single_wall:.1f} s over {len(singles)} runs\n")
    print("| run | members | wall s | wall / single | throughput vs K singles | peak RSS MB | final evals |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["wall"] / single_wall
        throughput = row["members"] * single_wall / row["wall"]
        evals = ", ".join(f"{value:.1f}" for value in row["evals"])
        print(
            f"| {row['run']} | {row['members']} | {row['wall']:.1f} | {ratio:.2f}x | {throughput:.2f}x "
            f"| {row['rss']:.0f} | {evals} |"
        )


if __name__ == "__main__":
    main()
