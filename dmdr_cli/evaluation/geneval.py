"""GenEval scoring core (EVALUATION.md §1): per-class filtering, the rule engine, results rows and the summary.

Pure Python (no torch, no NumPy needed; NumPy arrays are accepted as input), backend-agnostic, and a faithful port
of djghosh13/geneval ``evaluation/evaluate_images.py`` and ``evaluation/summary_scores.py`` at commit ``af4902f``.

Data types
----------
*Detections of one image* are a mapping ``class name -> sequence of detections``; one detection is a sequence
``(x0, y0, x1, y1, score)`` or ``(x0, y0, x1, y1, score, mask)`` -- a tuple, a list or a row of an ``(N, 5)``
NumPy array (mmdet's per-class ``bbox`` output can be passed as is). Boxes are float pixels of the evaluated image,
origin top-left, y down, exclusive right/bottom edge. ``mask`` is an optional ``bool[H, W]`` array; the engine never
looks at it, it only hands the whole detection to the colour function. Detections may come in any order (the
engine sorts) and unfiltered (the engine thresholds). Detector backends that produce the §1.7 ``Detection`` records
(``class_name, score, box, mask``) can convert them with :func:`group_by_class`.

*The colour function* ``color_of(class_name, detection) -> str`` returns one colour name (one of :data:`COLORS`)
for one kept detection. ``detection`` is the very object given to the engine, so ``detection[:4]`` is the box,
``detection[4]`` the score and ``detection[5]`` (when present) the mask; :func:`detection_mask` reads the mask or
``None``. It is called only for include clauses that have ``color`` and found enough objects, once per object,
in score order.

Main entry points
-----------------
:func:`evaluate_detections` (filter + rules for one image), :func:`filter_detections` (§1.3), :func:`relation` and
:func:`iou` (§1.3/§1.5 geometry), :func:`results_row` (one ``results.jsonl`` line, §1.6), :func:`summarize` (§1.6
summary), :func:`write_prompt_folder` / :func:`iter_image_folder` (§1.2 folder layout).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "COLORS",
    "DEFAULT_OPTIONS",
    "Detection",
    "RELATIONS",
    "TASKS",
    "detection_mask",
    "evaluate_detections",
    "filter_detections",
    "group_by_class",
    "iou",
    "iter_image_folder",
    "relation",
    "results_row",
    "summarize",
    "write_prompt_folder",
]

#: The six GenEval tasks, in the order dmdr prints them.
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
#: The ten colour names of GenEval (upstream ``prompts/create_prompts.py`` / ``evaluate_images.py``).
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: Relative positions a ``position`` clause can ask for.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
#: Upstream option names and defaults (``--options key=value``) that affect the rule engine.
DEFAULT_OPTIONS: dict[str, float | int] = {
    "threshold": 0.3,
    "counting_threshold": 0.9,
    "max_objects": 16,
    "max_overlap": 1.0,
    "position_threshold": 0.1,
}

ColorFn = Callable[[str, Sequence[Any]], str]


class Detection(NamedTuple):
    """One detector output (EVALUATION.md §1.7): unfiltered, boxes exclusive right/bottom, mask optional."""

    class_name: str
    score: float
    box: tuple[float, float, float, float]
    mask: Any = None  # bool[H, W] ndarray or None


def group_by_class(detections: Iterable[Detection | Sequence[Any]]) -> dict[str, list[tuple]]:
    """Convert §1.7 ``Detection`` records ``(class_name, score, box, mask)`` into the engine's input mapping
    ``class -> [(x0, y0, x1, y1, score[, mask]), ...]`` (mask appended only when not ``None``), keeping input order.
    """
    out: dict[str, list[tuple]] = {}
    for det in detections:
        name, score, box = det[0], det[1], det[2]
        mask = det[3] if len(det) > 3 else None
        x0, y0, x1, y1 = (float(v) for v in box)
        row: tuple = (x0, y0, x1, y1, float(score)) if mask is None else (x0, y0, x1, y1, float(score), mask)
        out.setdefault(str(name), []).append(row)
    return out


def detection_mask(detection: Sequence[Any]) -> Any:
    """The mask of a detection (its 6th element) or ``None`` when it has none."""
    return detection[5] if len(detection) > 5 else None


# --------------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------------


def _box(det: Sequence[Any]) -> tuple[float, float, float, float]:
    if len(det) < 4:
        raise ValueError(f"a box needs 4 coordinates (x0, y0, x1, y1), got {len(det)} values")
    return float(det[0]), float(det[1]), float(det[2]), float(det[3])


def iou(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Intersection over union with GenEval's inclusive-pixel convention (§1.3).

    ``area = max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)``; ``iou = inter / union``, 0 when the union is 0.
    Only the first four values of ``a`` and ``b`` are used (a score or mask after them is ignored).
    """
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)

    def area(x0: float, y0: float, x1: float, y1: float) -> float:
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1))
    union = area(ax0, ay0, ax1, ay1) + area(bx0, by0, bx1, by1) - inter
    return inter / union if union else 0.0


