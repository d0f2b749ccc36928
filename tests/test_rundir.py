"""A run directory is untrusted input, held by one process, and left as it was by a refused command."""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from support import console_script, one_line_failure, ppo_train, run

from ppo_cli import cli, rundir
from ppo_cli.errors import UserError
from ppo_cli.logger import read_summary
from ppo_cli.resume import _parsed_value, hydra_value, resume_command

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_rundir")

TINY = ["env=CartPole", "env.num_envs=2", "env.num_steps=64", "algo.num_minibatches=2", "eval.episodes=1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed 256-step run made by ppo-train; tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = ppo_train(*TINY, "total_timesteps=256", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture
def received_run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run, as a colleague might send it."""
    copy = tmp_path / "received"
    shutil.copytree(finished_run, copy)
    return copy


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory``: its bytes and modification time (ns)."""
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


class _WritesMarker:
    """A pickle payload: unpickling it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _plant_evil_preset(tmp_path: Path, marker: Path) -> str:
    """A YAML file outside ppo-cli's configs that, loaded as a preset, adds a Hydra callback that
    creates ``marker``; returns the preset path as a planted ``env=`` override would name it."""
    evil = tmp_path / "evil" / "preset.yaml"
    evil.parent.mkdir()
    callback = {
        "_target_": "pathlib.Path.touch",
        "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
    }
    evil.write_text("# @package _global_\n" + yaml.safe_dump({"hydra": {"callbacks": {"p": callback}}}))
    return "../" * 12 + str(evil.with_suffix("")).lstrip("/")


PLANTED = {
    "hydra.callbacks": [
        "+hydra.callbacks.p._target_=torch.load",
        "+hydra.callbacks.p.f=${hydra.run.dir}/checkpoints/notes.pt",
        "+hydra.callbacks.p.weights_only=false",
    ],
    "_target_ in a schema key": ["+env.kwargs._target_=torch.load", "+env.kwargs.f=NOTES"],
    "interpolation": ["+env.kwargs.f=${oc.env:PPO_CLI_TEST_SECRET}"],
    "preset by path": ["env=EVIL"],
    "module import": ["env.id=planted_module:Planted-v0"],
}


@pytest.mark.parametrize("planted", list(PLANTED), ids=list(PLANTED))
@pytest.mark.slow
def test_a_planted_run_never_executes_code(
    planted: str,
    received_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    marker = tmp_path / "PWNED"
    notes = received_run / "checkpoints" / "notes.pt"
    torch.save(_WritesMarker(marker), notes)
    evil = _plant_evil_preset(tmp_path, marker)
    entries = [entry.replace("NOTES", str(notes)).replace("EVIL", evil) for entry in PLANTED[planted]]
    overrides = received_run / ".hydra" / "overrides.yaml"
    overrides.write_text(yaml.safe_dump(yaml.safe_load(overrides.read_text()) + entries))
    before = snapshot(received_run)
    monkeypatch.setenv("PPO_CLI_TEST_SECRET", str(notes))
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w')\n")  # a module on the path
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["ppo-train", f"resume={received_run}", "total_timesteps=512"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert not marker.exists()
    assert code == 2
    assert line.startswith(f"ppo-train: error: resume: {overrides}: refusing entry {entries[0]!r}: ")
    assert snapshot(received_run) == before


@pytest.mark.slow
def test_a_run_made_by_ppo_train_resumes_with_its_own_overrides(received_run: Path) -> None:
    """The checks refuse nothing that ppo-train itself writes: a preset, keys, a list value."""
    overrides = received_run / ".hydra" / "overrides.yaml"
    saved = yaml.safe_load(overrides.read_text())
    extra = ["agent=mlp", "agent.actor_hidden=[64,64]", "+env.kwargs.sutton_barto_reward=false",
             "algo.gae_lambda=0.9"]  # fmt: skip
    overrides.write_text(yaml.safe_dump(saved + extra))
    result = ppo_train(f"resume={received_run}", "total_timesteps=512", "resume_allow_changes=true",
                       cwd=received_run.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    config = read_summary(received_run)["config"]
    assert config["algo"]["gae_lambda"] == 0.9 and config["env"]["kwargs"] == {"sutton_barto_reward": False}


@pytest.mark.slow
def test_a_refused_command_changes_nothing(
    received_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(received_run)
    refused = [
        [f"resume={received_run}", "algo.clip_eps=0.1"],  # a changed key
        [*TINY, f"hydra.run.dir={received_run}"],  # a new run where one exists
        [*TINY, "env.num_envs=0", f"hydra.run.dir={received_run}"],  # a bad value there
    ]
    for args in refused:
        code, _ = one_line_failure(cli.train_main, ["ppo-train", *args], monkeypatch, capsys)
        assert code == 2
        assert snapshot(received_run) == before, args
    # The documented plain resume still works afterwards.
    result = ppo_train(f"resume={received_run}", "total_timesteps=512", cwd=received_run.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_summary(received_run)["global_step"] == 512


@pytest.mark.slow
def test_one_process_holds_a_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [console_script("ppo-train"), *TINY, "total_timesteps=100000000", "checkpoint.interval=1",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "last.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # The trainer holds it: ppo-train's child, under its supervisor (see supervisor.py).
        pgrep = subprocess.run(["pgrep", "-P", str(first.pid)], capture_output=True, text=True, timeout=10)
        (holder,) = pgrep.stdout.split()
        for args in ([*TINY, f"hydra.run.dir={run_dir}"], [f"resume={run_dir}"]):
            code, line = one_line_failure(cli.train_main, ["ppo-train", *args], monkeypatch, capsys)
            assert code == 2
            assert line == (
                f"ppo-train: error: {run_dir}: in use by process {holder} (ppo-train holds "
                f"{run_dir / '.lock'}); wait for it to end or stop it (kill {holder}), "
                "or choose another hydra.run.dir"
            )
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.kill()  # SIGKILL: no cleanup, the kernel releases the lock
        first.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:  # the trainer follows its supervisor (SIGKILL on its death), and the kernel frees the lock
        try:
            with rundir.hold(run_dir):
                break
        except UserError:
            assert time.monotonic() < deadline, "the trainer outlived ppo-train"
            time.sleep(0.05)


def test_a_lock_is_released_however_its_holder_ends(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom ppo_cli import rundir\n"
         "with rundir.hold(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(60)\n",
         str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} "), rundir.hold(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with rundir.hold(tmp_path) as directory, rundir.hold(tmp_path) as again:  # re-entrant in a process
        assert again is directory


TRICKY = ["josé proj", "it's", "a b\\", "${oc.env:HOME}", "x\\${y}", "中文 🙂", "a=b,c", "[x]", "'q'"]


def test_hydra_values_read_back_as_the_text() -> None:
    rng = random.Random(0)
    pieces = ["a", "\\", "'", '"', "$", "{", "}", " ", "é", "/", ":", "=", ",", "[", "]"]
    texts = TRICKY + ["".join(rng.choices(pieces, k=rng.randint(1, 12))) for _ in range(300)]
    for text in texts:
        assert OmegaConf.create({"k": _parsed_value(hydra_value(text))}).k == text, text


@pytest.mark.slow
def test_the_printed_resume_command_works_for_any_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "josé proj" / "it's [1]"  # (Hydra cannot run in a directory named ${...})
    result = ppo_train(
        *TINY, "total_timesteps=128", f"hydra.run.dir={hydra_value(str(run_dir))}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    command = resume_command(run_dir)
    path = f"{Path(console_script('ppo-train')).parent}:{os.environ['PATH']}"
    resumed = run(["bash", "-c", f"{command} total_timesteps=256"], tmp_path, env={"PATH": path})
    assert resumed.returncode == 0, (command, resumed.stderr[-2000:])
    summary = read_summary(run_dir)
    assert summary["global_step"] == 256 and summary["resumed_from"]["global_step"] == 128
    assert shlex.split(command)[1] == f"resume={run_dir}"
