"""The ``hf-m2f`` GenEval detector backend (EVALUATION.md §1.3, §1.4, §1.7, §1.8): transformers Mask2Former
(COCO instance) for objects + a transformers CLIP zero-shot classifier for colours. Compatible, not canonical.

Detection (§1.7 recipe)::

    inputs  = Mask2FormerImageProcessor(image)                      # the snapshot's preprocessor_config.json
    outputs = Mask2FormerForUniversalSegmentation(**inputs)
    result  = processor.post_process_instance_segmentation(outputs, threshold=0.0, target_sizes=[(H, W)],
                                                           return_binary_maps=True)[0]

``result["segmentation"]`` is an ``(N, H, W)`` stack of binary maps paired with ``result["segments_info"]``
(``label_id``, ``score``), or an ``(H, W)`` map of −1 when nothing survives (→ no detections). Empty masks are
dropped, boxes are the tight boxes of the masks with exclusive right/bottom edge ``[min_x, min_y, max_x + 1,
max_y + 1]``, scores are kept as returned (p × mean mask probability, rounded to 6 decimals; unsorted: the rule
engine sorts and thresholds), and ``label_id`` (COCO index 0–79) names the GenEval class of that index in
``object_names.txt``. At load time every ``id2label`` entry must equal the GenEval name at its index, or be one of
:data:`LABEL_ALIASES` for it (after lower-casing and reading ``_``/``-`` as spaces); anything else is refused
(``CheckpointError``): a panoptic/ADE checkpoint or a re-ordered label set would silently score the wrong classes.

Colour (§1.4), per kept detection, as djghosh13/geneval ``evaluate_images.py`` with open_clip ViT-L-14 (openai
weights = transformers ``openai/clip-vit-large-patch14``):

- classifier per class (cached): for each of the 10 :data:`~dmdr_cli.evaluation.geneval.COLORS` embed the three
  :data:`COLOR_TEMPLATES`, L2-normalise each, average, renormalise → column ``W[:, c]``;
- input: the image composited over solid ``#999`` with the binary mask as alpha (no mask: the image itself),
  cropped to the box rounded to whole pixels (PIL ``crop``), then the standard CLIP evaluation transform
  (:func:`clip_eval_transform`: bicubic resize of the short side to the CLIP image size, centre crop, OpenAI
  mean/std) — not the squash resize of the reward path;
- prediction: ``COLORS[argmax(100 · normalise(f_img) · W)]``.

Ids (§1.8): ``hf-m2f:<repo id or folder name>@<sha256[:12] of the weights file>`` and ``clip:<repo id or folder
name>@<sha256[:12]>``. The repo id is used for Hugging Face cache snapshots, the folder name otherwise; the hash is
the full-file sha256 (taken from the blob name for HF cache files, which are named by it; sharded weights: sha256
of the shard hashes in name order).

transformers quirks handled here (5.x):

- ``post_process_instance_segmentation`` allocates its −1 map on the CPU and indexes it with masks on the logits'
  device (a CPU tensor indexed by a CUDA mask raises): the two logit tensors are moved to the CPU first (the
  nearest resize of all queries' masks to the image size then runs on the CPU too).
- A preprocessor config with ``"size": 384`` (shortest edge only; older configs may say so) loads, but 5.x
  resizing then raises "Size must contain … 'shortest_edge' and 'longest_edge'"; 4.x implied ``longest_edge``
  1333 for it, which is restored here.
- The 5.x processor resizes straight to a multiple of ``size_divisor`` (slight stretch) instead of padding, so a
  single image never carries padding that the post-processing (which ignores ``pixel_mask``) would misplace.
- ``get_image_features``/``get_text_features`` return output objects in 5.x: read through
  :mod:`dmdr_cli.rewards.base`.

Registers itself as ``hf-m2f`` (:func:`dmdr_cli.evaluation.detectors.register_detector`) on import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dmdr_cli.errors import CheckpointError, ModelNotFoundError
from dmdr_cli.evaluation.benchfiles import load_object_names, resolve_bench_file, sha256_file
from dmdr_cli.evaluation.detectors import register_detector
from dmdr_cli.evaluation.geneval import COLORS, Detection, detection_mask, group_by_class
from dmdr_cli.rewards.assets import ASSETS, Asset, find_asset
from dmdr_cli.rewards.base import CLIP_MEAN, CLIP_STD, image_features, text_features

__all__ = [
    "BACKGROUND",
    "CLIP_ASSET",
    "COLOR_TEMPLATES",
    "HFMask2FormerDetector",
    "HF_M2F_REPO",
    "LABEL_ALIASES",
    "M2F_ASSET",
    "clip_eval_transform",
    "color_crop",
    "detections_from_segmentation",
    "map_labels",
    "mask_box",
    "weights_sha256",
]

#: The transformers checkpoint this backend is written for (detectron2 weights, Swin-S, COCO instance).
HF_M2F_REPO = "facebook/mask2former-swin-small-coco-instance"
#: Background of the colour crops (upstream option ``bgcolor`` default ``#999``).
BACKGROUND = "#999"
#: Zero-shot colour prompts (upstream ``evaluate_images.py``); ``{c}`` = colour, ``{cls}`` = GenEval class name.
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {cls}",
    "a photo of a {c}-colored {cls}",
    "a photo of a {c} object",
)
#: Accepted Hugging Face / older COCO label spellings → GenEval name (keys normalised: lower case, ``_``/``-`` as
#: spaces). Only accepted at the COCO index of that GenEval name; any other mismatch is refused.
LABEL_ALIASES: dict[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "hair dryer": "hair drier",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
}

_SNAPSHOT = ("a transformers snapshot folder (config.json + preprocessor_config.json + model.safetensors or "
             "pytorch_model.bin)")
#: The Mask2Former snapshot: ``--detector-path``, ``DMDR_ASSET_MASK2FORMER_SWIN_SMALL_COCO_INSTANCE``,
#: ``$DMDR_HOME/assets/mask2former-swin-small-coco-instance/`` or the Hugging Face cache (never downloaded).
M2F_ASSET = Asset(
    "mask2former-swin-small-coco-instance", HF_M2F_REPO,
    folder=tuple(("config.json", "preprocessor_config.json", w) for w in
                 ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                  "pytorch_model.bin.index.json")),
    hf_repo=HF_M2F_REPO, label=_SNAPSHOT,
)
#: The colour model: the same asset as the ``clip`` reward (``openai/clip-vit-large-patch14``, ``--clip-path``).
CLIP_ASSET = ASSETS["clip-vit-l-14"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_CONTEXT_LENGTH = 77
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


# ------------------------------------------------------------------------------------------------ resolution


def _resolve(asset: Asset, path: str | os.PathLike[str], flag: str, what: str) -> Path:
    """The local folder of ``asset`` (explicit path, env var, ``$DMDR_HOME/assets``, HF cache), or
    ``ModelNotFoundError`` naming the upstream id and ``flag``."""
    try:
        found = find_asset(asset, path or "")
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"{what}: {err.message}",
                                 f"{flag} DIR must be a local copy of {asset.upstream}: {asset.describe()}") from None
    if found is None:
        raise ModelNotFoundError(
            f"{what}: weights not found: {asset.describe()} from {asset.upstream} (dmdr never downloads)",
            f"pass {flag} DIR; or set {asset.env_var}; or put it in {asset.home_dir}/; or pre-populate the "
            f"Hugging Face cache on a connected machine (hf download {asset.hf_repo})",
        )
    return Path(found)


def _display_name(folder: Path) -> str:
    """``owner/name`` for a Hugging Face cache snapshot (``models--owner--name/snapshots/<rev>``), else the
    folder's name."""
    folder = Path(folder)
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo[len("models--"):].replace("--", "/")
    return folder.name or str(folder)


