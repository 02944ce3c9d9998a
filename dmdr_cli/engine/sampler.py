"""Family-agnostic samplers (ALGORITHM.md 3.2 and 5.2).

One loop serves the multi-step teacher (ODE, CFG, ends at t = 0) and the few-step student
(training-consistent grid, no CFG, ODE or SDE, ends at ``x0_end``), and doubles as the training-time
backward simulation, which needs the per-step clean estimates ``X0[i]``.

Noise is drawn per sample from per-sample generators, so an image depends only on its own seed,
never on the batch it was generated in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dmdr_cli.families.base import Cond, predict_cfg
from dmdr_cli.losses.dmd import interval_cfg


@dataclass(frozen=True)
class SamplerSpec:
    """What to run: a time grid (model input times, ``t = 1`` is noise), its end point and mode."""

    grid: tuple[float, ...]
    t_end: float
    mode: str = "ode"            # "ode" | "sde"
    guidance: float = 1.0        # CFG scale; <= 1 means a single conditional pass
    pure_noise_first: bool = False
    guidance_t_min: float = 0.0  # guidance interval: CFG only at steps with t >= this (0: every step)

    @property
    def steps(self) -> int:
        return len(self.grid)


def teacher_spec(family, steps: int, guidance: float, guidance_t_min: float = 0.0) -> SamplerSpec:
    """The base model's own multi-step ODE sampler with CFG (only at ``t >= guidance_t_min``)."""
    return SamplerSpec(tuple(family.teacher_grid(steps)), 0.0, "ode", guidance, guidance_t_min=guidance_t_min)


def student_spec(family, student_cfg, steps: int | None = None, guidance: float = 1.0) -> SamplerSpec:
    """The training-consistent few-step sampler of a student config (grid, end point, simulation mode)."""
    steps = steps or student_cfg.steps
    explicit = student_cfg.grid if len(student_cfg.grid) == steps else []
    grid = family.student_grid(steps, explicit, student_cfg.grid_dtype)
    return SamplerSpec(tuple(grid), family.student_end(), student_cfg.simulation, guidance, student_cfg.pure_noise_first)


