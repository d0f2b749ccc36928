"""What a multirun leaves behind: one row per job in ``sweep_summary.csv`` / ``.md``.

In a multirun each job is isolated by ``cli._train_task``: an exception is recorded in the job's
``summary.json`` and its log, and the job returns NaN (which Optuna records as a failed trial)
instead of raising, so the other jobs go on. A job's process may also die (a segfault in a native
simulator, the OOM killer), and a launcher may then stop the jobs still running (joblib's loky
kills its other workers with SIGKILL) and never start the rest. So the table is built from what
each process knows for certain:

- the launching process knows the planned jobs: :class:`SweepSummary` expands the basic sweeper's
  command line as the sweeper does (``BasicSweeper.split_arguments``) when the sweep starts.
  Optuna draws its trials as it goes; there the table lists the trials that started.
- each job records, as it starts, its number, overrides and run directory in
  ``<sweep dir>/.jobs/<num>.json``, and points Python's ``faulthandler`` at ``<num>.crash`` so
  that a fatal signal (SIGSEGV, SIGABRT, ...) leaves its name and the stack there;
- a job that ends by itself writes its ``summary.json`` (completed, failed or interrupted), and
  one refused before its run starts records why in ``<num>.error``.

Hydra calls :meth:`SweepSummary.on_multirun_end` in the launching process once every job has
returned; when a launcher gives up instead, :func:`finish` writes the table all the same.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import faulthandler
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # hydra-core is pinned to 1.3.x
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ppo_cli.config import TrainConfig
from ppo_cli.errors import Interrupted
from ppo_cli.logger import SUMMARY, read_summary, write_json, write_summary
from ppo_cli.train import train

log = logging.getLogger(__name__)

SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_MD = "sweep_summary.md"
# <sweep dir>/.jobs/: <num>.json (the job started), <num>.crash (its fatal signal), <num>.error
JOBS_DIR = ".jobs"
SWEPT = "swept.json"  # in JOBS_DIR: the keys the sweep varies, for each job's HParams columns
BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"
FINAL_STATUSES = ("completed", "failed", "interrupted")
# faulthandler's first line, "Fatal Python error: <name>", for each signal it catches.
FAULTHANDLER_SIGNALS = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating-point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}
NOT_RUN = "not run"
STOPPED = "stopped by the launcher"


@dataclass
class JobRow:
    """One job of a sweep."""

    job: int
    overrides: str
    # completed | failed | interrupted (its summary.json) | killed, or killed (SIGSEGV) where the
    # signal is known | stopped by the launcher (killed by it after another job died) | not run
    status: str
    global_step: int
    eval_mean: float | None
    run_dir: str
    error: str


@dataclass
class SweepOutcome:
    sweep_dir: Path
    jobs: int
    failed: int


# The launching process's sweep: its directory and planned jobs once it starts, its outcome once
# summarised.
_sweep_dir: Path | None = None
_planned: dict[int, str] | None = None
_outcome: SweepOutcome | None = None


def _sweep_arguments(config: DictConfig) -> list[str]:
    """The launching process's sweep as sweeper arguments: ``hydra.sweeper.params`` (a search
    space in the config, e.g. Optuna's), then the command line's overrides."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    return arguments + OmegaConf.to_container(config.hydra.overrides.task)  # type: ignore[operator]


