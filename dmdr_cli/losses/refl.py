"""ReFL: reward feedback learning by direct back-propagation of differentiable rewards (ALGORITHM.md §6.2).

ReFL was introduced with ImageReward (arXiv 2304.05977); DMDR (arXiv 2511.13649) adds it to the DMD generator
loss with a hinge per reward (EVALUATION.md §4.5)::

    s_m      = r_m(images, prefix_m + " " + prompts)                  per sample, raw score
    L_refl   = Σ_m w_m · mean_b relu(margin_m − s_m)                  margin_m set (DMDR: 0.7)
             = Σ_m w_m · mean_b (−s_m)                               margin_m None (plain reward maximisation)

Typical CLIP/HPS cosines are 0.2–0.4, so DMDR's 0.7 hinge is always active and acts as linear maximisation;
the weight alone sets the RL strength (ALGORITHM.md §12.13).
"""

from __future__ import annotations

from collections.abc import Sequence
import torch
from torch import Tensor

from dmdr_cli.errors import ConfigError
from dmdr_cli.rewards.base import Reward

__all__ = ["RewardTerm", "refl_loss", "with_prefix"]

#: ``(reward, weight, margin, prefix)``: one term of the ReFL objective.
RewardTerm = tuple[Reward, float, float | None, str]


def with_prefix(prefix: str, prompts: Sequence[str]) -> list[str]:
    """``prefix + " " + prompt`` for each prompt (DMDR's HPS "magic prompt" ``Realistic photo``); unchanged if empty."""
    return [f"{prefix} {p}" for p in prompts] if prefix else list(prompts)


def _stat_key(reward: Reward, seen: dict[str, int]) -> str:
    """``reward/<registry name>``: the ``@<weights hash>`` suffix of the reward id is left out of metric names."""
    base = "reward/" + str(reward.name).split("@", 1)[0]
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base}#{seen[base]}"


def refl_loss(terms: Sequence[RewardTerm], images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, float]]:
    """ReFL loss over ``terms`` = ``[(reward, weight, margin, prefix), …]`` (module docstring formula).

    ``images``: decoded ``[B, 3, H, W]`` in ``[0, 1]`` with the generator's graph attached. Returns the scalar loss
    (float32) and ``{"reward/<name>": mean raw score}`` per reward (python floats). Raises ``ConfigError`` when
    there is no term or a reward is not differentiable (GRPO and DPO do not need gradients).
    """
    if not terms:
        raise ConfigError("ReFL needs at least one reward", "set finetune_rl.rewards")
    for reward, *_ in terms:
        if not getattr(reward, "differentiable", False):
            raise ConfigError(f"ReFL needs a differentiable reward; use --rl grpo or dpo for {reward.name}")
    loss = torch.zeros((), dtype=torch.float32, device=images.device)
    stats: dict[str, float] = {}
    seen: dict[str, int] = {}
    for reward, weight, margin, prefix in terms:
        scores = reward(images, with_prefix(prefix, prompts)).float()
        if scores.shape != (images.shape[0],):
            raise ValueError(f"reward {reward.name} returned shape {tuple(scores.shape)}, "
                             f"expected ({images.shape[0]},)")
        per_sample = torch.relu(margin - scores) if margin is not None else -scores
        loss = loss + float(weight) * per_sample.mean().to(loss.device)
        stats[_stat_key(reward, seen)] = float(scores.detach().mean())
    return loss, stats
