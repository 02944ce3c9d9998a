"""Distribution-matching (DMD) generator loss, fake-score (critic) loss and CFG helpers (ALGORITHM.md §3).

Everything works in x0 space, so these functions are independent of the model family (flow or ε-prediction).

Papers: DMDR (arXiv 2511.13649), DMD2 (arXiv 2405.14867).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "DMD_EPS",
    "NAN_MODES",
    "cfg_combine",
    "dmd_loss",
    "fake_score_loss",
    "sample_cfg_scale",
]

#: Additive constant of the per-sample normaliser ``w_n``.
DMD_EPS = 1e-8

#: ``faithful``: ``torch.nan_to_num`` defaults (NaN → 0, ±inf → ±float-max); ``clean``: every non-finite → 0.
NAN_MODES: tuple[str, ...] = ("faithful", "clean")


def _chw_dims(x: Tensor) -> tuple[int, ...]:
    """All dimensions except the batch dimension."""
    if x.ndim < 2:
        raise ValueError(f"expected a batched tensor [B, ...], got shape {tuple(x.shape)}")
    return tuple(range(1, x.ndim))


def dmd_loss(
    x0_student: Tensor,
    x0_fake: Tensor,
    x0_real: Tensor,
    *,
    nan_mode: str = "faithful",
) -> tuple[Tensor, dict[str, float]]:
    """DMD generator loss in x0 space (DMDR arXiv 2511.13649 / DMD2 arXiv 2405.14867; ALGORITHM.md §3.1).

    ::

        w_n = mean_CHW |sg(x̂0) − x0_r| + 1e-8                  (per sample)
        g   = nan_to_num( (x0_f − x0_r) / w_n )
        L   = 0.5 · mean_{B,C,H,W} ( x̂0 − sg(x̂0 − g) )²

    so that ``∂L/∂x̂0 = g / (B·C·H·W)``: descent moves ``x̂0`` towards the real score's estimate and away from
    the fake one. All arithmetic is fp32 (inputs are upcast); ``x0_fake`` and ``x0_real`` are detached.

    ``nan_mode="faithful"`` uses ``torch.nan_to_num`` defaults (NaN → 0, ±inf → ±3.4e38), as the official code;
    ``nan_mode="clean"`` maps every non-finite entry of ``g`` to 0. In both modes ``dmd/nonfinite`` counts the
    non-finite entries of ``g`` before the mapping; in ``clean`` mode the caller must skip the optimiser step
    when it is > 0.

    Args:
        x0_student: ``x̂0`` of the generator, ``[B, C, H, W]`` (any ``[B, ...]``), carries the graph.
        x0_fake: fake score's x0 estimate ``x0_f``, same shape.
        x0_real: real score's (CFG) x0 estimate ``x0_r``, same shape.
        nan_mode: ``faithful`` | ``clean``.

    Returns:
        ``(loss, stats)``: the fp32 scalar loss and a dict of Python floats: ``dmd/grad_abs_mean`` (mean ``|g|``),
        ``dmd/w_n_mean`` (mean of ``w_n``), ``dmd/nonfinite`` (count of non-finite entries of raw ``g``),
        ``dmd/x0_mean`` and ``dmd/x0_std`` (mean / std of ``x̂0``, the drift detector of §12.6).
    """
    if nan_mode not in NAN_MODES:
        raise ValueError(f"nan_mode must be one of {NAN_MODES}, got {nan_mode!r}")
    if not (x0_student.shape == x0_fake.shape == x0_real.shape):
        raise ValueError(
            "dmd_loss: shape mismatch "
            f"{tuple(x0_student.shape)} / {tuple(x0_fake.shape)} / {tuple(x0_real.shape)}"
        )
    dims = _chw_dims(x0_student)
    x0 = x0_student.float()
    x0_sg = x0.detach()
    x0_f = x0_fake.detach().float()
    x0_r = x0_real.detach().float()

    w_n = (x0_sg - x0_r).abs().mean(dim=dims, keepdim=True) + DMD_EPS
    g_raw = (x0_f - x0_r) / w_n
    finite = torch.isfinite(g_raw)
    if nan_mode == "faithful":
        g = torch.nan_to_num(g_raw)
    else:
        g = torch.where(finite, g_raw, torch.zeros_like(g_raw))

    loss = 0.5 * ((x0 - (x0_sg - g)) ** 2).mean()

    stats_t = torch.stack(
        [
            g.abs().mean(),
            w_n.mean(),
            (~finite).sum().to(torch.float32),
            x0_sg.mean(),
            x0_sg.std() if x0_sg.numel() > 1 else x0_sg.new_zeros(()),
        ]
    )
    grad_abs_mean, w_n_mean, nonfinite, x0_mean, x0_std = stats_t.tolist()  # one device sync
    stats = {
        "dmd/grad_abs_mean": grad_abs_mean,
        "dmd/w_n_mean": w_n_mean,
        "dmd/nonfinite": nonfinite,
        "dmd/x0_mean": x0_mean,
        "dmd/x0_std": x0_std,
    }
    return loss, stats


def fake_score_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Fake-score (critic) denoising loss (DMDR arXiv 2511.13649 / DMD2 arXiv 2405.14867; ALGORITHM.md §3.1 step 3).

    ``L_C = mean_b mean_CHW (pred − target)²`` in fp32; ``target = ε − x0`` (flow) or ``ε`` (SDXL).

    Args:
        pred: network output of the fake score, ``[B, C, H, W]`` (any ``[B, ...]``).
        target: denoising target, same shape (detached by the caller or here).

    Returns:
        fp32 scalar tensor.
    """
    if pred.shape != target.shape:
        raise ValueError(f"fake_score_loss: shape mismatch {tuple(pred.shape)} vs {tuple(target.shape)}")
    dims = _chw_dims(pred)
    per_sample = ((pred.float() - target.detach().float()) ** 2).mean(dim=dims)
    return per_sample.mean()


