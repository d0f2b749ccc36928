"""The schemas' glue to Hydra and OmegaConf: registering them, composing into checked dataclasses,
and the messages for keys that no schema has.

``config.py`` says what the keys are; this module is how Hydra's composed ``DictConfig`` becomes
a :class:`~ppo_cli.config.TrainConfig` (:func:`to_train_config`, which runs every check before any
environment or network is built), and how a run's saved plain config is read back with the
defaults of keys added since (:func:`schema_defaults`, :func:`env_config_of`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, IntegerNode, OmegaConf

from ppo_cli.config import ALGO_SCHEMAS, EnvConfig, TrainConfig, flatten
from ppo_cli.errors import ConfigError

# The groups of the training config, which select presets (``tuned`` and ``hparams_search`` only
# load them).
CONFIG_GROUPS = ("algo", "agent", "env", "tuned", "hparams_search", "tracking")


def schema_defaults(algo: str | None = None) -> dict[str, Any]:
    """Every key of the root and env schemas that has a default, flattened, and of the schema of
    the variant named ``algo`` (each variant has its own), if one is named."""
    schema = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"env": OmegaConf.structured(EnvConfig)})
    if algo in ALGO_SCHEMAS:
        schema = OmegaConf.merge(schema, {"algo": OmegaConf.structured(ALGO_SCHEMAS[algo])})
    defaults = cast(dict[str, Any], OmegaConf.to_container(schema, throw_on_missing=False))
    return {key: value for key, value in flatten(defaults).items() if value != MISSING}


def env_config_of(saved: dict[str, Any]) -> EnvConfig:
    """The EnvConfig of a run's saved (plain) config; keys added since it was saved take their
    defaults."""
    env_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EnvConfig), saved))
    assert isinstance(env_cfg, EnvConfig)
    return env_cfg


_to_integer = IntegerNode._validate_and_convert_impl  # OmegaConf's own: ints and numeric strings


def _integral_float_to_integer(self: IntegerNode, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _to_integer(self, value)


def register_schemas() -> None:
    """Make the schemas known to Hydra: ``train.yaml`` starts from ``train_schema``, and each
    ``algo/<name>.yaml`` from ``/schemas/algo/<name>`` (a group of its own, so that ``--help``
    and error messages list only the YAML presets as choices).

    Integer keys also take integral floats (``total_timesteps=1e6``, ``2.0``): Hydra's override
    parser and OmegaConf's YAML loader read ``1e6`` as a float, which OmegaConf's integer nodes
    refuse, on the command line, in sweeps and in YAML presets alike; only that node can accept
    it everywhere. Other floats (``1.5``) are refused as before.
    """
    IntegerNode._validate_and_convert_impl = _integral_float_to_integer  # type: ignore[method-assign]
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name, schema in ALGO_SCHEMAS.items():
        store.store(group="schemas/algo", name=name, node=schema)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Turn a composed config into checked dataclasses (raises ConfigError on bad values)."""
    reject_unknown_keys(cfg)
    train_cfg = OmegaConf.to_object(cfg)
    assert isinstance(train_cfg, TrainConfig), type(train_cfg)
    return train_cfg


def reject_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Refuse keys the node's schema does not define.

    Hydra lets ``+key=value`` add a key even to a structured config, and ``to_object`` would then
    drop it silently; a typo must be an error instead. Each node is checked against its own
    schema (the chosen algo variant's, not the base class's); free-form mappings (``env.kwargs``)
    are not checked.
    """
    schema = OmegaConf.get_type(node)
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in node:
        name = str(key)
        if name not in fields:
            raise unknown_key_error(f"{prefix}{name}", schema)
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_missing():
            reject_unknown_keys(child, f"{prefix}{name}.")


def unknown_key_error(full_key: str, schema: type | None) -> ConfigError:
    """'<key>: not a config key; allowed keys under <parent>: ...'; ``schema`` is the parent's type."""
    parent = full_key.rpartition(".")[0]
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return ConfigError(
            full_key, f"not a config key (to add an entry to the mapping {parent} write +{full_key}=...)"
        )
    allowed = ", ".join(sorted(f.name for f in dataclasses.fields(schema)))
    where = f" under {parent}" if parent else ""
    return ConfigError(full_key, f"not a config key; allowed keys{where}: {allowed}")