def _file_sha256(path: Path) -> str:
    p = Path(path)
    real = p.resolve()
    # Hugging Face cache files are symlinks to blobs named by the sha256 of their content (LFS files).
    if p.is_symlink() and real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(real)
    return _SHA_CACHE[key]


def weights_sha256(folder: str | os.PathLike[str]) -> str:
    """Full sha256 (hex) of a snapshot's weights file (``model.safetensors``, else ``pytorch_model.bin``); for
    sharded weights, the sha256 of the shards' hex digests joined in file-name order. Cached per process."""
    folder = Path(folder)
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return _file_sha256(folder / name)
    for name in _WEIGHT_INDEXES:
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index}: not a weights index (no weight_map)") from err
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder}: weight shards missing: {', '.join(missing)}")
            return hashlib.sha256("".join(_file_sha256(folder / s) for s in shards).encode()).hexdigest()
    raise CheckpointError(f"{folder}: no weights file ({' or '.join(_WEIGHT_FILES + _WEIGHT_INDEXES)})")


# ------------------------------------------------------------------------------------------------ labels


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def map_labels(id2label: Mapping[Any, str], names: Sequence[str], *, source: str = "the model") -> list[str]:
    """Check a COCO-instance ``id2label`` against GenEval's ``names`` (COCO order) and return the GenEval name of
    each label id (index = ``label_id``).

    Ids must be exactly ``0..len(names)-1``; entry ``i`` must equal ``names[i]`` or be a :data:`LABEL_ALIASES`
    spelling of it (case and ``_``/``-`` vs space ignored). Raises ``CheckpointError`` listing every mismatch.
    """
    try:
        labels = {int(k): str(v) for k, v in dict(id2label or {}).items()}
    except (TypeError, ValueError):
        raise CheckpointError(f"hf-m2f: {source}: id2label keys are not integers") from None
    hint = (f"use a COCO instance-segmentation Mask2Former checkpoint such as {HF_M2F_REPO} (80 classes in COCO "
            "order); accepted spellings besides GenEval's: "
            + ", ".join(f"{k}→{v}" for k, v in LABEL_ALIASES.items()))
    if sorted(labels) != list(range(len(names))):
        ids = sorted(labels)
        span = f"ids {ids[0]}..{ids[-1]}" if ids else "no ids"
        raise CheckpointError(f"hf-m2f: {source} has {len(labels)} labels ({span}); GenEval needs the "
                              f"{len(names)} COCO instance classes with ids 0..{len(names) - 1}", hint)
    bad = []
    for i, gen in enumerate(names):
        key = _norm(labels[i])
        if key != _norm(gen) and LABEL_ALIASES.get(key) != gen:
            bad.append(f"{i}: {labels[i]!r} (GenEval: {gen!r})")
    if bad:
        raise CheckpointError(f"hf-m2f: {source}: id2label does not match GenEval's COCO classes at "
                              + "; ".join(bad), hint)
    return list(names)


