"""The family protocol: everything that differs between base-model families lives behind it.

All training maths is written in x0 space with a continuous time ``t`` in [0, 1] (``t = 1`` is noise),
so losses are family-agnostic; a family converts ``t`` to its own network time input and noise
schedule (ALGORITHM.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dmdr_cli.losses.dmd import cfg_combine


@dataclass
class Cond:
    """Prompt conditioning: a dict of batch-first tensors (hidden states, pooled vector, time ids...)."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def cat(self, other: "Cond") -> "Cond":
        return Cond({k: torch.cat([v, other.tensors[k]], 0) for k, v in self.tensors.items()})

    def index(self, idx) -> "Cond":
        return Cond({k: v[idx] for k, v in self.tensors.items()})

    def expand(self, n: int) -> "Cond":
        """Repeat a batch-1 conditioning (e.g. the empty prompt) to batch ``n``."""
        return Cond({k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()})

    def to(self, device=None, dtype=None) -> "Cond":
        return Cond({k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self.tensors.items()})


@dataclass
class Bundle:
    """A loaded base model: the diffusers pipeline (all components) and where it came from."""

    family: "Family"
    pipe: Any
    source: str
    folder: str
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)
    decode_autocast: torch.dtype | None = None  # autocast dtype of sample/eval decodes (``model.decode_dtype``)

    @property
    def network(self) -> torch.nn.Module:
        return self.family.network_of(self.pipe)


class Family(Protocol):
    """What a base-model family provides. Implementations: ``sd3`` (flow), ``sdxl`` (epsilon)."""

    name: str
    lora_targets: tuple[str, ...]

    def load(self, folder: str, *, device: torch.device, dtype: torch.dtype, source: str) -> Bundle: ...
    def network_of(self, pipe: Any) -> torch.nn.Module: ...
    def latent_shape(self, bundle: Bundle, resolution: int) -> tuple[int, int, int]: ...
    def encode_prompts(self, bundle: Bundle, prompts: list[str]) -> Cond: ...
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def predict(self, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...
    def to_x0(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def eps_from(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def noise_std(self, t: torch.Tensor) -> torch.Tensor: ...
    def ode_step(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor, t_next: float) -> torch.Tensor: ...
    def student_end(self) -> float: ...
    def student_grid(self, steps: int, grid: list, grid_dtype: str) -> list[float]: ...
    def teacher_grid(self, steps: int) -> list[float]: ...
    def decode(self, bundle: Bundle, latents: torch.Tensor) -> torch.Tensor: ...
    def encode_images(self, bundle: Bundle, images: torch.Tensor) -> torch.Tensor: ...


def bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample time/coefficient ``[B]`` reshaped to broadcast against ``B x C x H x W`` (fp32)."""
    return t.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.ndim - 1)))


def predict_cfg(family: Family, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                uncond: Cond | None, guidance: float | torch.Tensor) -> torch.Tensor:
    """Network output with classifier-free guidance ``F_u + w (F_c - F_u)``, batch-doubled [uncond, cond].

    ``guidance <= 1`` (or no ``uncond``) is a single conditional call. ``uncond`` is the encoding of the
    empty prompt "" (never zeros), batch 1 or B. ``guidance`` may be a per-sample ``[B]`` tensor (a guidance
    interval); if every entry is <= 1 that is the single conditional call too.
    """
    per_sample = isinstance(guidance, torch.Tensor)
    if uncond is None or (bool((guidance <= 1.0).all()) if per_sample else guidance <= 1.0):
        return family.predict(net, x_t, t, cond)
    b = x_t.shape[0]
    un = uncond.expand(b) if len(uncond) == 1 else uncond
    out = family.predict(net, torch.cat([x_t, x_t]), torch.cat([t, t]), un.cat(cond))
    out_u, out_c = out.chunk(2)
    return cfg_combine(out_u, out_c, bcast(guidance, out_c).to(out_c.dtype) if per_sample else guidance)
