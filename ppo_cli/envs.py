"""Build the vector environment a run trains or evaluates on.

gymnasium >= 1.0 vector envs reset a finished sub-env on the *next* call to ``step`` by default
(``AutoresetMode.NEXT_STEP``): that call ignores the action and returns the first observation of
the new episode with reward 0, a transition no agent should learn from. We ask ``sync`` and
``async`` vector envs for ``SAME_STEP`` autoreset instead (the final observation then arrives in
``info["final_obs"]``). gymnasium's numpy-vectorised implementations (e.g. ``CartPoleVectorEnv``) only
know ``NEXT_STEP``; for those the rollout masks the fake step out (see ``rollout.py``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from multiprocessing.process import BaseProcess
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import load_env_creator
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.async_vector_env import _async_worker

from ppo_cli.atari import is_atari, wrap_atari
from ppo_cli.config import EnvConfig
from ppo_cli.errors import ConfigError, EnvError, UserError
from ppo_cli.processes import die_with_parent
from ppo_cli.signals import STOP_SIGNALS

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 5.0  # how long closing waits for env workers (a step in flight, env.close) to answer

# What an env's constructor raises for an argument it cannot take (gymnasium's own envs check
# values with assert).
ARGUMENT_ERRORS = (TypeError, ValueError, AssertionError)

SUPPORTED_SPACES = (
    "Box (continuous, 1-D), Discrete or MultiDiscrete (1-D) actions; Box observations, "
    "or a Dict of a Box 'observation' and an 'action_mask'"
)


def _resolve_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """Find the registered spec, importing ``package.module`` for ids of the form ``module:Env-v0``
    (and ale-py, which registers the Atari games, when the id is not known yet)."""
    if ":" in env_id:
        module, _, _ = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(f"env.id: cannot import module {module!r} ({exc})") from None
        env_id = env_id.split(":", 1)[1]
    if env_id not in gym.registry:
        _register_atari(env_id)
    try:
        return gym.spec(env_id)
    except gym.error.Error:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"env.id: {env_id!r} is not a registered gymnasium environment{hint}") from None


def _register_atari(env_id: str) -> None:
    """Register ale-py's games (if it is installed; an Atari id without it is a one-line error)."""
    try:
        import ale_py
    except ImportError:
        if env_id.startswith("ALE/") or "NoFrameskip" in env_id:
            raise UserError(f"env.id: {env_id} needs ale-py: pip install 'ppo-cli[atari]'") from None
        return
    gym.register_envs(ale_py)


def resolve_vectorization(
    cfg: EnvConfig, spec: gym.envs.registration.EnvSpec, per_env_seeds: bool = False, sequences: bool = False
) -> str:
    """``auto`` picks gymnasium's numpy-vectorised implementation when the env has one, and the
    caller does not need to seed each env separately (those share one random generator) nor
    whole sequences without fake steps (a recurrent agent's; see ``rollout.py``)."""
    if cfg.vectorization != "auto":
        return cfg.vectorization
    plain = not cfg.kwargs and cfg.max_episode_steps is None and not cfg.atari.enabled
    plain = plain and not (per_env_seeds or sequences)
    return "vector_entry_point" if spec.vector_entry_point is not None and plain else "sync"


