"""Online Diffusion-DPO loss for the few-step student [REC] (ALGORITHM.md 6.3).

DMDR (arXiv 2511.13649) names DPO as an RL plug-in; no official code exists, so this follows
Diffusion-DPO (arXiv 2311.12908) on the student's own discrete grid with a frozen reference adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def x0_error(x0_pred: Tensor, x0_target: Tensor) -> Tensor:
    """``e(x) = mean_CHW (x0_pred - x)^2`` per sample, fp32. Shapes ``B x ...`` -> ``B``."""
    return (x0_pred.float() - x0_target.float()).pow(2).flatten(1).mean(1)


def dpo_loss(e_theta_w: Tensor, e_ref_w: Tensor, e_theta_l: Tensor, e_ref_l: Tensor, beta: float) -> tuple[Tensor, dict]:
    """``L = -log sigmoid(-beta [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))])``, mean over pairs.

    Lowering the policy's error on the winner (relative to the reference) and raising it on the loser
    lowers the loss. All inputs are per-pair errors ``[P]``; ``e_ref_*`` carry no gradient.
    Returns the loss and stats ``dpo/margin`` (mean of the bracket) and ``dpo/acc`` (share with bracket < 0).
    """
    diff = (e_theta_w - e_ref_w.detach()) - (e_theta_l - e_ref_l.detach())
    loss = -F.logsigmoid(-beta * diff).mean()
    return loss, {"dpo/margin": float(diff.detach().mean()), "dpo/acc": float((diff.detach() < 0).float().mean())}


def best_worst(rewards: Tensor, group: int, min_gap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per prompt (rows of ``group`` consecutive samples): flat indices of the best and worst sample, and a
    mask of prompts whose reward gap ``R_w - R_l`` is at least ``min_gap`` (others are skipped)."""
    r = rewards.view(-1, group)
    w = r.argmax(1)
    lo = r.argmin(1)
    base = torch.arange(r.shape[0], device=r.device) * group
    gap = r.gather(1, w[:, None]).squeeze(1) - r.gather(1, lo[:, None]).squeeze(1)
    return base + w, base + lo, (gap >= min_gap) & (gap > 0)
