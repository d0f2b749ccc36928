"""hydra/launcher=ray against a Ray head started here (runs where the ``ray`` extra is installed),
in a network namespace with only the loopback interface (see ``ray_head``)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import console_script, run

pytestmark = pytest.mark.slow  # every test here trains through the CLI

pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the ray extra is not installed")

SMALL = ["env.num_envs=8", "total_timesteps=512", "eval.episodes=2"]  # 2 iterations of 8 x 32
# Runs a command in a new network namespace that has only the loopback interface, brought up.
LOOPBACK_ONLY = ["unshare", "--map-root-user", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


@pytest.fixture
def ray_auth() -> dict[str, str]:
    """Ray's token authentication with a token of this test's own, for the head and its clients
    alike (otherwise each side looks for ~/.ray/auth_token, which may not be there or agree)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def ray_head(ray_auth: dict[str, str]) -> Iterator[list[str]]:
    """A one-node Ray cluster, at 127.0.0.1:6379 in a network namespace of its own that has no
    interface but loopback; yields the command prefix that runs a process in that namespace
    (``nsenter``). Stopped, with every process it started, afterwards.

    This is how the test keeps every connection on loopback: whatever address Ray would pick on
    the machine (it resolves 127.0.0.1 to the machine's network address where it can), inside the
    namespace no other address exists, so the head, its workers and the sweep run there can reach
    nothing else. The namespace needs no privileges (``unshare --map-root-user --net``: a user
    namespace in which we are root), and its ports are its own, so Ray's default ports cannot
    collide with anything on the machine.
    """
    probe = subprocess.run([*LOOPBACK_ONLY, "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode:
        pytest.skip(f"no unprivileged network namespace here (unshare --net): {probe.stderr.strip()}")
    # Ray's socket paths must fit in 107 characters: a short directory, not pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as temp_dir:
        command = [
            *LOOPBACK_ONLY, str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        ]  # fmt: skip
        # Its output goes to a file: a pipe nobody reads once the banner is out could fill up and
        # block it, on shutdown in particular.
        log = Path(temp_dir) / "head.log"
        with open(log, "wb") as out:
            head = subprocess.Popen(
                command, env={**os.environ, **ray_auth}, start_new_session=True, stdout=out, stderr=out
            )
        try:
            deadline = time.monotonic() + 120
            while b"Ray runtime started" not in log.read_bytes():  # --block: the banner, then it waits
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start did not start ({head.poll()}): {log.read_text()[-2000:]}")
                time.sleep(0.1)
            # sh exec'd ray in the process unshare became: its pid is in the namespace.
            yield ["nsenter", f"--target={head.pid}", "--user", "--net", "--preserve-credentials", "--"]
        finally:
            head.send_signal(signal.SIGINT)  # ray start --block stops what it started
            # On a busy machine its shutdown can outlast the wait: what is left is killed below.
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(timeout=60)
            subprocess.run(["pkill", "-KILL", "-g", str(head.pid)], check=False)  # anything left


def _in_namespace(prefix: list[str], *command: str) -> str:
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=30, check=True).stdout


def test_a_sweep_runs_its_jobs_on_a_ray_cluster(
    ray_head: list[str], ray_auth: dict[str, str], tmp_path: Path
) -> None:
    """Joining a cluster takes only its address (``hydra/launcher=ray_cluster``)."""
    sweep_dir = tmp_path / "sweep"
    result = run(
        [*ray_head, console_script("ppo-train"), "-m", "hydra/launcher=ray_cluster",
         "hydra.launcher.ray.init.address=127.0.0.1:6379", "algo=clip,penalty", "seed=0,1", "torch_threads=0",
         *SMALL, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=ray_auth,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Connecting to existing Ray cluster at address: 127.0.0.1:6379" in result.stderr
    summaries = [json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")]
    assert len(summaries) == 4
    assert {s["status"] for s in summaries} == {"completed"}
    assert {s["global_step"] for s in summaries} == {512}
    assert {(s["config"]["algo"]["name"], s["config"]["seed"]) for s in summaries} == {
        ("clip", 0), ("clip", 1), ("penalty", 0), ("penalty", 1)
    }  # fmt: skip
    # Ray reserves one CPU per job by default: torch_threads=0 became that share.
    assert {s["config"]["torch_threads"] for s in summaries} == {1}
    assert "4 of 4 jobs completed" in result.stdout + result.stderr
    # Where it all ran: no interface but loopback, and the cluster's connections all on it.
    links = [line.split(":")[1].strip() for line in _in_namespace(ray_head, "ip", "-o", "link").splitlines()]
    assert links == ["lo"]
    endpoints = [e for line in _in_namespace(ray_head, "ss", "-tnH").splitlines() for e in line.split()[3:5]]
    addresses = {e.rpartition(":")[0].strip("[]").removeprefix("::ffff:") for e in endpoints}
    assert endpoints
    assert addresses <= {"127.0.0.1", "::1"}
