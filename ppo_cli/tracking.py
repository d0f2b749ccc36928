"""Experiment trackers beside TensorBoard: ``tracking=mlflow|wandb`` mirrors a run into MLflow or
Weights & Biases.

What goes there is what TensorBoard gets, at the same steps: every scalar of
``RunLogger.scalars`` (x = environment steps), the hyperparameters of the HParams table, and, once
``summary.json`` is written, the run's final files (summary, log, checkpoints). The tracker's run
id is kept in ``<run dir>/tracking.json``, so that a resumed run appends to the same tracking run
(MLflow: the same run id; W&B: the same id with ``resume="allow"``). Under torchrun only rank 0
tracks, as only rank 0 has a ``RunLogger``.

Both packages are optional extras and imported only here, when a run starts a tracker, so that
``ppo-train`` without tracking never pays their import time. ``config.TrackingConfig`` refuses a
backend whose package is missing when the config is checked, before any env is built.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ppo_cli.errors import UserError
from ppo_cli.rundir import LOG_FILE, write_text_atomic

if TYPE_CHECKING:
    from ppo_cli.config import MlflowConfig, TrackingConfig, WandbConfig

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"  # {"backend": ..., "run_id": ...}: the run a resume continues
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the file is untrusted input: an id, nothing else
# Mirrored when the run ends, those that exist (eval.json: ppo-eval's report), with summary.json
# (which the caller names) and the checkpoints last.pt and best.pt.
FINAL_FILES = (LOG_FILE, "eval.json")


class Tracker(Protocol):
    """What a run tells its tracker; each backend turns it into its own calls."""

    run_id: str

    def log_params(self, params: dict[str, Any]) -> None:
        """The hyperparameters (flat keys); on a resumed run, those already there stay."""

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """Scalars ``{tag: value}`` at ``step`` (environment steps)."""

    def finish(self, run_dir: Path, files: list[Path], status: str) -> None:
        """Upload ``files`` (under ``run_dir``) and close the run with the summary's ``status``."""


_running: dict[Path, Tracker] = {}  # run dir -> its tracker, from RunLogger's start to finish()


def start(cfg: TrackingConfig, run_dir: Path, resumed: bool) -> Tracker | None:
    """The tracker ``cfg`` asks for (None for ``none``), continuing the tracking run that
    ``tracking.json`` names when this run is resumed."""
    if cfg.backend == "none":
        return None
    previous = stored_run_id(run_dir, cfg.backend) if resumed else None
    tracker: Tracker
    if cfg.backend == "mlflow":
        tracker = MlflowTracker(cfg.mlflow, run_dir.name, previous)
    else:
        tracker = WandbTracker(cfg.wandb, run_dir, previous)
    record = {"backend": cfg.backend, "run_id": tracker.run_id}
    write_text_atomic(run_dir / TRACKING_FILE, json.dumps(record) + "\n")
    log.info("tracking: %s run %s%s", cfg.backend, tracker.run_id, " (continued)" if previous else "")
    _running[run_dir.resolve()] = tracker
    return tracker


def finish(run_dir: Path, summary_file: Path, status: str) -> None:
    """Close the run's tracker, if it has one, with its final files: called once ``summary.json``
    holds the outcome, which is after the ``RunLogger`` has closed.

    A tracker that fails here (a server gone, a full disk) costs a warning, not the run: the
    outcome is already on disk, and an exception here would hide the one that ended a failed run."""
    tracker = _running.pop(run_dir.resolve(), None)
    if tracker is None:
        return
    from ppo_cli.checkpoint import LAST, checkpoint_dir  # torch and gymnasium: not at import

    checkpoints = [checkpoint_dir(run_dir) / name for name in (LAST, "best.pt")]  # best: eval.interval
    candidates = [summary_file, *(run_dir / name for name in FINAL_FILES), *checkpoints]
    try:
        tracker.finish(run_dir, [path for path in candidates if path.is_file()], status)
    except Exception as exc:  # whatever the tracker's library raises
        log.warning("tracking: run %s was not closed (%s: %s)", tracker.run_id, type(exc).__name__, exc)


def stored_run_id(run_dir: Path, backend: str) -> str | None:
    """The run id ``tracking.json`` holds for ``backend``; None when there is none, it names
    another backend, or it is not an id (the file is read as untrusted data)."""
    try:
        record = json.loads((run_dir / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("backend") != backend:
        return None
    run_id = record.get("run_id")
    if not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
        log.warning("tracking: %s holds no valid run id; starting a new tracking run", TRACKING_FILE)
        return None
    return run_id


def param_text(value: Any) -> str:
    """A parameter as the trackers show it: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


class MlflowTracker:
    """An MLflow run, through ``MlflowClient`` (no global active run, so that the seeds of a
    ``seeds_per_job`` job, one after the other in one process, each get their own run)."""

    def __init__(self, settings: MlflowConfig, name: str, run_id: str | None) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            self.client = MlflowClient(settings.tracking_uri)
            self.run_id = self._continue(run_id) or self._create(settings, name)
        except MlflowException as exc:
            where, problem = settings.tracking_uri or "MLflow's default store", exc.message.strip()
            raise UserError(f"tracking.mlflow.tracking_uri: {where}: {problem.splitlines()[0]}") from None

    def _continue(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            log.warning("tracking: MLflow run %s is not in this store; starting a new one", run_id)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _create(self, settings: MlflowConfig, name: str) -> str:
        experiment = self.client.get_experiment_by_name(settings.experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                settings.experiment_name, artifact_location=settings.artifact_location
            )
        run_id: str = self.client.create_run(experiment_id, run_name=name).info.run_id
        return run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """MLflow refuses to change a logged parameter: on resume (``resume_allow_changes``) the
        first value stays, and the new one is in ``summary.json``."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(key, param_text(value)) for key, value in params.items() if key not in logged]
        self.client.log_batch(self.run_id, params=new)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(value), now, step) for tag, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: Path, files: list[Path], status: str) -> None:
        for path in files:
            folder = path.parent.relative_to(run_dir).as_posix()
            self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)
        mlflow_status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)


class WandbTracker:
    """A W&B run. Its x-axis is ``global_step``, logged with every scalar, rather than W&B's own
    step: that one must only grow, and a resumed run logs again the steps after its checkpoint."""

    def __init__(self, settings: WandbConfig, run_dir: Path, run_id: str | None) -> None:
        import wandb

        directory = Path(settings.dir) if settings.dir else run_dir
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                mode=settings.mode,  # type: ignore[arg-type]  # checked: online|offline
                dir=directory,
                name=run_dir.name,
                id=run_id,
                resume="allow",
                reinit="create_new",
                settings=wandb.Settings(console="off"),  # the console is already in train.log
            )
        except wandb.Error as exc:
            raise UserError(f"tracking.wandb: {str(exc).splitlines()[0]}") from None
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        self.run_id = self.run.id

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "global_step": step})

    def finish(self, run_dir: Path, files: list[Path], status: str) -> None:
        for path in files:
            self.run.save(str(path), base_path=str(run_dir), policy="now")
        self.run.finish(exit_code=0 if status == "completed" else 1)
