"""hydra/launcher=ray against a Ray head started here (runs where the ``ray`` extra is installed)."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ppo_train

pytestmark = pytest.mark.slow  # every test here trains through the CLI

pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the ray extra is not installed")

SMALL = ["env.num_envs=8", "total_timesteps=512", "eval.episodes=2"]  # 2 iterations of 8 x 32
PORT_OPTIONS = (
    "--port",
    "--node-manager-port",
    "--object-manager-port",
    "--ray-client-server-port",
    "--dashboard-agent-grpc-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def ray_auth() -> dict[str, str]:
    """Ray's token authentication with a token of this test's own, for the head and its clients
    alike (otherwise each side looks for ~/.ray/auth_token, which may not be there or agree)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def ray_head(ray_auth: dict[str, str]) -> Iterator[str]:
    """The address of a one-node Ray cluster on this machine with its own ports and temp dir,
    stopped (with every process it started) afterwards.

    The head listens on the machine's address, not the loopback one: Ray resolves a client's
    127.0.0.1 to that address (``resolve_ip_for_localhost``), so ``127.0.0.1:<port>`` reaches it.
    """
    ports = {option: free_port() for option in PORT_OPTIONS}
    # Ray's socket paths must fit in 107 characters: a short directory, not pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as temp_dir:
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            "--num-cpus=2", "--include-dashboard=false",
            "--disable-usage-stats", f"--temp-dir={temp_dir}",
            *(f"{option}={port}" for option, port in ports.items()),
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
            yield f"127.0.0.1:{ports['--port']}"
        finally:
            head.send_signal(signal.SIGINT)  # ray start --block stops what it started
            try:
                head.wait(timeout=60)
            finally:
                subprocess.run(["pkill", "-KILL", "-g", str(head.pid)], check=False)  # anything left


def test_a_sweep_runs_its_jobs_on_a_ray_cluster(
    ray_head: str, ray_auth: dict[str, str], tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = ppo_train(
        "-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_head}",
        "+hydra.launcher.ray.init.object_store_memory=null",
        "algo=clip,penalty", "seed=0,1", "torch_threads=0", *SMALL, f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path, env=ray_auth,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    port = ray_head.rsplit(":", 1)[1]  # (Ray reports the machine's address in place of 127.0.0.1)
    assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{port}\b", result.stderr)
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
