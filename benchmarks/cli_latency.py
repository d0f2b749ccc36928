"""How long ppo-train takes to answer a question: ``--help``, a TAB completion, ``--cfg job``.

    python benchmarks/cli_latency.py --repeats 7
    python benchmarks/cli_latency.py --repeats 7 --baseline /path/to/older/checkout

Each measurement is the installed ``ppo-train`` console script, started fresh and timed from launch
to exit (the supervisor's fork and the imports included), its output thrown away; its CPU time
(user + system, from the kernel's accounting of that child: ``wait4``) is what the wall time would
be on an idle machine, and is printed as well, since this machine is shared. The ppo-cli it
imports is this checkout's (PYTHONPATH); ``--baseline DIR`` adds the source checkout DIR as a second
contender, and the two alternate so that a noisy machine's drifts hit both alike. Prints the median
and the range of each question per contender, and the median CPU time, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPLETION_LINE = "ppo-train env=P"  # a TAB after this: Hydra lists env=Pendulum env=Pong
QUESTIONS: dict[str, tuple[list[str], dict[str, str]]] = {
    "--help": (["--help"], {}),
    "completion query": (
        ["-sc", "query=bash"],
        {"COMP_LINE": COMPLETION_LINE, "COMP_POINT": str(len(COMPLETION_LINE))},
    ),
    "--cfg job": (["--cfg", "job"], {}),
}
TIMEOUT_S = 120


def seconds(source: Path, args: list[str], extra_env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one ``ppo-train <args>`` importing the ppo-cli in ``source``."""
    executable = shutil.which("ppo-train") or str(Path(sys.executable).parent / "ppo-train")
    env = {**os.environ, "PYTHONPATH": str(source), **extra_env}
    start = time.perf_counter()
    process = subprocess.Popen([executable, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL)
    deadline = threading.Timer(TIMEOUT_S, process.kill)
    deadline.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        deadline.cancel()
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ppo-train {' '.join(args)} failed (PYTHONPATH={source})")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each question per contender")
    parser.add_argument("--baseline", type=Path, help="another source checkout of ppo-cli to compare with")
    args = parser.parse_args()
    contenders = {"this checkout": REPO, **({"baseline": args.baseline} if args.baseline else {})}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(args.repeats):
            for question, (argv, env) in QUESTIONS.items():
                for name, source in contenders.items():
                    times.setdefault((question, name), []).append(seconds(source, argv, env, Path(cwd)))
    print(f"Seconds, median of {args.repeats} runs: wall (min-max), CPU (user + system)\n")
    print("| question | " + " | ".join(f"{name} wall | {name} CPU" for name in contenders) + " |")
    print("|---|" + "---|---|" * len(contenders))
    for question in QUESTIONS:
        cells = []
        for name in contenders:
            wall, cpu = zip(*times[(question, name)], strict=True)
            cells.append(f"{statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f})")
            cells.append(f"{statistics.median(cpu):.2f}")
        print(f"| {question} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
