"""``dmdr sample``: generate images with the teacher or a few-step sampler.

Steps:
1. Resolve the model: the config's base model, or ``--ckpt`` (a diffusers folder, or a dmdr run directory).
2. Pick the sampler: no ``--steps`` -> the teacher (``teacher.steps`` with CFG ``teacher.guidance``);
   ``--steps N`` -> the training-consistent N-step sampler of ALGORITHM.md 5.2 (student grid, no CFG
   unless ``--guidance``).
3. Generate in batches; image ``j`` of every prompt uses seed ``seed + j``, so the same prompt and seed
   give the same image whatever the batch.
4. Write ``NNNNN.png``, ``metadata.jsonl`` (prompt, seed, steps, guidance, sampler, grid, model),
   ``config.yaml`` and optionally ``grid.png`` into ``--out``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dmdr_cli.config.loader import save_resolved
from dmdr_cli.io import atomic_write_text


@dataclass
class SampleRequest:
    prompts: list[str]
    out_dir: Path
    n: int = 1
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    grid: bool = False
    batch_size: int = 4


def plan(prompts: list[str], n: int, seed: int) -> list[tuple[int, str, int]]:
    """(index, prompt, seed) for every image, prompt-major."""
    jobs = []
    for p in prompts:
        for j in range(n):
            jobs.append((len(jobs), p, seed + j))
    return jobs


def run(cfg, req: SampleRequest, on_progress: Callable[[int, int], None] | None = None) -> dict:
    from dmdr_cli.engine.images import make_grid, save_png, to_pil
    from dmdr_cli.engine.sampler import generate, student_spec, teacher_spec
    from dmdr_cli.families.loading import load_base

    bundle = load_base(cfg)
    family = bundle.family
    if req.steps is None:
        spec = teacher_spec(family, cfg.teacher.steps, cfg.teacher.guidance if req.guidance is None else req.guidance)
        kind = "teacher"
    else:
        spec = student_spec(family, cfg.student, req.steps, 1.0 if req.guidance is None else req.guidance)
        kind = "student"
    uncond = family.encode_prompts(bundle, [""]) if spec.guidance > 1.0 else None
    req.out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan(req.prompts, req.n, req.seed)
    records, pil = [], []
    t0 = time.perf_counter()
    for start in range(0, len(jobs), req.batch_size):
        chunk = jobs[start:start + req.batch_size]
        images = generate(bundle, bundle.network, spec, [p for _, p, _ in chunk], [s for _, _, s in chunk],
                          cfg.model.resolution, uncond)
        for (idx, prompt, seed), img in zip(chunk, images):
            name = f"{idx:05d}.png"
            im = to_pil(img)
            save_png(im, req.out_dir / name)
            pil.append(im)
            records.append({"file": name, "prompt": prompt, "seed": seed, "steps": spec.steps,
                            "guidance": spec.guidance, "sampler": kind, "mode": spec.mode,
                            "grid": [round(t, 6) for t in spec.grid], "model": bundle.source, "family": family.name,
                            "resolution": cfg.model.resolution})
        if on_progress:
            on_progress(len(records), len(jobs))
    seconds = time.perf_counter() - t0
    atomic_write_text(req.out_dir / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    save_resolved(cfg, req.out_dir)
    if req.grid:
        save_png(make_grid(pil, cols=req.n if len(req.prompts) > 1 else None), req.out_dir / "grid.png")
    return {"images": len(records), "out_dir": str(req.out_dir), "sampler": kind, "steps": spec.steps,
            "guidance": spec.guidance, "seconds": seconds, "seconds_per_image": seconds / max(len(records), 1)}
