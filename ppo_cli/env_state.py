"""Save and restore the state of a vector env as plain data, for exact resume.

A resumed run continues the very episodes the checkpoint interrupted only if every env comes back
in the same state: physics state, step counters of the time limits, episode statistics and the
random generators. Checkpoints must load with ``torch.load(weights_only=True)``, so the envs are
not pickled; instead every attribute of every wrapper layer whose value is plain data (numbers,
strings, numpy arrays, random generators, tuples of those) is written out as tensors and plain
Python values, and set back on freshly built envs.

This is exact only where such attributes are the whole state. That holds for gymnasium's
classic-control envs (pure numpy) and their numpy-vectorised versions, run in this process; it
does not hold for physics engines with native state (MuJoCo, Box2D) nor for async envs (their
state lives in worker processes). For those :func:`capture` returns None and the caller restarts
the episodes from a fresh seed (see ``Collector.load_state_dict``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium.vector import SyncVectorEnv, VectorEnv

EXACT_MODULE_PREFIXES = ("gymnasium.envs.classic_control.",)

_PLAIN = (type(None), bool, int, float, str)


def _layers(env: Any) -> list[Any]:
    """The wrapper chain of a (vector) env, outermost first, down to the unwrapped env."""
    layers = [env]
    while hasattr(layers[-1], "env"):
        layers.append(layers[-1].env)
    return layers


def _sub_env_chains(envs: VectorEnv) -> list[list[Any]] | None:
    """Every object that holds state: the vector layers, then each sub-env's layers; None when
    some of that state is out of reach (another process, or a native simulator)."""
    vector_layers = _layers(envs)
    core = vector_layers[-1]
    chains = [vector_layers]
    if isinstance(core, SyncVectorEnv):
        chains += [_layers(env) for env in core.envs]
        leaves = [chain[-1] for chain in chains[1:]]
    else:
        leaves = [core]
    if not all(type(leaf).__module__.startswith(EXACT_MODULE_PREFIXES) for leaf in leaves):
        return None
    return chains


def _encode(value: Any) -> Any:
    """Plain data for ``value``; raises TypeError for anything that is not."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, np.random.Generator):
        return {"generator": value.bit_generator.state}
    if isinstance(value, np.ndarray | np.generic) and value.dtype.kind in "biuf":
        return {"ndarray": torch.from_numpy(np.array(value, copy=True)), "scalar": np.ndim(value) == 0}
    if isinstance(value, tuple | list):
        return {"sequence": [_encode(item) for item in value], "tuple": isinstance(value, tuple)}
    raise TypeError(type(value).__name__)


def _decode(data: Any, current: Any) -> Any:
    """Inverse of :func:`_encode`; ``current`` is the attribute's value on the fresh env."""
    if not isinstance(data, dict):
        return data
    if "generator" in data:
        generator = current if isinstance(current, np.random.Generator) else np.random.default_rng()
        generator.bit_generator.state = data["generator"]
        return generator
    if "ndarray" in data:
        array = data["ndarray"].numpy().copy()
        return array[()] if data["scalar"] else array
    items = [_decode(item, None) for item in data["sequence"]]
    return tuple(items) if data["tuple"] else items


def _layer_state(layer: Any) -> dict[str, Any]:
    state = {}
    for name, value in vars(layer).items():
        try:
            state[name] = _encode(value)
        except TypeError:
            continue  # spaces, specs, renderers, sub-envs: configuration, not state
    return state


def capture(envs: VectorEnv) -> list[list[dict[str, Any]]] | None:
    """The state of ``envs`` as nested lists of plain dicts, or None if it cannot be captured."""
    chains = _sub_env_chains(envs)
    if chains is None:
        return None
    return [[_layer_state(layer) for layer in chain] for chain in chains]


def restore(envs: VectorEnv, state: list[list[dict[str, Any]]]) -> bool:
    """Set the state from :func:`capture` on ``envs`` (built from the same config).

    Returns False, changing nothing, when ``envs`` is not shaped like the envs it came from.
    """
    chains = _sub_env_chains(envs)
    if chains is None or [len(chain) for chain in chains] != [len(chain) for chain in state]:
        return False
    for chain, chain_state in zip(chains, state, strict=True):
        for layer, layer_state in zip(chain, chain_state, strict=True):
            if not set(layer_state) <= set(vars(layer)):
                return False
    for chain, chain_state in zip(chains, state, strict=True):
        for layer, layer_state in zip(chain, chain_state, strict=True):
            for name, data in layer_state.items():
                setattr(layer, name, _decode(data, getattr(layer, name)))
    return True
