"""tracking=mlflow|wandb: the run's scalars, hyperparameters and final files reach the tracker, and
a resumed run appends to the same tracking run.

MLflow is checked against a real local tracking store (the sqlite backend, artifacts in a temp
folder), read back with MLflow's own client; W&B runs in offline mode and is read back from its
``.wandb`` file. Neither needs the network: telemetry and error reports are switched off, and W&B's
server address points at a closed loopback port, so any attempt to reach it would stay on
127.0.0.1 (and fail).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import compose_config, one_line_failure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppo_cli import cli
from ppo_cli.config import TrainConfig
from ppo_cli.errors import UserError
from ppo_cli.logger import summary_final
from ppo_cli.resume import saved_overrides
from ppo_cli.train import train

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_tracking")

TINY = ("env=CartPole", "env.num_envs=2", "env.num_steps=16", "total_timesteps=64", "eval.episodes=1")
STEPS = [32, 64]  # one point per iteration of 2 envs x 16 steps


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A sqlite tracking store, created once for the module (its schema migrations take seconds),
    and the folder where its experiment keeps artifacts."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables
    return uri, folder / "artifacts"


def mlflow_overrides(store: tuple[str, Path], experiment: str) -> tuple[str, ...]:
    uri, artifacts = store
    return (
        "tracking=mlflow",
        f"tracking.mlflow.tracking_uri={uri}",
        f"tracking.mlflow.experiment_name={experiment}",
        f"tracking.mlflow.artifact_location={artifacts / experiment}",
    )


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def stored_run_id(run_dir: Path) -> str:
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    assert isinstance(run_id, str)
    return run_id


@pytest.mark.slow  # a tiny run, but the tracker's import and store take seconds
def test_mlflow_mirrors_scalars_params_and_final_files(
    mlflow_store: tuple[str, Path], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    train(compose_config(*TINY, *mlflow_overrides(mlflow_store, "mirror")), run_dir)

    client = MlflowClient(mlflow_store[0])
    run = client.get_run(stored_run_id(run_dir))
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    params = run.data.params
    assert params["env.id"] == "CartPole-v1"
    assert params["algo.clip_eps"] == "0.2"
    assert params["agent.actor_hidden"] == "[64, 64]"
    assert "checkpoint.interval" not in params and "tracking.backend" not in params  # operational
    tensorboard = tensorboard_scalars(run_dir)
    assert {"losses/value_loss", "charts/SPS", "eval/episodic_return"} <= tensorboard.keys()
    for tag, points in tensorboard.items():  # every tag, at the same steps, with the same values
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert [step for step, _ in history] == [step for step, _ in points], tag
        assert [value for _, value in history] == pytest.approx([value for _, value in points], rel=1e-6)
    assert [step for step, _ in tensorboard["losses/value_loss"]] == STEPS
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "checkpoints"} <= artifacts  # train.log too, written by ppo-train (cli.py)
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/best.pt", "checkpoints/last.pt"]
    summary = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(summary).read_text())["status"] == "completed"


@pytest.mark.slow  # a tiny run, but the tracker's import and store take seconds
def test_mlflow_resumed_run_appends_to_the_same_run(mlflow_store: tuple[str, Path], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    overrides = (*TINY, *mlflow_overrides(mlflow_store, "resume"))
    train(compose_config(*overrides), run_dir)
    first_id = stored_run_id(run_dir)
    train(compose_config(*overrides, "resume=auto", "total_timesteps=128"), run_dir)

    assert stored_run_id(run_dir) == first_id
    client = MlflowClient(mlflow_store[0])
    experiment = client.get_experiment_by_name("resume")
    assert experiment is not None
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [first_id]
    history = client.get_metric_history(first_id, "losses/value_loss")
    assert sorted(m.step for m in history) == [32, 64, 96, 128]
    assert sorted(m.step for m in client.get_metric_history(first_id, "eval/episodic_return")) == [64, 128]
    assert client.get_run(first_id).info.status == "FINISHED"


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file: W&B's protobuf ``Record``s in LevelDB's log format (a
    7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header: CRC, length,
    type 1 full / 2 first / 3 middle / 4 last). W&B has no public reader for it."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too short for a header: the block's padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield Record.FromString(pending)
            pending = b""


def wandb_history(offline_run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The history rows and the config of an offline run's folder."""
    (records_file,) = offline_run.glob("*.wandb")
    rows: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    for record in wandb_records(records_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = record.history.item  # a key is in nested_key, as its one part
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return rows, config


def train_with_wandb(cfg: TrainConfig, run_dir: Path) -> None:
    """``train``, then W&B's service stopped: the run's ``.wandb`` file is complete only once the
    service has closed it, which ``run.finish()`` does not wait for."""
    import wandb

    train(cfg, run_dir)
    wandb.teardown()


@pytest.mark.slow  # a tiny run, but the tracker's import and store take seconds
def test_wandb_offline_mirrors_scalars_and_config_and_resumes_the_same_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = (*TINY, "tracking=wandb", "tracking.wandb.mode=offline")
    train_with_wandb(compose_config(*overrides), run_dir)
    run_id = stored_run_id(run_dir)
    (offline_run,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")

    rows, config = wandb_history(offline_run)
    tensorboard = tensorboard_scalars(run_dir)
    for tag, points in tensorboard.items():
        logged = [(row["global_step"], row[tag]) for row in rows if tag in row]
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in points], rel=1e-6)
    assert [step for step, _ in tensorboard["losses/value_loss"]] == STEPS
    assert config["env.id"] == "CartPole-v1" and config["algo.clip_eps"] == 0.2
    assert "checkpoint.interval" not in config
    files = offline_run / "files"
    assert json.loads((files / "summary.json").read_text())["status"] == "completed"
    assert (files / "checkpoints" / "last.pt").is_file()

    train_with_wandb(compose_config(*overrides, "resume=auto", "total_timesteps=128"), run_dir)
    assert stored_run_id(run_dir) == run_id
    resumed = set((run_dir / "wandb").glob(f"offline-run-*-{run_id}")) - {offline_run}
    assert len(resumed) == 1  # W&B writes a resumed offline run to a folder of its own, same id
    rows, _ = wandb_history(resumed.pop())
    assert [row["global_step"] for row in rows if "losses/value_loss" in row] == [96, 128]