def _sign(v: float) -> float:
    return (v > 0) - (v < 0)


def relation(box_a: Sequence[Any], box_b: Sequence[Any], position_threshold: float = 0.1) -> set[str]:
    """Position of A relative to B (upstream ``relative_position``, §1.5); a set, possibly empty.

    Centres ``c``, sizes ``d = (|x1 - x0|, |y1 - y0|)`` (no +1), ``offset = c_a - c_b``, per axis
    ``revised = sign(offset) * max(|offset| - position_threshold * (d_a + d_b), 0)``; both ``|revised| < 1e-3``
    gives the empty set, otherwise ``(dx, dy) = revised / ||offset||`` and ``"left of"`` if ``dx < -0.5``,
    ``"right of"`` if ``dx > 0.5``, ``"above"`` if ``dy < -0.5``, ``"below"`` if ``dy > 0.5`` (several can hold).
    """
    ax0, ay0, ax1, ay1 = _box(box_a)
    bx0, by0, bx1, by1 = _box(box_b)
    off_x = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
    off_y = (ay0 + ay1) / 2 - (by0 + by1) / 2
    margin_x = position_threshold * (abs(ax1 - ax0) + abs(bx1 - bx0))
    margin_y = position_threshold * (abs(ay1 - ay0) + abs(by1 - by0))
    rev_x = _sign(off_x) * max(abs(off_x) - margin_x, 0.0)
    rev_y = _sign(off_y) * max(abs(off_y) - margin_y, 0.0)
    if abs(rev_x) < 1e-3 and abs(rev_y) < 1e-3:
        return set()
    norm = math.hypot(off_x, off_y)  # > 0 here: a non-zero revised offset needs a non-zero offset
    dx, dy = rev_x / norm, rev_y / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# --------------------------------------------------------------------------------------------------------------
# Filtering (§1.3) and rules (§1.5)
# --------------------------------------------------------------------------------------------------------------


def filter_detections(
    detections: Mapping[str, Iterable[Sequence[Any]]],
    tag: str,
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    max_overlap: float = 1.0,
) -> dict[str, list]:
    """Per-class filtering of one image's detections (§1.3).

    Per class: keep scores **strictly greater** than the threshold (``counting_threshold`` replaces ``threshold``
    for every class when ``tag == "counting"``), sort by score descending (stable: ties keep input order), keep the
    first ``max_objects`` (before NMS), then greedy NMS dropping candidates with :func:`iou` ``>= max_overlap``
    against a kept one -- only when ``max_overlap != 1.0`` (``1.0`` means no NMS at all). Classes with nothing
    kept are absent. The kept detection objects are returned unchanged (same tuples/rows, masks included).

    The function is idempotent, so filtering again (as :func:`evaluate_detections` does) changes nothing.
    """
    if max_objects < 0:
        raise ValueError(f"max_objects must be >= 0, got {max_objects}")
    thr = counting_threshold if tag == "counting" else threshold
    out: dict[str, list] = {}
    for name, dets in detections.items():
        cands = []
        for det in dets:
            if len(det) < 5:
                raise ValueError(f"detection of {name!r} needs (x0, y0, x1, y1, score[, mask]), got {len(det)} values")
            if float(det[4]) > thr:  # NaN scores compare False and are dropped
                cands.append(det)
        cands.sort(key=lambda d: float(d[4]), reverse=True)  # stable: equal scores keep input order
        cands = cands[:max_objects]
        kept = []
        while cands:
            best = cands.pop(0)
            kept.append(best)
            if max_overlap != 1.0:
                cands = [d for d in cands if iou(best, d) < max_overlap]
        if kept:
            out[name] = kept
    return out


