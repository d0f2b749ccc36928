"""Where a run reports: TensorBoard scalars, a console progress bar, and ``summary.json``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

SUMMARY = "summary.json"
TEXT_REPORTS = 20  # progress lines per run when there is no progress bar

log = logging.getLogger(__name__)


class RunLogger:
    """TensorBoard writer plus console progress.

    On a terminal, progress is a live bar; otherwise (a batch job, a sweep, a pipe) it is a log line
    at every 5% of the run, which also lands in the run's ``train.log``.
    """

    def __init__(self, run_dir: Path, config_yaml: str, total_steps: int, progress: bool) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.writer.add_text("config", f"```yaml\n{config_yaml}\n```", 0)
        self.bar = tqdm(
            total=total_steps,
            unit="step",
            unit_scale=True,
            dynamic_ncols=True,
            disable=not (progress and sys.stderr.isatty()),
        )
        self.total_steps = total_steps
        self.next_report = total_steps / TEXT_REPORTS

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log ``{tag: value}`` at ``step`` (environment steps)."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def progress(self, step: int, sps: float, mean_return: float | None) -> None:
        recent = "n/a" if mean_return is None else f"{mean_return:.1f}"
        if self.bar.disable:
            if step >= self.next_report:
                log.info("step %d/%d  SPS %.0f  recent return %s", step, self.total_steps, sps, recent)
                self.next_report += self.total_steps / TEXT_REPORTS
            return
        self.bar.n = step
        self.bar.set_postfix(SPS=f"{sps:.0f}", ret=recent, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()
        self.writer.close()


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically (temp file + rename)."""
    path = run_dir / SUMMARY
    tmp = path.with_name(f".{SUMMARY}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, path)