def per_sample_noise(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """``B x shape`` standard normal noise, row ``b`` drawn from ``generators[b]`` on the CPU."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def run_sampler(family, net, spec: SamplerSpec, cond: Cond, uncond: Cond | None, noise: torch.Tensor,
                generators: list[torch.Generator] | None = None, return_x0s: bool = False,
                noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                stop_after: torch.Tensor | None = None):
    """Integrate from ``noise`` along ``spec``; returns the final latents (and the per-step x0 estimates).

    ODE: ``x <- ode_step(x, F(x, t_i), t_i, t_{i+1})`` with ``t_N = t_end``; ``X0[i]`` = the final sample.
    SDE: ``X0[i] = to_x0(F(x, t_i))``; ``x <- renoise(X0[i], t_{i+1}, fresh eps)``; the last step returns X0.
    Fresh SDE noise comes from ``noise_fn(x)`` (training: one explicit generator), else from the
    per-sample ``generators`` (sampling: an image depends only on its own seed); it is always drawn for the
    whole batch, so the random stream does not depend on ``stop_after``.
    ``stop_after`` (SDE only, ``[B]`` grid indices): row ``b`` is integrated only up to ``X0[stop_after[b]]``
    (training uses one ``X0[i]`` per sample, and ``X0[i]`` depends only on steps ``0..i``); its later ``X0`` rows
    and the returned final rows are zeros. Same values as the full run, at ~5/8 of the network calls for 4 steps.
    """
    if stop_after is not None and spec.mode != "sde":
        raise ValueError("stop_after needs an SDE spec (an ODE's X0[i] is the final sample)")
    x = noise
    x0s: list[torch.Tensor] = []
    n = spec.steps
    for i, t_i in enumerate(spec.grid):
        rows = None if stop_after is None else torch.nonzero(stop_after.to(x.device) >= i).squeeze(1)
        if rows is not None and len(rows) == len(x):
            rows = None  # every row still running: no gather/scatter
        xs, cs = (x, cond) if rows is None else (x[rows], cond.index(rows))
        us = uncond if (rows is None or uncond is None or len(uncond) == 1) else uncond.index(rows)
        t = torch.full((xs.shape[0],), float(t_i), device=x.device)
        w = interval_cfg(spec.guidance, t, spec.guidance_t_min)
        out = predict_cfg(family, net, xs, t, cs, us, w) if len(xs) else None
        t_next = spec.grid[i + 1] if i + 1 < n else spec.t_end
        if spec.mode == "ode":
            x = family.ode_step(xs, out, t, t_next).to(noise.dtype)
            continue
        x0 = family.to_x0(xs, out, t) if len(xs) else xs
        if rows is not None:
            x0 = torch.zeros_like(x).index_copy(0, rows, x0.to(x.dtype))
        x0s.append(x0)
        if i + 1 < n:
            if noise_fn is not None:
                fresh = noise_fn(x)
            elif generators:
                fresh = per_sample_noise(generators, tuple(x.shape[1:]), x.device)
            else:
                raise ValueError("SDE sampling needs generators or noise_fn (no hidden global RNG)")
            x = family.add_noise(x0, fresh, torch.full((x.shape[0],), float(t_next), device=x.device)).to(noise.dtype)
        else:
            x = x0.to(noise.dtype)
    if spec.mode == "ode":
        x0s = [x] * n
    return (x, x0s) if return_x0s else x


def encode_unique(family, bundle, prompts: list[str]) -> Cond:
    """``family.encode_prompts`` with each distinct prompt encoded once (an evaluation asks for several images
    per prompt; diffusers' ``num_images_per_prompt`` does the same), rows back in ``prompts`` order."""
    unique = list(dict.fromkeys(prompts))
    cond = family.encode_prompts(bundle, unique)
    if len(unique) == len(prompts):
        return cond
    where = {p: i for i, p in enumerate(unique)}
    return cond.index(torch.tensor([where[p] for p in prompts]))


class PromptEncodings:
    """Training's text conditioning with each distinct prompt encoded once: the text encoders are frozen, and a
    training run draws its batches from a fixed prompt list (the digits world's has a few hundred), so encoding
    them again every inner step only repeats work (6% of a tiny-sd3 step). Rows are kept until ``max_bytes``
    (a large prompt set at full size, e.g. SD3's 333 x 4096 T5 tokens, fills it; later prompts are then encoded
    per call as before)."""

    def __init__(self, family, bundle, max_bytes: int = 256 << 20) -> None:
        self.family, self.bundle, self.max_bytes = family, bundle, max_bytes
        self.rows: dict[str, Cond] = {}
        self.bytes = 0

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Cond:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        fresh: dict[str, Cond] = {}
        if missing:
            enc = self.family.encode_prompts(self.bundle, missing)
            for i, p in enumerate(missing):
                row = Cond({k: v[i:i + 1].clone() for k, v in enc.tensors.items()})
                size = sum(v.numel() * v.element_size() for v in row.tensors.values())
                if self.bytes + size <= self.max_bytes:
                    self.rows[p] = row
                    self.bytes += size
                else:
                    fresh[p] = row
        parts = [self.rows[p] if p in self.rows else fresh[p] for p in prompts]
        return Cond({k: torch.cat([c.tensors[k] for c in parts]) for k in parts[0].tensors})


@torch.no_grad()
def generate(bundle, net, spec: SamplerSpec, prompts: list[str], seeds: list[int], resolution: int,
             uncond: Cond | None = None) -> torch.Tensor:
    """Images ``B x 3 x H x W`` in [0, 1] for ``prompts`` with per-image ``seeds``."""
    family = bundle.family
    shape = family.latent_shape(bundle, resolution)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = per_sample_noise(generators, shape, bundle.device).to(bundle.dtype)
    cond = encode_unique(family, bundle, prompts)
    if spec.guidance > 1.0 and uncond is None:
        uncond = family.encode_prompts(bundle, [""])
    latents = run_sampler(family, net, spec, cond, uncond, noise, generators)
    return decode_latents(bundle, latents, bundle.decode_autocast)


def decode_latents(bundle, latents: torch.Tensor, autocast: torch.dtype | None) -> torch.Tensor:
    """Images in [0, 1] (fp32) of ``latents``, decoded under ``autocast`` (``None``: in the VAE's own dtype)."""
    if autocast is None:
        return bundle.family.decode(bundle, latents)
    with torch.autocast(bundle.device.type, dtype=autocast):
        return bundle.family.decode(bundle, latents)
