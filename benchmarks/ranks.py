"""One process against K data-parallel ranks under torchrun, with the same global batch.

    python benchmarks/ranks.py --ranks 2 --repeats 3
    python benchmarks/ranks.py --cases CartPole --repeats 1 --total-timesteps 1024  # smoke

For each case, ``ppo-train`` with N envs and ``torchrun --nproc_per_node=K ppo-train`` with N/K envs
per rank alternate (1, K, 1, K, ...) in one invocation, so that a noisy machine's drifts hit both.
Reported: the training loop's time from each run's ``summary.json`` (``train_time_s``: imports,
rendezvous and env construction excluded) and the whole command's wall time, as medians, and
their ratio (1-process time / K-rank time: above 1, the ranks are faster).

Cases (presets, shortened budgets, no evaluation):
  CartPole     the preset: 16 numpy-vectorised envs x 32 steps, 10 epochs x 2 minibatches; cheap
               envs, the update dominates
  LunarLander  the preset: 16 Box2D envs x 1024 steps, 4 epochs x 32 minibatches; stepping the
               envs dominates
  HalfCheetah  2 MuJoCo envs x 512 steps, 20 epochs x 8 minibatches of 256-256 MLPs; the update
               dominates
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
PPO_TRAIN = str(Path(PYTHON).parent / "ppo-train")

# case: (overrides shared by both, envs of the single process)
CASES: dict[str, tuple[list[str], int]] = {
    "CartPole": (["env=CartPole"], 16),
    "LunarLander": (["env=LunarLander", "total_timesteps=98304"], 16),
    "HalfCheetah": (["env=HalfCheetah", "total_timesteps=20480"], 2),
}


def timed_run(command: list[str], run_dir: Path) -> tuple[float, float]:
    """(training loop seconds, whole command seconds) of one run."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:  # a smoke run in CI: show why
        raise RuntimeError(f"{command[:3]} exited {result.returncode}: {result.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())["train_time_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--total-timesteps", type=int, help="env steps of every run instead of the case's own: a smoke run"
    )
    args = parser.parse_args()
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"]
    print(f"| case | 1 process: train s (wall s) | {args.ranks} ranks: train s (wall s) | speed-up (train) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            overrides, envs = CASES[case]
            if args.total_timesteps is not None:
                budget = [o for o in overrides if not o.startswith("total_timesteps=")]
                overrides = [*budget, f"total_timesteps={args.total_timesteps}"]
            overrides = [*overrides, "eval.episodes=0", "progress=false"]
            times: dict[int, list[tuple[float, float]]] = {1: [], args.ranks: []}
            for repeat in range(args.repeats):
                for ranks in (1, args.ranks):
                    run_dir = Path(tmp) / f"{case}-{ranks}-{repeat}"
                    run_args = [*overrides, f"env.num_envs={envs // ranks}", f"hydra.run.dir={run_dir}"]
                    prefix = [PPO_TRAIN] if ranks == 1 else [*launcher, "--no-python", PPO_TRAIN]
                    times[ranks].append(timed_run([*prefix, *run_args], run_dir))
            (one_train, one_wall), (k_train, k_wall) = (
                (statistics.median(t for t, _ in runs), statistics.median(w for _, w in runs))
                for runs in times.values()
            )
            print(
                f"| {case} | {one_train:.1f} ({one_wall:.1f}) | {k_train:.1f} ({k_wall:.1f}) "
                f"| {one_train / k_train:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