def make_vector_env(
    cfg: EnvConfig,
    num_envs: int | None = None,
    render_mode: str | None = None,
    per_env_seeds: bool = False,
    wrappers: Sequence[Callable[[gym.Env], gym.Wrapper]] = (),
    training: bool = False,
    sequences: bool = False,
) -> VectorEnv:
    """The vector env described by ``cfg``.

    ``wrappers`` wrap each sub-env (e.g. video recording); they need ``sync`` vectorisation.
    ``training`` envs get the training-only parts of the Atari preprocessing (``atari.py``).
    """
    spec = _resolve_spec(cfg.id)
    mode = _vectorization_mode(cfg, spec, bool(wrappers), per_env_seeds, sequences)
    ours, wrappers = _sub_env_recipe(cfg, spec, render_mode, wrappers, training)
    build = partial(_build_vector_env, spec, mode, num_envs or cfg.num_envs, {**cfg.kwargs, **ours})
    try:
        envs = build(list(wrappers))
        if mode != "vector_entry_point" and ActionMaskInInfo.applies(envs.single_observation_space):
            envs.close()  # known only now: build it again, each env moving its mask into its info
            envs = build([ActionMaskInInfo, *wrappers])
    except gym.error.DependencyNotInstalled as exc:
        raise UserError(f"env.id: {spec.id} needs an optional dependency: {exc}") from None
    except ARGUMENT_ERRORS:
        refused = _refused_kwarg(spec, mode == "vector_entry_point", dict(cfg.kwargs), ours)
        if refused is None:
            raise
        raise refused from None
    check_spaces(envs, spec.id)
    return envs


def _vectorization_mode(
    cfg: EnvConfig,
    spec: gym.envs.registration.EnvSpec,
    wrapped: bool,
    per_env_seeds: bool,
    sequences: bool,
) -> str:
    """How to vectorise: ``sync`` when the caller wraps each sub-env (gymnasium's numpy-vectorised
    envs have no sub-envs to wrap), else :func:`resolve_vectorization`; asking for a
    numpy-vectorised implementation the env lacks is the user's fault, told before anything is built."""
    mode = "sync" if wrapped else resolve_vectorization(cfg, spec, per_env_seeds, sequences)
    if mode == "vector_entry_point" and spec.vector_entry_point is None:
        raise UserError(
            f"env.vectorization: {spec.id} has no numpy-vectorised implementation; allowed: auto|sync|async"
        )
    return mode


def _sub_env_recipe(
    cfg: EnvConfig,
    spec: gym.envs.registration.EnvSpec,
    render_mode: str | None,
    wrappers: Sequence[Callable[[gym.Env], gym.Wrapper]],
    training: bool,
) -> tuple[dict[str, Any], list[Callable[[gym.Env], gym.Wrapper]]]:
    """What each sub-env is made of beside the user's ``env.kwargs``: the keyword arguments
    ppo-cli adds to ``gym.make`` (render mode, time limit, Atari frame skip), kept apart so that a
    constructor's refusal can be blamed on the user's kwargs only (:func:`_refused_kwarg`), and
    the wrapper stack, the Atari preprocessing innermost, under the caller's ``wrappers``."""
    ours: dict[str, Any] = {}
    if render_mode is not None:
        ours["render_mode"] = render_mode
    if cfg.max_episode_steps is not None:
        ours["max_episode_steps"] = cfg.max_episode_steps
    if cfg.atari.enabled:
        if not is_atari(spec):
            raise UserError(f"env.atari.enabled: {spec.id} is not an Atari game of ale-py; allowed: false")
        ours["frameskip"] = 1  # frames are skipped (and max-pooled) by the preprocessing
        return ours, [partial(wrap_atari, cfg=cfg.atari, training=training), *wrappers]
    return ours, list(wrappers)


def _build_vector_env(
    spec: gym.envs.registration.EnvSpec,
    mode: str,
    num_envs: int,
    kwargs: dict[str, Any],
    sub_env_wrappers: list[Callable[[gym.Env], gym.Wrapper]],
) -> VectorEnv:
    """``gym.make_vec`` with same-step autoreset (see the module docstring) and, for ``async``,
    workers that die with the trainer and ignore stop signals.

    Async workers start with SIGINT and SIGTERM ignored (a disposition they inherit, however they
    are started): Ctrl-C in a terminal, or a scheduler, signals the whole process group, and only
    the trainer should react; it closes the workers itself.
    """
    vector_kwargs: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP}
    if mode == "async":
        # gymnasium's worker loop, in a process that dies with the trainer (see processes.py). A
        # forkserver, not the trainer, is the parent of workers it starts: their parent's pid is unknown.
        parent = None if multiprocessing.get_start_method() == "forkserver" else os.getpid()
        vector_kwargs["worker"] = partial(_env_worker, parent)
    with _stop_signals_ignored(mode == "async"):
        return gym.make_vec(
            spec,
            num_envs=num_envs,
            vectorization_mode=mode,
            vector_kwargs=None if mode == "vector_entry_point" else vector_kwargs,
            wrappers=sub_env_wrappers or None,
            **kwargs,
        )


