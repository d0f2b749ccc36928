"""ppo-compare: groups, curves and tables that agree with the event files they come from."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import colors as mcolors
from matplotlib import image
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from scipy import stats
from support import console_script, one_line_failure, ppo_train, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from ppo_cli import aggregate, cli, compare, figures
from ppo_cli.compare import CURVE_POINTS, Run, differing_keys, group_runs, mean_curve, resolve_key

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_compare")


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clip and penalty on CartPole, 3 seeds each, short runs."""
    sweep_dir = tmp_path_factory.mktemp("compare") / "sweep"
    result = ppo_train(
        "-m", "algo=clip,penalty", "seed=0,1,2", "total_timesteps=4096", "eval.episodes=3",
        f"hydra.sweep.dir={sweep_dir}", cwd=sweep_dir.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return sweep_dir


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float, float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)]


def _first_wall_time(run_dir: Path) -> float:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return min(events.Scalars(tag)[0].wall_time for tag in events.Tags()["scalars"])


@pytest.mark.slow
def test_ppo_compare_writes_a_figure_and_tables_that_match_the_events(
    small_sweep: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    threshold = 30.0
    result = run(
        [console_script("ppo-compare"), str(small_sweep), "--group-by", "algo", "--threshold", str(threshold),
         "--out", str(out)],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    png = image.imread(out / "comparison.png")
    assert png.shape[:2] == (500, 800)
    assert png[..., :3].std() > 0.05  # not a blank canvas

    with open(out / "comparison.csv") as f:
        table = {row["group"]: row for row in csv.DictReader(f)}
    assert set(table) == {"clip", "penalty"}
    for algo, row in table.items():
        run_dirs = sorted(small_sweep.glob(f"algo={algo},*"))
        assert len(run_dirs) == int(row["seeds"]) == 3
        finals = np.array([_scalars(d, "eval/episodic_return")[-1][1] for d in run_dirs])
        assert float(row["final mean"]) == pytest.approx(finals.mean(), abs=0.006)
        assert float(row["IQM"]) == pytest.approx(stats.trim_mean(finals, 0.25), abs=0.006)
        assert float(row["mean 95% CI low"]) <= float(row["final mean"]) <= float(row["mean 95% CI high"])
        assert finals.min() - 0.006 <= float(row["mean 95% CI low"])
        assert float(row["mean 95% CI high"]) <= finals.max() + 0.006
        reached = []
        for d in run_dirs:
            first = _first_wall_time(d)
            hits = [(s, w - first) for s, v, w in _scalars(d, "charts/episodic_return") if v >= threshold]
            if hits:
                reached.append(hits[0])
        assert row[f"reached {threshold:g}"] == f"{len(reached)}/3"
        if reached:
            assert float(row["median steps to reach"]) == pytest.approx(np.median([s for s, _ in reached]))
            assert float(row["median seconds to reach"]) == pytest.approx(
                np.median([t for _, t in reached]), abs=0.06
            )
    markdown = (out / "comparison.md").read_text()
    assert "| clip | 3 |" in markdown and "| penalty | 3 |" in markdown
    assert "wrote" in result.stdout


@pytest.mark.slow
def test_default_grouping_is_every_key_that_differs_except_seed(small_sweep: Path, tmp_path: Path) -> None:
    result = run([console_script("ppo-compare"), str(small_sweep), "--out", str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "comparison.csv") as f:
        groups = [row["group"] for row in csv.DictReader(f)]
    # clip and penalty differ in algo.name and in each variant's own keys.
    assert len(groups) == 2
    assert all("algo.name=" in group for group in groups)


# (file of the run to damage, its new content from the old, the warning after "skipping ")
DAMAGES = {
    "random bytes": (
        "events",
        lambda old: np.random.default_rng(0).bytes(2000),
        r"{events}: damaged after 0 records \(failed header crc32 check\)",
    ),
    "truncated": (
        "events",
        lambda old: old[:-10],
        r"{events}: damaged after \d+ records \(truncated record in data\)",
    ),
    "empty": ("events", lambda old: b"", r"{run}: its event files hold no scalars"),
    "summary.json cut": ("summary", lambda old: old[:100], r"{run}/summary.json: no config recorded"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.slow
def test_a_run_with_damaged_files_is_skipped_with_a_warning(
    damage: str, small_sweep: Path, tmp_path: Path
) -> None:
    """One run's damaged file costs that run, named in one warning line, not the comparison."""
    sweep = tmp_path / "sweep"
    shutil.copytree(small_sweep, sweep)
    (damaged_run,) = sweep.glob("algo=clip,*seed=1*")
    (event_file,) = damaged_run.glob("events.out.tfevents.*")
    which, rewrite, expected = DAMAGES[damage]
    target = event_file if which == "events" else damaged_run / "summary.json"
    target.write_bytes(rewrite(target.read_bytes()))
    result = run([console_script("ppo-compare"), str(sweep), "--group-by", "algo"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    warning, too_few = result.stderr.strip().splitlines()
    problem = expected.format(events=re.escape(str(event_file)), run=re.escape(str(damaged_run)))
    assert re.fullmatch(
        f"ppo-compare: skipping {problem}; the other runs are compared without it", warning
    ), warning
    assert too_few.startswith("ppo-compare: group 'clip' has 2 runs: no 95% interval"), too_few
    with open(sweep / "comparison.csv") as f:
        table = {row["group"]: row for row in csv.DictReader(f)}
    assert (table["clip"]["seeds"], table["penalty"]["seeds"]) == ("2", "3")
    others = [d for d in sweep.glob("algo=clip,*") if d != damaged_run]
    finals = [_scalars(d, "eval/episodic_return")[-1][1] for d in others]
    assert float(table["clip"]["final mean"]) == pytest.approx(np.mean(finals), abs=0.006)


def _run(seed: int, lr: float, steps: list[float], values: list[float]) -> Run:
    config = {"seed": seed, "algo.name": "clip", "algo.learning_rate": lr, "env.id": "CartPole-v1"}
    return Run(
        Path(f"/runs/{seed}-{lr}"), config, np.array(steps), np.array(values), np.zeros(len(steps)), {}
    )


def test_grouping_keys_and_labels() -> None:
    runs = [_run(seed, lr, [1, 2], [0, 1]) for seed in (0, 1) for lr in (1e-3, 3e-4)]
    assert differing_keys(runs) == ["algo.learning_rate"]
    groups = group_runs(runs, None)
    assert sorted(groups) == ["0.0003", "0.001"]
    assert all(len(group) == 2 for group in groups.values())
    assert resolve_key("algo", [runs[0].config]) == "algo.name"
    assert resolve_key("env", [runs[0].config]) == "env.id"
    assert list(group_runs(runs, ["algo", "seed"])) == ["algo.name=clip, seed=0", "algo.name=clip, seed=1"]


def test_mean_curve_averages_runs_on_their_common_steps() -> None:
    a = _run(0, 1e-3, [0, 10, 20, 30], [0, 10, 20, 30])
    b = _run(1, 1e-3, [5, 15, 25], [100, 100, 100])
    steps, mean, low, high = mean_curve([a, b], np.random.default_rng(0))
    assert len(steps) == CURVE_POINTS
    assert steps[0] == 5 and steps[-1] == 25  # where both runs have data
    np.testing.assert_allclose(mean, (steps + 100) / 2)
    assert np.all(low <= mean + 1e-9) and np.all(mean <= high + 1e-9)


def _write_run(
    run_dir: Path,
    env: str,
    algo: str,
    seed: int,
    curve: list[float],
    final: float,
    seconds_per_point: float = 1.0,
) -> None:
    """A run as ppo-compare reads it, without training: ``curve`` as charts/episodic_return at
    steps 0, 10k, 20k, ... logged ``seconds_per_point`` apart, ``final`` as eval/episodic_return."""
    start = 1_700_000_000.0 + 1000 * seed
    with SummaryWriter(str(run_dir)) as writer:
        for i, value in enumerate(curve):
            writer.add_scalar(
                "charts/episodic_return", value, i * 10_000, walltime=start + i * seconds_per_point
            )
        writer.add_scalar(
            "eval/episodic_return", final, (len(curve) - 1) * 10_000, walltime=start + len(curve)
        )
    config = {"env": {"id": env}, "algo": {"name": algo}, "seed": seed}
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "config": config}))


def _synthetic_sweep(
    root: Path, envs: dict[str, float], seeds: dict[str, int]
) -> dict[tuple[str, str], list[float]]:
    """Runs of each algo in ``seeds`` (that many seeds) on each env (returns scaled by its factor);
    ``{(env, algo): final scores}``."""
    finals: dict[tuple[str, str], list[float]] = {}
    for env, scale in envs.items():
        for offset, (algo, count) in enumerate(seeds.items()):
            for seed in range(count):
                final = scale * (1 + offset + 0.1 * seed)
                curve = list(np.linspace(0, final, 11) + seed)
                _write_run(root / f"{env}-{algo}-{seed}", env, algo, seed, curve, final)
                finals.setdefault((env, algo), []).append(final)
    return finals


@pytest.fixture
def captured_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures compare() saves (closed for pyplot, their artists still there to inspect)."""
    kept: list[Figure] = []
    save = figures.save

    def keep(figure: Figure, path: Path, formats: Any) -> list[Path]:
        kept.append(figure)
        return save(figure, path, formats)

    monkeypatch.setattr(figures, "save", keep)
    return kept


def _svg_texts(path: Path) -> str:
    return " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text()))


def _table(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {row.get("group") or row["method"]: row for row in rows}


@pytest.mark.slow
def test_figure_in_every_format_asked_with_readable_axes_and_iqm_intervals(tmp_path: Path) -> None:
    """One command end to end (a subprocess costs seconds here): formats, labels, IQM intervals,
    and the one warning line for the group under 3 seeds, whose intervals stay empty."""
    finals = _synthetic_sweep(tmp_path / "runs", {"CartPole-v1": 100.0}, {"clip": 4, "penalty": 3, "trpo": 2})
    out = tmp_path / "out"
    result = run(
        [console_script("ppo-compare"), str(tmp_path / "runs"), "--format", "png,pdf,svg", "--out", str(out)],
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (warning,) = result.stderr.strip().splitlines()
    assert warning.startswith("ppo-compare: group 'trpo' has 2 runs: no 95% interval"), warning
    assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "comparison.pdf").read_bytes().startswith(b"%PDF")
    assert "<svg" in (out / "comparison.svg").read_text()[:1000]
    assert not list(out.glob(".*tmp*"))  # written through temp files, none left
    texts = _svg_texts(out / "comparison.svg")
    assert "Environment steps" in texts and "Episodic return" in texts and "charts/" not in texts
    assert re.search(r"\b100k\b", texts)  # steps 0 to 100,000: ticks as 0, 20k, ..., 100k
    table = _table(out / "comparison.csv")
    for algo in ("clip", "penalty"):
        scores = np.array(finals[("CartPole-v1", algo)])
        row = table[algo]
        assert float(row["IQM"]) == pytest.approx(stats.trim_mean(scores, 0.25), abs=0.006)
        assert scores.min() - 0.006 <= float(row["IQM 95% CI low"]) < float(row["IQM"])
        assert float(row["IQM"]) < float(row["IQM 95% CI high"]) <= scores.max() + 0.006
    intervals = [f"{statistic} 95% CI {bound}" for statistic in ("mean", "IQM") for bound in ("low", "high")]
    assert [table["trpo"][column] for column in intervals] == [""] * 4
    assert "| IQM | IQM 95% CI low | IQM 95% CI high |" in (out / "comparison.md").read_text()


def test_no_band_under_three_seeds(tmp_path: Path, captured_figures: list[Figure]) -> None:
    _synthetic_sweep(tmp_path, {"CartPole-v1": 100.0}, {"clip": 3, "penalty": 2})
    compare.compare([tmp_path])
    ((axes,),) = [figure.axes for figure in captured_figures]
    assert [line.get_label() for line in axes.lines] == ["clip", "penalty"]
    (band,) = [c for c in axes.collections if isinstance(c, PolyCollection)]  # clip's only
    assert band.get_facecolor()[0][:3] == pytest.approx(mcolors.to_rgb(axes.lines[0].get_color()))


def test_wall_clock_x_axis_and_per_seed_lines(tmp_path: Path, captured_figures: list[Figure]) -> None:
    for seed in range(3):  # 11 points, 30 s apart: 0 to 300 s, drawn in minutes
        _write_run(
            tmp_path / f"run{seed}", "CartPole-v1", "clip", seed, [seed] * 11, 1.0, seconds_per_point=30
        )
    compare.compare([tmp_path], x="time", seed_lines=True)
    ((axes,),) = [figure.axes for figure in captured_figures]
    assert axes.get_xlabel() == "Wall-clock time (min)"
    assert axes.get_ylabel() == "Episodic return"
    *seed_lines, mean = axes.lines
    assert len(seed_lines) == 3
    for seed, line in enumerate(seed_lines):
        np.testing.assert_allclose(line.get_xdata(), np.arange(11) * 0.5)  # minutes since its first event
        np.testing.assert_allclose(line.get_ydata(), seed)
    np.testing.assert_allclose(mean.get_ydata(), 1.0)
    assert mean.get_xdata()[-1] == pytest.approx(5.0)


def test_smoothing_is_tensorboards_debiased_ema() -> None:
    values = np.array([0.0, 10.0, 4.0, 8.0, 20.0])
    weight, last, expected = 0.6, 0.0, []
    for n, value in enumerate(values, start=1):  # TensorBoard's smoothing loop (vz_line_chart2)
        last = last * weight + (1 - weight) * value
        expected.append(last / (1 - weight**n))
    np.testing.assert_allclose(compare.smooth_ema(values, weight), expected)
    assert compare.smooth_ema(values, 0.0) is values
    np.testing.assert_allclose(compare.smooth_ema(np.full(4, 7.0), 0.9), 7.0)


def test_smoothing_applies_to_the_curve_not_to_the_table(
    tmp_path: Path, captured_figures: list[Figure]
) -> None:
    curves = [[0, 10, 0, 10, 0, 10], [10, 0, 10, 0, 10, 0], [0, 0, 10, 10, 0, 0]]
    for seed, curve in enumerate(curves):
        _write_run(tmp_path / f"run{seed}", "CartPole-v1", "clip", seed, curve, 5.0)
    (result,), _ = compare.compare([tmp_path], smooth=0.9, final_tag="charts/episodic_return")
    ((axes,),) = [figure.axes for figure in captured_figures]
    (line,) = axes.lines
    steps = np.arange(6) * 10_000.0
    smoothed = [
        np.interp(line.get_xdata(), steps, compare.smooth_ema(np.array(c, float), 0.9)) for c in curves
    ]
    np.testing.assert_allclose(line.get_ydata(), np.mean(smoothed, axis=0), rtol=1e-6)
    assert result.mean == pytest.approx(np.mean([c[-1] for c in curves]))  # the raw last values


def test_readable_axis_labels() -> None:
    assert figures.axis_label("charts/episodic_return") == "Episodic return"
    assert figures.axis_label("eval/episodic_return") == "Evaluation return"
    assert figures.axis_label("losses/approx_kl") == "Approx kl (losses)"
    assert figures.axis_label("reward") == "Reward"
    assert figures.time_unit(90) == (1.0, "s") and figures.time_unit(3600) == (60.0, "min")
    assert figures.time_unit(36_000) == (3600.0, "h")


def test_aggregate_across_two_envs(
    tmp_path: Path, captured_figures: list[Figure], caplog: pytest.LogCaptureFixture
) -> None:
    envs = {"CartPole-v1": 100.0, "Pendulum-v1": -10.0}
    finals = _synthetic_sweep(tmp_path, envs, {"clip": 4, "penalty": 3})
    _write_run(tmp_path / "trpo", "CartPole-v1", "trpo", 0, [0.0, 1.0], 1e6)  # on one env only
    compare.compare([tmp_path], group_by=["algo"], formats=("svg",))
    assert (
        "left out of the aggregate (not run on every env: CartPole-v1, Pendulum-v1): trpo" in caplog.messages
    )
    curves, aggregate_figure = captured_figures
    assert [axes.get_title() for axes in curves.axes] == list(envs)  # a panel per env, not mixed
    assert "Performance profile" in _svg_texts(tmp_path / "aggregate.svg")
    assert len(aggregate_figure.axes) == 3

    low = {env: min(min(finals[(env, a)]) for a in ("clip", "penalty")) for env in envs}
    high = {env: max(max(finals[(env, a)]) for a in ("clip", "penalty")) for env in envs}
    table = _table(tmp_path / "aggregate.csv")
    assert sorted(table) == ["clip", "penalty"]
    for algo in ("clip", "penalty"):
        normalised = np.concatenate(
            [(np.array(finals[(env, algo)]) - low[env]) / (high[env] - low[env]) for env in envs]
        )
        row = table[algo]
        assert (row["envs"], row["runs"]) == ("2", str(len(normalised)))
        assert float(row["normalised IQM"]) == pytest.approx(stats.trim_mean(normalised, 0.25), abs=0.006)
        assert float(row["normalised mean"]) == pytest.approx(normalised.mean(), abs=0.006)
        assert float(row["IQM 95% CI low"]) <= float(row["normalised IQM"]) <= float(row["IQM 95% CI high"])
        assert (
            float(row["mean 95% CI low"]) <= float(row["normalised mean"]) <= float(row["mean 95% CI high"])
        )
    markdown = (tmp_path / "aggregate.md").read_text()
    assert f"- Pendulum-v1: 0 = {low['Pendulum-v1']:.2f}, 1 = {high['Pendulum-v1']:.2f}" in markdown


def test_stratified_bootstrap_and_performance_profile() -> None:
    per_env = [np.array([0.0, 0.5, 1.0]), np.array([10.0, 20.0])]
    resampled = aggregate.stratified_resamples(per_env, np.random.default_rng(0))
    assert [r.shape for r in resampled] == [(aggregate.RESAMPLES, 3), (aggregate.RESAMPLES, 2)]
    assert set(np.unique(resampled[0])) <= {0.0, 0.5, 1.0} and set(np.unique(resampled[1])) <= {10.0, 20.0}
    # Envs count the same whatever their number of runs: (2/3 + 2/2) / 2 above 0.25.
    profile = aggregate.profile([np.array([0.0, 0.5, 1.0]), np.array([0.3, 0.9])], np.array([0.25, 0.95]))
    np.testing.assert_allclose(profile, [(2 / 3 + 1) / 2, (1 / 3 + 0) / 2])
    summary = aggregate.aggregate(
        {
            "a": {"x": np.array([1.0, 2.0, 3.0]), "y": np.array([0.0, 0.0])},
            "b": {"x": np.array([5.0]), "y": np.array([1.0])},
        },
        np.random.default_rng(0),
    )
    assert summary.references == {"x": (1.0, 5.0), "y": (0.0, 1.0)}
    a, b = summary.methods
    assert b.iqm == b.mean == 1.0 and b.iqm_low == b.iqm_high == 1.0
    assert np.all(np.diff(a.profile) <= 0) and np.all(a.profile_low <= a.profile + 1e-12)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--format", "png,jpg"],
            "--format: 'png,jpg' is not a list of figure formats; use one or several of png, pdf, svg",
        ),
        (
            ["--x", "episodes"],
            "--x: 'episodes' is not an x axis; use steps (environment steps) or time (wall clock)",
        ),
        (["--smooth", "1"], "--smooth: 1 is not a smoothing weight; use a value in [0, 1)"),
    ],
)
def test_a_bad_figure_option_is_one_line_naming_the_flag(
    argv: list[str],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, line = one_line_failure(
        cli.compare_main, ["ppo-compare", str(tmp_path), *argv], monkeypatch, capsys
    )
    assert code == 2
    assert line.startswith(f"ppo-compare: error: {expected}"), line


def test_variants_are_grouped_by_keys_only_some_of_them_have() -> None:
    """A key of one variant (pg's algo.returns) groups the runs that have it and is left out of
    the labels of those that do not."""
    clip = _run(0, 1e-3, [1, 2], [0, 1])
    pg = _run(0, 1e-3, [1, 2], [0, 1])
    pg.config |= {"algo.name": "pg", "algo.returns": "episode"}
    assert list(group_runs([clip, pg], ["algo", "algo.returns"])) == [
        "algo.name=clip",
        "algo.name=pg, algo.returns=episode",
    ]


def test_a_group_never_mixes_envs() -> None:
    runs = [_run(seed, 1e-3, [1, 2], [0, 1]) for seed in (0, 1)]
    runs[1].config["env.id"] = "Pendulum-v1"
    assert list(group_runs(runs, ["algo"])) == [
        "algo.name=clip, env.id=CartPole-v1",
        "algo.name=clip, env.id=Pendulum-v1",
    ]


def test_every_method_of_a_comparison_gets_a_colour_of_its_own() -> None:
    """Beyond the default cycle's 10 colours (issue 19's comparison has 11 methods), up to 20."""
    for count in (3, 10, 11, 20):
        methods = [f"method {i}" for i in range(count)]
        assert len(set(figures._colours(methods).values())) == count
