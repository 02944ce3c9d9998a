"""Reward registry: ``build_reward(name, path=…)`` turns a reward spec into a :class:`~dmdr_cli.rewards.base.Reward`.

Weights are found offline (:mod:`dmdr_cli.rewards.assets`: explicit ``path``, ``DMDR_ASSET_<NAME>``,
``$DMDR_HOME/assets/<name>/``, the local Hugging Face cache), never downloaded. Importing this module imports
neither transformers nor open_clip; each builder imports what it needs.

| name | asset (upstream) | score |
|---|---|---|
| ``clip`` | ``clip-vit-l-14`` (openai/clip-vit-large-patch14) | cos (evaluation reports ×100) |
| ``pickscore`` | ``pickscore`` (yuvalkirstain/PickScore_v1) + tokenizer from ``pickscore-processor`` | exp(logit_scale)·cos |
| ``hps-v2``, ``hps-v2.1`` | ``hps-v2``/``hps-v2.1`` (xswu/HPSv2 ``HPS_v2*_compressed.pt``) | cos |
| ``dfn5b-clip`` | ``dfn5b-h14`` (apple/DFN5B-CLIP-ViT-H-14), GELU as DMDR; option ``quickgelu=True`` | cos |
| ``dfn5b-clip-quickgelu`` | the same weights with QuickGELU (the model's intended form) | cos |
| ``aesthetic-v2`` | ``aesthetic-v2`` (``sac+logos+ava1-l14-linearMSE.pth``) + ``clip-vit-l-14`` | raw MLP output |
| ``imagereward`` | ``imagereward`` (THUDM/ImageReward), optional ``ImageReward`` package | standardised |
| ``color``, ``brightness`` | none (dmdr-only, :mod:`dmdr_cli.rewards.offline`) | see there |
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dmdr_cli.errors import ConfigError, did_you_mean
from dmdr_cli.rewards.assets import ASSETS, find_asset, resolve_asset, weights_fingerprint
from dmdr_cli.rewards.base import Reward
from dmdr_cli.rewards.offline import BrightnessReward, ColorReward

__all__ = ["REWARDS", "Builder", "build_reward", "register_reward", "reward_names"]

#: ``builder(*, path: str, device, dtype, **options) -> Reward``.
Builder = Callable[..., Reward]
Device = str | torch.device


def _no_path(name: str, path: str) -> None:
    if path:
        raise ConfigError(f"reward '{name}' has no weights; remove path: {path}")


def _build_color(*, path: str = "", device: Device = "cpu", dtype: torch.dtype = torch.float32) -> Reward:
    _no_path("color", path)
    return ColorReward()


def _build_brightness(*, path: str = "", device: Device = "cpu", dtype: torch.dtype = torch.float32) -> Reward:
    _no_path("brightness", path)
    return BrightnessReward()


def _build_clip(*, path: str = "", device: Device = "cpu", dtype: torch.dtype = torch.float32) -> Reward:
    from dmdr_cli.rewards.clip_models import ClipReward

    folder = resolve_asset(ASSETS["clip-vit-l-14"], path, reward="clip", example="/x/clip-vit-large-patch14")
    return ClipReward(folder, name=f"clip@{weights_fingerprint(folder)}", device=device, dtype=dtype)


def _build_pickscore(*, path: str = "", device: Device = "cpu", dtype: torch.dtype = torch.float32) -> Reward:
    from dmdr_cli.rewards.clip_models import ClipReward

    folder = resolve_asset(ASSETS["pickscore"], path, reward="pickscore", example="/x/PickScore_v1")
    processor = find_asset(ASSETS["pickscore-processor"])
    return ClipReward(folder, name=f"pickscore@{weights_fingerprint(folder)}", tokenizer_dirs=(processor,),
                      logit_scale=True, device=device, dtype=dtype)


def _hps_builder(version: str) -> Builder:
    def build(*, path: str = "", device: Device = "cpu", dtype: torch.dtype = torch.float32,
              arch: str = "ViT-H-14") -> Reward:
        from dmdr_cli.rewards.clip_models import OpenClipReward

        asset = ASSETS[version]
        weights = resolve_asset(asset, path, reward=version, example=f"/x/{asset.files[0]}")
        return OpenClipReward(weights, name=f"{version}@{weights_fingerprint(weights)}", arch=arch,
                              device=device, dtype=dtype)

    build.__doc__ = f"``{version}``: open_clip ``arch`` (ViT-H-14) + the HPS state dict; score = cos."
    return build


def _dfn5b_builder(registry_name: str, default_quickgelu: bool) -> Builder:
    def build(*, path: str = "", device: Device = "cpu", dtype: torch.dtype = torch.float32,
              arch: str = "ViT-H-14", quickgelu: bool = default_quickgelu) -> Reward:
        from dmdr_cli.rewards.clip_models import OpenClipReward

        weights = resolve_asset(ASSETS["dfn5b-h14"], path, reward=registry_name,
                                example="/x/open_clip_pytorch_model.bin")
        name = "dfn5b-clip-quickgelu" if quickgelu else "dfn5b-clip"
        return OpenClipReward(weights, name=f"{name}@{weights_fingerprint(weights)}", arch=arch,
                              quickgelu=quickgelu, device=device, dtype=dtype)

    build.__doc__ = f"``{registry_name}``: DFN5B weights in open_clip ``arch``; QuickGELU={default_quickgelu}."
    return build


def _build_aesthetic(*, path: str = "", device: Device = "cpu", dtype: torch.dtype = torch.float32,
                     clip_path: str = "") -> Reward:
    from dmdr_cli.rewards.clip_models import AestheticReward

    mlp = resolve_asset(ASSETS["aesthetic-v2"], path, reward="aesthetic-v2",
                        example="/x/sac+logos+ava1-l14-linearMSE.pth")
    clip_dir = resolve_asset(ASSETS["clip-vit-l-14"], clip_path, reward="aesthetic-v2")  # the ViT-L/14 tower
    name = f"aesthetic-v2@{weights_fingerprint(mlp)}{weights_fingerprint(clip_dir)[:4]}"
    return AestheticReward(mlp, clip_dir, name=name, device=device, dtype=dtype)


def _build_imagereward(*, path: str = "", device: Device = "cpu", dtype: torch.dtype = torch.float32) -> Reward:
    from dmdr_cli.rewards.clip_models import ImageRewardReward, imagereward_available

    if not imagereward_available():
        raise ConfigError("reward 'imagereward' needs the optional ImageReward package",
                          "install the imagereward extra: pip install 'dmdr[imagereward]' (= image-reward + "
                          "openai-clip), or use another reward")
    if path and Path(path).is_file():  # the ImageReward.pt file itself: use its folder
        path = str(Path(path).parent)
    folder = resolve_asset(ASSETS["imagereward"], path, reward="imagereward", example="/x/ImageReward")
    return ImageRewardReward(folder / "ImageReward.pt", folder / "med_config.json",
                             name=f"imagereward@{weights_fingerprint(folder / 'ImageReward.pt')}",
                             device=device, dtype=dtype)


REWARDS: dict[str, Builder] = {
    "clip": _build_clip,
    "pickscore": _build_pickscore,
    "hps-v2": _hps_builder("hps-v2"),
    "hps-v2.1": _hps_builder("hps-v2.1"),
    "dfn5b-clip": _dfn5b_builder("dfn5b-clip", False),
    "dfn5b-clip-quickgelu": _dfn5b_builder("dfn5b-clip-quickgelu", True),
    "aesthetic-v2": _build_aesthetic,
    "imagereward": _build_imagereward,
    "color": _build_color,
    "brightness": _build_brightness,
}


def reward_names() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(REWARDS)


def register_reward(name: str, builder: Builder, *, replace: bool = False) -> None:
    """Add a reward (e.g. the digits world's ``digit-cls``); ``builder(*, path, device, dtype, **options)``."""
    if name in REWARDS and not replace:
        raise ValueError(f"reward '{name}' is already registered")
    REWARDS[name] = builder


def _check_options(name: str, builder: Builder, options: dict[str, Any]) -> None:
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = sorted(k for k in params if k not in ("path", "device", "dtype"))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"reward '{name}' has no option {', '.join(unknown)}.{did_you_mean(unknown[0], allowed)}",
                          f"options: {', '.join(allowed) or 'none'}")


def build_reward(
    name: str,
    *,
    path: str = "",
    device: Device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Reward:
    """Build the reward ``name`` on ``device``/``dtype`` from local weights (``path`` or the asset search order).

    Raises ``ConfigError`` for an unknown name (with a did-you-mean) or option, ``ModelNotFoundError`` when the
    weights are nowhere on this machine, ``CheckpointError`` when a file does not fit the architecture.
    Options: ``arch`` (open_clip architecture, hps-*/dfn5b-*), ``quickgelu`` (dfn5b-clip), ``clip_path``
    (aesthetic-v2's ViT-L/14 folder).
    """
    builder = REWARDS.get(name)
    if builder is None and name == "digit-cls":  # the digits world registers itself on first use
        from dmdr_cli.digits import register_all

        register_all(fidelity=False)
        builder = REWARDS.get(name)
    if builder is None:
        raise ConfigError(f"unknown reward '{name}'.{did_you_mean(name, REWARDS)}",
                          f"available: {', '.join(reward_names())}")
    _check_options(name, builder, options)
    return builder(path=str(path or ""), device=device, dtype=dtype, **options)