# ------------------------------------------------------------------------------------------------ detections


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight box of a binary mask, exclusive right/bottom edge ``(min_x, min_y, max_x + 1, max_y + 1)``, or
    ``None`` for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def detections_from_segmentation(result: Mapping[str, Any], labels: Sequence[str],
                                 size: tuple[int, int]) -> list[Detection]:
    """§1.7 ``Detection`` records from one ``post_process_instance_segmentation(..., return_binary_maps=True)``
    result at image size ``size = (H, W)``: the −1 map (nothing survived) → ``[]``; empty masks dropped; boxes
    from the masks; scores as returned; ``labels[label_id]`` as the class."""
    seg = result.get("segmentation")
    infos = list(result.get("segments_info") or [])
    if seg is None or not infos:
        return []
    seg = seg.detach().cpu().numpy() if isinstance(seg, Tensor) else np.asarray(seg)
    if seg.ndim == 2:  # the (H, W) map of −1: no instance survived
        return []
    if seg.ndim != 3 or seg.shape[0] != len(infos) or tuple(seg.shape[1:]) != tuple(size):
        raise RuntimeError(f"hf-m2f: unexpected post-processing output: segmentation {seg.shape} for "
                           f"{len(infos)} segments at image size {tuple(size)}")
    out = []
    for info, plane in zip(infos, seg):
        mask = plane > 0.5
        box = mask_box(mask)
        if box is None:
            continue
        label = int(info["label_id"])
        if not 0 <= label < len(labels):
            raise RuntimeError(f"hf-m2f: label_id {label} outside the {len(labels)} known classes")
        out.append(Detection(labels[label], float(info["score"]), box, mask))
    return out


# ------------------------------------------------------------------------------------------------ colour input


def color_crop(image: Image.Image, det: Sequence[Any], background: str = BACKGROUND) -> Image.Image:
    """The colour classifier's input region (upstream ``ImageCrops``): ``image`` composited over a solid
    ``background`` with the detection's mask as alpha (skipped without a mask), cropped to ``det[:4]`` rounded to
    whole pixels (Python ``round``, as PIL's ``crop`` does). Degenerate boxes are widened to one pixel."""
    image = image.convert("RGB")
    mask = detection_mask(det)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask shape {mask.shape} differs from the image size {(image.height, image.width)}")
        blank = Image.new("RGB", image.size, background)
        image = Image.composite(image, blank, Image.fromarray(mask))
    x0, y0, x1, y1 = (int(round(float(v))) for v in det[:4])
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


