"""Resolve a run's configuration: schema defaults < preset < ``--config`` files < ``--set`` overrides.

Strict by design (nanochat/torchtune): unknown keys are errors with a did-you-mean, values are
coerced to the field's declared type (YAML reads ``1e-6`` as a string; ``--set`` values arrive as
strings), enums are checked. Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any

import yaml

from dmdr_cli.config import presets as preset_store
from dmdr_cli.config.schema import CHOICES, DmdrConfig
from dmdr_cli.errors import ConfigError, did_you_mean

_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}
_FIX = "fix the value in the preset, --config file or --set"


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_describe(args[0])} or null"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any, item: type | None = None) -> Any:
    """Coerce ``value`` to the type ``tp`` of field ``key`` or raise ConfigError naming key and type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in {"null", "none", "~"}):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        try:
            return coerce(key, value, inner, item)
        except ConfigError:  # name the full type: "float or null"
            raise ConfigError(f"{key} must be of type {_describe(tp)}, got {value!r}", _FIX) from None
    bad = ConfigError(f"{key} must be of type {_describe(tp)}, got {value!r}", _FIX)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # YAML files read `1`/`0` as ints
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.strip())
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is list or origin is list:
        if isinstance(value, str):
            try:
                parsed = yaml.safe_load(value) if value.strip() else []
            except yaml.YAMLError:
                raise ConfigError(f"{key}: {value!r} is not a valid YAML list", "e.g. --set student.grid=[1.0,0.75]") from None
            value = parsed if isinstance(parsed, list) else [parsed]
        if not isinstance(value, (list, tuple)):
            raise bad
        if item is not None:
            return [_coerce_item(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return list(value)
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                raise ConfigError(f"{key}: {value!r} is not a valid YAML mapping", "e.g. {color_weight: 1.0}") from None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return dict(value)
    raise bad  # pragma: no cover - schema uses only the types above


def _coerce_item(key: str, value: Any, cls: type) -> dict:
    """List items that are small dataclasses (e.g. reward specs) are stored as validated dicts."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping with keys {[f.name for f in dataclasses.fields(cls)]}, got {value!r}")
    types = _field_types(cls)
    out = dataclasses.asdict(cls())
    for k, v in value.items():
        if k not in types:
            raise ConfigError(f"unknown key '{key}.{k}'.{did_you_mean(k, types)}", f"valid keys: {', '.join(types)}")
        out[k] = coerce(f"{key}.{k}", v, types[k])
    return out


def _apply(cfg: Any, data: dict, prefix: str, source: str) -> None:
    """Apply a nested mapping onto dataclass ``cfg`` in place."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    types = _field_types(type(cfg))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{full}'.{did_you_mean(full, all_keys())}",
                              "`dmdr presets show NAME --resolved` lists every key")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if value is not None:  # an empty section (every key commented out) reads as null
                _apply(current, value, f"{full}.", source)
        else:
            setattr(cfg, key, coerce(full, value, types[key], fields[key].metadata.get("item")))


def all_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema."""
    cfg = cfg if cfg is not None else DmdrConfig()
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def parse_set(item: str) -> tuple[str, str]:
    """Split one ``key=value`` override."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}", "e.g. --set distill.lr=1e-6")
    key, value = item.split("=", 1)
    return key.strip(), value


def apply_set(cfg: DmdrConfig, item: str) -> None:
    """Apply one ``--set key=value``; value is parsed as YAML scalar/list then coerced by type."""
    key, raw = parse_set(item)
    keys = all_keys()
    if key not in keys:
        raise ConfigError(f"unknown key '{key}'.{did_you_mean(key, keys)}",
                          "`dmdr presets show NAME --resolved` lists every key")
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    f = {f.name: f for f in dataclasses.fields(node)}[leaf]
    tp = _field_types(type(node))[leaf]
    setattr(node, leaf, coerce(key, raw, tp, f.metadata.get("item")))  # lists are parsed as YAML by coerce()


