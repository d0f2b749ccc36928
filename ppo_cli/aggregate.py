"""Scores across several envs, the way Agarwal et al. 2021 ("Deep RL at the Edge of the Statistical
Precipice") report them: each run's final score normalised per env, the interquartile mean (IQM)
and mean over all runs of all envs with stratified bootstrap intervals (runs resampled within each
env, so every resample keeps every env), and performance profiles (the fraction of runs scoring
above each normalised score).

Written with numpy, not with the ``rliable`` library that introduced these views: rliable 1.2.0
(its last release, 2024) installs here but brings arch (< 8, pinned below the current release),
statsmodels, pandas, seaborn and absl-py for what is here about thirty lines, and draws with the
legacy ``np.random.RandomState``. The statistics are the same: scipy's 25% trimmed mean for the
IQM, percentile intervals, ``>`` for the profiles.

Normalisation: few envs outside Atari have agreed reference scores, so 0 and 1 are the lowest and
the highest final score among the runs compared on that env. Normalised scores therefore rank the
methods of one comparison; they are not comparable across comparisons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

RESAMPLES = 2000
CONFIDENCE = 0.95
PROFILE_POINTS = 101  # normalised scores 0, 0.01, ..., 1 where the profiles are evaluated


@dataclass
class MethodAggregate:
    """One method's normalised scores over every env, with 95% stratified bootstrap intervals."""

    method: str
    runs: int
    iqm: float
    iqm_low: float
    iqm_high: float
    mean: float
    mean_low: float
    mean_high: float
    profile: np.ndarray  # fraction of runs (averaged over envs) above each of Aggregate.taus
    profile_low: np.ndarray
    profile_high: np.ndarray


@dataclass
class Aggregate:
    references: dict[str, tuple[float, float]]  # env: (final score normalised to 0, to 1)
    taus: np.ndarray
    methods: list[MethodAggregate]


def iqm(samples: np.ndarray, axis: int | None = 0) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% (scipy's 25% trimmed mean, as rliable's)."""
    return np.asarray(stats.trim_mean(samples, 0.25, axis=axis))


def normalise(
    scores: dict[str, dict[str, np.ndarray]],
) -> tuple[dict[str, list[np.ndarray]], dict[str, tuple[float, float]]]:
    """``{method: [scores of env 1, env 2, ...]}`` mapped so that on each env the lowest final
    score of any method is 0 and the highest 1 (all 1 on an env where every run scored the same),
    and the ``{env: (low, high)}`` references used."""
    envs = sorted({env for by_env in scores.values() for env in by_env})
    references = {}
    for env in envs:
        pooled = np.concatenate([by_env[env] for by_env in scores.values()])
        references[env] = (float(pooled.min()), float(pooled.max()))
    normalised = {
        method: [_scale(by_env[env], *references[env]) for env in envs] for method, by_env in scores.items()
    }
    return normalised, references


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (values - low) / (high - low) if high > low else np.ones(len(values))


def stratified_resamples(per_env: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Per env, ``RESAMPLES`` draws (rows) of as many runs as it has, with replacement, from that
    env's runs only: the bootstrap varies the seeds, never which envs are in."""
    return [scores[rng.integers(0, len(scores), size=(RESAMPLES, len(scores)))] for scores in per_env]


def profile(per_env: list[np.ndarray], taus: np.ndarray) -> np.ndarray:
    """Fraction of runs with a score above each tau, averaged over envs (each env counts the same
    whatever its number of runs); over the last axis of each array, so resamples vectorise."""
    return np.mean([(scores[..., None] > taus).mean(axis=-2) for scores in per_env], axis=0)


def _interval(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail], axis=0)
    return low, high


def _pooled(statistic: Callable[..., np.ndarray], per_env: list[np.ndarray]) -> np.ndarray:
    return statistic(np.concatenate(per_env, axis=-1), axis=-1)


def aggregate(scores: dict[str, dict[str, np.ndarray]], rng: np.random.Generator) -> Aggregate:
    """IQM, mean and performance profile of each method's normalised scores (``scores``: {method:
    {env: final scores}}, every method on the same envs), with stratified bootstrap intervals."""
    normalised, references = normalise(scores)
    taus = np.linspace(0.0, 1.0, PROFILE_POINTS)
    methods = []
    for method, per_env in normalised.items():
        resampled = stratified_resamples(per_env, rng)
        iqm_low, iqm_high = _interval(_pooled(iqm, resampled))
        mean_low, mean_high = _interval(_pooled(np.mean, resampled))
        profile_low, profile_high = _interval(profile(resampled, taus))
        methods.append(
            MethodAggregate(
                method=method,
                runs=sum(len(scores) for scores in per_env),
                iqm=float(_pooled(iqm, per_env)),
                iqm_low=float(iqm_low),
                iqm_high=float(iqm_high),
                mean=float(_pooled(np.mean, per_env)),
                mean_low=float(mean_low),
                mean_high=float(mean_high),
                profile=profile(per_env, taus),
                profile_low=profile_low,
                profile_high=profile_high,
            )
        )
    return Aggregate(references, taus, methods)