def clip_eval_transform(image: Image.Image, size: int = 224, *, normalize: bool = True) -> Tensor:
    """The standard CLIP evaluation transform of a PIL image → ``[3, size, size]`` float32 (open_clip / torchvision
    ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` + ``ToTensor`` + OpenAI ``Normalize``).

    The short side is resized to ``size`` with PIL bicubic (long side ``int(size · long / short)``, no resize when
    the short side already is ``size``), then the centre ``size × size`` is cut (offsets ``round((n − size) / 2)``).
    ``normalize=False`` stops after ``ToTensor`` (values in ``[0, 1]``).
    """
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1).contiguous()
    if normalize:
        x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    return x


# ------------------------------------------------------------------------------------------------ the backend


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_processor(folder: Path) -> Any:
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Mask2FormerImageProcessor as Processor
    else:  # the PIL backend has the same pre- and post-processing
        from transformers import Mask2FormerImageProcessorPil as Processor

    processor = Processor.from_pretrained(str(folder), local_files_only=True)
    size = processor.size
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if get("shortest_edge") and not get("longest_edge") and not (get("height") and get("width")):
        # "size": 384 in an older preprocessor_config.json: transformers 4.x implied longest_edge 1333, 5.x raises.
        processor.size = {"shortest_edge": int(get("shortest_edge")), "longest_edge": 1333}
    return processor


