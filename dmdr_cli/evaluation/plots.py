"""Line charts as PNG with Pillow only (no plotting dependency): training curves and ablation curves.

``line_chart({"vanilla": [(0, 0.1), (50, 0.3)], "both": [...]}, path, title=..., xlabel=..., ylabel=...)``
draws one polyline with point markers per series, axes with 5 ticks each, and a legend.
"""

from __future__ import annotations

import math
from pathlib import Path

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / (n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    v = math.floor(lo / step) * step
    out = [round(v, 10)]
    while out[-1] < hi - 1e-9 * step:
        v += step
        out.append(round(v, 10))
    return out if len(out) > 1 else out + [round(v + step, 10)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart(series: dict[str, list[tuple[float, float]]], path: str | Path, *, title: str = "",
               xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (640, 400)) -> Path:
    """Write a PNG line chart of ``series`` (name -> [(x, y), ...]); non-finite points are skipped."""
    from PIL import Image, ImageDraw, ImageFont

    from dmdr_cli.io import atomic_write_bytes

    pts = {k: [(float(x), float(y)) for x, y in v if math.isfinite(x) and math.isfinite(y)] for k, v in series.items()}
    xs = [x for v in pts.values() for x, _ in v] or [0.0, 1.0]
    ys = [y for v in pts.values() for _, y in v] or [0.0, 1.0]
    xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    w, h = size
    left, right, top, bottom = 64, 150, 34, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0 or 1) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0 or 1) * (h - top - bottom))

    for t in xt:
        a, _ = px(t, y0)
        d.line([(a, top), (a, h - bottom)], fill="#eeeeee")
        d.text((a - 10, h - bottom + 6), _fmt(t), fill="black", font=font)
    for t in yt:
        _, b = px(x0, t)
        d.line([(left, b), (w - right, b)], fill="#eeeeee")
        d.text((4, b - 6), _fmt(t), fill="black", font=font)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i, (name, v) in enumerate(pts.items()):
        color = COLORS[i % len(COLORS)]
        line = [px(x, y) for x, y in sorted(v)]
        if len(line) > 1:
            d.line(line, fill=color, width=2)
        if len(line) <= 40:
            for a, b in line:
                d.ellipse([a - 3, b - 3, a + 3, b + 3], fill=color)
        ly = top + 4 + 16 * i
        d.line([(w - right + 10, ly + 6), (w - right + 30, ly + 6)], fill=color, width=3)
        d.text((w - right + 36, ly), name[:18], fill="black", font=font)
    d.text((left, 8), title + (f"   ({ylabel})" if ylabel else ""), fill="black", font=font)
    d.text(((w - right + left) / 2 - 3 * len(xlabel), h - 18), xlabel, fill="black", font=font)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(Path(path), buf.getvalue())


def training_curves(run_dir: str | Path) -> list[Path]:
    """``curves-losses.png`` (DMD, fake-score and RL losses) and, when rewards were logged, ``curves-rewards.png``
    of a run directory, from its ``metrics.jsonl`` (one point per generator step; stage-2 runs include the
    stage-1 history only through their parent run)."""
    from dmdr_cli.engine.metrics import read_metrics

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return []

    def collect(keys: list[str]) -> dict[str, list[tuple[float, float]]]:
        out = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and "step" in r] for k in keys}
        return {k: v for k, v in out.items() if any(y != 0 for _, y in v)}  # stage 1 logs loss/rl = 0

    written = []
    losses = collect(["loss/dmd", "loss/fake", "loss/rl"])
    if losses:
        written.append(line_chart(losses, run_dir / "curves-losses.png", title=f"{run_dir.name}: losses",
                                  xlabel="generator step", ylabel="loss"))
    rewards = collect(sorted({k for r in rows for k in r if k.startswith("reward/")}))
    if rewards:
        written.append(line_chart(rewards, run_dir / "curves-rewards.png", title=f"{run_dir.name}: rewards",
                                  xlabel="generator step", ylabel="reward"))
    return written
