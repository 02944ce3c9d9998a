"""The ``digits`` GenEval detector backend (EVALUATION.md §1.7, §7.4 item 4). dmdr-only, never canonical.

Per image (``H×W`` RGB):

1. segmentation (:func:`dmdr_cli.digits.world.segment`): foreground ``max_c rgb > 0.25`` → 3×3 binary dilation →
   ``scipy.ndimage.label`` (4-connectivity); one detection per component with at least ``min_area`` foreground
   pixels (default ``max(3, ⌊0.002·H·W⌋)``); its mask is ``foreground ∧ component`` (``bool[H, W]``), its box the
   mask's extent with GenEval's exclusive right/bottom edge;
2. class and score: argmax and max softmax of the digits classifier on the crop of the grey image
   (``max_c rgb``) restricted to the dilated component, square-padded to its box and normalised like the
   classifier's training crops (:func:`dmdr_cli.digits.classifier.normalize_crops`);
3. colour (``color_of``, colour model ``digits-hsv``): the brightness-weighted mean RGB ``m = Σ v·rgb / Σ v``
   over the mask (``v = max_c rgb``); saturation ``(max m − min m) / max m`` below ``sat_threshold`` (0.3) is
   ``white``, otherwise the palette colour of nearest hue (circular distance; hues of
   :data:`dmdr_cli.rewards.offline.COLORS` for :data:`dmdr_cli.digits.world.PALETTE`). Tints multiply the grey
   glyph, which keeps hue and saturation, so the choice is exact for the world's colours.

Rows are returned for the predicted class only (no per-class score lists as Mask2Former gives); GenEval's
thresholds (0.3, 0.9 for counting) and rules apply unchanged.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdr_cli.digits.classifier import DigitClassifier, load_classifier, normalize_crops
from dmdr_cli.digits.world import CLASSES, DILATION, FG_THRESHOLD, PALETTE, mask_box, palette_rgb, segment

__all__ = ["COLOR_MODEL", "DigitsDetector", "classify_color", "make_detector"]

COLOR_MODEL = "digits-hsv"


def _hue(rgb: tuple[float, float, float]) -> float:
    return colorsys.rgb_to_hsv(*rgb)[0]


def classify_color(mean_rgb: Any, palette: tuple[str, ...] = PALETTE, sat_threshold: float = 0.3) -> str:
    """Palette colour of a mean RGB (any scale): ``white`` when unsaturated, else the nearest palette hue
    (``black`` for an all-zero input)."""
    r, g, b = (float(v) for v in mean_rgb)
    top = max(r, g, b)
    if top <= 1e-8:
        return "black"
    sat = (top - min(r, g, b)) / top
    chromatic = [c for c in palette if c != "white"]
    if sat < sat_threshold or not chromatic:
        return "white"
    hue = _hue((r / top, g / top, b / top))

    def dist(c: str) -> float:
        d = abs(hue - _hue(palette_rgb(c)))
        return min(d, 1.0 - d)

    return min(chromatic, key=dist)


def to_rgb_array(image: Any = None, image_path: Any = None) -> np.ndarray:
    """``uint8 H×W×3`` from a PIL image, an array (uint8, or float in [0, 1]; grey or RGBA accepted) or a path."""
    if image is None:
        from PIL import Image

        with Image.open(image_path) as im:
            image = im.convert("RGB")
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an H×W×3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(np.asarray(arr, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return arr


class DigitsDetector:
    """``detector(image_path, image) -> (rows, color_of)`` (the protocol of :mod:`dmdr_cli.evaluation.detectors`).

    ``image`` may be a PIL image, an ``H×W×3`` array or ``None`` (then ``image_path`` is opened). Rows are
    ``(x0, y0, x1, y1, score, mask)``. ``id`` = ``digits:cls@<first 8 hex of the weights' sha256>``.
    """

    color_model = COLOR_MODEL

    def __init__(self, classifier: DigitClassifier, *, threshold: float = FG_THRESHOLD, dilation: int = DILATION,
                 min_area: int | None = None, sat_threshold: float = 0.3, device: Any = "cpu") -> None:
        self.classifier = classifier
        self.threshold = threshold
        self.dilation = dilation
        self.min_area = min_area
        self.sat_threshold = sat_threshold
        self.device = torch.device(device)
        self.id = f"digits:cls@{classifier.fingerprint}"

    def detect(self, image: Any) -> list[tuple[str, float, tuple[int, int, int, int], np.ndarray]]:
        """§1.7 records ``(class_name, score, box, mask)`` of one image (PIL, array or path), in label order."""
        from scipy import ndimage

        rgb = to_rgb_array(None, image) if isinstance(image, (str, Path)) else to_rgb_array(image)
        _, masks = segment(rgb, threshold=self.threshold, dilation=self.dilation, min_area=self.min_area)
        if not masks:
            return []
        value = torch.from_numpy(rgb.max(axis=-1).astype(np.float32) / 255.0)
        crops, boxes = [], []
        for m in masks:
            region = ndimage.binary_dilation(m, structure=np.ones((3, 3), bool), iterations=self.dilation) \
                if self.dilation else m
            crops.append(value * torch.from_numpy(region))
            boxes.append(mask_box(m))
        grey = torch.stack(crops)[:, None].to(self.device)
        box_t = torch.tensor(boxes, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            probs = torch.softmax(self.classifier.logits(normalize_crops(grey, box_t)).float(), dim=-1).cpu()
        score, label = probs.max(dim=-1)
        return [(CLASSES[int(k)], float(s), b, m) for k, s, b, m in zip(label, score, boxes, masks)]

    def __call__(self, image_path: Any, image: Any) -> tuple[dict[str, list[tuple]], Any]:
        rgb = to_rgb_array(image, image_path)
        rows: dict[str, list[tuple]] = {}
        for name, score, (x0, y0, x1, y1), mask in self.detect(rgb):
            rows.setdefault(name, []).append((float(x0), float(y0), float(x1), float(y1), score, mask))
        value = rgb.max(axis=-1).astype(np.float64)
        flat = rgb.astype(np.float64)

        def color_of(class_name: str, row: Any) -> str:
            mask = row[5] if len(row) > 5 else None
            if mask is None:  # a row without mask: its box
                x0, y0, x1, y1 = (int(round(float(v))) for v in row[:4])
                mask = np.zeros(value.shape, bool)
                mask[y0:y1, x0:x1] = True
            w = value * np.asarray(mask, bool)
            if w.sum() <= 0:
                return "black"
            mean = (flat * w[..., None]).sum(axis=(0, 1)) / w.sum()
            return classify_color(mean, PALETTE, self.sat_threshold)

        return rows, color_of


def make_detector(path: str = "", clip_path: str = "", device: Any = "cpu") -> DigitsDetector:
    """Registry factory (``register_detector("digits", make_detector)``): ``path`` = classifier weights file
    (default: the cached classifier, trained on first use); ``clip_path`` is not used."""
    return DigitsDetector(load_classifier(path or None, device=device), device=device)
