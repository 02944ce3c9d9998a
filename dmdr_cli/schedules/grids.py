"""Student / teacher time grids and network time inputs (ALGORITHM.md §1.2, §1.3, §5.1).

All grids are returned as plain Python floats in the continuous time ``t ∈ [0, 1]`` convention used
everywhere in dmdr (``t = 1`` is pure noise). The SDXL helpers map them to discrete timesteps ``τ``.

Papers: DMDR (arXiv 2511.13649), DMD2 (arXiv 2405.14867).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "GRID_DTYPES",
    "discrete_timestep",
    "eps_student_grid",
    "eps_teacher_grid",
    "flow_shift",
    "flow_student_grid",
    "flow_teacher_grid",
    "flow_time_input",
    "sdxl_alphas_cumprod",
]

#: Arithmetic used to build a flow student grid (``student.grid_dtype``).
GRID_DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
}

SDXL_NUM_TRAIN_TIMESTEPS = 1000
SDXL_BETA_START = 0.00085
SDXL_BETA_END = 0.012


def flow_shift(s: float | Tensor, shift: float) -> float | Tensor:
    """Static time shift of flow-matching schedules (SD3 / SD3.5), ALGORITHM.md §5.1.

    ``t = S·s / (1 + (S − 1)·s)``; ``S = 1`` is the identity, ``S > 1`` moves points towards noise (t = 1).

    Args:
        s: unshifted time(s) in [0, 1]; a float or a tensor of any shape.
        shift: the shift ``S > 0``.

    Returns:
        The shifted time(s), same type (and, for tensors, same shape and dtype) as ``s``. For tensors the
        operations are evaluated in ``s.dtype`` in this order: ``S·s``, ``(S − 1)·s``, ``1 + ·``, ``÷``;
        this order reproduces the official bf16 grid (see :func:`flow_student_grid`).
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * s / (1 + (shift - 1) * s)


def flow_student_grid(steps: int, shift: float, t_end: float = 0.001, dtype: str = "fp32") -> list[float]:
    """Few-step student time grid of a flow model (DMDR arXiv 2511.13649; ALGORITHM.md §5.1).

    ``s = linspace(1, t_end, N + 1)``, ``t = S·s / (1 + (S − 1)·s)``, then ``t_N := t_end``. The student is
    evaluated at the first ``N`` points, which are returned; the end point of the sampler is ``t_end``.

    ``dtype`` selects the arithmetic:

    * ``"fp32"`` (clean, default): computed in float64 and rounded to float32. SD3-M (N=4, S=3):
      1.0, 0.90012, 0.75037, 0.50100; SD3.5-L (N=4, S=5): 1.0, 0.93758, 0.83361, 0.62594.
    * ``"fp64"``: computed and returned in float64.
    * ``"bf16"`` (faithful): the official run's rounding. ``linspace`` is evaluated in float32 and each point
      rounded to bfloat16 (torch's CPU ``linspace(..., dtype=bfloat16)`` must *not* be used: it rounds the
      step, giving s_3 = 0.2520 and t_3 = 0.5039 / 0.6289, which contradicts the documented column); the
      shift is then evaluated in bf16 arithmetic, every operation rounding to bf16, in the order ``S·s``,
      ``(S − 1)·s``, ``1 + ·``, ``÷``. This reproduces ALGORITHM.md's bf16 column exactly:
      SD3-M 1.0, 0.8984375, 0.75, 0.5; SD3.5-L 1.0, 0.9375, 0.83203125, 0.625.

    Args:
        steps: number of student steps ``N ≥ 1``.
        shift: the static shift ``S``.
        t_end: last grid point ``x0_end`` (0.001 faithful SD3, 0 clean / ImageNet SiT).
        dtype: ``"fp32"``, ``"fp64"`` or ``"bf16"``.

    Returns:
        ``N`` model-input times ``[t_0 = 1 > t_1 > … > t_{N−1}]`` as Python floats.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end must be in [0, 1), got {t_end}")
    if dtype not in GRID_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(GRID_DTYPES)}, got {dtype!r}")
    if dtype == "bf16":
        s = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float32).to(torch.bfloat16)
    else:
        s = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)
    t = flow_shift(s, shift).to(GRID_DTYPES[dtype])
    t[-1] = t_end  # forced end point; not a model input
    return [float(v) for v in t[:steps]]


def flow_teacher_grid(steps: int, shift: float) -> list[float]:
    """Multi-step teacher (Euler) schedule of a flow model, ALGORITHM.md §5.1.

    ``t = shift(linspace(1, 0, N + 1))[:-1]`` computed in float64; the sampler's end point is ``t_N = 0``.

    Args:
        steps: number of teacher steps ``N ≥ 1``.
        shift: the static shift ``S``.

    Returns:
        ``N`` model-input times as Python floats, starting at 1.0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return [float(v) for v in flow_shift(s, shift)[:steps]]


