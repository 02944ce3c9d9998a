"""``report.md`` for an evaluation: one side-by-side table per benchmark and sample grids, readable without the
terminal. Images are referenced relative to the report so the folder can be zipped or browsed on GitHub."""

from __future__ import annotations

import math
from pathlib import Path

from dmdr_cli.io import atomic_write_text

def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _names(results: dict) -> list[str]:
    """Teacher first, the student last, other models (``--compare RUN``) in between in their given order."""
    rank = {"teacher": 0, "student": 2, "images": 3}
    return sorted(results, key=lambda n: rank.get(n, 1))


def metric_rows(bench: str, results: dict) -> tuple[list[str], dict[str, dict[str, object]]]:
    """Columns and per-model values of the main table."""
    cols: list[str] = []
    values: dict[str, dict[str, object]] = {}
    for name in _names(results):
        r = results[name]
        v: dict[str, object] = {}
        if bench == "geneval":
            v["GenEval overall"] = r.get("overall")
            for tag, t in r.get("tasks", {}).items():
                v[tag] = t.get("accuracy")
            v["% correct images"] = r.get("% correct images")
            v["detector"] = r.get("detector")
        elif bench == "rewards":
            for metric, m in r.get("metrics", {}).items():
                v[f"{metric}" + (f" x{m['scale']:g}" if m.get("scale", 1) != 1 else "")] = m.get("mean")
        elif bench in ("fid", "kid"):
            for key in ("fid", "kid_mean", "kid_std", "isc_mean", "precision", "recall"):
                if key in r:
                    v[key] = r[key]
            v["features"] = r.get("feature_extractor")
        elif bench == "digits":
            ge = r.get("geneval", {})
            v["GenEval-digits"] = ge.get("overall")
            for tag, t in ge.get("tasks", {}).items():
                v[tag] = t.get("accuracy")
            v["digits-FID"] = r.get("fid")
            v["digit-cls reward"] = r.get("reward")
        elif bench == "dpg":
            v["DPG score"] = r.get("dpg_score")
            v["images"] = r.get("n_images")
            v["vqa"] = r.get("vqa_backend")
        values[name] = v
        cols += [c for c in v if c not in cols]
    return cols, values


def compare_grid(samples: dict, out: Path) -> Path | None:
    """Rows = prompts, columns = models (teacher | student), same prompt and seed in each row."""
    from PIL import Image

    names = [n for n in _names(samples) if not n.startswith("_")]
    if not names:
        return None
    n_rows = min(len(samples[n]) for n in names)
    if n_rows == 0:
        return None
    tiles = [[Image.open(samples[n][i]).convert("RGB") for n in names] for i in range(n_rows)]
    w, h = tiles[0][0].size
    if w < 96:  # tiny canvases (digits world: 32 px) are upscaled without smoothing so they stay readable
        k = -(-96 // w)
        tiles = [[im.resize((w * k, h * k), Image.NEAREST) for im in row] for row in tiles]
        w, h = w * k, h * k
    pad = 4
    grid = Image.new("RGB", (len(names) * (w + pad) + pad, n_rows * (h + pad) + pad), "white")
    for r, row in enumerate(tiles):
        for c, im in enumerate(row):
            grid.paste(im.resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    path = out / "compare.png"
    grid.save(path)
    return path


def write(out: Path, data: dict, samples: dict) -> Path:
    bench, results, models = data["bench"], data["results"], data.get("models", {})
    cols, values = metric_rows(bench, results)
    lines = [f"# dmdr eval: {bench}", ""]
    header = ["model"] + cols + ["steps", "guidance", "s / image"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in _names(results):
        m = models.get(name, {})
        label = m.get("label", name)
        row = [label] + [fmt(values[name].get(c)) for c in cols]
        row += [fmt(m.get("steps")), fmt(m.get("guidance")), fmt(m.get("seconds_per_image"), 3)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, x in data.get("speedups", {}).items():
        label = models.get(name, {}).get("label", name)
        decode = models.get(name, {}).get("decode")
        lines += [f"**Speed-up of {label} over the teacher: {x:.1f}x** (wall-clock per image incl. text encoding "
                  f"and VAE decoding{f' in {decode}' if decode else ''}, {_timing_note(data)}, same prompts, seeds "
                  "and machine).", ""]
    canon = [r.get("canonical") for r in results.values() if isinstance(r, dict)]
    if canon and not all(canon):
        lines += ["Numbers marked non-canonical (offline backends, tiny or substitute models) are dmdr-internal "
                  "checks, not comparable with published tables.", ""]
    grid = compare_grid(samples, out)
    if grid is not None:
        names = [models.get(n, {}).get("label", n) for n in _names(samples) if not n.startswith("_")]
        lines += ["## Samples (same prompt and seed per row)", "", f"Columns: {' | '.join(names)}", "",
                  f"![comparison]({grid.name})", ""]
        for i, p in enumerate(samples.get("_prompts", [])):
            lines.append(f"{i + 1}. {p}")
        lines.append("")
    v = data.get("versions", {})
    lines += ["## Environment", "", ", ".join(f"{k} {val}" for k, val in v.items() if val), "",
              "All numbers, options and the resolved config are in `eval.json`; per-image results in "
              "`<model>/results.jsonl`.", ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


def _timing_note(data: dict) -> str:
    how = data.get("timing", {})
    if how.get("mode") == "interleaved":
        return (f"median of {how['rounds']} calls of the first {how['images']} images per model, the models taking turns "
                "after generation")
    return f"median over batches of {how.get('images')}, the first left out as warm-up"
