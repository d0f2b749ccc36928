"""ppo-cli against Stable-Baselines3 on identical PPO settings, one after the other, in one invocation.

    pip install -e ".[bench]"
    python benchmarks/bench.py --cases a b c --repeats 3 --out benchmarks/RESULTS.md
    python benchmarks/bench.py --cases a --repeats 1 --frameworks ppo-cli --total-timesteps 1024  # smoke
    python benchmarks/bench.py --cases a --frameworks ppo-cli --baseline /path/to/older/checkout

Every measurement is a whole process, started fresh (imports included), timed from launch to exit;
its peak resident memory comes from the kernel's accounting of that child (``wait4``). Runs of the
two frameworks alternate (ppo-cli, SB3, ppo-cli, SB3, ...) so that drifts of a noisy machine hit
both alike, and ratios are taken within one invocation. ``--baseline DIR`` adds a third contender
to the alternation, ``baseline``: the same ppo-train command importing the ppo-cli of the source
checkout DIR (through PYTHONPATH), to measure a change against the code before it.

Cases:
  a  CartPole-v1, 4 envs x 128 steps, 4 epochs x 4 minibatches, 64-64 tanh MLPs, 200k steps
  b  HalfCheetah-v5, 1 env x 2048 steps, 10 epochs x 32 minibatches, observation and reward
     normalisation, 100k steps
  c  seconds for ``ppo-train env=CartPole`` (the preset) to reach an evaluation mean >= 475, 5 seeds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

PYTHON = sys.executable
PPO_TRAIN = str(Path(PYTHON).parent / "ppo-train")
SOLVED = 475.0  # CartPole-v1's reward threshold
FRAMEWORKS = ("ppo-cli", "sb3")
BASELINE = "baseline"  # ppo-cli from another source checkout (--baseline)


@dataclass
class Measurement:
    framework: str
    case: str
    wall_s: float
    peak_rss_mb: float
    final_return: float | None
    steps: int


class Case(TypedDict):
    """The shared hyperparameters of a case, in SB3's names; ppo-cli's keys are mapped below."""

    env: str
    n_envs: int
    n_steps: int
    n_epochs: int
    n_minibatches: int
    total: int
    lr: float
    gamma: float
    gae_lambda: float
    ent_coef: float
    normalize: bool


CASES: dict[str, Case] = {
    "a": {
        "env": "CartPole-v1",
        "n_envs": 4,
        "n_steps": 128,
        "n_epochs": 4,
        "n_minibatches": 4,
        "total": 200_000,
        "lr": 2.5e-4,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "ent_coef": 0.01,
        "normalize": False,
    },
    "b": {
        "env": "HalfCheetah-v5",
        "n_envs": 1,
        "n_steps": 2048,
        "n_epochs": 10,
        "n_minibatches": 32,
        "total": 100_000,
        "lr": 3e-4,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "ent_coef": 0.0,
        "normalize": True,
    },
}


def run_measured(command: list[str], cwd: Path, pythonpath: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one child process (importing first from
    ``pythonpath``, if given)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    start = time.perf_counter()
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:3]} failed: {(cwd / 'stderr.txt').read_text()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, (cwd / "stdout.txt").read_text()


def ppo_cli_command(case: Case, run_dir: Path, seed: int) -> list[str]:
    batch = case["n_envs"] * case["n_steps"]
    return [
        PPO_TRAIN,
        "algo=clip",
        "~tuned",  # exactly the settings below, not a tuned preset's
        f"env.id={case['env']}",
        f"env.num_envs={case['n_envs']}",
        f"env.num_steps={case['n_steps']}",
        f"env.normalize_obs={case['normalize']}",
        f"env.normalize_reward={case['normalize']}",
        f"algo.update_epochs={case['n_epochs']}",
        f"algo.num_minibatches={case['n_minibatches']}",
        f"algo.learning_rate={case['lr']}",
        "algo.anneal_lr=false",  # SB3's default: a constant learning rate
        f"algo.gamma={case['gamma']}",
        f"algo.gae_lambda={case['gae_lambda']}",
        f"algo.ent_coef={case['ent_coef']}",
        "algo.clip_vloss=false",  # SB3 does not clip the value loss by default
        "agent.actor_hidden=[64,64]",
        "agent.critic_hidden=[64,64]",
        "agent.activation=tanh",
        f"total_timesteps={case['total'] - case['total'] % batch}",
        f"seed={seed}",
        "eval.episodes=0",
        "checkpoint.interval=0",
        f"hydra.run.dir={run_dir}",
    ]


SB3_SCRIPT = """
import json, sys
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

case, seed = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)  # the same single thread ppo-cli uses for small MLPs
envs = make_vec_env(case["env"], n_envs=case["n_envs"], seed=seed)
if case["normalize"]:
    envs = VecNormalize(envs, gamma=case["gamma"])
