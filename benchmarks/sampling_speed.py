"""Seconds per image of the teacher (N steps + CFG) vs the few-step student, measured in one run.

    .venv/bin/python benchmarks/sampling_speed.py [--base tiny-sd3] [--images 16] [--batch 4 [16 48 ...]] [--set key=value ...]

Both samplers run on the same loaded base network, prompts and seeds, alternating batches so machine
load affects them equally; the first batch of each is warm-up. Several ``--batch`` values sweep the
images per call (both samplers get the same batch); the ratio is reported per batch size and for each
sampler at its own fastest batch. Writes ``benchmarks/results/sampling_speed-<base>-<device>.json``.
Network calls per image: teacher ``2 x teacher.steps`` (CFG doubles the batch), student ``student.steps``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny-sd3")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[4])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    from dmdr_cli.config.loader import resolve
    from dmdr_cli.engine.sampler import student_spec, teacher_spec
    from dmdr_cli.families.loading import load_base

    cfg = resolve(args.base, [], args.sets)
    bundle = load_base(cfg)
    fam = bundle.family
    specs = {"teacher": teacher_spec(fam, cfg.teacher.steps, cfg.teacher.guidance),
             "student": student_spec(fam, cfg.student)}
    uncond = fam.encode_prompts(bundle, [""])
    prompts = ["a photo of a red 7", "a photo of two 5s", "a photo of a 2 left of an 8", "a photo of a 3"]
    rows = [dict(batch=bs, **measure(bundle, specs, prompts, uncond, cfg.model.resolution, args.images, bs))
            for bs in args.batch]
    for r in rows:
        r["speedup"] = r["teacher"] / r["student"]
    best = {k: min(rows, key=lambda r: r[k]) for k in specs}
    result = {"base": args.base, "device": str(bundle.device), "resolution": cfg.model.resolution,
              "teacher": {"steps": cfg.teacher.steps, "guidance": cfg.teacher.guidance},
              "student": {"steps": specs["student"].steps}, "images": args.images, "per_batch": rows,
              "best": {k: {"batch": r["batch"], "s_per_image": r[k]} for k, r in best.items()},
              "speedup_at_best": best["teacher"]["teacher"] / best["student"]["student"]}
    dest = Path(__file__).parent / "results" / f"sampling_speed-{args.base}-{bundle.device.type}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"teacher {cfg.teacher.steps} steps CFG {cfg.teacher.guidance:g} vs student {specs['student'].steps} steps, s/image:")
    for r in rows:
        print(f"  batch {r['batch']:4d}: teacher {r['teacher']:.4f}  student {r['student']:.4f}  speed-up x{r['speedup']:.1f}")
    print(f"each at its fastest batch ({best['teacher']['batch']} / {best['student']['batch']}): "
          f"speed-up x{result['speedup_at_best']:.1f}  ->  {dest}")


def measure(bundle, specs, prompts, uncond, resolution, images, batch_size) -> dict:
    """Mean seconds per image of each spec over ``images`` images in batches of ``batch_size`` (after one warm-up
    batch), the specs alternating batch by batch."""
    import time

    from dmdr_cli.engine.sampler import generate

    times = {k: [] for k in specs}
    for b in range(max(images // batch_size, 1) + 1):
        batch = [prompts[(b * batch_size + i) % len(prompts)] for i in range(batch_size)]
        seeds = list(range(b * batch_size, (b + 1) * batch_size))
        for name, spec in specs.items():
            t0 = time.perf_counter()
            generate(bundle, bundle.network, spec, batch, seeds, resolution, uncond)
            if b > 0:  # batch 0 is warm-up
                times[name].append((time.perf_counter() - t0) / batch_size)
    return {k: sum(v) / len(v) for k, v in times.items()}


if __name__ == "__main__":
    main()
