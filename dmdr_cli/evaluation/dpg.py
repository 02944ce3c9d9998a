"""DPG-Bench scoring (EVALUATION.md §2): 2×2 tiles, the question CSV, DSG dependency masking and VQA backends.

A port of TencentQQGYLab/ELLA ``dpg_bench/compute_dpg_bench.py`` at commit ``3c228f1``. Torch-free at import: only
the BLIP and ModelScope backends import torch / transformers / modelscope, inside their constructors.

Scoring of one image (§2.3), for each of its tiles in the order top-left, top-right, bottom-left, bottom-right:

1. every question of the item is asked; its score is ``1.0`` when the answer is exactly the string ``"yes"``,
   else ``0.0`` (``raw``, copied before masking);
2. in CSV order, in place, a question is zeroed when any of its parents (``dependency``, ``0`` = none; parents
   visited in the order listed, stopping at the first zero) has score 0 -- because the update is in place and
   parents come first in the CSV, a "no" cascades down the whole chain;
3. the tile score is the mean over the item's questions.

The image score is the mean of its tile scores; the DPG score is ``100 ×`` the mean image score over the images
that were scored; a category score (L2 = ``tuple`` text before ``(``, L1 = L2 text before ``-``) is ``100 ×`` the
mean of the per-question ``raw`` values, pooled over scored images.

``compat=True`` (default; canonical) replicates the upstream quirks of §2.4:

* quirk 1 (ELLA#61): the first data row of the CSV is ignored. If another question of that item names it as a
  parent, the parent lookup fails (when the masking loop reaches it, exactly like upstream) and the image is
  dropped from the mean -- dmdr lists it in ``skipped_images`` with ``"quirk": true`` and does not treat it as an
  error; otherwise the item is scored with one question fewer;
* quirk 2 (ELLA#60): category scores use the ``raw`` answers of the **last** tile only.

``compat=False`` (``--dpg-fix``) keeps the first row and pools the ``raw`` answers of every tile into the
categories. Quirk 3 (silent skips) is never replicated: files that cannot be scored are listed with a reason and
are an error unless ``allow_missing=True``.

dmdr is stricter than upstream in three places, none of which changes a number on valid input: an image whose
size is not exactly ``2R×2R`` (``R×R`` for one tile) is skipped with a reason instead of being cropped/padded
silently; an item whose rows are not contiguous in the CSV is an ``InputError`` (upstream would silently keep only
the last block); hidden files (names starting with ``.``) and folders in the image folder are ignored.

VQA backends are callables ``(PIL.Image, question) -> answer`` (:data:`VqaBackend`): :class:`ScriptedVqa` (tests,
demos; dmdr-only), :class:`BlipVqa` (transformers BLIP; compatible only, labelled "DPG (BLIP-VQA backend)") and
:class:`ModelscopeMplugVqa` (the canonical mPLUG-large through ModelScope; optional extra). :func:`build_vqa`
builds one by name.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dmdr_cli.errors import ConfigError, InputError, ModelNotFoundError, did_you_mean

__all__ = [
    "CSV_COLUMNS",
    "QUESTIONS_FLAG",
    "QUESTIONS_UPSTREAM",
    "VQA_BACKENDS",
    "BlipVqa",
    "DpgImageError",
    "ModelscopeMplugVqa",
    "Question",
    "ScriptedVqa",
    "VqaBackend",
    "build_vqa",
    "load_questions",
    "score_folder",
    "score_image",
    "split_tiles",
    "tile_2x2",
    "tile_boxes",
]

#: The columns of ``dpg_bench.csv``, in upstream order.
CSV_COLUMNS: tuple[str, ...] = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                                "category_detailed", "tuple", "question_natural_language")
#: Where the question CSV lives upstream (it is not shipped with dmdr and not in ../shared/benchmarks).
QUESTIONS_UPSTREAM = "TencentQQGYLab/ELLA dpg_bench/dpg_bench.csv"
#: The CLI flag that supplies the CSV (named in error messages).
QUESTIONS_FLAG = "--questions"

#: ``vqa(image, question) -> answer``; compared with the exact string ``"yes"``.
VqaBackend = Callable[[Image.Image, str], str]

#: ``PIL.Image.info`` keys set by :func:`score_folder` on every tile (``crop`` copies ``info``), so that a backend
#: such as :class:`ScriptedVqa` can tell which item and tile it is looking at.
INFO_ID = "dmdr_id"
INFO_TILE = "dmdr_tile"


# --------------------------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------------------------

def tile_boxes(resolution: int, n_tiles: int = 4) -> list[tuple[int, int, int, int]]:
    """Crop boxes ``(left, top, right, bottom)`` of the tiles, in upstream order: one tile ``(0, 0, R, R)``, or
    four: top-left, top-right, bottom-left, bottom-right."""
    r = int(resolution)
    if r <= 0:
        raise InputError(f"DPG tile resolution must be a positive integer, got {resolution!r}")
    if n_tiles == 1:
        return [(0, 0, r, r)]
    if n_tiles == 4:
        return [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
    raise InputError(f"DPG images hold 1 or 4 tiles, got n_tiles={n_tiles!r}")


def tile_2x2(images: Sequence[Image.Image]) -> Image.Image:
    """Tile four equally sized images into one RGB image twice as wide and high: ``images[0]`` top-left,
    ``[1]`` top-right, ``[2]`` bottom-left, ``[3]`` bottom-right (the order :func:`split_tiles` reads back)."""
    if len(images) != 4:
        raise InputError(f"a DPG image is a 2×2 tile of 4 images, got {len(images)}")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise InputError(f"the 4 images of a DPG tile must have the same size, got {sorted(sizes)}")
    w, h = images[0].size
    out = Image.new("RGB", (2 * w, 2 * h))
    for im, (x, y) in zip(images, ((0, 0), (w, 0), (0, h), (w, h))):
        out.paste(im.convert("RGB"), (x, y))
    return out


def split_tiles(image: Image.Image, resolution: int, n_tiles: int = 4) -> list[Image.Image]:
    """The tiles of ``image`` (:func:`tile_boxes` order). The image must be exactly ``2R×2R`` (``R×R`` for one
    tile); anything else is an ``InputError`` (upstream would crop and pad silently)."""
    boxes = tile_boxes(resolution, n_tiles)
    side = boxes[-1][2]
    if image.size != (side, side):
        raise InputError(f"image is {image.size[0]}×{image.size[1]}, expected {side}×{side} "
                         f"({n_tiles} tile{'s' if n_tiles > 1 else ''} of {resolution}×{resolution})")
    return [image.crop(box) for box in boxes]


# --------------------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    """One row of ``dpg_bench.csv``: ``qid`` (``proposition_id``), ``parents`` (``dependency`` without the ``0``
    "no parent" entries, in listed order), the ``question`` text, the ``tuple`` and its categories, and ``row``:
    the 0-based index of the data row in the CSV (row 0 is the one upstream skips)."""

    item_id: str
    qid: int
    parents: tuple[int, ...]
    question: str
    tuple: str
    category_l2: str
    category_l1: str
    row: int


def _category(tuple_text: str) -> tuple[str, str]:
    l2 = tuple_text.split("(")[0].strip()
    return l2, l2.split("-")[0].strip()


def _int(value: str, what: str, where: str) -> int:
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        try:  # pandas-written CSVs may hold "3.0"
            f = float(value)
        except (TypeError, ValueError):
            f = float("nan")
        if f.is_integer():
            return int(f)
        raise InputError(f"{where}: {what} must be an integer, got {value!r}") from None


def load_questions(csv_path: str | os.PathLike[str]) -> dict[str, list[Question]]:
    """Read ``dpg_bench.csv`` into ``item_id -> [Question, ...]`` in CSV order (dict order = first appearance).

    All rows are kept (the compat-mode skip of the first row happens in :func:`score_image`). A repeated
    ``proposition_id`` within an item replaces the earlier row's content at the earlier position (upstream dict
    semantics). Raises ``InputError`` when the file is missing (it is user-supplied), lacks a column, has a
    non-integer id, or an item's rows are not contiguous.
    """
    p = Path(csv_path).expanduser()
    if not p.is_file():
        raise InputError(
            f"DPG-Bench question CSV not found: {p}",
            f"the CSV is user-supplied, dmdr does not ship it: get {QUESTIONS_UPSTREAM} (upstream ELLA repository) "
            f"and pass {QUESTIONS_FLAG} PATH")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise InputError(f"{p}: not a DPG-Bench question CSV: missing column(s) {', '.join(missing)}",
                                 f"expected columns {', '.join(CSV_COLUMNS)}")
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read {p}: {err}") from err

    out: dict[str, dict[int, Question]] = {}
    last_item: str | None = None
    first_line: dict[str, int] = {}
    for row, rec in enumerate(rows):
        line = row + 2  # 1-based, after the header
        where = f"{p}:{line}"
        item = (rec.get("item_id") or "").strip()
        if not item:
            raise InputError(f"{where}: empty item_id")
        if item != last_item and item in out:
            raise InputError(f"{where}: the rows of item {item!r} are not contiguous (it also starts on line "
                             f"{first_line[item]})", "upstream would silently keep only the last block; group "
                                                     "each item's rows together")
        first_line.setdefault(item, line)
        last_item = item
        qid = _int(rec.get("proposition_id") or "", "proposition_id", where)
        dep = rec.get("dependency") or ""
        parents = tuple(d for d in (_int(x, "dependency", where) for x in dep.split(",")) if d != 0)
        tuple_text = rec.get("tuple") or ""
        question = rec.get("question_natural_language")
        if question is None or not question.strip():
            raise InputError(f"{where}: empty question_natural_language")
        l2, l1 = _category(tuple_text)
        out.setdefault(item, {})[qid] = Question(item, qid, parents, question, tuple_text, l2, l1, row)
    if not out:
        raise InputError(f"{p}: no question rows")
    return {item: list(qs.values()) for item, qs in out.items()}


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------

class DpgImageError(InputError):
    """One image cannot be scored; ``quirk`` is True when upstream compat mode (quirk 1) is the reason."""

    def __init__(self, message: str, hint: str = "", *, quirk: bool = False) -> None:
        super().__init__(message, hint)
        self.quirk = quirk


def _active(questions: Sequence[Question], compat: bool) -> list[Question]:
    return [q for q in questions if not (compat and q.row == 0)]


def score_image(tiles: Sequence[Image.Image], questions: Sequence[Question], vqa: VqaBackend, *,
                compat: bool = True) -> tuple[float, dict[int, float], list[float]]:
    """Score one image given its tiles (§2.3). Returns ``(image_score, raw_by_qid, tile_scores)`` in ``[0, 1]``.

    ``raw_by_qid`` (unmasked answers, the input of the category scores) holds the last tile's values with
    ``compat=True`` (quirk 2) and the mean over tiles with ``compat=False``. With ``compat=True`` the question on
    CSV data row 0 is dropped (quirk 1); a question naming a parent that is not among the item's questions raises
    :class:`DpgImageError` when the masking loop looks it up (``quirk=True`` when the parent was dropped by quirk
    1), which means "drop this image".
    """
    if not tiles:
        raise InputError("no tiles to score")
    active = _active(questions, compat)
    if not active:
        dropped = compat and any(q.row == 0 for q in questions)
        raise DpgImageError("no questions left for this item" + (
            " (its only question is the CSV's first data row, skipped by upstream quirk 1, ELLA#61)" if dropped
            else ""), quirk=dropped)
    dropped_qids = {q.qid for q in questions if compat and q.row == 0}
    tile_scores: list[float] = []
    raw_sum: dict[int, float] = {}
    raw: dict[int, float] = {}
    for tile in tiles:
        scores = {q.qid: 1.0 if vqa(tile, q.question) == "yes" else 0.0 for q in active}
        raw = dict(scores)
        for q in active:  # CSV order, in place: masking cascades down dependency chains
            for parent in q.parents:
                if parent not in scores:
                    quirk = parent in dropped_qids
                    raise DpgImageError(
                        f"question {q.qid} of item {q.item_id!r} names parent {parent}, which is not a question of "
                        "this item" + (" here: it is the CSV's first data row, skipped by upstream quirk 1 "
                                       "(ELLA#61), so upstream drops this image" if quirk else ""),
                        "" if quirk else "the CSV is inconsistent", quirk=quirk)
                if scores[parent] == 0:
                    scores[q.qid] = 0.0
                    break
        tile_scores.append(sum(scores.values()) / len(scores))
        for qid, v in raw.items():
            raw_sum[qid] = raw_sum.get(qid, 0.0) + v
    image_score = sum(tile_scores) / len(tile_scores)
    raw_by_qid = raw if compat else {qid: v / len(tiles) for qid, v in raw_sum.items()}
    return image_score, raw_by_qid, tile_scores


def _image_id(name: str) -> str:
    return name.split(".")[0]  # upstream: os.path.basename(path).split('.')[0]


def score_folder(image_dir: str | os.PathLike[str], questions: Mapping[str, Sequence[Question]], vqa: VqaBackend,
                 resolution: int, *, compat: bool = True, allow_missing: bool = False, n_tiles: int = 4,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score every ``<id>.png`` (2×2 tiled) in ``image_dir`` against ``questions`` (:func:`load_questions`).

    Every non-hidden file in the folder is a candidate, in sorted name order; its id is the name up to the first
    ``.`` (upstream). Files that cannot be scored -- no questions for the id, unreadable or not an image, wrong
    size -- are checked first, before any VQA call, and listed in ``skipped_images``; unless ``allow_missing``
    they are an ``InputError``. Images dropped by compat quirk 1 are listed with ``"quirk": true`` and are never
    an error (upstream behaviour, needed for canonical numbers).

    Returns ``dpg_score`` (×100 mean image score; ``None`` when nothing was scored), ``categories_l1`` and
    ``categories_l2`` (×100, sorted by name), ``n_images`` (scored), ``n_files``, ``skipped_images`` (``[{file,
    id, reason, quirk}]``), ``items_without_image`` (CSV items with no file), ``compat_mode`` (True = upstream
    quirks replicated), ``n_tiles``, ``resolution`` and ``rows``: one ``results.jsonl`` record per scored image
    ``{id, file, tile_scores, image_score}`` (scores in ``[0, 1]``, as upstream writes them per image).
    """
    folder = Path(image_dir).expanduser()
    if not folder.is_dir():
        raise InputError(f"DPG image folder not found: {folder}", "pass the folder holding <id>.png 2×2 images")
    tile_boxes(resolution, n_tiles)  # validates resolution / n_tiles
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
    skipped: list[dict[str, Any]] = []
    todo: list[tuple[Path, str]] = []
    side = 2 * int(resolution) if n_tiles == 4 else int(resolution)
    for path in files:
        item = _image_id(path.name)
        reason = None
        if item not in questions:
            reason = f"no questions for id {item!r} in the CSV (the file name must be <prompt id>.png)."
            reason += did_you_mean(item, questions)
        else:
            try:
                with Image.open(path) as im:
                    size = im.size
                    im.verify()
                if size != (side, side):
                    reason = f"image is {size[0]}×{size[1]}, expected {side}×{side} ({n_tiles} tiles of {resolution})"
            except Exception as err:  # noqa: BLE001 - any unreadable file is one skip reason
                reason = f"not a readable image ({type(err).__name__}: {err})"
        if reason is None:
            todo.append((path, item))
        else:
            skipped.append({"file": path.name, "id": item, "reason": reason, "quirk": False})
    if skipped and not allow_missing:
        first = skipped[0]
        raise InputError(f"{len(skipped)} of {len(files)} file(s) in {folder} cannot be scored, e.g. "
                         f"{first['file']}: {first['reason']}",
                         "fix or remove them, or pass --allow-missing to score the rest (they are listed in "
                         "summary.json skipped_images)")

    rows: list[dict[str, Any]] = []
    l1: dict[str, list[float]] = defaultdict(list)
    l2: dict[str, list[float]] = defaultdict(list)
    for n, (path, item) in enumerate(todo, 1):
        qs = questions[item]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
            image.info[INFO_ID] = item
            tiles = split_tiles(image, resolution, n_tiles)
            for t, tile in enumerate(tiles):
                tile.info[INFO_TILE] = t
            image_score, raw, tile_scores = score_image(tiles, qs, vqa, compat=compat)
        except DpgImageError as err:
            skipped.append({"file": path.name, "id": item, "reason": err.message, "quirk": err.quirk})
            if not err.quirk and not allow_missing:
                raise InputError(f"{path.name}: {err.message}", err.hint or "pass --allow-missing to skip it") from None
            if progress:
                progress(n, len(todo))
            continue
        by_qid = {q.qid: q for q in qs}
        for qid, v in raw.items():
            l2[by_qid[qid].category_l2].append(v)
            l1[by_qid[qid].category_l1].append(v)
        rows.append({"id": item, "file": path.name, "tile_scores": tile_scores, "image_score": image_score})
        if progress:
            progress(n, len(todo))

    scored_ids = {r["id"] for r in rows} | {s["id"] for s in skipped}

    def pct(values: Iterable[float]) -> float:
        values = list(values)
        return 100.0 * sum(values) / len(values)

    return {
        "dpg_score": pct(r["image_score"] for r in rows) if rows else None,
        "categories_l1": {k: pct(v) for k, v in sorted(l1.items())},
        "categories_l2": {k: pct(v) for k, v in sorted(l2.items())},
        "n_images": len(rows),
        "n_files": len(files),
        "skipped_images": skipped,
        "items_without_image": sum(1 for item in questions if item not in scored_ids),
        "compat_mode": bool(compat),
        "n_tiles": n_tiles,
        "resolution": int(resolution),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------------------
# VQA backends
# --------------------------------------------------------------------------------------------------------------

def _info_key(image: Image.Image) -> Hashable:
    return image.info.get(INFO_ID)


class ScriptedVqa:
    """Answers from a table (tests, demos; dmdr-only numbers).

    ``key(image)`` names the image (default: the item id that :func:`score_folder` stores in ``image.info``; a
    test may map a tile's colour instead). Lookup order: ``table[(key, question)]``, ``table[key]``,
    ``table[question]``, then ``default``. A looked-up value that is a mapping is indexed by the question; one
    that is callable is called as ``value(image, question)``. Every call is recorded in ``calls`` as
    ``(key, question)``.
    """

    name = "scripted"
    label = "DPG (scripted VQA, dmdr-only)"
    canonical = False

    def __init__(self, table: Mapping[Any, Any] | None = None, default: str = "no",
                 key: Callable[[Image.Image], Hashable] | None = None) -> None:
        self.table = dict(table or {})
        self.default = default
        self.key = key or _info_key
        self.calls: list[tuple[Hashable, str]] = []

    def _lookup(self, k: Hashable, question: str) -> Any:
        for probe in ((k, question), k, question):
            try:
                if probe in self.table:
                    return self.table[probe]
            except TypeError:  # unhashable key
                continue
        return None

    def __call__(self, image: Image.Image, question: str) -> str:
        k = self.key(image)
        self.calls.append((k, question))
        value = self._lookup(k, question)
        if isinstance(value, Mapping):
            value = value.get(question)
        if callable(value):
            value = value(image, question)
        return self.default if value is None else str(value)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> ScriptedVqa:
        """Load ``{"default": "no", "answers": {<question or image id>: <answer or {question: answer}>}}``."""
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"scripted VQA table not found: {p}") from None
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read scripted VQA table {p}: {err}") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("answers", {}), Mapping):
            raise InputError(f"{p}: expected {{\"default\": ..., \"answers\": {{...}}}}")
        return cls(data.get("answers", {}), default=str(data.get("default", "no")))


