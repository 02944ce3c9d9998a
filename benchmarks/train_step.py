"""Seconds per generator step of dmdr's training loop vs the library-path loop it replaced, measured in one run.

    .venv/bin/python benchmarks/train_step.py [--base tiny-sd3] [--steps 10] [--set key=value ...]

One loaded base, one set of adapters, one trainer; the two variants alternate one generator step (``ttur`` inner
steps) at a time, so machine load affects them equally; the first step of each is warm-up.

- ``library``: roles switched through diffusers' ``enable_adapters``/``disable_adapters``/``set_adapters`` (plus
  the ``requires_grad`` repair they need), the whole SDE backward simulation for every sample, one simulation
  per inner step, every prompt batch encoded by the text encoders;
- ``dmdr``: the direct LoRA-layer switch, the simulation stopped at the ``X0[i]`` each sample uses, one batched
  simulation for all inner steps that see the same generator weights (``distill.group_simulation``), one
  encoding per distinct training prompt (``engine.sampler.PromptEncodings``).

Both do the same maths (tests/unit: ``test_fast_switch_sets_the_library_state_and_outputs``,
``test_truncated_sde_simulation_equals_the_full_one``, ``test_encode_unique_and_prompt_encodings_...``,
``test_simulation_groups_follow_the_generator_updates``; the grouped simulation draws the same distribution with
its random numbers in another order). Writes
``benchmarks/results/train_step-<base>-<device>.json`` with the ratio library / dmdr.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="tiny-sd3")
    ap.add_argument("--steps", type=int, default=10, help="timed generator steps per variant (after 1 warm-up)")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    import torch

    from dmdr_cli.config.loader import resolve
    from dmdr_cli.engine import trainer as trainer_mod
    from dmdr_cli.engine.dmdr import select_generator_input, simulate, simulate_and_select
    from dmdr_cli.engine.metrics import NullSink
    from dmdr_cli.engine.networks import GEN, GUIDE, REF
    from dmdr_cli.engine.prompts import PromptStream
    from dmdr_cli.engine.runtime import quiet_libraries
    from dmdr_cli.engine.sampler import student_spec
    from dmdr_cli.engine.trainer import Trainer, TrainPlan
    from dmdr_cli.families.loading import load_base
    from dmdr_cli.recipes.distill import build_roles, dmd_settings, make_accelerator, prompt_source

    quiet_libraries()
    cfg = resolve(args.base, sets=args.sets)
    accel = make_accelerator(cfg)
    bundle = load_base(cfg, device=accel.device)
    roles = build_roles(bundle, cfg)
    spec = student_spec(bundle.family, cfg.student)
    d = cfg.distill
    tmp = Path(tempfile.mkdtemp(prefix="dmdr-bench-"))
    plan = TrainPlan(run_dir=tmp, stage="distill", max_steps=10 ** 6, lr_gen=d.lr, lr_guide=d.lr_guide,
                     seed=cfg.runtime.seed, resolution=cfg.model.resolution, dmd=dmd_settings(cfg),
                     checkpoint_every=10 ** 6, sample_every=0, sde_input=cfg.student.sde_input)
    stream = PromptStream(prompt_source(cfg, ""), d.batch_size, cfg.runtime.seed)
    tr = Trainer(bundle, roles, spec, plan, stream, NullSink(), accel, sample_prompts=[])
    fast_switch, fast_encode = roles._switch, tr.encode
    net = bundle.network

    def library_switch(adapter, weight=1.0):
        if adapter is None:
            net.disable_adapters()
        else:
            net.enable_adapters()
            net.set_adapters([adapter], weights=[weight])
        for p in roles.trainable():
            p.requires_grad_(True)
        for p in roles._ref.values():
            p.requires_grad_(False)

    def full_simulation(roles_, family, spec_, cond, shape, gen, device, dtype, sde_input="official"):
        x0s = simulate(roles_, family, spec_, cond, shape, gen, device, dtype)
        return select_generator_input(family, spec_, x0s, gen, sde_input)

    def use(variant: str) -> None:
        library = variant == "library"
        roles._switch = library_switch if library else fast_switch
        tr.plan.group_simulation = not library
        tr.encode = (lambda p: bundle.family.encode_prompts(bundle, p)) if library else fast_encode
        trainer_mod.simulate_and_select = full_simulation if library else simulate_and_select
        roles._apply(roles.state, force=True)

    def generator_step() -> float:
        t0 = time.perf_counter()
        while tr.inner_step() is None:
            pass
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"library": [], "dmdr": []}
    for _ in range(args.steps + 1):
        for variant in times:
            use(variant)
            times[variant].append(generator_step())
    per_step = {v: sum(ts[1:]) / len(ts[1:]) for v, ts in times.items()}
    result = {"base": args.base, "device": str(bundle.device), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "ttur": d.ttur, "batch_size": d.batch_size,
              "simulation": cfg.student.simulation, "steps_timed": args.steps,
              "seconds_per_generator_step": per_step, "ratio_library_over_dmdr": per_step["library"] / per_step["dmdr"],
              "adapters": [GEN, GUIDE] + ([REF] if roles._ref else [])}
    out = Path(__file__).parent / "results" / f"train_step-{args.base}-{bundle.device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