def cfg_combine(out_uncond: Tensor, out_cond: Tensor, w: float | Tensor) -> Tensor:
    """Classifier-free guidance (ALGORITHM.md §3.3): ``F∅ + w·(F_c − F∅)``.

    Args:
        out_uncond: network output for the empty prompt ``F∅``, ``[B, ...]``.
        out_cond: network output for the prompt ``F_c``, same shape.
        w: guidance scale (a float, or a tensor broadcastable to the outputs).

    Returns:
        Guided output, same shape and dtype as the inputs (``w = 1`` gives ``F_c`` up to rounding).
    """
    return out_uncond + w * (out_cond - out_uncond)


def sample_cfg_scale(w0: float, jitter: float, generator: torch.Generator) -> float:
    """Real-score CFG scale for one DMD call (DMDR arXiv 2511.13649; ALGORITHM.md §3.3).

    ``w ~ U[w0 − jitter, w0 + jitter]``, one draw per call (not per sample). Returns 1.0 ("no CFG", skip the
    unconditional branch) when ``w0 ≤ 1``; in that case nothing is drawn from ``generator``.

    Args:
        w0: centre of the guidance scale (e.g. 4.5 / 3.5; ≤ 1 disables CFG).
        jitter: half-width (0.5 in the official recipe), ≥ 0.
        generator: explicit ``torch.Generator``.

    Returns:
        ``w`` as a Python float.
    """
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if w0 <= 1.0:
        return 1.0
    u = float(torch.rand((), generator=generator, dtype=torch.float64, device=generator.device))
    return w0 - jitter + 2.0 * jitter * u


def interval_cfg(w: float, t: torch.Tensor, t_min: float) -> float | torch.Tensor:
    """Real-score CFG restricted to a guidance interval (Kynkaenniemi et al. 2024, arXiv 2404.07724).

    ``t_min <= 0`` (or ``w <= 1``): ``w`` itself, guidance at every time. Otherwise a per-sample ``[B]`` fp32
    tensor, ``w`` where ``t >= t_min`` (high noise: layout, class, count) and ``1`` (the conditional score)
    below, where guidance mainly sharpens texture and costs diversity.
    """
    if t_min < 0:
        raise ValueError(f"t_min must be >= 0, got {t_min}")
    if t_min <= 0 or w <= 1.0:
        return w
    t = t.to(torch.float32)
    return torch.ones_like(t).masked_fill(t >= t_min, float(w))  # on t's device
