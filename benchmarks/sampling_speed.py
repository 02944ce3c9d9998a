"""Seconds per image of the teacher (N steps + CFG) vs the few-step student, measured in one run.

    .venv/bin/python benchmarks/sampling_speed.py [--base tiny-sd3] [--images 16] [--batch 4 [16 48 ...]] [--set key=value ...]

Both samplers run on the same loaded base network, prompts and seeds, alternating batches so machine
load affects them equally; the first batch of each is warm-up. Several ``--batch`` values sweep the
images per call (both samplers get the same batch); the ratio is reported per batch size and for each
sampler at its own fastest batch. Images are decoded as ``model.decode_dtype`` says (``tiny-sd3``: ``auto``, bf16
autocast on a CPU with AMX / AVX512-BF16); the VAE decode alone is also timed in fp32 and under bf16 autocast,
interleaved, on the same latents, with the largest pixel difference between the two.
Writes ``benchmarks/results/sampling_speed-<base>-<device>.json``.
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
    decode = measure_decode(bundle, cfg.model.resolution, max(args.batch))
    result = {"base": args.base, "device": str(bundle.device), "cpu": cpu_name(), "resolution": cfg.model.resolution,
              "decode_dtype": cfg.model.decode_dtype, "decode_autocast": str(bundle.decode_autocast), "decode": decode,
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
    print(f"VAE decode alone, batch {decode['batch']}: fp32 {decode['fp32_ms']:.3f} ms/image, bf16 autocast "
          f"{decode['bf16_ms']:.3f} ms/image (x{decode['ratio']:.2f}), largest pixel difference {decode['max_abs_diff']:.4f}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def measure_decode(bundle, resolution, batch_size, rounds: int = 5) -> dict:
    """Milliseconds per image of the VAE decode in the VAE's dtype vs under bf16 autocast, alternating call by call on
    the same latents (the first call of each is warm-up), and the largest difference of their images in [0, 1]."""
    import statistics
    import time

    import torch

    from dmdr_cli.engine.sampler import decode_latents

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((batch_size, *bundle.family.latent_shape(bundle, resolution)), generator=gen).to(bundle.device)
    modes = {"fp32": None, "bf16": torch.bfloat16}
    times, images = {k: [] for k in modes}, {}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, dtype in modes.items():
                t0 = time.perf_counter()
                images[name] = decode_latents(bundle, latents, dtype)
                if r > 0:
                    times[name].append((time.perf_counter() - t0) / batch_size * 1e3)
    fp32, bf16 = (statistics.median(times[k]) for k in modes)
    return {"batch": batch_size, "fp32_ms": fp32, "bf16_ms": bf16, "ratio": fp32 / bf16,
            "max_abs_diff": float((images["fp32"] - images["bf16"]).abs().max())}


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
