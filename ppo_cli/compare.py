"""``ppo-compare``: learning curves and a results table across runs, grouped by config keys.

Runs are read from their own files only: the scalars through TensorBoard's event reader (purges
after resumes applied, as TensorBoard shows them), the config from ``summary.json``. Runs that
differ only by seed form a group; the figure shows each group's mean curve with a 95% bootstrap
band, and the table each group's final score: mean, interquartile mean (IQM: the mean of the middle
50% of runs, robust to one outlier seed; Agarwal et al. 2021, "Deep RL at the Edge of the
Statistical Precipice") and a 95% bootstrap confidence interval of the mean.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import errors as tf_errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

from ppo_cli.config import flatten, role_of
from ppo_cli.errors import UserError
from ppo_cli.logger import read_summary

log = logging.getLogger(__name__)

DEFAULT_METRIC = "charts/episodic_return"
DEFAULT_FINAL = "eval/episodic_return"
CURVE_POINTS = 200
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
FIGURE_SIZE = (8.0, 5.0)  # inches, at FIGURE_DPI: an 800 x 500 PNG
FIGURE_DPI = 100


class UnreadableRun(UserError):
    """A run whose own files are damaged: left out of a comparison, which goes on without it."""


@dataclass
class Run:
    """One run's config and scalars."""

    path: Path
    config: dict[str, Any]  # flat keys: {"algo.name": "clip", ...}
    steps: np.ndarray  # of the curve metric, strictly increasing
    values: np.ndarray
    wall_times: np.ndarray  # seconds since the run's first event, at each curve point
    last_values: dict[str, float]  # last value of every scalar tag: final scores to choose from


@dataclass
class GroupResult:
    label: str
    runs: list[Run]
    finals: np.ndarray
    mean: float
    iqm: float
    ci_low: float
    ci_high: float
    reached: int  # runs that reached the threshold (0 without one)
    steps_to_threshold: float | None  # median over the runs that reached it
    seconds_to_threshold: float | None


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (holding an event file and a summary.json) at or below ``paths``."""
    found: set[Path] = set()
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path}: not a directory")
        found |= {
            event.parent
            for event in path.rglob("events.out.tfevents.*")
            if (event.parent / "summary.json").is_file()
        }
    if not found:
        raise UserError(
            f"{', '.join(map(str, paths))}: no runs found (directories with events and summary.json)"
        )
    return sorted(found)


def event_file_damage(run_dir: Path) -> str | None:
    """``<file>: <what is wrong>`` for the first of the run's event files that TensorBoard's record
    reader cannot read to its end (a truncated or corrupt record), None when all read whole.

    TensorBoard's loader stops quietly at such a record, so the run would enter the comparison
    with a curve cut short, or with no scalars at all. The check reads each file once more with
    the same reader, CRCs included (about as long again as loading it).
    """
    for event_file in sorted(run_dir.glob("events.out.tfevents.*")):
        reader = PyRecordReader_New(str(event_file))
        records = 0
        try:
            while True:
                reader.GetNext()
                records += 1
        except tf_errors.OutOfRangeError:  # the end of a whole file
            continue
        except tf_errors.DataLossError as exc:
            problem = str(exc.message).removeprefix(f"{event_file} ").removeprefix("has ")
            return f"{event_file}: damaged after {records} records ({problem})"
        except OSError as exc:
            return f"{event_file}: cannot read ({exc.strerror or exc})"
    return None


def load_run(path: Path, metric: str) -> Run:
    """One run's config and scalars; :class:`UnreadableRun` if its files are damaged."""
    damage = event_file_damage(path)
    if damage is not None:
        raise UnreadableRun(damage)
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if not tags:
        raise UnreadableRun(f"{path}: its event files hold no scalars")
    if metric not in tags:
        raise UserError(f"--metric: {path} has no scalar {metric!r}; it has: {', '.join(sorted(tags))}")
    points = events.Scalars(metric)
    first_wall_time = min(e.wall_time for tag in tags for e in events.Scalars(tag)[:1])
    config = read_summary(path).get("config")
    if not isinstance(config, dict):
        raise UnreadableRun(f"{path}/summary.json: no config recorded")
    return Run(
        path=path,
        config=flatten(config),
        steps=np.array([e.step for e in points], dtype=float),
        values=np.array([e.value for e in points]),
        wall_times=np.array([e.wall_time for e in points]) - first_wall_time,
        last_values={tag: float(events.Scalars(tag)[-1].value) for tag in tags},
    )


def resolve_key(key: str, config: dict[str, Any]) -> str:
    """``algo`` means ``algo.name`` and ``env`` means ``env.id``: the group's option, as typed."""
    for candidate in (key, f"{key}.name", f"{key}.id"):
        if candidate in config:
            return candidate
    raise UserError(f"--group-by: {key!r} is not a config key of the runs")


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run, seeds and bookkeeping aside."""
    keys = sorted(set().union(*(run.config for run in runs)))
    return [
        key for key in keys if role_of(key).factor and len({repr(run.config.get(key)) for run in runs}) > 1
    ]


def group_runs(runs: list[Run], group_by: list[str] | None) -> dict[str, list[Run]]:
    """``{label: runs}``; the label shows the values of the grouping keys."""
    keys = differing_keys(runs) if group_by is None else [resolve_key(k, runs[0].config) for k in group_by]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        values = [run.config.get(key) for key in keys]
        if len(keys) == 1:
            label = str(values[0])
        else:
            label = ", ".join(f"{key}={value}" for key, value in zip(keys, values, strict=True)) or "all runs"
        groups.setdefault(label, []).append(run)
    return groups


def _bootstrap_mean_interval(samples: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over axis 0 (runs), for each column."""
    if samples.shape[0] < 2 or np.all(samples == samples[0]):
        mean = samples.mean(axis=0)
        return mean, mean
    result = stats.bootstrap(
        (samples,),
        np.mean,
        axis=0,
        confidence_level=CONFIDENCE,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        random_state=rng,
    )
    return result.confidence_interval.low, result.confidence_interval.high