class BlipVqa:
    """transformers ``BlipForQuestionAnswering`` + ``BlipProcessor`` from a local folder (or a hub id already in
    the HF cache; never downloads). Compatible only: labelled "DPG (BLIP-VQA backend)". Answers are decoded,
    stripped and lower-cased."""

    name = "blip-vqa"
    label = "DPG (BLIP-VQA backend)"
    canonical = False

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", max_new_tokens: int = 10) -> None:
        import torch
        from transformers import BlipForQuestionAnswering, BlipProcessor

        self.path = str(path)
        try:
            self.processor = BlipProcessor.from_pretrained(self.path, local_files_only=True)
            self.model = BlipForQuestionAnswering.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(
                f"cannot load a BLIP VQA model from {self.path}: {str(err).splitlines()[0] if str(err) else err}",
                "pass a local folder holding a transformers BlipForQuestionAnswering checkpoint and its processor "
                "(e.g. a snapshot of Salesforce/blip-vqa-base)") from None
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self._torch = torch

    def __call__(self, image: Image.Image, question: str) -> str:
        inputs = self.processor(images=image.convert("RGB"), text=question, return_tensors="pt").to(self.device)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self.processor.decode(out[0], skip_special_tokens=True).strip().lower()


class ModelscopeMplugVqa:
    """The canonical scorer: ModelScope ``damo/mplug_visual-question-answering_coco_large_en`` through
    ``pipeline(Tasks.visual_question_answering)`` from a local model folder, fp16 autocast on CUDA (upstream runs
    under accelerate fp16 mixed precision). Optional extra: needs the ``modelscope`` package."""

    name = "modelscope-mplug"
    label = "DPG-Bench (mPLUG-large VQA)"
    canonical = True
    model_id = "damo/mplug_visual-question-answering_coco_large_en"

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu") -> None:
        from modelscope.pipelines import pipeline
        from modelscope.utils.constant import Tasks

        self.path = str(path)
        self.device = device
        self.pipeline = pipeline(Tasks.visual_question_answering, model=self.path,
                                 device="gpu" if device.startswith("cuda") else device)

    def __call__(self, image: Image.Image, question: str) -> str:
        if self.device.startswith("cuda"):
            import torch

            with torch.autocast("cuda", dtype=torch.float16):
                return self.pipeline({"image": image, "question": question})["text"]
        return self.pipeline({"image": image, "question": question})["text"]


