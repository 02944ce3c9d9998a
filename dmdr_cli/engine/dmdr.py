"""The DMDR inner step (ALGORITHM.md 3.1), family-agnostic and shared by both training stages.

    1. backward simulation of the student on its own samples (no grad, ``gen`` role)
    2. generator input: per sample a grid index i ~ U{0..N-1}; x_c = X0[i]; x_in = renoise(x_c, T[i], eps1)
    3. critic (fake score) update every inner step on sg(x_c), guide adapter at lambda_f, no CFG
    4. every ``ttur``-th inner step (j % ttur == 0, j > 0): generator update with the normalised DMD
       loss, real score = base + lambda_r(k) guide with CFG w ~ U[w0 - 0.5, w0 + 0.5] (DynaDG), renoise
       timesteps from DynaRS, plus an optional RL term on the decoded one-step prediction (stage 2).

All randomness comes from one explicit CPU ``torch.Generator`` (saved in checkpoints for exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dmdr_cli.engine.sampler import SamplerSpec, run_sampler
from dmdr_cli.families.base import Cond, predict_cfg
from dmdr_cli.losses.dmd import dmd_loss, fake_score_loss, interval_cfg, sample_cfg_scale
from dmdr_cli.schedules.dynamic import dynadg_scale, dynars_params, sample_timesteps


@dataclass
class DMDSettings:
    """Flat numbers the step needs (built from the config by the recipe; no config objects in here)."""

    ttur: int = 5
    real_cfg: float = 7.0
    cfg_jitter: float = 0.5
    real_cfg_t_min: float = 0.0
    dynadg: bool = True
    dynadg_scale0: float = 0.5
    dynamic_steps: int = 2000
    t_sampler: str = "beta_anneal"
    beta_a0: float = 4.0
    beta_b0: float = 1.5
    nan_mode: str = "faithful"
    grad_clip: float = 1.0
    dmd_weight: float = 1.0


def randn(gen: torch.Generator, shape, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def schedule_values(s: DMDSettings, k: int) -> dict[str, float]:
    """DynaDG scale and DynaRS Beta parameters at generator step ``k`` (for logging and the step)."""
    horizon = s.dynamic_steps
    a, b = dynars_params(k, horizon, s.beta_a0, s.beta_b0, enabled=s.t_sampler != "uniform")
    return {"sched/lambda_r": dynadg_scale(k, horizon, s.dynadg_scale0, enabled=s.dynadg),
            "sched/beta_a": a, "sched/beta_b": b}


def draw_t(s: DMDSettings, n: int, k: int, gen: torch.Generator, device) -> torch.Tensor:
    return sample_timesteps(n, k, s.dynamic_steps, sampler=s.t_sampler, a0=s.beta_a0, b0=s.beta_b0,
                            generator=gen).to(device)


@torch.no_grad()
def simulate(roles, family, spec: SamplerSpec, cond: Cond, latent_shape, gen: torch.Generator, device, dtype):
    """Backward simulation (3.2): the list of N clean estimates X0[i] of the student's own samples."""
    b = len(cond)
    z = randn(gen, (b, *latent_shape), device, dtype)
    with roles.role("gen") as net:
        _, x0s = run_sampler(family, net, spec, cond, None, z, generators=None, return_x0s=True,
                             noise_fn=lambda like: randn(gen, like.shape, device, dtype))
    return [x.detach() for x in x0s]


@torch.no_grad()
def simulate_and_select(roles, family, spec: SamplerSpec, cond: Cond, latent_shape, gen: torch.Generator, device,
                        dtype, sde_input: str = "official"):
    """:func:`simulate` then :func:`select_generator_input`, with the same random draws in the same order (z, the
    N - 1 re-noising draws, the grid indices, eps1), but in SDE mode each sample is simulated only up to the
    ``X0[i]`` its drawn index uses (``run_sampler``'s ``stop_after``): the same values (up to float rounding of
    smaller batches) at 5/8 of the simulation's network calls for 4 steps. ODE samples need the whole trajectory."""
    if spec.mode != "sde":
        return select_generator_input(family, spec, simulate(roles, family, spec, cond, latent_shape, gen, device,
                                                             dtype), gen, sde_input)
    b = len(cond)
    z = randn(gen, (b, *latent_shape), device, dtype)
    fresh = iter([randn(gen, z.shape, device, dtype) for _ in range(spec.steps - 1)])
    idx = torch.randint(0, spec.steps, (b,), generator=gen)
    with roles.role("gen") as net:
        _, x0s = run_sampler(family, net, spec, cond, None, z, return_x0s=True, noise_fn=lambda like: next(fresh),
                             stop_after=idx)
    return select_generator_input(family, spec, [x.detach() for x in x0s], gen, sde_input, idx=idx)


