"""``ppo-compare``: learning curves and a results table across runs, grouped by config keys.

Runs are read from their own files only: the scalars through TensorBoard's event reader (purges
after resumes applied, as TensorBoard shows them), the config from ``summary.json``. Runs that
differ only by seed form a group; the figure shows each group's mean curve with a 95% bootstrap
band, and the table each group's final score: mean, interquartile mean (IQM: the mean of the middle
50% of runs, robust to one outlier seed; Agarwal et al. 2021, "Deep RL at the Edge of the
Statistical Precipice"), each with a 95% bootstrap confidence interval. Groups of fewer than 3 runs
get a warning and no interval: with two runs a bootstrap interval is only their min-max.

The figures are drawn by :mod:`ppo_cli.figures`; across several envs, :mod:`ppo_cli.aggregate`
adds the normalised-score views (IQM with stratified bootstrap, performance profiles).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import signal, stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import errors as tf_errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

from ppo_cli import aggregate, figures
from ppo_cli.config import flatten, role_of
from ppo_cli.errors import UserError
from ppo_cli.logger import read_summary
from ppo_cli.rundir import write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_METRIC = "charts/episodic_return"
DEFAULT_FINAL = "eval/episodic_return"
CURVE_POINTS = 200
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
MIN_RUNS_FOR_INTERVAL = 3  # below, a bootstrap "interval" is the runs' min-max: none is reported
ENV_KEY = "env.id"
X_AXES = ("steps", "time")  # --x: environment steps, or wall-clock seconds since the run's start


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
    env: str  # the runs' env.id: groups never mix envs
    method: str  # the label without the env: what is compared across envs
    runs: list[Run]
    finals: np.ndarray
    mean: float
    iqm: float
    ci_low: float | None  # of the mean; None under MIN_RUNS_FOR_INTERVAL runs
    ci_high: float | None
    iqm_low: float | None  # of the IQM; None under MIN_RUNS_FOR_INTERVAL runs
    iqm_high: float | None
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


def check_options(formats: str, x: str, smooth: float) -> tuple[str, ...]:
    """The figure formats asked for (``png,pdf``: each once, in order); :class:`UserError` naming
    the flag for a value that is not allowed."""
    asked = tuple(dict.fromkeys(name.strip().lower() for name in formats.split(",")))
    if not all(name in figures.FORMATS for name in asked):
        raise UserError(
            f"--format: {formats!r} is not a list of figure formats; "
            f"use one or several of {', '.join(figures.FORMATS)}, comma-separated (e.g. png,pdf)"
        )
    if x not in X_AXES:
        raise UserError(f"--x: {x!r} is not an x axis; use steps (environment steps) or time (wall clock)")
    if not 0 <= smooth < 1:
        raise UserError(f"--smooth: {smooth:g} is not a smoothing weight; use a value in [0, 1), e.g. 0.6")
    return asked


def resolve_key(key: str, configs: list[dict[str, Any]]) -> str:
    """``algo`` means ``algo.name`` and ``env`` means ``env.id``: the group's option, as typed. A
    key of one variant only (``algo.returns``) is a key of the runs if any of them has it."""
    for candidate in (key, f"{key}.name", f"{key}.id"):
        if any(candidate in config for config in configs):
            return candidate
    raise UserError(f"--group-by: {key!r} is not a config key of the runs")


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run, seeds and bookkeeping aside."""
    keys = sorted(set().union(*(run.config for run in runs)))
    return [
        key for key in keys if role_of(key).factor and len({repr(run.config.get(key)) for run in runs}) > 1
    ]


def grouping_keys(runs: list[Run], group_by: list[str] | None) -> list[str]:
    """The keys that define a group: ``group_by`` (resolved), or every key that differs; the env
    is always one of them when the runs span several, since a mean over envs mixes score scales."""
    configs = [run.config for run in runs]
    keys = differing_keys(runs) if group_by is None else [resolve_key(k, configs) for k in group_by]
    if ENV_KEY not in keys and len({repr(run.config.get(ENV_KEY)) for run in runs}) > 1:
        keys.append(ENV_KEY)
    return keys


def _label(keys: list[str], config: dict[str, Any]) -> str:
    """``key=value`` for each grouping key the run has: a key of another variant only (a clip run
    has no ``algo.returns``) says nothing about this run."""
    if len(keys) == 1:
        return str(config.get(keys[0]))
    return ", ".join(f"{key}={config[key]}" for key in keys if key in config) or "all runs"


def group_runs(runs: list[Run], group_by: list[str] | None) -> dict[str, list[Run]]:
    """``{label: runs}``; the label shows the values of the grouping keys."""
    keys = grouping_keys(runs, group_by)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_label(keys, run.config), []).append(run)
    return groups


