"""Built-in presets: one YAML per base model, holding only deltas from the schema defaults.

Presets ship inside the wheel as ``dmdr_cli/_presets`` (mapped from the top-level ``presets/``
folder in ``pyproject.toml``); from a checkout they are read from ``presets/`` directly. Torch-free.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import yaml

from dmdr_cli.errors import ConfigError, did_you_mean


def preset_dir() -> Path:
    checkout = Path(__file__).resolve().parents[2] / "presets"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("dmdr_cli") / "_presets"))


def names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def exists(name: str) -> bool:
    return name in names()


def path_of(name: str) -> Path:
    if not exists(name):
        raise ConfigError(f"unknown preset '{name}'.{did_you_mean(name, names())}",
                          f"built-in presets: {', '.join(names())}; or pass a diffusers folder / hub id")
    return preset_dir() / f"{name}.yaml"


def load(name: str) -> dict:
    data = yaml.safe_load(path_of(name).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{name}' is not a mapping")
    return data


def copy(name: str, dest: str | Path, force: bool = False) -> Path:
    src = path_of(name)
    out = Path(dest)
    if out.is_dir():
        out = out / src.name
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists", "choose another destination or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return out


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def for_model(spec: str) -> dict:
    """Config deltas for ``--base DIR`` or ``--base org/name``: the family preset's values with this model.

    The family comes from the folder's ``model_index.json`` (``_class_name``); for a hub id it is read from
    the HF cache when present. Otherwise the user must give ``--set model.family=...`` (checked later).
    """
    path = Path(spec).expanduser()
    family = ""
    if path.is_dir():
        family = detect_family(path)
        deltas = {"model": {"path": str(path.resolve()), "hub_id": ""}}
    elif _looks_like_hub_id(spec):
        deltas = {"model": {"hub_id": spec, "path": ""}}
        cached = _hf_cached_index(spec)
        if cached is not None:
            family = detect_family(cached.parent)
    else:
        raise ConfigError(f"unknown preset '{spec}'.{did_you_mean(spec, names())}",
                          f"built-in presets: {', '.join(names())}; --base also takes a diffusers folder or a hub id")
    base = {"sd3": "sd3-medium", "sdxl": "sdxl-base"}.get(family)
    data = load(base) if base else {}
    model = dict(data.get("model", {}))
    model.update(deltas["model"])
    model.pop("tiny", None)
    if family:
        model["family"] = family
    data["model"] = model
    data["description"] = f"{spec} with the {base or 'schema default'} hyperparameters"
    return data


_CLASS_TO_FAMILY = {
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionXLPipeline": "sdxl",
}


def detect_family(folder: Path) -> str:
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder",
                          "pass a folder saved with save_pretrained, or a preset name")
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{index} is not valid JSON") from None
    cls = data.get("_class_name", "") if isinstance(data, dict) else ""
    if cls not in _CLASS_TO_FAMILY:
        raise ConfigError(f"{folder}: pipeline class '{cls}' is not supported",
                          f"supported: {', '.join(_CLASS_TO_FAMILY)}; or pass --set model.family=sd3|sdxl")
    return _CLASS_TO_FAMILY[cls]


def _hf_cached_index(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    found = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(found) if isinstance(found, str) else None


def describe(name: str) -> str:
    return str(load(name).get("description", ""))
