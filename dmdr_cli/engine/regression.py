"""Teacher-trajectory regression (DMD1's paired regression term, extended to a multi-step student).

DMD1 (arXiv 2311.18828) adds to the distribution-matching loss a regression of the one-step generator's output on
the teacher's deterministic ODE output from the same noise, ``|| G(z) - ODE(z) ||``: the DMD gradient alone is
mode-seeking and says little about which sample a given noise should become, the regression ties that down.

A few-step student is a map from ``x_{t_i}`` to a clean estimate at each of its grid times ``t_i``. Along the
teacher's probability-flow ODE from ``z``, the point ``x_{t_i}`` lies in the teacher's marginal at ``t_i`` and the
ODE carries it to ``y = ODE(z)``; so ``G(x_{t_i}, t_i) = y`` for every ``i`` is one valid solution of what
distribution matching asks of the student (its outputs from the marginal at ``t_i`` follow the teacher's output
distribution), and the two losses share their optimum. The pairs are made once, before training, with the
frozen base (the ``teacher`` role), so the term needs no real images (the method stays image-free).

``L_reg = mean_{b, CHW} ( x0_hat(x_{t_i}, t_i) - y )^2`` on ``batch`` pairs per generator update, each at its own
grid index ``i``, uniform over the grid times ``<= t_max``; the generator minimises ``L_dmd + weight * L_reg``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from dmdr_cli.engine.sampler import SamplerSpec, run_sampler
from dmdr_cli.io import atomic_write_bytes


@dataclass
class TeacherPairs:
    """``P`` teacher ODE trajectories: ``xs[i]`` the point at student grid time ``grid[i]``, ``y`` the end."""

    grid: tuple[float, ...]
    prompts: list[str]
    xs: torch.Tensor        # N x P x C x H x W
    y: torch.Tensor         # P x C x H x W

    def __len__(self) -> int:
        return len(self.prompts)


def merged_grid(teacher_grid: list[float], student_grid: tuple[float, ...]) -> list[float]:
    """The teacher's ODE grid with the student's grid times inserted (descending, distinct): the Euler
    integration then passes through every student time exactly."""
    return sorted({float(t) for t in teacher_grid} | {float(t) for t in student_grid}, reverse=True)


@torch.no_grad()
def teacher_trajectories(family, net, grid: list[float], record: tuple[float, ...], cond, uncond, noise: torch.Tensor,
                         guidance: float, guidance_t_min: float = 0.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The teacher's sampler (``run_sampler``: Euler ODE with CFG) from ``noise`` over ``grid`` to t = 0, run in
    segments that end at the ``record`` times (each must be on ``grid``); returns the states at those times and the
    final state (fp32)."""
    missing = [t for t in record if float(t) not in grid]
    if missing:
        raise ValueError(f"record times {missing} are not on the integration grid")
    cuts = sorted({0, *(grid.index(float(t)) for t in record)}) + [len(grid)]
    x, at = noise, {}
    for a, b in zip(cuts, cuts[1:]):
        at[a] = x
        spec = SamplerSpec(tuple(grid[a:b]), grid[b] if b < len(grid) else 0.0, "ode", guidance,
                           guidance_t_min=guidance_t_min)
        x = run_sampler(family, net, spec, cond, uncond, x)
    return [at[grid.index(float(t))].float() for t in record], x.float()


@torch.no_grad()
def make_pairs(bundle, roles, prompts: list[str], n: int, student_grid: tuple[float, ...], *, teacher_steps: int,
               guidance: float, guidance_t_min: float, seed: int, latent_shape, encode,
               batch: int = 64) -> TeacherPairs:
    """``n`` teacher trajectories for prompts drawn (seeded) from the training prompts; pair ``p``'s noise comes
    from its own generator, so the pairs do not depend on ``batch``."""
    family = bundle.family
    rng = random.Random(seed * 7_919 + 17)
    chosen = [prompts[rng.randrange(len(prompts))] for _ in range(n)]
    grid = merged_grid(family.teacher_grid(teacher_steps), student_grid)
    uncond = family.encode_prompts(bundle, [""])
    xs_parts, y_parts = [], []
    with roles.role("teacher") as net:
        for lo in range(0, n, batch):
            rows = range(lo, min(n, lo + batch))
            noise = torch.stack([torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(
                seed * 1_000_003 + 500_009 + p)) for p in rows]).to(bundle.device, bundle.dtype)
            seen, y = teacher_trajectories(family, net, grid, student_grid, encode([chosen[p] for p in rows]), uncond,
                                           noise, guidance, guidance_t_min)
            xs_parts.append(torch.stack(seen))
            y_parts.append(y)
    return TeacherPairs(tuple(float(t) for t in student_grid), chosen, torch.cat(xs_parts, dim=1),
                        torch.cat(y_parts))


def regression_loss(roles, family, pairs: TeacherPairs, batch: int, gen: torch.Generator, encode,
                    t_max: float = 1.0):
    """``L_reg`` on ``batch`` pairs (rows and grid indices drawn from ``gen``, indices among the grid times
    ``<= t_max``); leaves the ``gen`` role active."""
    choices = torch.tensor([i for i, t in enumerate(pairs.grid) if t <= t_max + 1e-9])
    if not len(choices):
        raise ValueError(f"no student grid time is <= {t_max}")
    rows = torch.randint(0, len(pairs), (batch,), generator=gen)
    idx = choices[torch.randint(0, len(choices), (batch,), generator=gen)]
    device = pairs.y.device
    x_t = pairs.xs[idx.to(device), rows.to(device)]
    t = torch.tensor([pairs.grid[i] for i in idx.tolist()], device=device)
    cond = encode([pairs.prompts[r] for r in rows.tolist()])
    with roles.role("gen") as net:
        out = family.predict(net, x_t, t, cond)
    x0 = family.to_x0(x_t, out, t)
    loss = (x0 - pairs.y[rows.to(device)].float()).pow(2).mean()
    roles.activate("gen")
    return loss, {"loss/reg": float(loss.detach())}


PAIRS_FILE = "teacher-pairs.safetensors"


def pairs_key(**settings) -> str:
    """What the pairs were made from (prompts, seed, grids, teacher settings, model): a cached file is reused only
    when all of it matches."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_pairs(path, pairs: TeacherPairs, key: str) -> None:
    """Atomically (a resumed run must never read half a file)."""
    meta = {"key": key, "grid": json.dumps(list(pairs.grid)), "prompts": json.dumps(pairs.prompts)}
    tensors = {"xs": pairs.xs.detach().cpu().contiguous(), "y": pairs.y.detach().cpu().contiguous()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))


def load_pairs(path, key: str, device) -> TeacherPairs | None:
    """The cached pairs of ``path`` when they were made with ``key``; None when missing, foreign or unreadable
    (they are then made again: the cache is an optimisation, never the source of truth)."""
    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            xs, y = f.get_tensor("xs"), f.get_tensor("y")
        return TeacherPairs(tuple(json.loads(meta["grid"])), json.loads(meta["prompts"]), xs.to(device), y.to(device))
    except Exception:
        return None