def _refused_kwarg(
    spec: gym.envs.registration.EnvSpec, vector: bool, given: dict[str, Any], ours: dict[str, Any]
) -> ConfigError | None:
    """Which of the user's ``env.kwargs`` (``given``) the env's constructor refused, after building
    the env with them raised one of ARGUMENT_ERRORS; None when they are not to blame (a bug: it
    keeps its traceback). ``ours`` are the keyword arguments ppo-cli adds (render mode, time limit).

    A name the constructor does not take is read off its signature. A value of the wrong type (or
    out of range) shows only when the constructor runs: the env is built once without the user's
    kwargs, then once with each of them alone, and the first that alone makes it fail is named.
    """
    if not given:
        return None
    entry_point = spec.vector_entry_point if vector else spec.entry_point
    creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
    if creator is None:
        return None
    name = f"{getattr(creator, '__name__', entry_point)} ({spec.id})"
    unknown = _unknown_kwarg(creator, name, given)
    if unknown is not None:
        return unknown
    if _construction_failure(spec, vector, ours) is not None:
        return None
    for key, value in given.items():
        error = _construction_failure(spec, vector, {**ours, key: value})
        if error is not None:
            shown = f"{key}={value!r} ({type(value).__name__})"
            return ConfigError(
                f"env.kwargs.{key}", f"{name} fails with {shown}: {error or type(error).__name__}"
            )
    return None


def _unknown_kwarg(creator: Callable[..., Any], name: str, given: dict[str, Any]) -> ConfigError | None:
    """The first of ``given`` that ``creator`` (called ``name`` in the message) has no parameter
    for, read off its signature without running it; None when all are taken, or when the
    signature cannot tell (none to read, or a ``**kwargs`` that takes any name)."""
    try:
        parameters = list(inspect.signature(creator).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin)
        parameters = []
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [key for key in given if key not in named]
    if unknown and parameters and not any(p.kind == p.VAR_KEYWORD for p in parameters):
        return ConfigError(
            f"env.kwargs.{unknown[0]}",
            f"{name} takes no parameter {unknown[0]!r}; its parameters: {', '.join(named) or 'none'}",
        )
    return None


def _construction_failure(
    spec: gym.envs.registration.EnvSpec, vector: bool, kwargs: dict[str, Any]
) -> Exception | None:
    """What the env's constructor raises with ``kwargs`` (not gymnasium's rewording of a
    TypeError), building one env (or a numpy-vectorised one of one) and closing it; None if it
    builds. A wrong value shows only this way: the signature says nothing of types or ranges."""
    try:
        if vector:
            gym.make_vec(spec, num_envs=1, vectorization_mode="vector_entry_point", **kwargs).close()
        else:
            gym.make(spec, **kwargs).close()
    except ARGUMENT_ERRORS as exc:
        return exc.__cause__ if isinstance(exc.__cause__, TypeError) else exc
    return None


def _env_worker(parent_pid: int | None, *args: Any) -> None:
    """An async env worker: gymnasium's own loop, once this process is tied to the trainer's life
    (before the env is built, which may hang too)."""
    die_with_parent(parent_pid)
    _async_worker(*args)


@contextmanager
def closing_envs(envs: VectorEnv) -> Iterator[VectorEnv]:
    """``contextlib.closing`` for a vector env, with a close that cannot hang (see :func:`close_envs`)."""
    try:
        yield envs
    finally:
        close_envs(envs)