def evaluate_detections(
    metadata: Mapping[str, Any],
    detections: Mapping[str, Iterable[Sequence[Any]]],
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    position_threshold: float = 0.1,
    color_of: ColorFn | None = None,
    max_overlap: float = 1.0,
) -> tuple[bool, str]:
    """Score one image: :func:`filter_detections` with the options, then the GenEval rules (§1.5).

    ``metadata`` is one parsed line of ``evaluation_metadata.jsonl``. Include clauses are checked in order on the
    top-``count`` detections of their class: enough objects; with ``color``, at least ``count`` of them classified
    as that colour by ``color_of`` (see the module docstring); with ``position: [rel, g]``, every found object must
    be ``rel`` of every object matched by include clause ``g`` (:func:`relation` with ``position_threshold``), and
    the clause fails when clause ``g`` failed. An exclude clause makes the image wrong when the number of **all**
    kept detections of its class is ``>= count``.

    Returns ``(correct, reason)``; ``reason`` joins upstream-style messages with newlines (empty when correct).
    Raises ``ValueError`` when an include clause asks for a colour and ``color_of`` is ``None``.
    """
    include = list(metadata.get("include", []))
    if color_of is None and any("color" in clause for clause in include):
        raise ValueError("this prompt asks for a colour: evaluate_detections needs color_of(class_name, detection)")
    objects = filter_detections(
        detections,
        str(metadata.get("tag", "")),
        threshold=threshold,
        counting_threshold=counting_threshold,
        max_objects=max_objects,
        max_overlap=max_overlap,
    )

    correct = True
    reasons: list[str] = []
    groups: list[list | None] = []  # groups[i]: objects matched by include clause i, or None when it failed
    for clause in include:
        name, count = clause["class"], int(clause["count"])
        found = objects.get(name, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                want = clause["color"]
                colors = [color_of(name, obj) for obj in found]  # type: ignore[misc]
                if colors.count(want) < count:
                    matched = False
                    reasons.append(
                        f"expected {want} {name}>={count}, found {colors.count(want)} {want}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in _ordered_colors(colors))
                    )
            if matched and "position" in clause:
                rel, target = clause["position"][0], int(clause["position"][1])
                if target >= len(groups) or groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {rel}")
                else:
                    for obj in found:
                        for ref in groups[target]:  # type: ignore[union-attr]
                            rels = relation(obj, ref, position_threshold)
                            if rel not in rels:
                                matched = False
                                have = " and ".join(sorted(rels))
                                reasons.append(f"expected {name} {rel} target, found {have} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
        correct = correct and matched

    for clause in metadata.get("exclude", []) or []:
        name, count = clause["class"], int(clause["count"])
        n = len(objects.get(name, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {n}")
    return correct, "\n".join(reasons)


def _ordered_colors(colors: list[str]) -> list[str]:
    """The distinct colours of ``colors``: GenEval's colours first in their order, then any others by name."""
    return [c for c in COLORS if c in colors] + sorted({c for c in colors if c not in COLORS}, key=str)


# --------------------------------------------------------------------------------------------------------------
# results.jsonl rows and the summary (§1.6)
# --------------------------------------------------------------------------------------------------------------


def results_row(
    filename: str | os.PathLike[str],
    metadata: Mapping[str, Any] | str,
    correct: bool,
    reason: str,
    detections: Mapping[str, Iterable[Sequence[Any]]],
    detector: str,
    color_model: str,
    **extra: Any,
) -> dict[str, Any]:
    """One ``results.jsonl`` line (§1.6), columns in order: ``filename, tag, prompt, correct, reason, metadata,
    details, detector, color_model``, then ``extra`` (dmdr additions such as options or ``canonical``).

    ``metadata`` is the parsed line (serialised with ``json.dumps``, as upstream) or already its JSON string.
    ``detections`` should be the **kept** detections (:func:`filter_detections`); ``details`` is the JSON string
    ``{class: [[x0, y0, x1, y1, score], ...]}`` (masks dropped, values as floats).
    """
    if isinstance(metadata, str):
        meta_str, meta = metadata, json.loads(metadata)
    else:
        meta_str, meta = json.dumps(dict(metadata)), metadata
    details = {
        str(name): [[float(v) for v in list(det)[:5]] for det in dets] for name, dets in detections.items()
    }
    row: dict[str, Any] = {
        "filename": os.fspath(filename),
        "tag": meta.get("tag"),
        "prompt": meta.get("prompt"),
        "correct": bool(correct),
        "reason": str(reason),
        "metadata": meta_str,
        "details": json.dumps(details),
        "detector": detector,
        "color_model": color_model,
    }
    for key, value in extra.items():
        if key in row:
            raise ValueError(f"results_row: extra column {key!r} would overwrite a standard column")
        row[key] = value
    return row


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """GenEval summary of ``results.jsonl`` rows (upstream ``summary_scores.py``, §1.6).

    Returns ``{"tasks": {tag: {"accuracy", "n_correct", "n"}}, "overall", "% correct images", "% correct prompts",
    "n_images", "n_prompts"}``. ``tasks`` lists the tags present, in :data:`TASKS` order (unknown tags after them,
    by name); a task's accuracy is over its **images**; ``overall`` is the mean of the task accuracies of the tasks
    present (not the image mean); percentages are fractions in ``[0, 1]`` like ``overall``; prompts are grouped by
    the ``metadata`` JSON string and count as correct when **any** of their images is. Raises ``ValueError`` on an
    empty list.
    """
    if not results:
        raise ValueError("summarize: no results")
    per_task: dict[str, list[int]] = {}
    per_prompt: dict[str, bool] = {}
    n_correct_images = 0
    for row in results:
        ok = bool(row["correct"])
        tag = str(row["tag"])
        counts = per_task.setdefault(tag, [0, 0])
        counts[0] += ok
        counts[1] += 1
        n_correct_images += ok
        meta = row["metadata"]
        key = meta if isinstance(meta, str) else json.dumps(dict(meta))
        per_prompt[key] = per_prompt.get(key, False) or ok
    order = [t for t in TASKS if t in per_task] + sorted(t for t in per_task if t not in TASKS)
    tasks = {t: {"accuracy": per_task[t][0] / per_task[t][1], "n_correct": per_task[t][0], "n": per_task[t][1]}
             for t in order}
    return {
        "tasks": tasks,
        "overall": sum(v["accuracy"] for v in tasks.values()) / len(tasks),
        "% correct images": n_correct_images / len(results),
        "% correct prompts": sum(per_prompt.values()) / len(per_prompt),
        "n_images": len(results),
        "n_prompts": len(per_prompt),
    }


# --------------------------------------------------------------------------------------------------------------
# Folder layout (§1.2)
# --------------------------------------------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_SAMPLE = re.compile(r"([0-9]+)\.png")


def write_prompt_folder(
    root: str | os.PathLike[str],
    index: int,
    metadata: Mapping[str, Any],
    images: Sequence[Any],
) -> Path:
    """Write one prompt's folder: ``<root>/<index:05d>/metadata.jsonl`` (``json.dumps(metadata)``, one line) and
    ``samples/0000.png``, ``0001.png``, ... (PIL images, or ``uint8`` arrays ``H×W×3``). Returns the folder.

    Existing files of the same names are overwritten; other files already in the folder are left alone.
    """
    if index < 0:
        raise ValueError(f"prompt index must be >= 0, got {index}")
    folder = Path(root) / f"{index:05d}"
    samples = folder / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(dict(metadata)) + "\n", encoding="utf-8")
    for i, img in enumerate(images):
        if not hasattr(img, "save"):
            from PIL import Image  # lazy: keep the module import cheap

            img = Image.fromarray(img)
        img.save(samples / f"{i:04d}.png")
    return folder


def iter_image_folder(root: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any], list[Path]]]:
    """Yield ``(index, metadata, [image paths])`` for every all-digit sub-folder of ``root``, in numeric order.

    ``metadata`` is parsed from the folder's ``metadata.jsonl``; images are the files in ``samples/`` named
    ``<digits>.png`` (4- or 5-digit names alike), sorted numerically; a folder without ``samples/`` yields an empty
    list. Other entries (``grid.png``, non-digit folders) are ignored. Raises ``InputError`` when ``root`` is not a
    folder or a prompt folder lacks a readable ``metadata.jsonl``.
    """
    from dmdr_cli.errors import InputError

    base = Path(root)
    if not base.is_dir():
        raise InputError(f"GenEval image folder {base} does not exist", "expected <images>/00000/samples/0000.png ...")
    folders = sorted((p for p in base.iterdir() if p.is_dir() and _DIGITS.fullmatch(p.name)), key=lambda p: int(p.name))
    for folder in folders:
        meta_file = folder / "metadata.jsonl"
        try:
            text = meta_file.read_text(encoding="utf-8").strip()
            metadata = json.loads(text.splitlines()[0]) if text else None
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {meta_file}: {err}", "each prompt folder needs its metadata.jsonl") from err
        if not isinstance(metadata, dict):
            raise InputError(f"{meta_file} holds no JSON object", "each prompt folder needs its metadata.jsonl")
        samples = folder / "samples"
        images = []
        if samples.is_dir():
            found = [(int(m.group(1)), p) for p in samples.iterdir()
                     if (m := _SAMPLE.fullmatch(p.name)) and p.is_file()]
            images = [p for _, p in sorted(found, key=lambda t: (t[0], t[1].name))]
        yield int(folder.name), metadata, images
