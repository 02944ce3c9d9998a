"""RL plug-ins for stage 2 (ALGORITHM.md 6): ``L_G = dmd_weight * L_dmd + L_rl``.

Each plug-in is called inside the generator update as ``plugin(x0_hat, prompts, cond, gen)`` and returns
``(loss, stats)``; ``x0_hat`` is the generator's one-step prediction (with grad), ``gen`` the training RNG.

- ``refl`` [O]: decode ``x0_hat`` through the frozen VAE (gradients flow into the generator only) and apply
  the hinge ``sum_m w_m mean relu(margin_m - R_m)`` (losses/refl.py).
- ``dpo`` [REC]: online reward-ranked best/worst pairs from the student's own sampler, Diffusion-DPO on the
  student grid against a frozen reference adapter ``gen_ref`` (losses/dpo.py).
- ``grpo`` [REC]: group-normalised advantages on stochastic CPS rollouts, clipped ratio on the stochastic
  steps, DMD in place of the KL term (losses/grpo.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmdr_cli.engine.sampler import SamplerSpec, run_sampler
from dmdr_cli.errors import ConfigError
from dmdr_cli.losses.dpo import best_worst, dpo_loss, x0_error
from dmdr_cli.losses.grpo import cps_coefficients, gaussian_logprob, group_advantages, grpo_policy_loss


def _randn(gen, shape, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen).to(device=like.device, dtype=like.dtype)


def reward_scores(terms, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Weighted reward ``R = sum_m w_m R_m(prefix_m + prompt)`` per image (no hinge; used for ranking)."""
    total = torch.zeros(images.shape[0], device=images.device)
    for reward, weight, _margin, prefix in terms:
        texts = [f"{prefix} {p}" if prefix else p for p in prompts]
        total = total + weight * reward(images, texts).float()
    return total


@dataclass
class ReFL:
    """Reward on the decoded one-step prediction, hinge per reward, gradients through the VAE decoder."""

    bundle: object
    terms: list

    def __call__(self, x0_hat, prompts, cond, gen):
        from dmdr_cli.losses.refl import refl_loss

        images = self.bundle.family.decode(self.bundle, x0_hat)
        return refl_loss(self.terms, images, prompts)


@dataclass
class DPO:
    """Online DPO: M student samples per prompt, best vs worst by reward, DPO on a shared-noise renoise."""

    bundle: object
    roles: object
    spec: SamplerSpec
    terms: list
    beta: float = 1000.0
    samples: int = 4
    weight: float = 1.0
    min_gap: float = 0.0

    def __call__(self, x0_hat, prompts, cond, gen):
        fam, m = self.bundle.family, self.samples
        idx = torch.arange(len(prompts)).repeat_interleave(m)
        cond_m = cond.index(idx.to(x0_hat.device))
        with torch.no_grad(), self.roles.role("gen") as net:
            z = _randn(gen, (len(idx), *x0_hat.shape[1:]), x0_hat)
            x = run_sampler(fam, net, self.spec, cond_m, None, z, noise_fn=lambda like: _randn(gen, like.shape, like))
            scores = reward_scores(self.terms, fam.decode(self.bundle, x), [prompts[i] for i in idx.tolist()])
        w_i, l_i, keep = best_worst(scores, m, self.min_gap)
        stats = {"reward/ranked_mean": float(scores.mean()), "dpo/pairs": float(keep.sum())}
        if not keep.any():
            return torch.zeros((), device=x0_hat.device), stats
        w_i, l_i = w_i[keep], l_i[keep]
        pair_cond = cond.index(torch.arange(len(prompts), device=x0_hat.device)[keep])
        k = torch.randint(0, self.spec.steps, (int(keep.sum()),), generator=gen)
        t = torch.tensor([self.spec.grid[i] for i in k.tolist()], device=x0_hat.device)
        eps = _randn(gen, (len(t), *x0_hat.shape[1:]), x0_hat)
        x_w, x_l = x[w_i], x[l_i]
        xt_w, xt_l = fam.add_noise(x_w, eps, t), fam.add_noise(x_l, eps, t)
        both, t2, c2 = torch.cat([xt_w, xt_l]), torch.cat([t, t]), pair_cond.cat(pair_cond)
        with torch.no_grad(), self.roles.role("ref") as net:
            ref0 = fam.to_x0(both, fam.predict(net, both, t2, c2), t2)
        with self.roles.role("gen") as net:
            pol0 = fam.to_x0(both, fam.predict(net, both, t2, c2), t2)
        n = len(t)
        target = torch.cat([x_w, x_l])
        e_pol, e_ref = x0_error(pol0, target), x0_error(ref0, target)
        loss, dstats = dpo_loss(e_pol[:n], e_ref[:n], e_pol[n:], e_ref[n:], self.beta)
        stats.update(dstats)
        return self.weight * loss, stats


