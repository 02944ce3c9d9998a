"""Something that turns (prompts, seeds) into images: a run's student, a diffusers folder, or a teacher.

``eval`` (and ``--compare``) need the same interface for every model under test, with its label, step
count, guidance and timing, so tables can put teacher and student side by side.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dmdr_cli.engine.sampler import SamplerSpec, generate, student_spec, teacher_spec


@dataclass
class ImageGenerator:
    label: str
    bundle: object
    spec: SamplerSpec
    resolution: int
    roles: object | None = None
    network: torch.nn.Module | None = None  # a network other than ``bundle.network`` (a baked student)
    calls: list = field(default_factory=list, repr=False)  # (seconds, images) per call
    first_inputs: tuple | None = field(default=None, repr=False)  # (prompts, seeds) of the first call
    _uncond: object = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return self.spec.steps

    @property
    def guidance(self) -> float:
        return self.spec.guidance

    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if self.first_inputs is None:
            self.first_inputs = (list(prompts), list(seeds))
        imgs, seconds = self._generate(prompts, seeds)
        self.calls.append((seconds, len(prompts)))
        return imgs

    def time_call(self, prompts: list[str], seeds: list[int]) -> float:
        """Seconds per image of one call, not recorded in ``calls`` (``evaluation.timing``)."""
        return self._generate(prompts, seeds)[1] / max(1, len(prompts))

    def _generate(self, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, float]:
        fam = self.bundle.family
        if self.spec.guidance > 1.0 and self._uncond is None:
            self._uncond = fam.encode_prompts(self.bundle, [""])
        if self.roles is not None:
            ctx = self.roles.role("gen")
        else:
            ctx = nullcontext(self.network if self.network is not None else self.bundle.network)
        t0 = time.perf_counter()
        with ctx as net:
            imgs = generate(self.bundle, net, self.spec, prompts, seeds, self.resolution, self._uncond)
        return imgs, time.perf_counter() - t0

    @property
    def seconds_per_image(self) -> float:
        """Wall-clock per image: the median over calls of each call's seconds per image, weighted by its images (a
        background hiccup in one batch moved the mean by 10% between two identical students on a 2-core machine).
        The first call is a warm-up (thread pools, allocator, lazy inits) and is left out when there are later
        calls, as in any benchmark."""
        timed = [(s / k, k) for s, k in (self.calls[1:] if len(self.calls) > 1 else self.calls) if k]
        half, seen = sum(k for _, k in timed) / 2, 0
        for per_image, k in sorted(timed):
            seen += k
            if seen >= half:
                return per_image
        return float("nan")

    def describe(self) -> dict:
        return {"label": self.label, "model": self.bundle.source, "family": self.bundle.family.name,
                "steps": self.steps, "guidance": self.guidance,
                "guidance_t_min": self.spec.guidance_t_min, "mode": self.spec.mode,
                "grid": [round(t, 6) for t in self.spec.grid], "decode": self.decode_dtype}

    @property
    def decode_dtype(self) -> str:
        """What the VAE decodes in: 'bf16' under autocast (``model.decode_dtype``), else its weights' dtype."""
        dtype = self.bundle.decode_autocast or self.bundle.pipe.vae.dtype
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def student_of_run(cfg, run_dir: Path, step: int | None = None) -> ImageGenerator:
    """The student of a dmdr run (gen adapter merged into the weights) on its training grid, guidance-free."""
    from dmdr_cli.engine.checkpoint import latest
    from dmdr_cli.engine.student import load_student_for_inference, uses_ema

    ckpt = latest(run_dir, step)
    bundle, net = load_student_for_inference(cfg, ckpt)
    spec = student_spec(bundle.family, cfg.student)
    ema = ", EMA" if uses_ema(cfg, ckpt) else ""
    return ImageGenerator(f"student {cfg.student.steps}-step ({Path(run_dir).name}@{ckpt.name}{ema})", bundle, spec,
                          cfg.model.resolution, network=net)


def teacher_of(cfg, bundle=None) -> ImageGenerator:
    """The base model with its own multi-step sampler and CFG (``teacher.steps``, ``teacher.guidance``)."""
    from dmdr_cli.families.loading import load_base

    bundle = bundle or load_base(cfg)
    tc = cfg.teacher
    spec = teacher_spec(bundle.family, tc.steps, tc.guidance, tc.guidance_t_min)
    interval = f" at t >= {tc.guidance_t_min:g}" if tc.guidance_t_min > 0 and tc.guidance > 1 else ""
    return ImageGenerator(f"teacher {tc.steps}-step CFG {tc.guidance:g}{interval}", bundle, spec,
                          cfg.model.resolution)


def few_step_of(cfg, steps: int) -> ImageGenerator:
    """A diffusers folder (e.g. a merged export) sampled on the training-consistent few-step grid."""
    from dmdr_cli.families.loading import load_base

    bundle = load_base(cfg)
    spec = student_spec(bundle.family, cfg.student, steps)
    return ImageGenerator(f"{steps}-step ({bundle.source})", bundle, spec, cfg.model.resolution)