def validate(cfg: DmdrConfig) -> DmdrConfig:
    """Check enums and simple ranges after all layers are applied."""
    flat = to_flat(cfg)
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(repr(c) for c in choices if c)}, got {flat[key]!r}."
                              f"{did_you_mean(str(flat[key]), choices)}")
    for key in ("student.steps", "teacher.steps", "distill.max_steps", "distill.batch_size", "distill.ttur",
                "finetune_rl.batch_size", "sample.n", "sample.batch_size", "model.resolution",
                "distill.regression_pairs", "distill.regression_batch"):
        if flat[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {flat[key]}")
    for key in ("distill.ema_decay", "finetune_rl.ema_decay"):
        if not 0.0 <= flat[key] < 1.0:
            raise ConfigError(f"{key} must be in [0, 1) (0 = no EMA), got {flat[key]}")
    for key in ("distill.real_cfg_t_min", "teacher.guidance_t_min"):
        if not 0.0 <= flat[key] < 1.0:
            raise ConfigError(f"{key} must be in [0, 1) (0 = CFG at every t), got {flat[key]}")
    if not flat["distill.regression_weight"] >= 0.0:
        raise ConfigError(f"distill.regression_weight must be >= 0 (0 = no regression term), got {flat['distill.regression_weight']}")
    if not 0.0 < flat["distill.regression_t_max"] <= 1.0:
        raise ConfigError(f"distill.regression_t_max must be in (0, 1] (1 = every grid step), got {flat['distill.regression_t_max']}")
    if cfg.model.resolution % 8:
        raise ConfigError(f"model.resolution must be a multiple of 8, got {cfg.model.resolution}")
    if cfg.student.grid and len(cfg.student.grid) != cfg.student.steps:
        raise ConfigError(f"student.grid has {len(cfg.student.grid)} values but student.steps is {cfg.student.steps}")
    for t in cfg.student.grid:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0:
            raise ConfigError(f"student.grid values must be numbers in (0, 1], got {t!r}")
    return cfg


def to_flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def to_dict(cfg: DmdrConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "config") -> DmdrConfig:
    """Rebuild a config from a saved resolved dict (e.g. a run directory's config.yaml)."""
    cfg = DmdrConfig()
    _apply(cfg, data, "", source)
    return validate(cfg)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}", "pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}", "fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve(base: str | None = None, config_files: list[str] | None = None, sets: list[str] | None = None,
            default_base: str = "tiny-sd3") -> DmdrConfig:
    """Build the resolved config. ``base`` is a preset name, a local diffusers folder or a hub id."""
    cfg = DmdrConfig()
    base = base or default_base
    if preset_store.exists(base):
        _apply(cfg, preset_store.load(base), "", f"preset '{base}'")
        cfg.name = base
    else:
        _apply(cfg, preset_store.for_model(base), "", f"--base {base}")
    for path in config_files or []:
        _apply(cfg, load_yaml(path), "", str(path))
    for item in sets or []:
        apply_set(cfg, item)
    return validate(cfg)


def resolve_run(run_dir: str | Path, config_files: list[str] | None = None, sets: list[str] | None = None) -> DmdrConfig:
    """A run directory's saved config, with further ``--config`` files and ``--set`` overrides on top."""
    cfg = DmdrConfig()
    _apply(cfg, load_yaml(Path(run_dir) / "config.yaml"), "", f"{run_dir}/config.yaml")
    for path in config_files or []:
        _apply(cfg, load_yaml(path), "", str(path))
    for item in sets or []:
        apply_set(cfg, item)
    return validate(cfg)


def dump_yaml(cfg: DmdrConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def config_hash(cfg: DmdrConfig) -> str:
    """Stable short hash of the resolved config (export metadata, checkpoint compatibility)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_resolved(cfg: DmdrConfig, run_dir: str | Path) -> Path:
    """Write ``config.yaml`` (the resolved config) atomically into a run directory."""
    from dmdr_cli.io import atomic_write_text

    return atomic_write_text(Path(run_dir) / "config.yaml", dump_yaml(cfg))