#: Backend names accepted by :func:`build_vqa`.
VQA_BACKENDS: tuple[str, ...] = ("modelscope-mplug", "blip-vqa", "scripted")


def build_vqa(name: str, path: str | os.PathLike[str] | None = None, *, device: str = "cpu") -> VqaBackend:
    """The VQA backend ``name`` (:data:`VQA_BACKENDS`).

    ``scripted``: ``path`` is an optional JSON table (:meth:`ScriptedVqa.from_json`); without it every answer is
    "yes" (a smoke test). ``blip-vqa``: ``path`` is a local BLIP VQA folder. ``modelscope-mplug``: needs the
    optional ``modelscope`` package and ``path`` = the ModelScope model folder. Missing pieces are
    ``ConfigError``s saying what to install or pass.
    """
    if name == "scripted":
        return ScriptedVqa.from_json(path) if path else ScriptedVqa(default="yes")
    if name == "blip-vqa":
        if not path:
            raise ConfigError("the blip-vqa DPG backend needs a local BLIP VQA model folder",
                              "pass its path (e.g. a snapshot of Salesforce/blip-vqa-base); numbers are labelled "
                              "'DPG (BLIP-VQA backend)', not canonical")
        return BlipVqa(path, device)
    if name == "modelscope-mplug":
        if importlib.util.find_spec("modelscope") is None:
            raise ConfigError(
                "the modelscope-mplug DPG backend needs the optional 'modelscope' package, which is not installed",
                f"it is an optional extra: pip install modelscope, and put the ModelScope weights "
                f"{ModelscopeMplugVqa.model_id} in a local folder; or use --vqa blip-vqa (compatible only)")
        if not path or not Path(path).expanduser().is_dir():
            raise ConfigError(
                f"the modelscope-mplug DPG backend needs the ModelScope weights {ModelscopeMplugVqa.model_id} "
                f"in a local folder" + (f" ({path} is not a folder)" if path else ""),
                "download them on a connected machine (modelscope snapshot_download) and pass the folder; dmdr "
                "never downloads them")
        return ModelscopeMplugVqa(Path(path).expanduser(), device)
    raise ConfigError(f"unknown DPG VQA backend '{name}'.{did_you_mean(name, VQA_BACKENDS)}",
                      "known: " + ", ".join(VQA_BACKENDS))
