"""DynaDG and DynaRS cold-start schedules and the critic / DMD renoise-time sampler (ALGORITHM.md §4).

All schedules are indexed by the generator-step counter ``k`` and share the horizon ``K`` (``dynamic_steps``).

Paper: DMDR (arXiv 2511.13649).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "T_SAMPLERS",
    "UNIFORM_T_MIN",
    "cosine_factor",
    "dynadg_scale",
    "dynars_params",
    "sample_beta",
    "sample_gamma",
    "sample_timesteps",
]

#: Accepted ``t_sampler`` values; ``logit_normal`` is the official (misleading) name of ``beta_anneal``.
T_SAMPLERS: tuple[str, ...] = ("beta_anneal", "uniform", "logit_normal")

#: Lower bound of the ``uniform`` sampler, ``t ~ U[0.001, 1)``.
UNIFORM_T_MIN = 0.001

_FP32_BELOW_ONE = 1.0 - 2.0**-24  # largest float32 < 1


def cosine_factor(k: int, horizon: int) -> float:
    """Cosine decay shared by DynaDG and DynaRS (DMDR arXiv 2511.13649; ALGORITHM.md §4).

    ``c_k = ½·(1 + cos(π·min(k/K, 1)))``: 1 at k = 0, 0 for k ≥ K. ``K ≤ 0`` (schedules off) gives 0.0.
    Negative ``k`` is treated as 0.

    Args:
        k: generator-step counter.
        horizon: ``K`` (``dynamic_steps``).

    Returns:
        ``c_k`` in [0, 1] as a Python float.
    """
    if horizon <= 0:
        return 0.0
    progress = min(max(k, 0) / horizon, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def dynadg_scale(k: int, horizon: int, scale0: float, enabled: bool = True) -> float:
    """DynaDG: LoRA scale ``λ_r(k)`` of the guide adapter used as the real score (DMDR arXiv 2511.13649; §4.1).

    ``λ_r(k) = λ_r0·c_k`` for ``k < K``, else 0. 0 also when disabled or ``K ≤ 0``; ``λ_r = 0`` means "use the
    pure teacher" (adapters disabled). Table (λ_r0 = 0.5): k/K = 0, .25, .5, .75, 1 → 0.5, 0.427, 0.25, 0.073, 0.

    Args:
        k: generator-step counter.
        horizon: ``K``.
        scale0: ``λ_r0`` (0.5 T2I, 0.75 ImageNet SiT).
        enabled: DynaDG switch.

    Returns:
        ``λ_r(k)`` as a Python float.
    """
    if not enabled or horizon <= 0 or k >= horizon:
        return 0.0
    return scale0 * cosine_factor(k, horizon)


def dynars_params(
    k: int, horizon: int, a0: float = 4.0, b0: float = 1.5, enabled: bool = True
) -> tuple[float, float]:
    """DynaRS: Beta parameters of the renoise-time distribution (DMDR arXiv 2511.13649; ALGORITHM.md §4.2).

    ``a_k = 1 + (a0 − 1)·c_k``, ``b_k = 1 + (b0 − 1)·c_k``; Beta(4, 1.5) at k = 0 annealed to Beta(1, 1) = U(0, 1)
    at k ≥ K. For ``c_k > 0`` the mode stays at ``(a0 − 1)/(a0 + b0 − 2)`` (0.857 for the defaults).

    Args:
        k: generator-step counter.
        horizon: ``K``.
        a0, b0: Beta parameters at k = 0.
        enabled: DynaRS switch; ``(1.0, 1.0)`` when disabled.

    Returns:
        ``(a_k, b_k)`` as Python floats.
    """
    if not enabled:
        return 1.0, 1.0
    c = cosine_factor(k, horizon)
    return 1.0 + (a0 - 1.0) * c, 1.0 + (b0 - 1.0) * c


def sample_gamma(n: int, concentration: float, generator: torch.Generator) -> Tensor:
    """Gamma(concentration, 1) samples drawn only from ``generator`` (Marsaglia & Tsang, 2000).

    For ``α ≥ 1``: ``d = α − 1/3``, ``c = 1/√(9d)``; draw ``x ~ N(0, 1)``, ``u ~ U(0, 1)``, ``v = (1 + c·x)³`` and
    accept ``d·v`` iff ``v > 0`` and ``log u < x²/2 + d − d·v + d·log v``; rejected entries are redrawn in
    vectorised rounds. For ``α < 1`` the boost ``Gamma(α) = Gamma(α + 1)·U^{1/α}`` is used. Same generator state
    → same values.

    Args:
        n: number of samples.
        concentration: shape ``α > 0``.
        generator: the source of randomness (its device is used for the draws).

    Returns:
        float64 tensor of shape ``[n]`` on the generator's device.
    """
    if concentration <= 0:
        raise ValueError(f"Gamma concentration must be > 0, got {concentration}")
    dev = generator.device
    alpha = concentration if concentration >= 1.0 else concentration + 1.0
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=dev)
    todo = torch.arange(n, device=dev)
    while todo.numel() > 0:
        m = todo.numel()
        x = torch.randn(m, generator=generator, dtype=torch.float64, device=dev)
        u = torch.rand(m, generator=generator, dtype=torch.float64, device=dev)
        v = (1.0 + c * x) ** 3
        ok = v > 0
        log_v = torch.log(torch.where(ok, v, torch.ones_like(v)))
        ok &= torch.log(u) < 0.5 * x * x + d - d * v + d * log_v
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if concentration < 1.0:
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=dev)
        out = out * u ** (1.0 / concentration)
    return out


def sample_beta(n: int, a: float, b: float, generator: torch.Generator) -> Tensor:
    """Beta(a, b) samples via ``X/(X + Y)``, ``X ~ Gamma(a)``, ``Y ~ Gamma(b)`` (see :func:`sample_gamma`).

    Args:
        n: number of samples.
        a, b: Beta parameters (> 0).
        generator: the source of randomness.

    Returns:
        float64 tensor of shape ``[n]`` in [0, 1] on the generator's device.
    """
    x = sample_gamma(n, a, generator)
    y = sample_gamma(n, b, generator)
    return x / (x + y)


def sample_timesteps(
    n: int,
    k: int,
    horizon: int,
    *,
    sampler: str,
    a0: float,
    b0: float,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """Critic timestep ``t_c`` / DMD renoise timestep ``t_d`` (DMDR arXiv 2511.13649; ALGORITHM.md §4.2).

    * ``beta_anneal`` (DynaRS; ``logit_normal`` is the official name, accepted as a deprecated alias):
      ``t ~ Beta(a_k, b_k)`` per sample with ``(a_k, b_k) =`` :func:`dynars_params` ``(k, K, a0, b0)``, no clipping.
    * ``uniform``: ``t ~ U[0.001, 1)`` per sample, no schedule (``k``, ``K``, ``a0``, ``b0`` ignored); drawn in
      float64, rounded to float32 and kept strictly below 1.

    DynaRS off = ``horizon = 0`` (then Beta(1, 1) = U(0, 1)).

    Draws come only from ``generator`` (on its device), then move to ``device``.

    Args:
        n: batch size.
        k: generator-step counter.
        horizon: ``K``.
        sampler: ``beta_anneal`` | ``logit_normal`` | ``uniform``.
        a0, b0: DynaRS Beta parameters at k = 0.
        generator: explicit ``torch.Generator``.
        device: target device (default: the generator's device).

    Returns:
        float32 tensor of shape ``[n]`` with times in [0, 1] (``t = 1`` is noise).
    """
    if sampler not in T_SAMPLERS:
        raise ValueError(f"sampler must be one of {T_SAMPLERS}, got {sampler!r}")
    if sampler == "uniform":
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
        t = (UNIFORM_T_MIN + (1.0 - UNIFORM_T_MIN) * u).to(torch.float32)
        t = t.clamp(max=_FP32_BELOW_ONE)  # keep the interval half-open after rounding to float32
    else:
        a, b = dynars_params(k, horizon, a0, b0)
        t = sample_beta(n, a, b, generator).to(torch.float32)
    return t.to(device=device if device is not None else generator.device)