batch = case["n_envs"] * case["n_steps"]
model = PPO(
    "MlpPolicy", envs, n_steps=case["n_steps"], batch_size=batch // case["n_minibatches"],
    n_epochs=case["n_epochs"], learning_rate=case["lr"], gamma=case["gamma"],
    gae_lambda=case["gae_lambda"], ent_coef=case["ent_coef"], seed=seed, device="cpu",
    policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh),
)
model.learn(total_timesteps=case["total"] - case["total"] % batch)
returns = [info["r"] for info in model.ep_info_buffer]
print(json.dumps({"final_return": sum(returns) / len(returns), "steps": model.num_timesteps}))
"""


def measure(
    framework: str, case_name: str, case: Case, seed: int, workdir: Path, baseline: Path | None = None
) -> Measurement:
    workdir.mkdir(parents=True)
    if framework in ("ppo-cli", BASELINE):
        source = baseline if framework == BASELINE else None
        wall, rss, _ = run_measured(ppo_cli_command(case, workdir / "run", seed), workdir, source)
        summary = json.loads((workdir / "run" / "summary.json").read_text())
        final, steps = summary["recent_episodic_return"], summary["global_step"]
    else:
        wall, rss, stdout = run_measured([PYTHON, "-c", SB3_SCRIPT, json.dumps(case), str(seed)], workdir)
        report = json.loads(stdout.strip().splitlines()[-1])
        final, steps = report["final_return"], report["steps"]
    return Measurement(framework, case_name, wall, rss, final, steps)


def time_to_solve(seed: int, workdir: Path) -> Measurement:
    """Case c: the CartPole preset, whole process, and whether it reached an eval mean >= 475."""
    workdir.mkdir(parents=True)
    command = [PPO_TRAIN, "env=CartPole", f"seed={seed}", f"hydra.run.dir={workdir / 'run'}"]
    wall, rss, _ = run_measured(command, workdir)
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    return Measurement("ppo-cli", "c", wall, rss, summary["eval_mean"], summary["global_step"])


def versions() -> str:
    import gymnasium
    import torch

    try:
        import stable_baselines3

        sb3 = stable_baselines3.__version__
    except ImportError:
        sb3 = "not installed"
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, gymnasium {gymnasium.__version__}, stable-baselines3 {sb3}"
    )


def report(results: list[Measurement], repeats: int, total_timesteps: int | None) -> str:
    budget = f", {total_timesteps} env steps a run instead of each case's own" if total_timesteps else ""
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/bench.py` ({repeats} repeats of "
        f"cases a and b, frameworks alternating{budget}; case c: 5 seeds).",
        "",
        f"Machine: {versions()}",
        "",
        "| case | framework | runs | wall s (median) | env steps / s | peak RSS MB (max) | final return | "
        "wall vs SB3 | wall vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in sorted({r.case for r in results}):
        contenders = (*FRAMEWORKS, BASELINE)
        by_framework = {fw: [r for r in results if r.case == case and r.framework == fw] for fw in contenders}
        medians = {fw: statistics.median(r.wall_s for r in runs) for fw, runs in by_framework.items() if runs}
        for framework, runs in by_framework.items():
            if not runs:
                continue
            wall = medians[framework]
            steps = statistics.median(r.steps for r in runs)
            finals = [r.final_return for r in runs if r.final_return is not None]
            if case == "c":
                final = f"{sum(f >= SOLVED for f in finals)}/{len(runs)} solved (eval >= {SOLVED:g})"
            else:
                final = f"{statistics.mean(finals):.1f}" if finals else ""
            ratio = f"{wall / medians['sb3']:.2f}x" if framework != "sb3" and "sb3" in medians else ""
            to_baseline = (
                f"{wall / medians[BASELINE]:.2f}x" if framework == "ppo-cli" and BASELINE in medians else ""
            )
            rss = max(r.peak_rss_mb for r in runs)
            cells = [
                case,
                framework,
                len(runs),
                f"{wall:.1f}",
                f"{steps / wall:.0f}",
                f"{rss:.0f}",
                final,
                ratio,
                to_baseline,
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the markdown table here as well")
    parser.add_argument(
        "--frameworks",
        nargs="+",
        default=list(FRAMEWORKS),
        choices=FRAMEWORKS,
        help="sb3 needs stable-baselines3 (pip install -e '.[bench]'); ppo-cli alone does not",
    )
    parser.add_argument(
        "--total-timesteps",
        type=int,
        help="env steps of each run of cases a and b instead of the case's own: a smoke run, whose "
        "returns mean nothing (case c trains until the preset's end regardless)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a source checkout of ppo-cli (e.g. `git worktree add /tmp/base <commit>`) whose code is "
        "measured too, in turn with the others, for cases a and b",
    )
    args = parser.parse_args()
    if args.baseline is not None and not (args.baseline / "ppo_cli" / "__init__.py").is_file():
        parser.error(f"--baseline: {args.baseline} is not a source checkout of ppo-cli (no ppo_cli/)")
    contenders = [*args.frameworks, *([BASELINE] if args.baseline else [])]
    if "sb3" in args.frameworks and importlib.util.find_spec("stable_baselines3") is None:
        parser.error(
            "stable-baselines3 is not installed: pip install -e '.[bench]', "
            "or measure ppo-cli alone with --frameworks ppo-cli"
        )
    cases = {name: CASES[name] for name in args.cases if name != "c"}
    if args.total_timesteps is not None:
        for name, case in cases.items():
            batch = case["n_envs"] * case["n_steps"]
            if args.total_timesteps < batch:
                parser.error(f"--total-timesteps: at least one batch of case {name}, {batch} env steps")
            cases[name] = {**case, "total": args.total_timesteps}
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for case in args.cases:
            for repeat in range(args.repeats if case != "c" else 1):
                if case == "c":
                    for seed in range(5):
                        results.append(time_to_solve(seed, root / f"c-{seed}"))
                        print(results[-1], flush=True)
                    continue
                for framework in contenders:
                    workdir = root / f"{case}-{framework}-{repeat}"
                    results.append(measure(framework, case, cases[case], repeat, workdir, args.baseline))
                    print(results[-1], flush=True)
    table = report(results, args.repeats, args.total_timesteps)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
