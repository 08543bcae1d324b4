"""A ``TrainConfig`` from YAML plus ``key=value`` overrides, and back to YAML.

    cfg = load_config("configs/smollm2_cpu_demo.yaml", ["total_steps=4", "loss.beta=0.2", "reference=sft"])

A file holds flat keys (``beta: 0.1``) and/or group mappings (``loss: {beta: 0.1}``); an override is a flat key
or a dotted ``group.key``. Unknown keys and impossible values raise ``ConfigError`` naming the key before
anything is compiled.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml

from bpo_jax.config.groups import GROUPS, ConfigError
from bpo_jax.config.train_config import KEY_GROUP, KEY_TYPES, TrainConfig


def _list_item(key: str, value) -> bool:
    """A valid item of a list key: a name, or for ``mesh_device_ids`` a device id."""
    return isinstance(value, str) or (key == "mesh_device_ids" and type(value) is int)


def _coerce(key: str, value: Any):
    """Convert a YAML value or an override string to the key's type, or raise ConfigError."""
    hint = KEY_TYPES[key]
    scalar = isinstance(value, (str, int, float)) and not (isinstance(value, bool) and hint in (int, float))
    if hint is not tuple and not scalar:  # a list, a mapping, null, or a bool where a number is wanted
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(hint, '__name__', hint)}")
    if hint is tuple and not (isinstance(value, str) or (isinstance(value, (list, tuple))
                                                         and all(_list_item(key, v) for v in value))):
        raise ConfigError(f"{key}={value!r} is not a list of names")
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None


def _key(name: str, source: str) -> str:
    """The flat key a flat or dotted name means; ConfigError for an unknown one (with the closest keys)."""
    group, dot, key = name.rpartition(".")
    if dot and group not in GROUPS:
        raise ConfigError(f"unknown config group {group!r} in {source}; groups: {', '.join(GROUPS)}")
    if key in KEY_GROUP and (not dot or KEY_GROUP[key] == group):
        return key
    if dot and key in KEY_GROUP:
        raise ConfigError(f"{name!r} in {source}: {key} is in group {KEY_GROUP[key]!r}, not {group!r}")
    close = difflib.get_close_matches(key, list(KEY_GROUP), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(KEY_GROUP)}"
    raise ConfigError(f"unknown config key {name!r} in {source}{hint}")


def _file_values(path: str) -> dict:
    """The flat settings of a YAML file (flat keys and/or ``group: {key: value}`` mappings)."""
    try:
        from etils import epath  # also gs:// (a multi-host run's config.yaml)

        data = yaml.safe_load(epath.Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path!r} is not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
    values = {}
    for name, value in data.items():
        if name in GROUPS and isinstance(value, dict):
            for k, v in value.items():
                key = _key(f"{name}.{k}", path)
                values[key] = _coerce(key, v)
        else:
            key = _key(name, path)
            values[key] = _coerce(key, value)
    return values


def load_config(path: str | None = None, overrides=()) -> TrainConfig:
    """Defaults ← YAML file (if given) ← ``key=value`` overrides (flat or dotted keys); then validate."""
    values: dict[str, Any] = _file_values(path) if path else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        name, v = item.split("=", 1)
        k = _key(name, "the command line")
        values[k] = _coerce(k, yaml.safe_load(v) if KEY_TYPES[k] is not str else v)
    return TrainConfig(**values)


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write every key of ``cfg`` as flat YAML that ``load_config`` reads back to an equal config."""
    from etils import epath

    values = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_flat().items()}
    epath.Path(path).write_text(yaml.safe_dump(values, sort_keys=False))
