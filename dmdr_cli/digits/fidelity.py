"""``dmdr-digits-cnn``: the digits classifier as a torch-fidelity feature extractor (EVALUATION.md §7.4 (b)).

dmdr-only FID / KID / IS / PRC on the digits world (never comparable with Inception numbers). Input: uint8
``B×3×H×W`` images of any size. Preprocessing: grey = brightest channel / 255 (colour-blind, like the
classifier), the **whole image** resized to 28×28 (bilinear, antialiased) -- no cropping, so the features see the
composition of multi-digit canvases. Features: ``feat`` = the penultimate 64-d layer (default for FID, KID and
PRC), ``logits`` = the 10 class logits (default for IS).

Weights: ``feature_extractor_weights_path`` (torch-fidelity's option; ``compute_fidelity(weights_path=…)`` passes
it) = a classifier ``.safetensors`` file; default the cached classifier (trained on first use).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase

from dmdr_cli.digits.classifier import load_classifier

__all__ = ["EXTRACTOR_NAME", "DigitsFeatureExtractor", "register"]

EXTRACTOR_NAME = "dmdr-digits-cnn"


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor over :class:`~dmdr_cli.digits.classifier.DigitCNN` (module docstring)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, features_list)
        clf = load_classifier(feature_extractor_weights_path or None)
        self.net = copy.deepcopy(clf.net)  # torch-fidelity moves/ freezes its module: keep the shared one intact
        self.weights_fingerprint = clf.fingerprint
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("feat", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits"}.get(metric, "feat")

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 B×3×H×W images, got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        grey = x.float().amax(dim=1, keepdim=True) / 255.0
        if grey.shape[-2:] != (28, 28):
            grey = F.interpolate(grey, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        feat = self.net.features(grey)
        out = {"feat": feat, "logits": self.net.head(feat)}
        return tuple(out[name].float() for name in self.features_list)


def register() -> None:
    """Register ``dmdr-digits-cnn`` with torch-fidelity, once (a second call is a no-op).

    Through :func:`dmdr_cli.evaluation.fidelity.register_extractor` when dmdr has it, else directly, guarded
    against double registration (a class of the same module and name already there counts as registered).
    """
    try:
        from dmdr_cli.evaluation.fidelity import register_extractor
    except ImportError:  # pragma: no cover - older dmdr without the fidelity module
        register_extractor = None
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    existing = FEATURE_EXTRACTORS_REGISTRY.get(EXTRACTOR_NAME)
    if existing is not None and (existing is DigitsFeatureExtractor or (
            existing.__module__ == DigitsFeatureExtractor.__module__
            and existing.__qualname__ == DigitsFeatureExtractor.__qualname__)):
        return  # already registered (possibly by an earlier import of this module)
    if register_extractor is not None:
        register_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)
    else:  # pragma: no cover
        from torch_fidelity import register_feature_extractor

        register_feature_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)