def close_envs(envs: VectorEnv, grace_s: float = CLOSE_GRACE_S) -> None:
    """Close ``envs``; async env workers still alive ``grace_s`` seconds later are killed.

    gymnasium's ``AsyncVectorEnv.close`` first waits for a step in flight (``timeout``), then for
    every worker to close its env, without limit; when the wait times out it "terminates" the
    workers with SIGTERM, which ours ignore (see :func:`_build_vector_env`), and joins them. A worker
    stuck in ``env.step`` would hold the trainer forever, even after a second Ctrl-C. So a timer
    kills (SIGKILL) whatever worker is still alive after the grace period; the join then returns.
    """
    workers = list(getattr(envs.unwrapped, "processes", ()))
    if not workers:
        envs.close()
        return
    killer = threading.Timer(grace_s, _kill_stuck_workers, args=(workers, grace_s))
    killer.daemon = True
    killer.start()
    try:
        with warnings.catch_warnings():  # gymnasium's warning about the step in flight: the killer reports
            warnings.simplefilter("ignore")
            envs.close(timeout=grace_s)
    except (EOFError, OSError):  # a worker died (crashed, or killed by the timer): end them all
        killer.cancel()
        async_env = envs.unwrapped
        for worker in workers:
            worker.kill()
            worker.join()
        for pipe in getattr(async_env, "parent_pipes", ()):
            if pipe is not None:
                pipe.close()
        async_env.closed = True  # gymnasium's close would wait on the dead worker's pipe again
    finally:
        killer.cancel()


def _kill_stuck_workers(workers: list[BaseProcess], grace_s: float) -> None:
    stuck = [worker for worker in workers if worker.is_alive()]
    for worker in stuck:
        worker.kill()
    if stuck:
        pids = ", ".join(str(worker.pid) for worker in stuck)
        log.warning("env worker(s) %s did not answer within %.0f s of closing: killed", pids, grace_s)


def dead_env_workers(envs: VectorEnv, wait_s: float = 1.0) -> str | None:
    """Which of an async env's workers died, and of what ("env worker 1 (pid 4242) died of
    SIGSEGV"), waiting up to ``wait_s`` for the OS to report the death; None if none did (or the
    env has no workers). Called when talking to the workers failed (``EOFError``)."""
    workers = list(getattr(envs.unwrapped, "processes", ()))
    deadline = time.monotonic() + wait_s
    while not (dead := [(i, w) for i, w in enumerate(workers) if w.exitcode is not None]):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return ", ".join(f"env worker {i} (pid {w.pid}) died of {_exit_cause(w.exitcode)}" for i, w in dead)


def _exit_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return signal.Signals(-exitcode).name
    return f"exit code {exitcode}"


class ActionMaskInInfo(gym.Wrapper):
    """For envs whose observation is a Dict of ``observation`` and ``action_mask`` (as in
    PettingZoo-style and many board-game envs): the observation alone, with the mask moved to
    ``info["action_mask"]``, where the rollout reads masks (see :func:`action_masks`)."""

    KEYS = frozenset({"observation", "action_mask"})

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        assert isinstance(env.observation_space, gym.spaces.Dict)
        self.observation_space = env.observation_space["observation"]

    @classmethod
    def applies(cls, space: gym.spaces.Space) -> bool:
        return isinstance(space, gym.spaces.Dict) and set(space.spaces) == cls.KEYS

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        return obs["observation"], {**info, "action_mask": obs["action_mask"]}

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs["observation"], reward, terminated, truncated, {**info, "action_mask": obs["action_mask"]}


