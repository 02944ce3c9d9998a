"""The digits world's classifier (EVALUATION.md §7.4 item 5): a ~40k-parameter CNN on 28×28 grey crops.

One network serves three uses: the ``digits`` GenEval detector (class + score of each connected component), the
``dmdr-digits-cnn`` torch-fidelity extractor (``feat`` = penultimate 64-d, ``logits``) and the ``digit-cls``
reward (log-probabilities, differentiable w.r.t. the pixels).

Crops
-----
Every input goes through :func:`normalize_crops`, the same for training and use: the foreground box of a grey image
(pixels ``> FG_THRESHOLD``) is made square around its centre (side = the box's longer side), and that square is
sampled (bilinear, 2× supersampled then 2×2 average-pooled, differentiable w.r.t. the pixels) so that it spans the
central 20×20 pixels of the 28×28 output — MNIST's own convention — and the crop is divided by its (detached)
maximum, floored at ``FG_THRESHOLD``.

Training (deterministic: fixed seed, CPU, one thread, ``torch.use_deterministic_algorithms``)
------------------------------------------------------------------------------------------
Train glyphs of :func:`dmdr_cli.digits.world.glyphs` (4,000 MNIST digits; the 1,000 ``test`` glyphs are held out).
An augmented pool of ``variants`` copies per glyph is built once: stroke thickness (blend with a 3×3 dilation or
erosion), a random affine map (rotation ±12°, scale 0.85–1.15, shear ±0.15), brightness 0.7–1, then the glyph is
"rendered" at a random ink height of 8–30 px (antialiased resize, as the renderer draws it on a 32/64-px canvas)
and cropped by :func:`normalize_crops` with a jittered window (centre ±6 % and side ×0.92–1.12 of the box).
Adam (one-cycle schedule to the schedule's peak learning rate, weight decay 1e-4, batch 64), plain cross-entropy
(no label smoothing: GenEval's counting keeps only detections scoring above 0.9). ``full``: 6 variants × 3 epochs
(~98 % held-out, ~20 s); ``short`` (tests): 2 variants × 3 epochs (~97.5 %, ~7 s).
Held-out accuracy is measured on the ``test`` glyphs rendered at ink heights 10, 14, 20 and 28 px without the
random affine map.

Weights live in ``$DMDR_HOME/cache/digits-cls-<key>.safetensors`` (``DMDR_HOME`` default ``~/.cache/dmdr``), where
``key`` hashes :data:`CLS_VERSION`, the source of the training code, the glyph data file, the seed and the
schedule; they are written atomically and trained on first use by :func:`load_classifier`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dmdr_cli.digits.world import CLASSES, FG_THRESHOLD, data_fingerprint, glyphs

__all__ = [
    "CLS_VERSION",
    "SCHEDULES",
    "DigitClassifier",
    "DigitCNN",
    "cache_path",
    "evaluate_accuracy",
    "load_classifier",
    "normalize_crops",
    "train_classifier",
]

#: Bump when the architecture or the training recipe changes meaning (the source hash catches code edits too).
CLS_VERSION = "digits-cls-v1"
#: Training schedules: ``full`` is the shipped classifier, ``short`` the test suite's (accuracy threshold only).
SCHEDULES: dict[str, dict[str, int]] = {
    "full": {"variants": 6, "epochs": 3, "batch": 64, "lr_milli": 4},
    "short": {"variants": 2, "epochs": 3, "batch": 64, "lr_milli": 5},
}
CROP = 28
INNER = 20


# --------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------


class DigitCNN(nn.Module):
    """``1×28×28 → conv5×5/2(16) → conv3×3/2(32) → conv3×3(40) → maxpool 2 → 360 → fc(64) = feat → ReLU →
    fc(10) = logits`` (ReLU after each conv); 40,370 parameters. Inputs in [0, 1] (0 = background), normalised
    inside. Strided convolutions instead of early max-pooling: about 3× faster to train on one CPU core."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 40, 3, padding=1)
        self.fc1 = nn.Linear(40 * 3 * 3, 64)
        self.fc2 = nn.Linear(64, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate 64-d features (pre-activation of the hidden layer) of ``[N, 1, 28, 28]`` crops."""
        x = (x - 0.13) / 0.3
        x = F.relu(self.conv1(x))  # 14×14
        x = F.relu(self.conv2(x))  # 7×7
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 3×3
        return self.fc1(x.flatten(1))

    def head(self, feat: Tensor) -> Tensor:
        return self.fc2(F.relu(feat))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)


@dataclass
class DigitClassifier:
    """A trained :class:`DigitCNN` (frozen, eval mode) with where it came from.

    ``fingerprint``: first 8 hex of the weights file's sha256 (the detector id uses it); ``meta``: the training
    record (seed, schedule, held-out accuracy, seconds).
    """

    net: DigitCNN
    path: Path
    fingerprint: str
    meta: dict[str, Any]

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES

    def to(self, device: Any) -> DigitClassifier:
        self.net.to(device)
        return self

    def features(self, x: Tensor) -> Tensor:
        return self.net.features(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.net.logits(x)

    def log_probs(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.net.logits(x).float(), dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Crop normalisation (shared by training, detector, reward)
# --------------------------------------------------------------------------------------------------------------


def foreground_boxes(grey: Tensor, threshold: float = FG_THRESHOLD) -> Tensor:
    """Exclusive ``(x0, y0, x1, y1)`` float boxes ``[N, 4]`` of the pixels ``> threshold`` of ``[N, 1, H, W]``
    grey images (no gradient); an image without foreground gets the whole image."""
    with torch.no_grad():
        fg = grey.detach()[:, 0] > threshold
        n, h, w = fg.shape
        rows, cols = fg.any(dim=2), fg.any(dim=1)
        ar_h = torch.arange(h, device=grey.device)
        ar_w = torch.arange(w, device=grey.device)
        big = torch.tensor(10**9, device=grey.device)
        y0 = torch.where(rows, ar_h, big).min(dim=1).values
        y1 = torch.where(rows, ar_h, -1).max(dim=1).values + 1
        x0 = torch.where(cols, ar_w, big).min(dim=1).values
        x1 = torch.where(cols, ar_w, -1).max(dim=1).values + 1
        empty = ~rows.any(dim=1)
        boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
        full = torch.tensor([0.0, 0.0, float(w), float(h)], device=grey.device)
        return torch.where(empty[:, None], full, boxes)


def normalize_crops(grey: Tensor, boxes: Tensor | None = None, *, jitter: Tensor | None = None,
                    threshold: float = FG_THRESHOLD) -> Tensor:
    """``[N, 1, 28, 28]`` classifier inputs from ``[N, 1, H, W]`` grey images in [0, 1] (module docstring).

    ``boxes`` (exclusive pixel boxes ``[N, 4]``; default :func:`foreground_boxes`) are made square around their
    centre and mapped onto the central 20×20 pixels. ``jitter`` ``[N, 3]`` = (dx, dy, log side factor) in units of
    the side (training only). Differentiable w.r.t. ``grey``; the window itself carries no gradient.
    """
    if boxes is None:
        boxes = foreground_boxes(grey, threshold)
    boxes = boxes.detach().to(grey.device, torch.float32)
    n, _, h, w = grey.shape
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    if jitter is not None:
        cx = cx + jitter[:, 0] * side
        cy = cy + jitter[:, 1] * side
        side = side * torch.exp(jitter[:, 2])
    span = side * CROP / INNER  # input pixels covered by the 28 output pixels
    theta = torch.zeros(n, 2, 3, device=grey.device, dtype=torch.float32)
    theta[:, 0, 0] = span / w
    theta[:, 0, 2] = 2 * cx / w - 1
    theta[:, 1, 1] = span / h
    theta[:, 1, 2] = 2 * cy / h - 1
    grid = F.affine_grid(theta, [n, 1, 2 * CROP, 2 * CROP], align_corners=False)
    out = F.grid_sample(grey.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = F.avg_pool2d(out, 2)
    peak = out.detach().amax(dim=(1, 2, 3), keepdim=True).clamp(min=threshold)
    return (out / peak).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def _affine(x: Tensor, g: torch.Generator) -> Tensor:
    n = x.shape[0]
    rot = (torch.rand(n, generator=g) * 2 - 1) * math.radians(12)
    scale = 0.85 + torch.rand(n, generator=g) * 0.30
    shear = (torch.rand(n, generator=g) * 2 - 1) * 0.15
    cos, sin = torch.cos(rot) / scale, torch.sin(rot) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _thickness(x: Tensor, g: torch.Generator) -> Tensor:
    u = torch.rand(x.shape[0], 1, 1, 1, generator=g)
    thick = 0.5 * (x + F.max_pool2d(x, 3, 1, 1))
    thin = 0.5 * (x - F.max_pool2d(-x, 3, 1, 1))
    return torch.where(u < 0.25, thick, torch.where(u > 0.85, thin, x))


def _render_at(x: Tensor, heights: Tensor, jitter: Tensor | None) -> Tensor:
    """Resize each 28-px glyph so its ~20-px ink is ``heights`` px tall (bucketed), then normalise the crop."""
    out = torch.empty(x.shape[0], 1, CROP, CROP)
    for hgt in torch.unique(heights).tolist():
        idx = torch.nonzero(heights == hgt).flatten()
        size = max(4, int(round(CROP * hgt / INNER)))
        small = F.interpolate(x[idx], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[idx] = normalize_crops(small, jitter=None if jitter is None else jitter[idx])
    return out


def _pool(x: Tensor, variants: int, g: torch.Generator) -> Tensor:
    chunks = []
    for _ in range(variants):
        v = _thickness(x, g)
        v = _affine(v, g)
        v = v * (0.7 + 0.3 * torch.rand(x.shape[0], 1, 1, 1, generator=g))
        heights = torch.randint(8, 31, (x.shape[0],), generator=g)
        jitter = torch.cat([(torch.rand(x.shape[0], 2, generator=g) * 2 - 1) * 0.06,
                            torch.log(0.92 + torch.rand(x.shape[0], 1, generator=g) * 0.20)], dim=1)
        chunks.append(_render_at(v, heights, jitter))
    return torch.cat(chunks)


def _as_float(x: Any) -> Tensor:
    return torch.as_tensor(x.copy() if hasattr(x, "copy") else x).float().div(255.0).unsqueeze(1)


def evaluate_accuracy(net: DigitCNN, split: str = "test", heights: tuple[int, ...] = (10, 14, 20, 28)) -> float:
    """Accuracy on the ``split`` glyphs rendered at each ink height in ``heights`` (no augmentation), pooled."""
    gx, gy = glyphs(split)
    x, y = _as_float(gx), torch.as_tensor(gy.copy())
    correct = total = 0
    net.eval()
    with torch.no_grad():
        for hgt in heights:
            crops = _render_at(x, torch.full((len(y),), hgt), None)
            pred = torch.cat([net.logits(c).argmax(-1) for c in crops.split(500)])
            correct += int((pred == y).sum())
            total += len(y)
    return correct / total


def train_classifier(seed: int = 0, schedule: str = "full", *, log: Any = None) -> tuple[DigitCNN, dict[str, Any]]:
    """Train a :class:`DigitCNN` deterministically (module docstring); returns ``(net, record)``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} ({', '.join(SCHEDULES)})")
    cfg = SCHEDULES[schedule]
    t0 = time.perf_counter()
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)  # the weights must not depend on the machine's thread count
    try:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        gx, gy = glyphs("train")
        x, y = _as_float(gx), torch.as_tensor(gy.copy())
        with torch.no_grad():
            pool = _pool(x, cfg["variants"], g)
        labels = y.repeat(cfg["variants"])
        net = DigitCNN()
        net.train()
        batch = cfg["batch"]
        steps_per_epoch = math.ceil(len(labels) / batch)
        total = steps_per_epoch * cfg["epochs"]
        lr = cfg["lr_milli"] * 1e-3
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
        for epoch in range(cfg["epochs"]):
            order = torch.randperm(len(labels), generator=g)
            for i in range(steps_per_epoch):
                idx = order[i * batch:(i + 1) * batch]
                loss = F.cross_entropy(net(pool[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if log:
                log(f"digits classifier: epoch {epoch + 1}/{cfg['epochs']} loss {float(loss.detach()):.3f}")
        net.eval()
        acc = evaluate_accuracy(net, "test")
    finally:
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)
        torch.set_num_threads(threads)
    record = {"version": CLS_VERSION, "seed": seed, "schedule": schedule, **cfg, "heldout_accuracy": round(acc, 4),
              "train_glyphs": len(y), "seconds": round(time.perf_counter() - t0, 2),
              "params": sum(p.numel() for p in net.parameters())}
    return net, record


# --------------------------------------------------------------------------------------------------------------
# Cache and loading
# --------------------------------------------------------------------------------------------------------------


def _code_hash() -> str:
    from dmdr_cli.digits import world

    parts = [CLS_VERSION]
    for obj in (DigitCNN, foreground_boxes, normalize_crops, _affine, _thickness, _render_at, _pool, _as_float,
                train_classifier, world.glyphs):
        try:
            parts.append(inspect.getsource(obj))
        except (OSError, TypeError):  # no source (frozen install): the version string alone
            parts.append(getattr(obj, "__qualname__", repr(obj)))
    parts.append(json.dumps(SCHEDULES, sort_keys=True))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_key(seed: int = 0, schedule: str = "full") -> str:
    text = f"{_code_hash()}|data={data_fingerprint('mnist')}|seed={seed}|schedule={schedule}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_path(seed: int = 0, schedule: str = "full") -> Path:
    """``$DMDR_HOME/cache/digits-cls-<key>.safetensors`` of a seed and schedule."""
    from dmdr_cli.io import dmdr_home

    return dmdr_home() / "cache" / f"digits-cls-{cache_key(seed, schedule)}.safetensors"


def shipped_path() -> Path:
    """The classifier shipped with the package (``dmdr_cli/assets/digits-cls.safetensors``): the default
    (seed 0, ``full``) one, used while its recorded cache key matches this code and data."""
    return Path(__file__).resolve().parents[1] / "assets" / "digits-cls.safetensors"


def _shipped_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads((fh.metadata() or {}).get("dmdr", "{}")).get("key")
    except Exception:  # noqa: BLE001 - unreadable: train instead
        return None


def save_classifier(net: DigitCNN, record: dict[str, Any], path: str | Path) -> Path:
    from safetensors.torch import save

    from dmdr_cli.io import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return atomic_write_bytes(path, save(tensors, metadata={"dmdr": json.dumps(record)}))


_LOADED: dict[tuple[str, int, str], DigitClassifier] = {}
_LOCK = threading.Lock()


def _read(path: Path) -> DigitClassifier:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dmdr_cli.errors import CheckpointError

    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("dmdr", "{}"))
        net = DigitCNN()
        net.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - any unreadable or foreign file
        raise CheckpointError(f"{path} is not a digits classifier: {err}",
                              "delete it to retrain, or pass the right file") from None
    net.eval().requires_grad_(False)
    fp = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return DigitClassifier(net=net, path=path, fingerprint=fp, meta=meta)


def load_classifier(path: str | os.PathLike[str] | None = None, *, seed: int = 0, schedule: str = "full",
                    device: Any = "cpu", log: Any = None) -> DigitClassifier:
    """The digits classifier: from ``path`` when given, else from the cache (trained and cached on first use,
    about 20 s on one CPU core for ``schedule="full"``). Memoised per process, file and device; the network is
    frozen (``requires_grad=False``) and in eval mode, so share it read-only."""
    from dmdr_cli.errors import ModelNotFoundError

    with _LOCK:
        if path:
            file = Path(path).expanduser()
            if not file.is_file():
                raise ModelNotFoundError(f"digits classifier weights {file} do not exist",
                                         "leave the path empty to train/use the cached classifier")
        else:
            file = cache_path(seed, schedule)
            shipped = shipped_path()
            if not file.is_file() and _shipped_key(shipped) == cache_key(seed, schedule):
                file = shipped  # trained by exactly this code and data: no need to train again
            elif not file.is_file():
                net, record = train_classifier(seed, schedule, log=log)
                save_classifier(net, {**record, "key": cache_key(seed, schedule)}, file)
        st = file.stat()
        key = (str(file.resolve()), st.st_mtime_ns, str(device))
        if key not in _LOADED:
            _LOADED[key] = _read(file).to(device)
        return _LOADED[key]
