"""Exponential moving average (EMA) of the generator weights: an option, off by default.

The official DMDR recipes keep no EMA (ALGORITHM.md 7.1): at their learning rates (1e-6) consecutive generator
iterates hardly differ. At the high learning rates a tiny model needs to learn in a few hundred steps (the
digits-world preset trains its LoRA at 3e-3), DMD's generator/critic game makes the iterates wander: ten
checkpoints 10 steps apart of one ``tiny-sd3`` run scored 0.31-0.36 GenEval-digits at digits-FID 107-150, their
plain average 0.40 at FID 110. The EMA is that average, kept online.

    ema <- d_n * ema + (1 - d_n) * theta,    d_n = min(d, (1 + n) / (10 + n)),    n = EMA updates so far (1, 2, ...)

The warm-up ``d_n`` keeps the early EMA from holding on to the initial weights (``d_1 = 2/11``). The EMA is
updated after every applied generator step, saved beside the generator (``gen_ema.safetensors``) and restored on
resume; ``sample``, ``eval`` and ``export`` use it as the student (``student.use_ema``), and stage 2 starts from
it. It costs one copy of the generator's trainable tensors (LoRA-sized; a full-weight generator doubles).
"""

from __future__ import annotations

import torch

#: Checkpoint group name of the EMA weights (keys: the ``gen`` group's parameter names).
EMA = "gen_ema"


def ema_decay_at(decay: float, n: int) -> float:
    """The decay used by the ``n``-th update (``n >= 1``): ``min(decay, (1 + n) / (10 + n))``."""
    return min(float(decay), (1.0 + n) / (10.0 + n))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float, n: int) -> float:
    """In place ``ema[k] = d_n * ema[k] + (1 - d_n) * params[k]`` for every key; returns ``d_n``."""
    d = ema_decay_at(decay, n)
    for name, value in ema.items():
        value.lerp_(params[name].detach().to(value.dtype), 1.0 - d)
    return d


def ema_copy(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached fp32 copy of ``params`` (on their device) to start an EMA from."""
    return {n: p.detach().clone().float() for n, p in params.items()}
