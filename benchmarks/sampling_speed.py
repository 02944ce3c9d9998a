"""Seconds per image of the teacher (N steps + CFG) vs the few-step student, measured in one run.

    .venv/bin/python benchmarks/sampling_speed.py [--base tiny-sd3] [--images 16] [--batch 4] [--set key=value ...]

Both samplers run on the same loaded base network, prompts and seeds, alternating batches so machine
load affects them equally; the first batch of each is warm-up. Writes
``benchmarks/results/sampling_speed-<base>-<device>.json`` with the ratio. Network calls per image:
teacher ``2 x teacher.steps`` (CFG doubles the batch), student ``student.steps``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny-sd3")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    from dmdr_cli.config.loader import resolve
    from dmdr_cli.engine.sampler import generate, student_spec, teacher_spec
    from dmdr_cli.families.loading import load_base

    cfg = resolve(args.base, [], args.sets)
    bundle = load_base(cfg)
    fam = bundle.family
    specs = {"teacher": teacher_spec(fam, cfg.teacher.steps, cfg.teacher.guidance),
             "student": student_spec(fam, cfg.student)}
    uncond = fam.encode_prompts(bundle, [""])
    prompts = ["a red circle", "a blue square above a green star", "two yellow rings", "a purple cross"]
    times = {k: [] for k in specs}
    for b in range(args.images // args.batch + 1):
        batch = [prompts[(b * args.batch + i) % len(prompts)] for i in range(args.batch)]
        seeds = list(range(b * args.batch, (b + 1) * args.batch))
        for name, spec in specs.items():
            t0 = time.perf_counter()
            generate(bundle, bundle.network, spec, batch, seeds, cfg.model.resolution, uncond)
            if b > 0:  # batch 0 is warm-up
                times[name].append((time.perf_counter() - t0) / args.batch)
    per_image = {k: sum(v) / len(v) for k, v in times.items()}
    result = {"base": args.base, "device": str(bundle.device), "resolution": cfg.model.resolution,
              "teacher": {"steps": cfg.teacher.steps, "guidance": cfg.teacher.guidance, "s_per_image": per_image["teacher"]},
              "student": {"steps": specs["student"].steps, "s_per_image": per_image["student"]},
              "speedup": per_image["teacher"] / per_image["student"], "images": args.images, "batch": args.batch}
    dest = Path(__file__).parent / "results" / f"sampling_speed-{args.base}-{bundle.device.type}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"teacher {cfg.teacher.steps} steps CFG {cfg.teacher.guidance:g}: {per_image['teacher']:.4f} s/image")
    print(f"student {specs['student'].steps} steps:            {per_image['student']:.4f} s/image")
    print(f"speed-up x{result['speedup']:.1f}  ->  {dest}")


if __name__ == "__main__":
    main()