def select_generator_input(family, spec: SamplerSpec, x0s: list[torch.Tensor], gen: torch.Generator,
                           sde_input: str = "official", idx: torch.Tensor | None = None):
    """Per sample: i ~ U{0..N-1}, t_g = T[i], x_c = X0[i], x_in = renoise(x_c, t_g, eps1).

    ``pure_noise_first``: samples with i = 0 get pure noise (SDXL 1-step at tau = 399, tau = 999).
    ``sde_input = "dmd2"`` feeds X0[i-1] re-noised to T[i] (pure noise for i = 0) instead.
    ``idx``: the grid indices when already drawn (:func:`simulate_and_select`).
    """
    b = x0s[0].shape[0]
    device, dtype = x0s[0].device, x0s[0].dtype
    if idx is None:
        idx = torch.randint(0, spec.steps, (b,), generator=gen)
    stack = torch.stack(x0s)                                   # N x B x C x H x W
    rows = torch.arange(b)
    x_c = stack[idx.to(device), rows.to(device)]
    t_g = torch.tensor([spec.grid[i] for i in idx.tolist()], device=device)
    eps = randn(gen, x_c.shape, device, dtype)
    src = x_c
    if sde_input == "dmd2" and spec.mode == "sde":
        prev = (idx - 1).clamp(min=0)
        src = stack[prev.to(device), rows.to(device)]
    x_in = family.add_noise(src, eps, t_g)
    first = (idx == 0).to(device)
    if spec.pure_noise_first or sde_input == "dmd2":
        x_in = torch.where(first.view(-1, 1, 1, 1), eps, x_in)
    return x_c, x_in, t_g, idx


def critic_loss(roles, family, s: DMDSettings, x_c: torch.Tensor, cond: Cond, k: int, gen: torch.Generator):
    """Fake-score loss on detached student samples: guide adapter at lambda_f, conditional only.

    Leaves the ``fake`` role active: activation checkpointing recomputes forward segments during
    ``backward()`` under the current adapter state, which must be the one the loss was built with.
    """
    t_c = draw_t(s, x_c.shape[0], k, gen, x_c.device)
    eps = randn(gen, x_c.shape, x_c.device, x_c.dtype)
    x_tc = family.add_noise(x_c.detach(), eps, t_c)
    with roles.role("fake") as net:
        pred = family.predict(net, x_tc, t_c, cond)
    loss = fake_score_loss(pred, family.target(x_c.detach(), eps, t_c))
    roles.activate("fake")
    return loss, {"loss/fake": float(loss.detach())}


def generator_loss(roles, family, s: DMDSettings, x_in: torch.Tensor, t_g: torch.Tensor, cond: Cond,
                   uncond: Cond, k: int, gen: torch.Generator,
                   rl_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict]] | None = None):
    """DMD (+ RL) loss of one generator update; leaves the ``gen`` role active for ``backward()``."""
    with roles.role("gen") as net:
        out = family.predict(net, x_in, t_g, cond)
    x0_hat = family.to_x0(x_in, out, t_g)                      # fp32, with grad
    stats: dict[str, float] = {}
    loss_rl = torch.zeros((), device=x0_hat.device)
    if rl_fn is not None:
        loss_rl, rl_stats = rl_fn(x0_hat)
        stats.update(rl_stats)
    sched = schedule_values(s, k)
    lam_r = sched["sched/lambda_r"]
    w = sample_cfg_scale(s.real_cfg, s.cfg_jitter, gen)
    t_d = draw_t(s, x0_hat.shape[0], k, gen, x0_hat.device)
    eps = randn(gen, x0_hat.shape, x0_hat.device)
    x_td = family.add_noise(x0_hat.detach(), eps, t_d).to(x_in.dtype)
    with torch.no_grad():
        with roles.role("fake") as net:
            x0_fake = family.to_x0(x_td, family.predict(net, x_td, t_d, cond), t_d)
        with roles.role("real", lam_r) as net:
            x0_real = family.to_x0(x_td, predict_cfg(family, net, x_td, t_d, cond, uncond,
                                                     interval_cfg(w, t_d, s.real_cfg_t_min)), t_d)
    loss_dmd, dstats = dmd_loss(x0_hat, x0_fake, x0_real, nan_mode=s.nan_mode)
    roles.activate("gen")  # activation checkpointing recomputes under the *current* adapter state
    stats.update(dstats)
    stats.update(sched)
    stats.update({"loss/dmd": float(loss_dmd.detach()), "sched/cfg_w": float(w), "loss/rl": float(loss_rl.detach())})
    total = s.dmd_weight * loss_dmd + loss_rl
    return total, stats
