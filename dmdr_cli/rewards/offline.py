"""Rewards that need no weights: ``color`` (prompt-following on the tiny models' 64×64 images) and ``brightness``
(plumbing tests). dmdr-only, differentiable, never canonical (EVALUATION.md §7.7).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from dmdr_cli.rewards.base import check_inputs

__all__ = ["COLORS", "BrightnessReward", "ColorReward", "parse_color"]

#: Target RGB in [0, 1] of GenEval's ten colour words (saturated, easy to separate on a black canvas).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.6, 0.0, 0.8),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "pink": (1.0, 0.5, 0.75),
    "brown": (0.55, 0.3, 0.1),
    "black": (0.0, 0.0, 0.0),
}

_COLOR_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\b", re.IGNORECASE)


def parse_color(prompt: str) -> str | None:
    """The first colour word of ``prompt`` (whole word, case-insensitive), or ``None``."""
    match = _COLOR_RE.search(prompt)
    return match.group(1).lower() if match else None


class ColorReward:
    """How close the image's salient colour is to the colour named in the prompt. Score in ``[−1, 0]``.

    Per image ``x ∈ [0,1]^{3×H×W}`` (pixels ``p``) and target ``t = COLORS[first colour word]``::

        b    = median_p x_p                      per channel, no gradient (background colour)
        d²_p = Σ_c (x_{c,p} − b_c)²              squared distance of pixel p from the background
        w_p  = (d²_p + ε) / Σ_q (d²_q + ε)       soft saliency weights, ε = 1e-4 (uniform on a flat image)
        m    = Σ_p w_p · x_p                     saliency-weighted mean colour
        s    = −(1/3) · Σ_c (m_c − t_c)²          negative mean squared distance to the target colour

    A prompt without a colour word scores exactly 0 and contributes no gradient. Squared distances (no square
    root) keep the gradient finite on flat images. Assumes the object covers less than half of the image (else
    the median is the object's colour); a black object on a black background is invisible to it.
    """

    name = "color"
    differentiable = True

    def __init__(self, eps: float = 1e-4) -> None:
        self.eps = eps

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_inputs(images, prompts)
        x = images.float().flatten(2)                                    # [B, 3, P]
        background = x.detach().median(dim=2, keepdim=True).values       # [B, 3, 1]
        d2 = (x - background).pow(2).sum(dim=1, keepdim=True) + self.eps  # [B, 1, P]
        mean_colour = (d2 * x).sum(dim=2) / d2.sum(dim=2)                # [B, 3]
        names = [parse_color(p) for p in prompts]
        target = torch.tensor([COLORS.get(n or "black") for n in names], dtype=x.dtype, device=x.device)
        has_colour = torch.tensor([n is not None for n in names], dtype=x.dtype, device=x.device)
        return -(mean_colour - target).pow(2).mean(dim=1) * has_colour


class BrightnessReward:
    """Mean pixel value ``s = mean_{c,h,w} x`` in ``[0, 1]``; ignores the prompt. For plumbing tests only."""

    name = "brightness"
    differentiable = True

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_inputs(images, prompts)
        return images.float().mean(dim=(1, 2, 3))
