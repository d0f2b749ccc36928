"""Where a run reports: TensorBoard scalars (mirrored to an experiment tracker when
``tracking`` names one), a console progress bar, and ``summary.json``."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ppo_cli import supervisor, tracking
from ppo_cli.errors import UserError
from ppo_cli.provenance import provenance
from ppo_cli.rundir import write_text_atomic

if TYPE_CHECKING:
    from ppo_cli.config import TrackingConfig

SUMMARY = "summary.json"
TEXT_REPORTS = 20  # progress lines per run (one every 5% of the budget)

log = logging.getLogger(__name__)


class RunLogger:
    """TensorBoard writer plus console progress.

    Progress is a log line at every 5% of the run, which lands in the run's ``train.log`` (so
    ``tail -f train.log`` follows a run) and on the console; on a terminal there is also a live
    bar, and while it is shown log lines are written above it (``logging_redirect_tqdm``), never
    onto it. The last iteration may overshoot the budget: the bar's total then grows to the steps
    trained, so that it ends full.
    """

    def __init__(
        self,
        run_dir: Path,
        config_yaml: str,
        total_steps: int,
        progress: bool,
        resumed_at: int | None = None,
        label: str = "",
        tracking_config: TrackingConfig | None = None,
    ) -> None:
        """``label`` starts every progress line (in a sweep: which job). ``tracking_config``:
        the experiment tracker that mirrors the scalars and hyperparameters (``tracking.py``).

        ``resumed_at``: the global step of the checkpoint a resumed run continues from. Events a
        killed run logged after that step are hidden (TensorBoard's ``purge_step``) and logged again
        by the resumed run, so every curve has each step exactly once."""
        self.first_step = first_step = 0 if resumed_at is None else resumed_at + 1
        resumed = resumed_at is not None
        self.tracker = None if tracking_config is None else tracking.start(tracking_config, run_dir, resumed)
        self.writer = SummaryWriter(
            log_dir=str(run_dir), purge_step=None if resumed_at is None else first_step
        )
        # The config of this (part of the) run, at its first step.
        self.writer.add_text("config", f"```yaml\n{config_yaml}\n```", first_step)
        self.bar = tqdm(
            total=total_steps,
            initial=resumed_at or 0,
            unit="step",
            unit_scale=True,
            dynamic_ncols=True,
            disable=not (progress and sys.stderr.isatty()),
        )
        self.total_steps = total_steps
        self.label = label
        self.report_every = total_steps / TEXT_REPORTS
        self.next_report = self._report_after(resumed_at or 0)
        self._console = ExitStack()
        if not self.bar.disable:  # log lines go above the bar while it is shown
            self._console.enter_context(logging_redirect_tqdm())

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log ``{tag: value}`` at ``step`` (environment steps), all in one event: readers see the
        same scalars as from one ``add_scalar`` per tag, which costs ten times more per iteration."""
        values_pb = [Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()]
        self._add_summary(Summary(value=values_pb), step)
        if self.tracker is not None:
            self.tracker.log_metrics(values, step)

    def _report_after(self, step: int) -> float:
        """The step of the first progress line after ``step``: the next multiple of 5%."""
        return (step // self.report_every + 1) * self.report_every

    def progress(self, step: int, sps: float, mean_return: float | None) -> None:
        recent = "n/a" if mean_return is None else f"{mean_return:.1f}"
        self.total_steps = max(self.total_steps, step)  # the last iteration may overshoot
        if step >= self.next_report:
            line = "%sstep %d/%d  SPS %.0f  recent return %s"
            log.info(line, self.label, step, self.total_steps, sps, recent)
            self.next_report = self._report_after(step)
        if not self.bar.disable:
            self.bar.total = self.total_steps
            self.bar.n = step
            self.bar.set_postfix(SPS=f"{sps:.0f}", ret=recent, refresh=False)
            self.bar.refresh()

    def hparams(self, hyperparameters: dict[str, Any], metric_tags: list[str], step: int) -> None:
        """Register this run in TensorBoard's HParams dashboard: its hyperparameters (flat keys)
        and the scalar tags that serve as its metrics. Written into this run's own event file,
        unlike ``SummaryWriter.add_hparams``, which makes a new run folder per call."""
        values = {key: _hparam_value(value) for key, value in hyperparameters.items()}
        experiment, start, _ = hparams(values, dict.fromkeys(metric_tags, 0.0))
        for summary in (experiment, start):
            self._add_summary(summary, step)
        if self.tracker is not None:
            self.tracker.log_params(hyperparameters)

    def hparams_completed(self, step: int) -> None:
        """Mark the run as finished successfully in the HParams dashboard."""
        _, _, end = hparams({}, {})
        self._add_summary(end, step)

    def _add_summary(self, summary: Any, step: int) -> None:
        file_writer = self.writer.file_writer
        assert file_writer is not None  # created by SummaryWriter.__init__
        file_writer.add_summary(summary, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        self._console.close()
        self.writer.flush()
        self.writer.close()


def _hparam_value(value: Any) -> bool | int | float | str:
    """HParams takes numbers, strings and booleans; lists and null become their YAML text."""
    return value if isinstance(value, bool | int | float | str) else json.dumps(value)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (temp file + rename): readers never see half a file."""
    try:
        write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror or exc})") from None


def new_summary(config: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` as a run starts: running, at step 0, with its config and what made it
    (versions, git commit, host, command line: ``provenance.py``)."""
    return {"status": "running", "global_step": 0, "config": config, **provenance()}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_json(run_dir / SUMMARY, summary)


def summary_started(run_dir: Path, summary: dict[str, Any]) -> None:
    """A run was accepted in ``run_dir`` with ``summary`` as it stands: its supervisor (if any)
    keeps it, to write it with the cause should the process die before :func:`summary_final`."""
    supervisor.run_started(run_dir, summary)


def summary_final(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write the run's outcome into ``summary.json``, then hand it with the run's other final files
    to its tracker; the supervisor has nothing left to record."""
    write_summary(run_dir, summary)
    try:
        tracking.finish(run_dir, run_dir / SUMMARY, summary["status"])
    finally:
        supervisor.run_ended()


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``, or ``{}`` when there is none (or it cannot be parsed)."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}
