"""GenEval detector backends (EVALUATION.md 1.7): image -> unfiltered detections + a colour function.

A backend is ``detect(image_path, image) -> (detections, color_of)`` where ``detections`` maps a GenEval
class name to ``(x0, y0, x1, y1, score[, mask])`` rows and ``color_of(class_name, det)`` names the colour of
one detection. Its ``id`` and ``color_model`` are written into every result line.

- ``fixture`` (dmdr-only): detections read from a JSON side file next to each image, for golden tests and
  for scoring detections produced elsewhere.
- ``hf-m2f`` (compatible, not canonical): transformers Mask2Former (COCO instance) + CLIP zero-shot colour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

from dmdr_cli.errors import ConfigError, InputError, did_you_mean

Rows = dict[str, list[tuple]]
ColorFn = Callable[[str, tuple], str]


class Detector(Protocol):
    id: str
    color_model: str

    def __call__(self, image_path: Path, image) -> tuple[Rows, ColorFn | None]: ...


class FixtureDetector:
    """Detections from ``<image>.json`` (or ``<image stem>.json``) beside each image::

        {"detections": [{"class": "dog", "box": [x0, y0, x1, y1], "score": 0.95, "color": "brown"}, ...]}

    ``color`` is optional; ``color_of`` returns it for the detection with that exact box.
    """

    id = "fixture"
    color_model = "fixture"

    def __call__(self, image_path: Path, image) -> tuple[Rows, ColorFn]:
        side = Path(str(image_path) + ".json")
        if not side.is_file():
            side = Path(image_path).with_suffix(".json")
        if not side.is_file():
            raise InputError(f"fixture detector: no detections file for {image_path}",
                             f"write {side.name} next to the image, or choose another --detector")
        try:
            items = json.loads(side.read_text())["detections"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{side}: expected {{\"detections\": [{{class, box, score[, color]}}, ...]}}") from None
        rows: Rows = {}
        colors: dict[tuple, str] = {}
        for d in items:
            box = tuple(float(v) for v in d["box"])
            rows.setdefault(d["class"], []).append((*box, float(d["score"])))
            if "color" in d:
                colors[(d["class"], box)] = d["color"]

        def color_of(class_name: str, det: tuple) -> str:
            return colors.get((class_name, tuple(float(v) for v in det[:4])), "unknown")

        return rows, color_of


DETECTORS = {"fixture": lambda path, clip_path, device: FixtureDetector()}


def register_detector(name: str, factory) -> None:
    """Add a backend, e.g. the digits world's ``digits`` detector: ``factory(path, clip_path, device)``."""
    DETECTORS[name] = factory


def build_detector(name: str, *, path: str = "", clip_path: str = "", device="cpu") -> Detector:
    if name == "hf-m2f" and name not in DETECTORS:
        import dmdr_cli.evaluation.hf_m2f  # noqa: F401  (importing it registers the backend)
    if name == "digits" and name not in DETECTORS:
        from dmdr_cli.digits import register_all

        register_all(fidelity=False)
    if name not in DETECTORS:
        raise ConfigError(f"unknown GenEval detector '{name}'.{did_you_mean(name, DETECTORS)}",
                          f"available: {', '.join(sorted(set(DETECTORS) | {'hf-m2f', 'digits'}))}; the canonical mmdet backend "
                          "is an optional path for users who have mmdet 2.x (see README)")
    return DETECTORS[name](path, clip_path, device)