def discrete_timestep(t: Tensor) -> Tensor:
    """SDXL discrete timestep from continuous time, ALGORITHM.md §1.2.

    ``τ = clamp(round(1000·t), 0, 999)`` (round half to even), computed in float64.

    Args:
        t: continuous times in [0, 1], any shape, any float dtype.

    Returns:
        int64 tensor of the same shape with values in ``{0, …, 999}``.
    """
    tau = torch.round(t.to(torch.float64) * SDXL_NUM_TRAIN_TIMESTEPS)
    return tau.clamp(0, SDXL_NUM_TRAIN_TIMESTEPS - 1).to(torch.int64)


def flow_time_input(t: Tensor, rounding: bool = True) -> Tensor:
    """Network time input ``τ(t)`` of SD3 / SD3.5 transformers (0–1000 scale), ALGORITHM.md §1.2.

    ``τ = round(1000·t)`` (official, round half to even) or ``1000·t`` when ``rounding=False``. The noising
    itself always uses the exact continuous ``t``; use the same ``rounding`` in training and inference.

    Args:
        t: continuous times in [0, 1], any shape.
        rounding: round to integers (faithful) or not.

    Returns:
        float32 tensor of the same shape (float32 so that integers up to 1000 stay exact; bf16 cannot hold
        e.g. 898).
    """
    tau = t.to(torch.float64) * SDXL_NUM_TRAIN_TIMESTEPS
    if rounding:
        tau = torch.round(tau)
    return tau.to(torch.float32)


def sdxl_alphas_cumprod() -> Tensor:
    """SDXL ``ᾱ_τ`` for τ = 0…999 (scaled-linear betas), ALGORITHM.md §1.3.

    ``β_τ = (√0.00085 + (√0.012 − √0.00085)·τ/999)²``, ``ᾱ_τ = Π_{i ≤ τ} (1 − β_i)``, in float64.
    Reference values: √ᾱ_399 = 0.65275, √(1 − ᾱ_399) = 0.75757; ᾱ_999 ≈ 0.0047.

    Returns:
        float64 tensor of shape ``[1000]``.
    """
    betas = torch.linspace(
        SDXL_BETA_START**0.5, SDXL_BETA_END**0.5, SDXL_NUM_TRAIN_TIMESTEPS, dtype=torch.float64
    ) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _trailing_timesteps(steps: int) -> list[int]:
    """DDIM "trailing" spacing: ``τ_i = round(1000 − i·1000/N) − 1`` for i = 0…N−1 (diffusers convention)."""
    step_ratio = SDXL_NUM_TRAIN_TIMESTEPS / steps
    taus = torch.round(SDXL_NUM_TRAIN_TIMESTEPS - torch.arange(steps, dtype=torch.float64) * step_ratio) - 1
    return [int(v) for v in taus]


def eps_student_grid(steps: int, one_step_timestep: int = 399) -> list[float]:
    """Few-step student grid of an ε-prediction model (SDXL), ALGORITHM.md §5.1; DMD2 arXiv 2405.14867.

    * ``N = 1``: ``[one_step_timestep / 1000]`` (DMD2/DMDR feed pure noise at τ = 399).
    * ``N > 1``: trailing spacing ``τ_i = round(1000 − i·1000/N) − 1`` (the same as
      :func:`eps_teacher_grid`); ``N = 4`` → τ = [999, 749, 499, 249], DMD2's 4-step grid.

    Values are ``τ / 1000`` so that :func:`discrete_timestep` maps them back to τ exactly.

    Args:
        steps: number of student steps ``N ≥ 1``.
        one_step_timestep: conditioning timestep of the 1-step student (0…999).

    Returns:
        ``N`` times as Python floats.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        if not 0 <= one_step_timestep < SDXL_NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"one_step_timestep must be in [0, 999], got {one_step_timestep}")
        return [one_step_timestep / SDXL_NUM_TRAIN_TIMESTEPS]
    return eps_teacher_grid(steps)


def eps_teacher_grid(steps: int) -> list[float]:
    """Multi-step (DDIM, trailing spacing) schedule of an ε-prediction model (SDXL), ALGORITHM.md §5.1.

    ``τ_i = round(1000 − i·1000/N) − 1`` for i = 0…N−1 (diffusers ``timestep_spacing="trailing"``), returned as
    ``τ / 1000``. ``N = 4`` → [0.999, 0.749, 0.499, 0.249]; ``N = 1`` → [0.999].

    Args:
        steps: number of teacher steps ``N ≥ 1`` (at most 1000).

    Returns:
        ``N`` times as Python floats.
    """
    if not 1 <= steps <= SDXL_NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be in [1, 1000], got {steps}")
    return [tau / SDXL_NUM_TRAIN_TIMESTEPS for tau in _trailing_timesteps(steps)]