@dataclass
class GRPO:
    """Group rollouts on the stochastic CPS sampler; clipped-ratio policy loss on the stochastic steps."""

    bundle: object
    roles: object
    spec: SamplerSpec
    terms: list
    group: int = 8
    eta: float = 0.9
    clip_eps: float = 1e-4

    def __post_init__(self) -> None:
        if self.spec.steps < 2:
            raise ConfigError("GRPO needs a student with at least 2 steps (its stochastic steps are the policy)",
                              "use --rl refl or --rl dpo for a 1-step student")

    def _policy_step(self, net, x, t, t_next, cond):
        fam = self.bundle.family
        out = fam.predict(net, x, t, cond)
        cos, sin = cps_coefficients(self.eta)
        x0, eps = fam.to_x0(x, out, t), fam.eps_from(x, out, t)
        mean = fam.add_noise(x0, cos * eps, t_next).float()
        return mean, fam.noise_std(t_next) * sin, x0

    def __call__(self, x0_hat, prompts, cond, gen):
        fam, g = self.bundle.family, self.group
        idx = torch.arange(len(prompts)).repeat_interleave(g).to(x0_hat.device)
        cond_g = cond.index(idx)
        grid = self.spec.grid
        steps = []
        with torch.no_grad(), self.roles.role("gen") as net:
            x = _randn(gen, (len(idx), *x0_hat.shape[1:]), x0_hat)
            for i, ti in enumerate(grid):
                t = torch.full((len(idx),), ti, device=x.device)
                if i == len(grid) - 1:  # deterministic last step
                    x = fam.to_x0(x, fam.predict(net, x, t, cond_g), t)
                    break
                t_next = torch.full_like(t, grid[i + 1])
                mean, rho, _ = self._policy_step(net, x, t, t_next, cond_g)
                x_next = mean + rho.view(-1, 1, 1, 1) * _randn(gen, x.shape, x).float()
                steps.append((x, t, t_next, x_next, gaussian_logprob(x_next, mean, rho)))
                x = x_next.to(x.dtype)
            scores = reward_scores(self.terms, fam.decode(self.bundle, x), [prompts[i] for i in idx.tolist()])
        adv = group_advantages(scores, g)
        logp_new, logp_old, advs = [], [], []
        with self.roles.role("gen") as net:
            for x_i, t, t_next, x_next, lp_old in steps:
                mean, rho, _ = self._policy_step(net, x_i, t, t_next, cond_g)
                logp_new.append(gaussian_logprob(x_next, mean, rho))
                logp_old.append(lp_old)
                advs.append(adv)
        loss, stats = grpo_policy_loss(torch.cat(logp_new), torch.cat(logp_old), torch.cat(advs), self.clip_eps)
        stats.update({"reward/group_mean": float(scores.mean()), "reward/group_std": float(scores.std(unbiased=False))})
        return loss, stats


def build_plugin(kind: str, *, bundle, roles, spec: SamplerSpec, terms, settings):
    """The RL plug-in for ``finetune_rl.rl`` (``none`` -> None: distillation only)."""
    if kind == "none":
        return None
    if not terms:
        raise ConfigError(f"--rl {kind} needs at least one reward", "pass --reward NAME=WEIGHT or set finetune_rl.rewards")
    if kind == "refl":
        return ReFL(bundle, terms)
    if kind == "dpo":
        roles.add_reference()
        return DPO(bundle, roles, spec, terms, beta=settings.dpo_beta, samples=settings.dpo_samples,
                   weight=settings.dpo_weight)
    if kind == "grpo":
        return GRPO(bundle, roles, spec, terms, group=settings.grpo_group, eta=settings.grpo_eta,
                    clip_eps=settings.grpo_clip)
    raise ConfigError(f"unknown RL plug-in '{kind}'", "choose refl, dpo, grpo or none")
