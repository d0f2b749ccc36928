"""What a multirun leaves behind: one row per job in ``sweep_summary.csv`` / ``.md``.

In a multirun each job is isolated by ``cli._train_task``: an exception is recorded in the job's
``summary.json`` and its log, and the job returns NaN (which Optuna records as a failed trial)
instead of raising, so the other jobs go on. Hydra calls :meth:`SweepSummary.on_multirun_end` in
the launching process once every job has returned; it reads each job's own files, writes the
sweep's table, and remembers how many jobs failed so that ``ppo-train`` can exit non-zero. When a
launcher gives up instead (a job killed by the OS), :func:`finish` writes the table all the same.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ppo_cli.config import TrainConfig
from ppo_cli.errors import Interrupted
from ppo_cli.logger import read_summary, write_summary
from ppo_cli.train import train

log = logging.getLogger(__name__)

SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_MD = "sweep_summary.md"


@dataclass
class JobRow:
    """One job of a sweep, from its own directory."""

    job: int
    overrides: str
    status: str  # completed | failed | interrupted | killed (no summary: it died without cleanup)
    global_step: int
    eval_mean: float | None
    run_dir: str
    error: str


@dataclass
class SweepOutcome:
    sweep_dir: Path
    jobs: int
    failed: int


# The launching process's sweep: its directory once it starts, its outcome once summarised.
_sweep_dir: Path | None = None
_outcome: SweepOutcome | None = None


def _job_row(job_dir: Path) -> JobRow:
    hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    summary = read_summary(job_dir)
    return JobRow(
        job=int(hydra_cfg["job"]["num"]),
        overrides=" ".join(overrides),
        status=summary.get("status", "killed"),
        global_step=int(summary.get("global_step", 0)),
        eval_mean=summary.get("eval_mean"),
        run_dir=str(job_dir),
        error=summary.get("error", ""),
    )


def collect_jobs(sweep_dir: Path) -> list[JobRow]:
    """Every job directory under ``sweep_dir`` (they hold ``.hydra/overrides.yaml``), by job number."""
    job_dirs = {path.parent.parent for path in sweep_dir.rglob(".hydra/overrides.yaml")}
    return sorted((_job_row(job_dir) for job_dir in job_dirs), key=lambda row: row.job)


def write_tables(sweep_dir: Path, rows: list[JobRow]) -> None:
    """``sweep_summary.csv`` (every field) and ``sweep_summary.md`` (for reading)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(JobRow.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(asdict(row) for row in rows)
    (sweep_dir / SUMMARY_CSV).write_text(buffer.getvalue())
    lines = ["| job | overrides | status | steps | final return | error |", "|---|---|---|---|---|---|"]
    for row in rows:
        final = "" if row.eval_mean is None else f"{row.eval_mean:.2f}"
        error = row.error.replace("|", "\\|")
        lines.append(
            f"| {row.job} | {row.overrides} | {row.status} | {row.global_step} | {final} | {error} |"
        )
    (sweep_dir / SUMMARY_MD).write_text("\n".join(lines) + "\n")


def summarize(sweep_dir: Path) -> SweepOutcome:
    """Write the sweep's tables from its job directories; how many jobs did not complete."""
    global _outcome
    rows = collect_jobs(sweep_dir)
    write_tables(sweep_dir, rows)
    failed = sum(row.status != "completed" for row in rows)
    log.info("%d of %d jobs completed; summary in %s", len(rows) - failed, len(rows), sweep_dir / SUMMARY_MD)
    _outcome = SweepOutcome(sweep_dir, len(rows), failed)
    return _outcome


def finish() -> SweepOutcome | None:
    """The outcome of this process's sweep (None without one), summarising it first if the
    launcher stopped before Hydra's end-of-sweep callback."""
    if _sweep_dir is not None and _outcome is None:
        return summarize(_sweep_dir)
    return _outcome


class SweepSummary(Callback):
    """Hydra callback (registered in ``train.yaml``) that writes the sweep's table."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir
        _sweep_dir = Path(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize(Path(config.hydra.sweep.dir))


def threads_per_job(requested: int, hydra_cfg: DictConfig) -> int:
    """Torch threads for one job of a sweep, so that jobs x threads fits the cores.

    joblib runs ``launcher.n_jobs`` jobs at once (-1: one per core); submitit gives each job
    ``launcher.cpus_per_task`` cores when set; Ray reserves ``launcher.ray.remote.num_cpus`` per
    job (Ray's default for a task: 1); the basic launcher runs one job at a time. ``requested`` 0
    (torch's default: every core) becomes the job's share.
    """
    cores = os.cpu_count() or 1
    cpus_per_task = OmegaConf.select(hydra_cfg, "launcher.cpus_per_task")
    ray = OmegaConf.select(hydra_cfg, "launcher.ray")
    if cpus_per_task:
        share = int(cpus_per_task)
    elif ray is not None:
        share = int(OmegaConf.select(ray, "remote.num_cpus", default=None) or 1)
    else:
        n_jobs = int(OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=1))
        share = max(1, cores // (cores if n_jobs < 0 else max(1, n_jobs)))
    return share if requested == 0 else min(requested, share)


def configure_job(cfg: TrainConfig, hydra_cfg: DictConfig) -> str:
    """Adapt one job of a sweep to running beside others; returns the label of its log lines.

    Jobs may run side by side: each logs one line at a time instead of drawing a progress bar,
    and its torch threads are capped at its share of the cores.
    """
    cfg.progress = False
    cfg.torch_threads = threads_per_job(cfg.torch_threads, hydra_cfg)
    return f"job {hydra_cfg.job.num} ({hydra_cfg.job.override_dirname}) "


def train_seeds(cfg: TrainConfig, job_dir: Path, label: str = "") -> dict[str, Any]:
    """Train ``cfg.seeds_per_job`` seeds, each in ``job_dir/seed_<s>/``; the job's summary holds
    each seed's final evaluation and their mean (``eval_mean``, the job's objective).

    A multi-seed objective ranks hyperparameters by what they do on average rather than on one
    lucky seed, at ``seeds_per_job`` times the cost.
    """
    seeds = [cfg.seed + offset for offset in range(cfg.seeds_per_job)]
    per_seed: dict[str, Any] = {}
    summary: dict[str, Any] = {"status": "running", "global_step": 0, "seeds": per_seed}
    try:
        for seed in seeds:
            seed_cfg = dataclasses.replace(cfg, seed=seed)
            result = train(seed_cfg, job_dir / f"seed_{seed}", f"{label}seed {seed} ")
            per_seed[str(seed)] = result.get("eval_mean", result.get("recent_episodic_return"))
            summary["global_step"] += result["global_step"]
        summary.update(status="completed", eval_mean=float(sum(per_seed.values()) / len(per_seed)))
    except (Interrupted, KeyboardInterrupt) as exc:
        summary.update(status="interrupted", error=str(exc))
        raise
    except BaseException as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        write_summary(job_dir, summary)
    return summary