def planned_jobs(config: DictConfig) -> dict[int, str] | None:
    """``{job number: overrides}`` of every job the basic sweeper will launch, in its order (the
    numbers Hydra gives the jobs); None for a sweeper that decides as it goes (Optuna)."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(_sweep_arguments(config))
        batches = BasicSweeper.split_arguments(overrides, None)
    except HydraException:  # e.g. glob() over a config group, which needs Hydra's config loader
        return None
    return {num: " ".join(job) for num, job in enumerate(job for batch in batches for job in batch)}


def swept_keys(config: DictConfig) -> list[str]:
    """The keys (or config groups) the launching process's sweep gives several values
    (``seed=0,1,2``, ``algo=clip,pg``, an Optuna interval), in the order given."""
    try:
        overrides = OverridesParser.create().parse_overrides(_sweep_arguments(config))
    except HydraException:
        return []
    return list(dict.fromkeys(o.key_or_group for o in overrides if o.is_sweep_override()))


def job_swept_keys(hydra_cfg: DictConfig) -> list[str]:
    """In a job: the keys its sweep varies, as the launching process recorded them in
    ``<sweep dir>/.jobs/swept.json`` (a job may run in another process or on another machine);
    where that record cannot be read, the keys the job's own overrides set, which include them."""
    try:
        recorded = json.loads((Path(hydra_cfg.sweep.dir) / JOBS_DIR / SWEPT).read_text())["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if isinstance(recorded, list):
        return [str(key) for key in recorded]
    job_overrides = OmegaConf.to_container(hydra_cfg.overrides.task)
    return [str(o).partition("=")[0].lstrip("+~") for o in job_overrides]  # type: ignore[union-attr]


def crash_signal(crash_file: Path) -> str | None:
    """The fatal signal faulthandler reported in ``crash_file`` (None if it holds no report)."""
    try:
        first_line = crash_file.read_text(errors="replace").partition("\n")[0]
    except OSError:
        return None
    name = first_line.removeprefix("Fatal Python error: ").strip()
    return FAULTHANDLER_SIGNALS.get(name, name) if first_line.startswith("Fatal Python error") else None


def _started_jobs(jobs_dir: Path) -> dict[int, dict[str, Any]]:
    """``{job number: its start record}`` (see :meth:`SweepSummary.on_job_start`)."""
    records: dict[int, dict[str, Any]] = {}
    for path in jobs_dir.glob("*.json") if jobs_dir.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        if path.stem.isdigit():
            records[int(path.stem)] = record if isinstance(record, dict) else {}
    return records


def _summary_since(record: dict[str, Any], record_file: Path) -> dict[str, Any]:
    """The job's ``summary.json`` if written since the job started (its start record was); an
    older one is an earlier sweep's record of the same run dir (``resume=auto``), not this job's
    outcome. Both times come from the file system, whose clock may not be this machine's."""
    run_dir = Path(str(record.get("run_dir", "")))
    try:
        fresh = run_dir.is_absolute() and (run_dir / SUMMARY).stat().st_mtime >= record_file.stat().st_mtime
    except OSError:
        fresh = False
    return read_summary(run_dir) if fresh else {}


def collect_jobs(sweep_dir: Path, planned: dict[int, str] | None, launcher_gave_up: bool) -> list[JobRow]:
    """Every planned or started job of the sweep, by job number, in its true state."""
    jobs_dir = sweep_dir / JOBS_DIR
    started = _started_jobs(jobs_dir)
    overrides = dict(planned or {})
    overrides.update(
        {num: " ".join(map(str, record.get("overrides", []))) for num, record in started.items()}
    )
    signals = {num: crash_signal(jobs_dir / f"{num}.crash") for num in started}
    died = ", ".join(str(num) for num, name in sorted(signals.items()) if name)
    rows = []
    for num in sorted(overrides):
        row = JobRow(num, overrides[num], NOT_RUN, 0, None, "", "")
        if num in started:
            summary = _summary_since(started[num], jobs_dir / f"{num}.json")
            row.run_dir = str(started[num].get("run_dir", ""))
            row.global_step = int(summary.get("global_step", 0))
            row.eval_mean = summary.get("eval_mean")
            row.error = str(summary.get("error", ""))
            if summary.get("status") in FINAL_STATUSES:
                row.status = summary["status"]
            elif (jobs_dir / f"{num}.error").is_file():  # refused before its run started
                row.status, row.error = "failed", (jobs_dir / f"{num}.error").read_text()
            elif signals[num]:
                row.status = f"killed ({signals[num]})"
                row.error = f"Python's stack at the crash: {jobs_dir / f'{num}.crash'}"
            elif launcher_gave_up and died:
                row.status = STOPPED
                row.error = f"killed by the launcher when job {died} died"
            else:
                row.status = "killed"
                row.error = "ended without a trace: SIGKILL (out of memory?) or a hard exit"
        rows.append(row)
    return rows


def record_failure(hydra_cfg: DictConfig, error: str) -> None:
    """Record in ``<sweep dir>/.jobs/<num>.error`` why a job failed: one refused before its run
    starts (a bad config value) may leave no ``summary.json`` of its own to say so."""
    path = Path(hydra_cfg.sweep.dir) / JOBS_DIR / f"{hydra_cfg.job.num}.error"
    try:
        path.write_text(error)
    except OSError as exc:  # the job's own log still says why it failed
        log.warning("cannot record the failure in %s: %s", path, exc.strerror or exc)


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


def summarize(sweep_dir: Path, launcher_gave_up: bool = False) -> SweepOutcome:
    """Write the sweep's tables; how many jobs did not complete."""
    global _outcome
    rows = collect_jobs(sweep_dir, _planned, launcher_gave_up)
    write_tables(sweep_dir, rows)
    failed = sum(row.status != "completed" for row in rows)
    log.info("%d of %d jobs completed; summary in %s", len(rows) - failed, len(rows), sweep_dir / SUMMARY_MD)
    _outcome = SweepOutcome(sweep_dir, len(rows), failed)
    return _outcome


def finish(launcher_gave_up: bool = False) -> SweepOutcome | None:
    """The outcome of this process's sweep (None without one), summarising it first if the
    launcher stopped before Hydra's end-of-sweep callback (``launcher_gave_up``: it raised)."""
    if _sweep_dir is not None and _outcome is None:
        return summarize(_sweep_dir, launcher_gave_up)
    return _outcome


class SweepSummary(Callback):
    """Hydra callback (registered in ``train.yaml``) that writes the sweep's table: it learns the
    planned jobs in the launching process, and each job's start (and fatal signal) in its own."""

    def __init__(self) -> None:
        # The crash files of the jobs running in this process, by job number: one, or a
        # population's members (which die together: faulthandler reports into the newest's).
        self._crash_files: dict[int, IO[str]] = {}
        self._faulthandler_was_enabled = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir, _planned, _outcome
        _sweep_dir, _planned, _outcome = Path(config.hydra.sweep.dir), planned_jobs(config), None
        jobs_dir = _sweep_dir / JOBS_DIR
        for stale in jobs_dir.glob("*") if jobs_dir.is_dir() else ():  # an earlier sweep in this dir
            stale.unlink()
        jobs_dir.mkdir(parents=True, exist_ok=True)
        write_json(jobs_dir / SWEPT, {"keys": swept_keys(config)})  # for its jobs' HParams columns

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        num = int(config.hydra.job.num)
        jobs_dir = Path(config.hydra.sweep.dir) / JOBS_DIR
        jobs_dir.mkdir(parents=True, exist_ok=True)
        if not self._crash_files:
            self._faulthandler_was_enabled = faulthandler.is_enabled()  # loky's workers: on stderr
        crash_file = open(jobs_dir / f"{num}.crash", "w")  # noqa: SIM115 (open for the job's life)
        self._crash_files[num] = crash_file
        faulthandler.enable(crash_file, all_threads=True)
        record = {
            "overrides": OmegaConf.to_container(config.hydra.overrides.task),
            "run_dir": config.hydra.runtime.output_dir,
        }
        write_json(jobs_dir / f"{num}.json", record)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        crash_file = self._crash_files.pop(int(config.hydra.job.num), None)
        if crash_file is None:
            return
        faulthandler.disable()
        crash_file.close()
        Path(crash_file.name).unlink()  # the job ended by itself: no signal to report
        if self._crash_files:  # a population's members still running
            faulthandler.enable(next(reversed(self._crash_files.values())), all_threads=True)
        elif self._faulthandler_was_enabled and sys.__stderr__ is not None:
            # Back to stderr, where loky's workers report (faulthandler cannot tell where it
            # reported before); a stderr without a file descriptor keeps it off.
            with contextlib.suppress(OSError, ValueError):
                faulthandler.enable(sys.__stderr__)

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


def train_seeds(
    cfg: TrainConfig, job_dir: Path, label: str = "", swept: Sequence[str] = ()
) -> dict[str, Any]:
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
            result = train(seed_cfg, job_dir / f"seed_{seed}", f"{label}seed {seed} ", swept)
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
