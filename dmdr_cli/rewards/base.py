"""The reward protocol and the pieces every CLIP-family scorer shares (EVALUATION.md §4.1, §7.2).

A reward maps decoded images ``[B, 3, H, W]`` in ``[0, 1]`` and their prompts to ``B`` scores, higher is better.
The same object serves ReFL training (gradients flow back to the pixels) and evaluation (called under
``torch.no_grad()``).

One preprocessing path for training and evaluation (EVALUATION.md §4.1, as in the DMDR reference code)::

    x = interpolate(images, size=(224, 224), mode="bicubic", antialias=True)   # squash, no centre crop
    x = (x − mean) / std      # mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258, 0.27577711)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Reward",
    "as_feature_tensor",
    "check_inputs",
    "clip_preprocess",
    "cosine",
    "image_features",
    "image_text_features",
    "text_features",
]

#: OpenAI CLIP normalisation, also used by OpenCLIP ViT-H-14 (LAION, HPS, DFN5B), PickScore and ImageReward.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class Reward(Protocol):
    """A scorer of images given their prompts.

    ``name`` is a stable id: the registry name, plus ``@<8 hex>`` (a fingerprint of the weights file) where the
    scorer has weights. ``differentiable`` says whether gradients of the scores reach the input pixels (ReFL needs
    it). ``__call__(images [B,3,H,W] in [0,1], prompts) -> scores [B]``, higher is better.
    """

    name: str
    differentiable: bool

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


def check_inputs(images: Tensor, prompts: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``images`` is ``[B, 3, H, W]`` and there is one prompt per image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a str" if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"expected one prompt per image ({images.shape[0]}), got {n}")


def clip_preprocess(
    images: Tensor,
    size: int | tuple[int, int] = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """Differentiable CLIP preprocessing of ``[B, 3, H, W]`` images in ``[0, 1]`` (EVALUATION.md §4.1).

    ``x = (bicubic_antialias_resize(images, size) − mean) / std``: a squash resize (no centre crop, so non-square
    images are distorted rather than cropped), computed in float32 and returned in float32. For square images the
    geometry equals CLIP's resize-short-side + centre-crop; PIL processors differ only in the resampling kernel.
    """
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    x = images.float()
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bicubic", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def as_feature_tensor(out: Any) -> Tensor:
    """The projected embedding as a tensor, whatever a transformers ``get_*_features`` call returned.

    transformers 4.x returns a tensor; 5.x returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is
    the projected embedding (EVALUATION.md §4.3). ``*WithProjection`` models put it in ``image_embeds`` /
    ``text_embeds``.
    """
    if isinstance(out, Tensor):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, attr, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot find a feature tensor in {type(out).__name__}")


def image_features(model: Any, pixel_values: Tensor) -> Tensor:
    """Projected (unnormalised) image embedding of a transformers CLIP model, as a tensor."""
    return as_feature_tensor(model.get_image_features(pixel_values=pixel_values))


def text_features(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Projected (unnormalised) text embedding of a transformers CLIP model, as a tensor."""
    return as_feature_tensor(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def image_text_features(
    model: Any, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(f_img, f_txt)`` of a transformers CLIP model, tensors under transformers 4.x and 5.x alike."""
    return image_features(model, pixel_values), text_features(model, input_ids, attention_mask)


def cosine(f_img: Tensor, f_txt: Tensor) -> Tensor:
    """Row-wise cosine ``⟨f_img/‖f_img‖, f_txt/‖f_txt‖⟩`` of two ``[B, D]`` feature batches → ``[B]``."""
    return (F.normalize(f_img.float(), dim=-1) * F.normalize(f_txt.float(), dim=-1)).sum(dim=-1)
