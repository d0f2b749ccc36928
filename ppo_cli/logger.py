"""Where a run reports: TensorBoard scalars, a console progress bar, and ``summary.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

SUMMARY = "summary.json"


class RunLogger:
    """TensorBoard writer plus a progress bar that stays quiet when stderr is not a terminal."""

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

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log ``{tag: value}`` at ``step`` (environment steps)."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def progress(self, step: int, sps: float, mean_return: float | None) -> None:
        self.bar.n = step
        recent = "n/a" if mean_return is None else f"{mean_return:.1f}"
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