class HFMask2FormerDetector:
    """GenEval detector backend ``hf-m2f`` (module docstring).

    ``HFMask2FormerDetector(path, clip_path, device)``: ``path`` = local Mask2Former snapshot (``--detector-path``;
    default: ``DMDR_ASSET_MASK2FORMER_SWIN_SMALL_COCO_INSTANCE``, ``$DMDR_HOME/assets/…`` or the HF cache),
    ``clip_path`` = local CLIP snapshot (``--clip-path``; default the ``clip-vit-l-14`` asset). ``object_names``
    overrides GenEval's ``object_names.txt`` (resolved through :mod:`~dmdr_cli.evaluation.benchfiles`).

    ``detector(image_path, image) -> (rows, color_of)``: ``rows`` maps GenEval class → ``[(x0, y0, x1, y1, score,
    mask), ...]`` (unfiltered), ``color_of(class_name, row)`` the colour name of one row of that image.
    """

    def __init__(self, path: str | os.PathLike[str] = "", clip_path: str | os.PathLike[str] = "",
                 device: str | torch.device = "cpu", *, object_names: Sequence[str] | None = None) -> None:
        from transformers import AutoConfig, CLIPModel, Mask2FormerForUniversalSegmentation

        from dmdr_cli.rewards.clip_models import _image_size, _quiet_loading, load_clip_tokenizer

        self.device = torch.device(device)
        names = list(object_names) if object_names is not None else load_object_names(
            resolve_bench_file("geneval", "object_names.txt"))

        folder = _resolve(M2F_ASSET, path, "--detector-path", "hf-m2f detector")
        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:  # noqa: BLE001 - unreadable config: wrong folder
            raise CheckpointError(f"hf-m2f: cannot read {folder / 'config.json'}: {_one_line(err)}") from err
        if getattr(config, "model_type", None) != "mask2former":
            raise CheckpointError(f"hf-m2f: {folder} holds a '{getattr(config, 'model_type', None)}' model, not "
                                  "mask2former", f"point --detector-path at a local copy of {HF_M2F_REPO}")
        #: GenEval class name of each label id (checked against the aliases at load time).
        self.labels = map_labels(config.id2label, names, source=str(folder))
        try:
            with _quiet_loading():
                model = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder), config=config,
                                                                            local_files_only=True)
            self.processor = _load_processor(folder)
        except Exception as err:  # noqa: BLE001 - shape/key mismatch, corrupt file: all "wrong checkpoint"
            raise CheckpointError(f"hf-m2f: cannot load Mask2Former from {folder}: {_one_line(err)}",
                                  f"expected a local copy of {HF_M2F_REPO}") from err
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.model_dir = folder

        clip_folder = _resolve(CLIP_ASSET, clip_path, "--clip-path", "GenEval colour model (CLIP)")
        try:
            with _quiet_loading():
                clip = CLIPModel.from_pretrained(str(clip_folder), local_files_only=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"GenEval colour model: cannot load CLIP from {clip_folder}: {_one_line(err)}",
                                  f"expected a local copy of {CLIP_ASSET.upstream}") from err
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_clip_tokenizer(clip_folder)
        self.clip_dir = clip_folder
        self.image_size = _image_size(self.clip.config.vision_config.image_size)[0]
        self.max_length = min(_CONTEXT_LENGTH, int(self.clip.config.text_config.max_position_embeddings))
        self._classifiers: dict[str, Tensor] = {}

        self.id = f"hf-m2f:{_display_name(folder)}@{weights_sha256(folder)[:12]}"
        self.color_model = f"clip:{_display_name(clip_folder)}@{weights_sha256(clip_folder)[:12]}"

    # -- detection ------------------------------------------------------------------------------------------
    def detect(self, image: Image.Image) -> list[Detection]:
        """Unfiltered §1.7 detections ``(class_name, score, box, mask)`` of one RGB PIL image."""
        from types import SimpleNamespace

        image = image.convert("RGB")
        size = (image.height, image.width)
        inputs = self.processor(images=image, return_tensors="pt")
        kwargs = {"pixel_values": inputs["pixel_values"].to(self.device, dtype=self.model.dtype)}
        if "pixel_mask" in inputs:
            kwargs["pixel_mask"] = inputs["pixel_mask"].to(self.device)
        with torch.inference_mode():
            outputs = self.model(**kwargs)
        # On the CPU: the post-processing builds its −1 map there and indexes it with the masks.
        cpu = SimpleNamespace(class_queries_logits=outputs.class_queries_logits.float().cpu(),
                              masks_queries_logits=outputs.masks_queries_logits.float().cpu())
        result = self.processor.post_process_instance_segmentation(
            cpu, threshold=0.0, target_sizes=[size], return_binary_maps=True)[0]
        return detections_from_segmentation(result, self.labels, size)

    # -- colour ---------------------------------------------------------------------------------------------
    def color_classifier(self, class_name: str) -> Tensor:
        """``W [D, 10]``: column ``c`` = renormalised mean of the normalised text embeddings of the three
        :data:`COLOR_TEMPLATES` for colour ``COLORS[c]`` and ``class_name``. Cached per class."""
        W = self._classifiers.get(class_name)
        if W is None:
            texts = [t.format(c=c, cls=class_name) for c in COLORS for t in COLOR_TEMPLATES]
            tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            with torch.inference_mode():
                f = text_features(self.clip, tok["input_ids"].to(self.device),
                                  tok["attention_mask"].to(self.device)).float()
            f = F.normalize(f, dim=-1).view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            W = F.normalize(f, dim=-1).t().contiguous()
            self._classifiers[class_name] = W
        return W

    def color_input(self, image: Image.Image, det: Sequence[Any], *, normalize: bool = True) -> Tensor:
        """``[3, S, S]`` CLIP input of one detection: :func:`color_crop` then :func:`clip_eval_transform`."""
        return clip_eval_transform(color_crop(image, det), self.image_size, normalize=normalize)

    def color_of(self, image: Image.Image, class_name: str, det: Sequence[Any]) -> str:
        """``COLORS[argmax(100 · normalise(f_img) · W)]`` for one detection of ``image``."""
        W = self.color_classifier(class_name)
        pixels = self.color_input(image, det)[None].to(self.device, dtype=self.clip.dtype)
        with torch.inference_mode():
            f = image_features(self.clip, pixels).float()
        logits = 100.0 * F.normalize(f, dim=-1) @ W.to(f.device)
        return COLORS[int(logits.argmax(dim=-1)[0])]

    # -- the backend interface ------------------------------------------------------------------------------
    def __call__(self, image_path: Path, image: Image.Image | None = None):
        if image is None:
            from PIL import ImageOps

            image = ImageOps.exif_transpose(Image.open(image_path))
        image = image.convert("RGB")
        rows = group_by_class(self.detect(image))

        def color_of(class_name: str, det: Sequence[Any]) -> str:
            return self.color_of(image, class_name, det)

        return rows, color_of


def _factory(path: str = "", clip_path: str = "", device: str | torch.device = "cpu") -> HFMask2FormerDetector:
    return HFMask2FormerDetector(path, clip_path, device)


register_detector("hf-m2f", _factory)
