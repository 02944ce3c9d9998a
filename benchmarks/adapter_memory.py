"""Memory and speed of dmdr's one-base layout vs the official two-copy layout, measured in one run.

    .venv/bin/python benchmarks/adapter_memory.py [--size small|medium] [--steps 3] [--device cpu|cuda]

Scenarios (each in its own subprocess, so peak memory is clean):
- ``shared``   : dmdr: one frozen SD3 transformer carrying the ``gen`` and ``guide`` LoRAs (teacher, fake
                 score, real score and generator are roles of one network).
- ``two_copy`` : the official recipe's layout: the generator transformer with its LoRA plus a deep copy
                 of the backbone carrying the guide LoRA (ALGORITHM.md 2.1).

Each scenario runs the same DMDR work (backward simulation, critic update, generator update with DMD,
CFG real score) on random conditioning, and reports unique parameter bytes, peak memory (CUDA max
allocated, or process max RSS on CPU) and seconds per generator update. Results go to
``benchmarks/results/adapter_memory-<size>-<device>.json`` with the ratios two_copy / shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SIZES = {  # SD3Transformer2DModel configs (random weights): tiny-ish to SD3-Medium-like width
    "small": dict(num_layers=4, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=256,
                  caption_projection_dim=128, pooled_projection_dim=128, sample_size=32),
    "medium": dict(num_layers=8, attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                   caption_projection_dim=512, pooled_projection_dim=256, sample_size=64),
    "sd3m": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                 caption_projection_dim=1536, pooled_projection_dim=2048, sample_size=64),
}


class TwoCopyRoles:
    """The official layout: a generator network with the gen LoRA and a separate guidance copy with the guide LoRA."""

    def __init__(self, base, targets, fake_scale=2.0):
        from dmdr_cli.engine.networks import adapter_params, lora_config

        self.guidance = copy.deepcopy(base)
        self.gen_net = base
        base.requires_grad_(False)
        self.guidance.requires_grad_(False)
        base.add_adapter(lora_config(64, 128, targets), adapter_name="gen")
        self.guidance.add_adapter(lora_config(32, 32, targets), adapter_name="guide")
        self._gen = adapter_params(base, "gen")
        self._guide = adapter_params(self.guidance, "guide")
        self.fake_scale = fake_scale

    def gen_parameters(self):
        return self._gen

    def guide_parameters(self):
        return self._guide

    def trainable(self):
        return list(self._gen.values()) + list(self._guide.values())

    def activate(self, name, scale=None):
        for p in self.trainable():
            p.requires_grad_(True)
        if name == "gen":
            self.gen_net.set_adapters(["gen"], weights=[1.0])
            return self.gen_net
        lam = self.fake_scale if name == "fake" else float(scale or 0.0)
        if lam == 0.0:
            self.guidance.disable_adapters()
        else:
            self.guidance.enable_adapters()
            self.guidance.set_adapters(["guide"], weights=[lam])
        return self.guidance

    @contextmanager
    def role(self, name, scale=None):
        yield self.activate(name, scale)


def run_scenario(layout: str, size: str, steps: int, device: str, batch: int) -> dict:
    import torch
    import warnings

    from diffusers import SD3Transformer2DModel

    from dmdr_cli.engine.dmdr import DMDSettings, critic_loss, generator_loss, select_generator_input, simulate
    from dmdr_cli.engine.networks import Roles, unique_storage_bytes
    from dmdr_cli.engine.sampler import SamplerSpec
    from dmdr_cli.families.base import Cond
    from dmdr_cli.families.sd3 import LORA_TARGETS, SD3Family

    warnings.simplefilter("ignore")
    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = dict(SIZES[size])
    s = cfg.pop("sample_size")
    net = SD3Transformer2DModel(sample_size=s, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=s,
                                **cfg).to(dev).eval()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    net.to(dtype)
    base_bytes = unique_storage_bytes([net])
    if layout == "shared":
        roles = Roles(net, targets=LORA_TARGETS, gen_rank=64, gen_alpha=128, guide_rank=32, guide_alpha=32)
        modules = [net]
    else:
        roles = TwoCopyRoles(net, LORA_TARGETS)
        modules = [net, roles.guidance]
    param_bytes = unique_storage_bytes(modules)
    fam = SD3Family(shift=3.0)
    spec = SamplerSpec((1.0, 0.9001, 0.7504, 0.501), 0.001, "ode")
    shape = (16, s, s)
    cond = Cond({"encoder_hidden_states": torch.randn(batch, 77, cfg["joint_attention_dim"], device=dev, dtype=dtype),
                 "pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], device=dev, dtype=dtype)})
    uncond = cond.index(slice(0, 1))
    gen = torch.Generator().manual_seed(0)
    opt_g = torch.optim.AdamW(list(roles.gen_parameters().values()), lr=1e-5)
    opt_c = torch.optim.AdamW(list(roles.guide_parameters().values()), lr=1e-5)
    settings = DMDSettings(ttur=1, real_cfg=7.0, dynamic_steps=100)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for k in range(steps + 1):  # the first update is warm-up
        t0 = time.perf_counter()
        x0s = simulate(roles, fam, spec, cond, shape, gen, dev, dtype)
        x_c, x_in, t_g, _ = select_generator_input(fam, spec, x0s, gen)
        lc, _ = critic_loss(roles, fam, settings, x_c, cond, k, gen)
        lc.backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        lg, _ = generator_loss(roles, fam, settings, x_in, t_g, cond, uncond, k, gen)
        lg.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    from dmdr_cli.engine.trainer import peak_memory_mb

    return {"layout": layout, "size": size, "device": str(dev), "dtype": str(dtype), "batch": batch,
            "base_params_M": base_bytes / (2 if dtype == torch.bfloat16 else 4) / 1e6,
            "base_param_mb": base_bytes / 2**20, "unique_param_mb": param_bytes / 2**20,
            "peak_mb": peak_memory_mb(dev), "s_per_update": sum(times[1:]) / max(len(times) - 1, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scenario", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scenario:
        print(json.dumps(run_scenario(args.scenario, args.size, args.steps, args.device, args.batch)))
        return
    rows = []
    for layout in ("shared", "two_copy"):
        out = subprocess.run([sys.executable, __file__, "--scenario", layout, "--size", args.size, "--steps",
                              str(args.steps), "--device", args.device, "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    shared, two = rows
    result = {"rows": rows, "ratios_two_copy_over_shared": {
        k: two[k] / shared[k] for k in ("unique_param_mb", "peak_mb", "s_per_update")}}
    dest = Path(__file__).parent / "results" / f"adapter_memory-{args.size}-{args.device}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['layout']:>9}: params {r['unique_param_mb']:8.1f} MB  peak {r['peak_mb']:8.1f} MB  "
              f"{r['s_per_update']:.3f} s/update  ({r['device']}, {r['dtype']}, batch {r['batch']})")
    print("two_copy / shared: " + ", ".join(f"{k} x{v:.2f}" for k, v in result["ratios_two_copy_over_shared"].items()))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