@contextmanager
def _stop_signals_ignored(active: bool) -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the body runs (main thread only: elsewhere Python cannot
    set handlers)."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def env_failure(envs: VectorEnv, call: str, exc: Exception) -> UserError:
    """What to report when ``envs.reset`` or ``envs.step`` (``call``) raised ``exc``.

    An observation whose shape is not its space's makes gymnasium's vector env fail while it
    stacks the observations, with numpy's words only ("Output array is the wrong shape"): that is
    reported with both shapes. Any other exception is the env's own: its traceback (from the
    vector env down, the env's code included) becomes the error's details; but an async env whose
    worker process died (the pipe to it broke) is reported as that death, which is all there is.
    """
    if isinstance(exc, UserError):  # ours already (a wrapper's), in one line
        return exc
    name = envs.spec.id if envs.spec is not None else type(envs.unwrapped).__name__
    if isinstance(exc, EOFError | ConnectionError) and (died := dead_env_workers(envs)) is not None:
        return EnvError(f"env {name}: {died}")
    expected = envs.single_observation_space.shape
    # A SyncVectorEnv keeps each env's last observation in _env_obs (gymnasium 1.x).
    shapes = {np.shape(obs) for obs in getattr(envs.unwrapped, "_env_obs", ()) if obs is not None}
    wrong = sorted(shape for shape in shapes if shape != expected)
    if isinstance(exc, ValueError) and wrong:
        return EnvError(
            f"env {name} returned an observation of shape {wrong[0]} in {call}; "
            f"its observation space has shape {expected}"
        )
    lines = str(exc).strip().splitlines()
    cause = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    below_caller = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    details = "".join(traceback.format_exception(type(exc), exc, below_caller))
    return EnvError(f"env {name} raised in {call} ({cause})", details)


def check_spaces(envs: VectorEnv, env_id: str) -> None:
    """Refuse spaces the agent cannot handle, before any network is built."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    if not isinstance(obs_space, gym.spaces.Box):
        raise UserError(
            f"env.id: {env_id} has a {type(obs_space).__name__} observation space; "
            f"supported: {SUPPORTED_SPACES}"
        )
    one_dim = isinstance(act_space, gym.spaces.Box | gym.spaces.MultiDiscrete) and len(act_space.shape) == 1
    if not (one_dim or isinstance(act_space, gym.spaces.Discrete)):
        raise UserError(f"env.id: {env_id} has a {act_space} action space; supported: {SUPPORTED_SPACES}")


def action_masks(info: dict[str, Any], num_envs: int, size: int) -> np.ndarray | None:
    """The allowed actions the envs report in ``info["action_mask"]`` (the gymnasium convention,
    e.g. Taxi), as a (num_envs, size) bool array for the current observations; None when the envs
    report none. An env that reports none this step allows every action. ``size`` is the number
    of actions (Discrete) or their total over components (MultiDiscrete, whose per-component
    masks are concatenated).
    """
    if "action_mask" not in info:
        return None
    reported = info["action_mask"]
    if isinstance(reported, tuple):  # MultiDiscrete: one mask per component
        reported = np.concatenate([np.asarray(part).reshape(num_envs, -1) for part in reported], axis=1)
    masks = np.asarray(reported).reshape(num_envs, -1).astype(bool)
    if masks.shape[1] != size:
        raise UserError(f"env.id: info['action_mask'] has {masks.shape[1]} entries, for {size} actions")
    if "_action_mask" in info:
        masks[~info["_action_mask"]] = True
    return masks


def finished_episodes(info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(env indices, returns, lengths) of the episodes that ended in this step (raw rewards), as
    ``RecordEpisodeStatistics`` reports them in ``info``."""
    if "episode" not in info:
        return np.empty(0, dtype=int), np.empty(0), np.empty(0, dtype=int)
    done = info["_episode"]
    return np.flatnonzero(done), info["episode"]["r"][done], info["episode"]["l"][done]


def uses_next_step_autoreset(envs: VectorEnv) -> bool:
    """True when the env emits the reset transition as an extra step (see module docstring)."""
    mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    return AutoresetMode(mode) == AutoresetMode.NEXT_STEP


def episode_time_limit(cfg: EnvConfig) -> int | None:
    """The number of steps after which an episode is truncated, or None if nothing cuts it."""
    return cfg.max_episode_steps or _resolve_spec(cfg.id).max_episode_steps