def _bootstrap_interval(
    samples: np.ndarray, statistic: Callable[..., np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of ``statistic(samples, axis=0)`` (over runs), per column."""
    if samples.shape[0] < 2 or np.all(samples == samples[0]):
        value = statistic(samples, axis=0)
        return value, value
    result = stats.bootstrap(
        (samples,),
        statistic,
        axis=0,
        confidence_level=CONFIDENCE,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        random_state=rng,
    )
    return result.confidence_interval.low, result.confidence_interval.high


def smooth_ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average over the logged points, divided by
    ``1 - weight**n`` (debiased) so the curve starts at the first value, not pulled towards 0.
    The same weight gives the curve TensorBoard's smoothing slider shows."""
    if weight == 0 or len(values) == 0 or np.all(values == values[0]):
        return values
    ema = signal.lfilter([1 - weight], [1, -weight], values)
    return np.asarray(ema / (1 - weight ** np.arange(1, len(values) + 1)))


def run_curve(run: Run, x: str = "steps", smooth: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One run's (x, value) points: x in env steps or seconds since its first event."""
    return (run.steps if x == "steps" else run.wall_times), smooth_ema(run.values, smooth)


def mean_curve(
    runs: list[Run], rng: np.random.Generator, x: str = "steps", smooth: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, band low, band high): each run interpolated on a common grid that stops where the
    shortest run stops, so every point averages every run."""
    points = [run_curve(run, x, smooth) for run in runs]
    start = max(xs[0] for xs, _ in points)
    end = min(xs[-1] for xs, _ in points)
    grid = np.linspace(start, end, CURVE_POINTS) if end > start else np.array([end])
    curves = np.stack([np.interp(grid, xs, ys) for xs, ys in points])
    low, high = _bootstrap_interval(curves, np.mean, rng)
    return grid, curves.mean(axis=0), low, high


def _time_to_threshold(run: Run, threshold: float) -> tuple[float, float] | None:
    """(steps, seconds) at the first logged point at or above ``threshold``."""
    above = np.flatnonzero(run.values >= threshold)
    if len(above) == 0:
        return None
    return float(run.steps[above[0]]), float(run.wall_times[above[0]])


def summarize(
    label: str,
    runs: list[Run],
    final_tag: str,
    threshold: float | None,
    rng: np.random.Generator,
    method: str = "",
) -> GroupResult:
    """A group's final scores, with bootstrap intervals of mean and IQM from 3 runs on."""
    finals = np.array([run.last_values[final_tag] for run in runs])
    intervals: list[float | None] = [None] * 4
    if len(runs) >= MIN_RUNS_FOR_INTERVAL:
        intervals = [
            float(bound[0])
            for statistic in (np.mean, aggregate.iqm)
            for bound in _bootstrap_interval(finals[:, None], statistic, rng)
        ]
    reached = [] if threshold is None else [t for run in runs if (t := _time_to_threshold(run, threshold))]
    return GroupResult(
        label=label,
        env=str(runs[0].config.get(ENV_KEY, "")),
        method=method or label,
        runs=runs,
        finals=finals,
        mean=float(finals.mean()),
        iqm=float(aggregate.iqm(finals, axis=None)),
        ci_low=intervals[0],
        ci_high=intervals[1],
        iqm_low=intervals[2],
        iqm_high=intervals[3],
        reached=len(reached),
        steps_to_threshold=float(np.median([s for s, _ in reached])) if reached else None,
        seconds_to_threshold=float(np.median([t for _, t in reached])) if reached else None,
    )


def _number(value: float | None, decimals: int = 2) -> str:
    return "" if value is None else f"{value:.{decimals}f}"


def _table_rows(results: list[GroupResult], threshold: float | None) -> tuple[list[str], list[list[str]]]:
    header = [
        "group", "seeds", "final mean", "mean 95% CI low", "mean 95% CI high",
        "IQM", "IQM 95% CI low", "IQM 95% CI high",
    ]  # fmt: skip
    if threshold is not None:
        header += [f"reached {threshold:g}", "median steps to reach", "median seconds to reach"]
    rows = []
    for r in results:
        row = [
            r.label,
            str(len(r.runs)),
            *map(_number, (r.mean, r.ci_low, r.ci_high, r.iqm, r.iqm_low, r.iqm_high)),
        ]
        if threshold is not None:
            steps = _number(r.steps_to_threshold, 0)
            row += [f"{r.reached}/{len(r.runs)}", steps, _number(r.seconds_to_threshold, 1)]
        rows.append(row)
    return header, rows


def write_table(path: Path, header: list[str], rows: list[list[str]], preamble: list[str]) -> None:
    """``<path>.csv`` and ``<path>.md`` (the preamble above the table), each written atomically."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    write_text_atomic(path.with_suffix(".csv"), buffer.getvalue())
    lines = [*preamble, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    write_text_atomic(path.with_suffix(".md"), "\n".join(lines) + "\n")


def write_tables(results: list[GroupResult], threshold: float | None, out: Path, final_tag: str) -> None:
    header, rows = _table_rows(results, threshold)
    preamble = [
        f"Final score: last value of `{final_tag}` per run (mean over seeds and IQM, each with a 95% "
        f"bootstrap CI; none for groups of fewer than {MIN_RUNS_FOR_INTERVAL} runs)."
    ]
    write_table(out / "comparison", header, rows, preamble)


def _warn_few_runs(results: list[GroupResult]) -> None:
    for r in results:
        if len(r.runs) < MIN_RUNS_FOR_INTERVAL:
            log.warning(
                "group %r has %d run%s: no 95%% interval (no band, empty CI columns) under %d seeds; "
                "run more seeds for one",
                r.label, len(r.runs), "" if len(r.runs) == 1 else "s", MIN_RUNS_FOR_INTERVAL,
            )  # fmt: skip


def compare(
    paths: list[Path],
    group_by: list[str] | None = None,
    metric: str = DEFAULT_METRIC,
    final_tag: str = DEFAULT_FINAL,
    threshold: float | None = None,
    out: Path | None = None,
    seed: int = 0,
    formats: Sequence[str] = ("png",),
    x: str = "steps",
    smooth: float = 0.0,
    seed_lines: bool = False,
) -> tuple[list[GroupResult], list[Path]]:
    """Read every run under ``paths``, group, and write to ``out`` (default: the first path)
    comparison.<format> and comparison.{md,csv}; with runs of several envs also
    aggregate.<format> and aggregate.{md,csv}. Returns the group results and the files written."""
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
    method_keys = [key for key in grouping_keys(runs, group_by) if key != ENV_KEY]
    rng = np.random.default_rng(seed)
    results = [
        summarize(label, group, final_tag, threshold, rng, _label(method_keys, group[0].config))
        for label, group in sorted(group_runs(runs, group_by).items())
    ]
    _warn_few_runs(results)
    out = paths[0] if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    panels = [
        figures.Curve(
            r.env, r.method, *mean_curve(r.runs, rng, x, smooth), band=len(r.runs) >= MIN_RUNS_FOR_INTERVAL,
            seeds=[run_curve(run, x, smooth) for run in r.runs] if seed_lines else [],
        )
        for r in results
    ]  # fmt: skip
    seeds = "/".join(map(str, sorted({len(r.runs) for r in results})))
    title = f"mean of {seeds} seeds, 95% bootstrap CI" + (f", smoothed (EMA {smooth:g})" if smooth else "")
    written = figures.plot_curves(panels, metric, x, title, out / "comparison", formats)
    write_tables(results, threshold, out, final_tag)
    written += [out / "comparison.md", out / "comparison.csv"]
    if len({r.env for r in results}) > 1:
        written += write_aggregate(results, out / "aggregate", formats, final_tag, rng)
    return results, written


def write_aggregate(
    results: list[GroupResult], path: Path, formats: Sequence[str], final_tag: str, rng: np.random.Generator
) -> list[Path]:
    """The across-env views of the methods run on every env: ``<path>.<format>`` (IQM and mean of
    normalised scores with stratified bootstrap CIs; performance profiles) and ``<path>.{md,csv}``."""
    scores: dict[str, dict[str, np.ndarray]] = {}
    for r in results:
        scores.setdefault(r.method, {})[r.env] = r.finals
    envs = sorted({r.env for r in results})
    partial = sorted(method for method, by_env in scores.items() if sorted(by_env) != envs)
    if partial:
        log.warning(
            "left out of the aggregate (not run on every env: %s): %s", ", ".join(envs), ", ".join(partial)
        )
    complete = {method: by_env for method, by_env in scores.items() if method not in partial}
    if not complete:
        return []
    summary = aggregate.aggregate(complete, rng)
    header = [
        "method", "envs", "runs", "normalised IQM", "IQM 95% CI low", "IQM 95% CI high",
        "normalised mean", "mean 95% CI low", "mean 95% CI high",
    ]  # fmt: skip
    rows = [
        [a.method, str(len(envs)), str(a.runs), *map(_number, (a.iqm, a.iqm_low, a.iqm_high)),
         *map(_number, (a.mean, a.mean_low, a.mean_high))]
        for a in summary.methods
    ]  # fmt: skip
    preamble = [
        f"Across {len(envs)} envs: last value of `{final_tag}` per run, normalised per env to the range "
        "of the runs compared (0 = the lowest final score, 1 = the highest), pooled over envs; "
        f"95% stratified bootstrap CIs (runs resampled within each env, {aggregate.RESAMPLES} resamples).",
        "",
        *(f"- {env}: 0 = {low:.2f}, 1 = {high:.2f}" for env, (low, high) in summary.references.items()),
    ]
    write_table(path, header, rows, preamble)
    return [
        *figures.plot_aggregate(summary, path, formats),
        path.with_suffix(".md"),
        path.with_suffix(".csv"),
    ]