def test_tracker_without_its_package_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails: as if not installed
    run_dir = tmp_path / "run"
    argv = ["ppo-train", *TINY, "tracking=wandb", f"hydra.run.dir={run_dir}"]
    code, line = one_line_failure(cli.train_main, argv, monkeypatch, capsys)
    assert code == 2
    assert line == (
        "ppo-train: error: tracking: wandb needs its package, not installed: pip install 'ppo-cli[wandb]'"
    )
    assert not (run_dir / "checkpoints").exists()  # stopped before training


@pytest.mark.slow  # a tiny run, but the tracker's import and store take seconds
def test_a_tracking_uri_mlflow_cannot_use_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ppo-train", *TINY, "tracking=mlflow", "tracking.mlflow.tracking_uri=foo://x"]
    code, line = one_line_failure(cli.train_main, [*argv, f"hydra.run.dir={tmp_path}"], monkeypatch, capsys)
    assert code == 2
    assert line.startswith("ppo-train: error: tracking.mlflow.tracking_uri: foo://x: ")
    assert "unsupported URI 'foo://x'" in line


def test_a_resume_keeps_the_tracker_chosen_by_plain_preset_name(tmp_path: Path) -> None:
    """The saved command line is untrusted data: ``tracking=<preset>`` is read back, a path in its
    place (which could load a YAML file from elsewhere) is refused."""
    saved = tmp_path / ".hydra" / "overrides.yaml"
    saved.parent.mkdir()
    saved.write_text("- tracking=mlflow\n- tracking.mlflow.experiment_name=cartpole\n")
    assert [line for line, _ in saved_overrides(tmp_path)] == [
        "tracking=mlflow",
        "tracking.mlflow.experiment_name=cartpole",
    ]
    saved.write_text("- tracking=../../elsewhere/x\n")
    refused = r"refusing entry 'tracking=\.\./\.\./elsewhere/x': a preset is named"
    with pytest.raises(UserError, match=refused):
        saved_overrides(tmp_path)


class UnreachableTracker:
    run_id = "abc123"

    def finish(self, run_dir: Path, files: list[Path], status: str) -> None:
        raise ConnectionError("tracking server gone")


def test_a_tracker_that_fails_at_the_end_costs_a_warning_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """summary.json already holds the outcome; raising here would hide a failed run's own error."""
    from ppo_cli import tracking  # imported here: the other tests fail one by one before it exists

    monkeypatch.setitem(tracking._running, tmp_path.resolve(), UnreachableTracker())
    summary_final(tmp_path, {"status": "completed"})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "completed"}
    assert "tracking: run abc123 was not closed (ConnectionError: tracking server gone)" in caplog.text
    assert tmp_path.resolve() not in tracking._running
