"""ppo-compare's figures: learning curves (one panel per env) and the across-env aggregate.

Made to go into a paper as they are: axis labels in words (``charts/episodic_return`` reads
"Episodic return"), step ticks as 0, 50k, 1M, wall-clock time in a unit that fits, and any of PNG,
PDF and SVG. Text stays text (SVG ``<text>``, TrueType in PDF rather than Type 3 fonts, which some
publishers refuse), so labels can be edited and searched. Each file is written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ppo_cli.rundir import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ppo_cli.aggregate import Aggregate

FORMATS = ("png", "pdf", "svg")
FIGURE_DPI = 100
PANEL_SIZE = (8.0, 5.0)  # inches, at FIGURE_DPI: an 800 x 500 PNG for one env
NARROW_PANEL_WIDTH = 5.0  # inches per env when there are several, side by side
TEXT_AS_TEXT = {"svg.fonttype": "none", "pdf.fonttype": 42, "ps.fonttype": 42}
LEGEND_INSIDE_MAX = 4  # more methods than this: one legend under the panels, not over the curves
LEGEND_ROW_HEIGHT = 0.25  # inches per row of that legend
LEGEND_CHAR_WIDTH = 0.08  # inches per character of a label, at the default font size

# Tags whose readable name is not their last part written out (see axis_label).
TAG_LABELS = {
    "charts/episodic_return": "Episodic return",
    "charts/episodic_length": "Episode length",
    "eval/episodic_return": "Evaluation return",
    "eval/episodic_return_std": "Evaluation return (std over episodes)",
    "charts/learning_rate": "Learning rate",
    "charts/SPS": "Steps per second",
}
TIME_UNITS = ((7200.0, 3600.0, "h"), (120.0, 60.0, "min"), (0.0, 1.0, "s"))  # (from, seconds, unit)


@dataclass
class Curve:
    """One group's mean curve, drawn in its env's panel, in its method's colour."""

    env: str
    method: str
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    band: bool  # False under 3 runs: their min-max would pass for an interval
    seeds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (x, values) per run


def axis_label(tag: str) -> str:
    """A scalar tag in words: known tags by name, others as their last part with spaces, section
    in parentheses (``losses/approx_kl`` reads "Approx kl (losses)")."""
    if tag in TAG_LABELS:
        return TAG_LABELS[tag]
    section, _, name = tag.rpartition("/")
    words = name.replace("_", " ").strip() or tag
    words = words[:1].upper() + words[1:]
    return f"{words} ({section})" if section else words


def time_unit(seconds: float) -> tuple[float, str]:
    """(seconds per unit, unit) for an axis that ends at ``seconds``: s up to 2 min, min up to 2 h."""
    return next((scale, unit) for start, scale, unit in TIME_UNITS if seconds >= start)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save(figure: Figure, path: Path, formats: Sequence[str]) -> list[Path]:
    """``path.<format>`` for each format, each written whole or not at all; closes the figure."""
    plt = _pyplot()
    written = []
    try:
        for fmt in formats:
            buffer = io.BytesIO()
            with plt.rc_context(TEXT_AS_TEXT):
                figure.savefig(buffer, format=fmt, dpi=FIGURE_DPI)
            target = path.with_suffix(f".{fmt}")
            write_bytes_atomic(target, buffer.getvalue())
            written.append(target)
    finally:
        plt.close(figure)
    return written