def mean_curve(
    runs: list[Run], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, band low, band high): each run interpolated on a common step grid that stops
    where the shortest run stops, so every point averages every run."""
    start = max(run.steps[0] for run in runs)
    end = min(run.steps[-1] for run in runs)
    grid = np.linspace(start, end, CURVE_POINTS) if end > start else np.array([end])
    curves = np.stack([np.interp(grid, run.steps, run.values) for run in runs])
    low, high = _bootstrap_mean_interval(curves, rng)
    return grid, curves.mean(axis=0), low, high


def _time_to_threshold(run: Run, threshold: float) -> tuple[float, float] | None:
    """(steps, seconds) at the first logged point at or above ``threshold``."""
    above = np.flatnonzero(run.values >= threshold)
    if len(above) == 0:
        return None
    return float(run.steps[above[0]]), float(run.wall_times[above[0]])


def summarize(
    label: str, runs: list[Run], final_tag: str, threshold: float | None, rng: np.random.Generator
) -> GroupResult:
    finals = np.array([run.last_values[final_tag] for run in runs])
    low, high = _bootstrap_mean_interval(finals[:, None], rng)
    reached = [] if threshold is None else [t for run in runs if (t := _time_to_threshold(run, threshold))]
    return GroupResult(
        label=label,
        runs=runs,
        finals=finals,
        mean=float(finals.mean()),
        iqm=float(stats.trim_mean(finals, 0.25)),
        ci_low=float(low[0]),
        ci_high=float(high[0]),
        reached=len(reached),
        steps_to_threshold=float(np.median([s for s, _ in reached])) if reached else None,
        seconds_to_threshold=float(np.median([t for _, t in reached])) if reached else None,
    )


def _table_rows(results: list[GroupResult], threshold: float | None) -> tuple[list[str], list[list[str]]]:
    header = ["group", "seeds", "final mean", "IQM", "95% CI low", "95% CI high"]
    if threshold is not None:
        header += [f"reached {threshold:g}", "median steps to reach", "median seconds to reach"]
    rows = []
    for r in results:
        row = [
            r.label,
            str(len(r.runs)),
            f"{r.mean:.2f}",
            f"{r.iqm:.2f}",
            f"{r.ci_low:.2f}",
            f"{r.ci_high:.2f}",
        ]
        if threshold is not None:
            steps = "" if r.steps_to_threshold is None else f"{r.steps_to_threshold:.0f}"
            seconds = "" if r.seconds_to_threshold is None else f"{r.seconds_to_threshold:.1f}"
            row += [f"{r.reached}/{len(r.runs)}", steps, seconds]
        rows.append(row)
    return header, rows


def write_tables(results: list[GroupResult], threshold: float | None, out: Path, final_tag: str) -> None:
    header, rows = _table_rows(results, threshold)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    (out / "comparison.csv").write_text(buffer.getvalue())
    lines = [
        f"Final score: last value of `{final_tag}` per run (mean over seeds, IQM, 95% bootstrap CI).",
        "",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    metric: str,
    title: str,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    for label, (steps, mean, low, high) in curves.items():
        (line,) = axes.plot(steps, mean, label=label)
        axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel("environment steps")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)


def compare(
    paths: list[Path],
    group_by: list[str] | None = None,
    metric: str = DEFAULT_METRIC,
    final_tag: str = DEFAULT_FINAL,
    threshold: float | None = None,
    out: Path | None = None,
    seed: int = 0,
) -> list[GroupResult]:
    """Read every run under ``paths``, group, and write comparison.{png,md,csv} to ``out``
    (default: the first path)."""
    runs = []
    for path in find_runs(paths):
        try:
            runs.append(load_run(path, metric))
        except UnreadableRun as exc:
            log.warning("skipping %s; the other runs are compared without it", exc)
    if not runs:
        raise UserError(f"{', '.join(map(str, paths))}: no readable runs (each one skipped is named above)")
    if not all(final_tag in run.last_values for run in runs):
        final_tag = metric  # e.g. runs without a final evaluation: their last training point
    groups = group_runs(runs, group_by)
    rng = np.random.default_rng(seed)
    results = [summarize(label, group, final_tag, threshold, rng) for label, group in sorted(groups.items())]
    out = paths[0] if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    curves = {r.label: mean_curve(r.runs, rng) for r in results}
    seeds = sorted({len(r.runs) for r in results})
    title = f"{runs[0].config.get('env.id', '')}: mean of {'/'.join(map(str, seeds))} seeds, 95% bootstrap CI"
    plot(curves, metric, title, out / "comparison.png")
    write_tables(results, threshold, out, final_tag)
    return results
