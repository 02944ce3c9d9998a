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
from contextlib import nullcontext
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
    student_ckpt: Path | None = None   # a dmdr checkpoint folder: sample its student (gen adapter)


def plan(prompts: list[str], n: int, seed: int) -> list[tuple[int, str, int]]:
    """(index, prompt, seed) for every image, prompt-major."""
    jobs = []
    for p in prompts:
        for j in range(n):
            jobs.append((len(jobs), p, seed + j))
    return jobs


def run(cfg, req: SampleRequest, on_progress: Callable[[int, int], None] | None = None) -> dict:
    from dmdr_cli.engine.images import save_png
    from dmdr_cli.engine.sampler import generate, student_spec, teacher_spec
    from dmdr_cli.families.loading import load_base

    guidance = req.guidance
    if req.student_ckpt is not None:  # a trained student: its own grid, no CFG unless asked
        from dmdr_cli.engine.student import load_student_for_inference, uses_ema

        bundle, student_net = load_student_for_inference(cfg, req.student_ckpt)
        net_ctx = nullcontext(student_net)
        spec = student_spec(bundle.family, cfg.student, req.steps or cfg.student.steps, guidance or 1.0)
        kind = f"student@{req.student_ckpt.name}" + (":ema" if uses_ema(cfg, req.student_ckpt) else "")
    else:
        bundle = load_base(cfg)
        net_ctx = nullcontext(None)
        if req.steps is None:  # the teacher's own multi-step sampler with CFG
            spec = teacher_spec(bundle.family, cfg.teacher.steps, cfg.teacher.guidance if guidance is None else guidance,
                                cfg.teacher.guidance_t_min)
            kind = "teacher"
        else:  # the training-consistent few-step sampler on the base weights
            spec = student_spec(bundle.family, cfg.student, req.steps, guidance or 1.0)
            kind = "few-step"
    family = bundle.family
    uncond = family.encode_prompts(bundle, [""]) if spec.guidance > 1.0 else None
    req.out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan(req.prompts, req.n, req.seed)
    records, pil = [], []
    t0 = time.perf_counter()
    with net_ctx as role_net:
        net = role_net if role_net is not None else bundle.network
        for start in range(0, len(jobs), req.batch_size):
            chunk = jobs[start:start + req.batch_size]
            images = generate(bundle, net, spec, [p for _, p, _ in chunk], [s for _, _, s in chunk],
                              cfg.model.resolution, uncond)
            _write(chunk, images, spec, kind, bundle, cfg, req, records, pil)
            if on_progress:
                on_progress(len(records), len(jobs))
    seconds = time.perf_counter() - t0
    atomic_write_text(req.out_dir / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    save_resolved(cfg, req.out_dir)
    if req.grid:
        from dmdr_cli.engine.images import make_grid

        save_png(make_grid(pil, cols=req.n if len(req.prompts) > 1 else None), req.out_dir / "grid.png")
    return {"images": len(records), "out_dir": str(req.out_dir), "sampler": kind, "steps": spec.steps,
            "guidance": spec.guidance, "seconds": seconds, "seconds_per_image": seconds / max(len(records), 1)}


def _write(chunk, images, spec, kind, bundle, cfg, req: SampleRequest, records: list, pil: list) -> None:
    """Save one batch of images and append their metadata records."""
    from dmdr_cli.engine.images import save_png, to_pil

    for (idx, prompt, seed), img in zip(chunk, images):
        name = f"{idx:05d}.png"
        im = to_pil(img)
        save_png(im, req.out_dir / name)
        pil.append(im)
        records.append({"file": name, "prompt": prompt, "seed": seed, "steps": spec.steps,
                        "guidance": spec.guidance, "guidance_t_min": spec.guidance_t_min, "sampler": kind,
                        "mode": spec.mode,
                        "grid": [round(t, 6) for t in spec.grid], "model": bundle.source, "family": bundle.family.name,
                        "resolution": cfg.model.resolution})