def _colours(methods: Sequence[str]) -> dict[str, str]:
    """The same colour for a method in every panel and figure, a different one for each: the
    default cycle's 10, or tab20's 20 for more (beyond that, colours repeat)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    unique = list(dict.fromkeys(methods))
    if len(unique) <= 10:
        return {method: f"C{i}" for i, method in enumerate(unique)}
    tab20 = colormaps["tab20"]  # pairs of a dark and a light shade: the 10 dark ones first
    return {method: to_hex(tab20((2 * i) % 20 + (2 * i // 20) % 2)) for i, method in enumerate(unique)}


def plot_curves(
    curves: list[Curve], metric: str, x: str, title: str, path: Path, formats: Sequence[str]
) -> list[Path]:
    """Mean curves (band where the group has one, faint per-run lines when given), a panel per
    env; ``x`` is "steps" or "time" (seconds since each run's first event)."""
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter

    envs = list(dict.fromkeys(curve.env for curve in curves))
    colours = _colours([curve.method for curve in curves])
    width = PANEL_SIZE[0] if len(envs) == 1 else NARROW_PANEL_WIDTH * len(envs)
    longest = max(len(method) for method in colours)
    columns = max(1, min(3, int(width / (LEGEND_CHAR_WIDTH * longest + 0.6))))  # 0.6 in: the line
    legend_rows = 0 if len(colours) <= LEGEND_INSIDE_MAX else -(-len(colours) // columns)
    height = PANEL_SIZE[1] + legend_rows * LEGEND_ROW_HEIGHT
    with plt.rc_context(TEXT_AS_TEXT):
        figure, panels = plt.subplots(1, len(envs), figsize=(width, height), dpi=FIGURE_DPI, squeeze=False)
    if x == "steps":
        scale, x_label = 1.0, "Environment steps"
    else:
        scale, unit = time_unit(max(float(curve.x[-1]) for curve in curves))
        x_label = f"Wall-clock time ({unit})"
    for axes, env in zip(panels[0], envs, strict=True):
        for curve in (c for c in curves if c.env == env):
            colour = colours[curve.method]
            for xs, values in curve.seeds:
                axes.plot(xs / scale, values, color=colour, alpha=0.35, linewidth=0.7)
            axes.plot(curve.x / scale, curve.mean, color=colour, label=curve.method)
            if curve.band:
                axes.fill_between(
                    curve.x / scale, curve.low, curve.high, color=colour, alpha=0.2, linewidth=0
                )
        axes.set_title(env)
        axes.set_xlabel(x_label)
        if x == "steps":
            axes.xaxis.set_major_formatter(EngFormatter(sep=""))
        axes.grid(alpha=0.3)
        if not legend_rows:
            axes.legend()
    panels[0][0].set_ylabel(axis_label(metric))
    figure.suptitle(title)
    if legend_rows:  # one entry per method, whichever panels it is in
        entries = (zip(*axes.get_legend_handles_labels(), strict=True) for axes in panels[0])
        handles = {label: handle for panel in entries for handle, label in panel}
        figure.legend(handles.values(), handles.keys(), loc="lower center", ncols=columns, frameon=False)
        figure.tight_layout(rect=(0, legend_rows * LEGEND_ROW_HEIGHT / height, 1, 1))
    else:
        figure.tight_layout()
    return save(figure, path, formats)


def plot_aggregate(summary: Aggregate, path: Path, formats: Sequence[str]) -> list[Path]:
    """Three panels: IQM and mean of normalised scores per method (point and 95% interval), and
    the performance profiles with their bands."""
    plt = _pyplot()
    colours = _colours([m.method for m in summary.methods])
    with plt.rc_context(TEXT_AS_TEXT):
        figure, (iqm_axes, mean_axes, profile_axes) = plt.subplots(
            1, 3, figsize=(12.0, 4.0), dpi=FIGURE_DPI, gridspec_kw={"width_ratios": [1, 1, 1.6]}
        )
    methods = summary.methods
    rows = np.arange(len(methods))
    for axes, name, points in (
        (iqm_axes, "IQM", [(m.iqm, m.iqm_low, m.iqm_high) for m in methods]),
        (mean_axes, "Mean", [(m.mean, m.mean_low, m.mean_high) for m in methods]),
    ):
        _interval_rows(axes, rows, points, [colours[m.method] for m in methods])
        axes.set_yticks(rows, [m.method for m in methods])
        axes.set_xlabel(f"{name} of normalised score")
        axes.grid(axis="x", alpha=0.3)
    mean_axes.tick_params(labelleft=False)
    for m in methods:
        colour = colours[m.method]
        profile_axes.plot(summary.taus, m.profile, color=colour, label=m.method)
        profile_axes.fill_between(
            summary.taus, m.profile_low, m.profile_high, color=colour, alpha=0.2, linewidth=0
        )
    profile_axes.set_xlabel("Normalised score (τ)")
    profile_axes.set_ylabel("Fraction of runs with score > τ")
    profile_axes.set_title("Performance profile")
    profile_axes.grid(alpha=0.3)
    profile_axes.legend()
    figure.suptitle(f"{len(summary.references)} envs, 95% stratified bootstrap CIs")
    figure.tight_layout()
    return save(figure, path, formats)


def _interval_rows(
    axes: Axes, rows: np.ndarray, points: list[tuple[float, float, float]], colours: list[str]
) -> None:
    """One row per method: its interval as a bar, its point estimate as a tick across it."""
    for row, (value, low, high), colour in zip(rows, points, colours, strict=True):
        axes.barh(row, high - low, left=low, height=0.6, color=colour, alpha=0.35)
        axes.vlines(value, row - 0.3, row + 0.3, color=colour, linewidth=2)
