"""Each config key described once, on its schema field: the values it allows and what it changes.

A schema field made with :func:`setting` carries both in its metadata (OmegaConf reads only the
field's name, type and default, so the metadata does not change what Hydra composes):

- a :class:`Check`, run by :class:`CheckedFields` when the dataclass is built, so that a value
  out of range fails as ``<key>: got <value>, allowed: <allowed>`` before any env or network is
  made. Checks that relate two keys, or a key to the env, stay as code in the schemas.
- a :class:`Role`, read by resume (which keys may change on resume), ppo-compare (which keys tell
  experiments apart) and the TensorBoard HParams table (which keys are columns).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from omegaconf import MISSING

from ppo_cli.errors import ConfigError


def require(ok: bool, key: str, allowed: str, value: Any) -> None:
    """The one shape of a bad value's message, for generated and hand-written checks alike."""
    if not ok:
        raise ConfigError(key, f"got {value!r}, allowed: {allowed}")


@dataclass(frozen=True)
class Check:
    """What a key allows: a test of its value, and the words the error message shows."""

    ok: Callable[[Any], bool]
    allowed: str


def integer_at_least(low: int, note: str | None = None) -> Check:
    return Check(lambda value: value >= low, f"an integer >= {low}" + (f" ({note})" if note else ""))


def number_above(low: float) -> Check:
    return Check(lambda value: value > low, f"a number > {low:g}")


def number_at_least(low: float) -> Check:
    return Check(lambda value: value >= low, f"a number >= {low:g}")


def number_in(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    """A number in an interval, each end closed unless told: ``a number in (0, 1]``."""

    def ok(value: float) -> bool:
        above = low < value if open_low else low <= value
        return above and (value < high if open_high else value <= high)

    left, right = "(" if open_low else "[", ")" if open_high else "]"
    return Check(ok, f"a number in {left}{low:g}, {high:g}{right}")


def one_of(choices: Sequence[str]) -> Check:
    return Check(lambda value: value in choices, "|".join(choices))


def optional(check: Check, null: str = "null") -> Check:
    """``check``, or None; ``null`` says what None means (``null (no early stop)``)."""
    return Check(lambda value: value is None or check.ok(value), f"{null} or {check.allowed}")


class Role(enum.Enum):
    """What a key changes, and so whether it may change on resume (without
    ``resume_allow_changes``), whether it tells experiments apart in ppo-compare, and whether it is
    a column of TensorBoard's HParams table. A group's role covers every key under it."""

    LEARNING = (False, True, True)  # the model, the envs or the updates: the default
    REPLICATE = (False, False, True)  # which replicate of an experiment (seed)
    LENGTH = (True, True, True)  # how long to train
    EVALUATION = (True, False, True)  # the final evaluation
    OPERATIONAL = (True, False, False)  # checkpoints, progress, threads, device, resuming

    def __init__(self, free_on_resume: bool, factor: bool, hparam: bool) -> None:
        self.free_on_resume = free_on_resume
        self.factor = factor
        self.hparam = hparam


def setting(
    default: Any = MISSING,
    *,
    check: Check | None = None,
    role: Role = Role.LEARNING,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A schema field (``default``, or ``factory()`` for a mutable one) with its check and role."""
    metadata = {"check": check, "role": role}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def role_of_field(field: dataclasses.Field[Any]) -> Role:
    return field.metadata.get("role", Role.LEARNING)


class CheckedFields:
    """Runs every field's check, in field order, when a schema dataclass is built; a schema with
    checks that relate keys extends ``__post_init__`` after calling this one."""

    key_prefix: ClassVar[str] = ""  # where the schema sits in the config tree: "env.", "algo.", ...

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            check = field.metadata.get("check")
            if check is not None:
                value = getattr(self, field.name)
                require(check.ok(value), f"{self.key_prefix}{field.name}", check.allowed, value)
