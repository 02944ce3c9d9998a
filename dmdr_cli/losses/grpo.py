"""GRPO on the student's stochastic sampler with DMD in place of the KL term [REC] (ALGORITHM.md 6.4).

Policy (CPS step, RTDMD arXiv 2605.26108 / Flow-GRPO arXiv 2505.05470), for ``i < N - 1``:

    mu_theta(x_i) = renoise(x0_hat, t_{i+1}, cos(eta pi / 2) eps_hat)      # flow: (1-t')x0 + t' cos eps
    rho_i         = sigma(t_{i+1}) sin(eta pi / 2)                          # flow: sigma(t') = t'
    pi_theta(x_{i+1} | x_i) = N(mu_theta, rho_i^2 I)

``eta = 1`` reproduces DMDR's SDE backward simulation; the last step is deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cps_coefficients(eta: float) -> tuple[float, float]:
    """``(cos(eta pi/2), sin(eta pi/2))``; eta = 0.9 gives (0.1564, 0.9877)."""
    return math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)


def gaussian_logprob(x_next: Tensor, mean: Tensor, rho: Tensor | float) -> Tensor:
    """``log pi = -mean_CHW (x_next - mean)^2 / (2 rho^2)`` per sample (constants dropped, Flow-GRPO style)."""
    rho = torch.as_tensor(rho, dtype=torch.float32, device=x_next.device)
    if rho.ndim == 1:
        rho = rho.view(-1, *([1] * (x_next.ndim - 1)))
    return -((x_next.float() - mean.float()).pow(2) / (2 * rho.pow(2))).flatten(1).mean(1)


def group_advantages(rewards: Tensor, group: int, clip: float = 5.0, eps: float = 1e-6) -> Tensor:
    """``A_j = clip((r_j - mean_group) / (std_group + eps), -clip, clip)``; groups are ``group`` consecutive
    samples (one prompt); std is the population std."""
    r = rewards.float().view(-1, group)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return a.clamp(-clip, clip).view(-1)


def grpo_policy_loss(logp_new: Tensor, logp_old: Tensor, adv: Tensor, clip_eps: float) -> tuple[Tensor, dict]:
    """``L = -mean min(ratio A, clip(ratio, 1 - e, 1 + e) A)``, ``ratio = exp(logp_new - logp_old)``.

    Inputs ``[M]`` over (sample, stochastic step) pairs; ``logp_old`` and ``adv`` carry no gradient.
    Stats: ``grpo/ratio_mean``, ``grpo/clip_frac``.
    """
    ratio = torch.exp(logp_new - logp_old.detach())
    adv = adv.detach()
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    frac = ((ratio - 1).abs() > clip_eps).float().mean()
    return loss, {"grpo/ratio_mean": float(ratio.detach().mean()), "grpo/clip_frac": float(frac)}
