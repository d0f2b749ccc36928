"""How long ppo-train takes to answer a question: ``--help``, a TAB completion, ``--cfg job``.

    python benchmarks/cli_latency.py --repeats 7
    python benchmarks/cli_latency.py --repeats 7 --baseline /path/to/older/checkout

Each measurement is the installed ``ppo-train`` console script, started fresh and timed from launch
to exit (the supervisor's fork and the imports included), its output thrown away. The ppo-cli it
imports is this checkout's (PYTHONPATH); ``--baseline DIR`` adds the source checkout DIR as a second
contender, and the two alternate so that a noisy machine's drifts hit both alike. Prints the median
and the range of each question per contender, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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


def seconds(source: Path, args: list[str], extra_env: dict[str, str], cwd: Path) -> float:
    """Wall time of one ``ppo-train <args>`` importing the ppo-cli in ``source``."""
    executable = shutil.which("ppo-train") or str(Path(sys.executable).parent / "ppo-train")
    env = {**os.environ, "PYTHONPATH": str(source), **extra_env}
    start = time.perf_counter()
    subprocess.run(
        [executable, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, timeout=TIMEOUT_S, check=True
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each question per contender")
    parser.add_argument("--baseline", type=Path, help="another source checkout of ppo-cli to compare with")
    args = parser.parse_args()
    contenders = {"this checkout": REPO, **({"baseline": args.baseline} if args.baseline else {})}
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(args.repeats):
            for question, (argv, env) in QUESTIONS.items():
                for name, source in contenders.items():
                    times.setdefault((question, name), []).append(seconds(source, argv, env, Path(cwd)))
    print(f"Wall seconds, median (min-max) of {args.repeats} runs\n")
    print("| question | " + " | ".join(contenders) + " |")
    print("|---|" + "---|" * len(contenders))
    for question in QUESTIONS:
        cells = []
        for name in contenders:
            runs = times[(question, name)]
            cells.append(f"{statistics.median(runs):.2f} ({min(runs):.2f}-{max(runs):.2f})")
        print(f"| {question} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
