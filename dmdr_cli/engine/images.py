"""Image helpers: tensors to PNG bytes, labelled grids. Writes go through ``dmdr_cli.io`` (atomic)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from dmdr_cli.io import atomic_write_bytes


def to_pil(img) -> Image.Image:
    """``3 x H x W`` float tensor/array in [0, 1] -> 8-bit RGB image (round half up, like torchvision)."""
    arr = img.detach().float().cpu().numpy() if hasattr(img, "detach") else np.asarray(img, dtype=np.float32)
    arr = np.clip(arr.transpose(1, 2, 0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def save_png(img, path: str | Path) -> Path:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else to_pil(img)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (all the same size) into a grid with ``pad`` pixels of white between them."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
