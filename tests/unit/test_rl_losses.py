"""RL plug-in losses [REC]: online DPO (ALGORITHM.md 6.3) and GRPO with the CPS policy (6.4, 8.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmdr_cli.losses.dpo import best_worst, dpo_loss, x0_error
from dmdr_cli.losses.grpo import cps_coefficients, gaussian_logprob, group_advantages, grpo_policy_loss


def _neg_log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.log(1.0 / (1.0 + np.exp(-x)))


# -- DPO --------------------------------------------------------------------------------------------

def test_x0_error_per_sample():
    a = torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2)
    b = torch.zeros_like(a)
    b[1] = 1.0
    want = [float(np.mean(np.arange(12) ** 2)), float(np.mean((np.arange(12, 24) - 1.0) ** 2))]
    assert x0_error(a, b).tolist() == pytest.approx(want)
    assert x0_error(a.half(), b.half()).dtype == torch.float32


def test_dpo_loss_matches_hand_computation():
    ew = np.array([0.30, 0.10, 0.52, 0.2])
    rw = np.array([0.31, 0.12, 0.50, 0.2])
    el = np.array([0.40, 0.20, 0.45, 0.2])
    rl = np.array([0.38, 0.21, 0.47, 0.2])
    beta = 50.0
    diff = (ew - rw) - (el - rl)
    want = float(np.mean(_neg_log_sigmoid(-beta * diff)))
    t = [torch.tensor(v, dtype=torch.float64) for v in (ew, rw, el, rl)]
    loss, stats = dpo_loss(*t, beta=beta)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert stats["dpo/margin"] == pytest.approx(float(diff.mean()))
    assert stats["dpo/acc"] == pytest.approx(float(np.mean(diff < 0)))  # 2 of 4 pairs prefer the winner
    assert stats["dpo/acc"] == 0.5
    # identical policy and reference: log 2
    z = torch.zeros(3)
    assert dpo_loss(z, z, z, z, beta=1000.0)[0].item() == pytest.approx(math.log(2))


def test_dpo_gradient_sign_and_detached_reference():
    ew = torch.tensor([0.3, 0.2], requires_grad=True)
    el = torch.tensor([0.3, 0.25], requires_grad=True)
    rw = torch.tensor([0.3, 0.2], requires_grad=True)
    rl = torch.tensor([0.3, 0.2], requires_grad=True)
    beta = 10.0
    loss, _ = dpo_loss(ew, rw, el, rl, beta)
    loss.backward()
    assert (ew.grad > 0).all()   # lowering the policy's error on the winner lowers the loss
    assert (el.grad < 0).all()   # raising it on the loser lowers the loss
    assert rw.grad is None and rl.grad is None
    # d/d e_w of -log sigmoid(-beta d) = beta * sigmoid(beta d) / P
    d = (ew - rw - (el - rl)).detach()
    torch.testing.assert_close(ew.grad, beta * torch.sigmoid(beta * d) / 2)
    lower = dpo_loss(ew.detach() - 0.01, rw, el.detach(), rl, beta)[0]
    assert lower.item() < loss.item()


def test_best_worst_ties_and_min_gap():
    r = torch.tensor([1.0, 3.0, 2.0, 3.0,      # tie for best: the first one (index 1)
                      5.0, 5.0, 5.0, 5.0,      # all equal: no pair
                      0.0, 0.1, 0.05, 0.0])    # tie for worst (0 and 3): the first one; gap 0.1
    w, lo, keep = best_worst(r, 4)
    assert w.tolist()[0] == 1 and lo.tolist()[0] == 0
    assert w.tolist()[2] == 9 and lo.tolist()[2] == 8
    assert keep.tolist() == [True, False, True]
    w, lo, keep = best_worst(r, 4, min_gap=0.5)
    assert keep.tolist() == [True, False, False]
    w, lo, keep = best_worst(r, 4, min_gap=2.0)   # gap exactly 2 passes
    assert keep.tolist() == [True, False, False]
    assert best_worst(r, 4, min_gap=2.0001)[2].tolist() == [False, False, False]
    # flat indices point at the rewards they name
    assert (r[w] >= r.view(3, 4).max(1).values).all() and (r[lo] <= r.view(3, 4).min(1).values).all()
    w, lo, keep = best_worst(torch.tensor([0.2, 0.9]), 2)
    assert (w.tolist(), lo.tolist(), keep.tolist()) == ([1], [0], [True])


# -- GRPO ---------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rng = np.random.default_rng(0)
    g1 = rng.normal(size=6)
    g2 = np.full(6, 0.7)                      # zero variance: all advantages 0
    g3 = np.array([0.0] * 29 + [1.0])         # one outlier at z = 5.39: clipped to 5
    r = np.concatenate([g1, g2])
    adv = group_advantages(torch.tensor(r), 6).numpy()
    want = (g1 - g1.mean()) / (g1.std() + 1e-6)
    np.testing.assert_allclose(adv[:6], want, rtol=1e-5, atol=1e-6)
    assert adv[6:].tolist() == [0.0] * 6
    z = (1 - g3.mean()) / g3.std()
    assert z > 5
    a3 = group_advantages(torch.tensor(g3), 30)
    assert a3[-1].item() == 5.0
    assert a3[0].item() == pytest.approx(float(-g3.mean() / (g3.std() + 1e-6)), rel=1e-5)
    a3n = group_advantages(torch.tensor(-g3), 30)
    assert a3n[-1].item() == -5.0
    assert group_advantages(torch.tensor(g3), 30, clip=2.0)[-1].item() == 2.0


def test_gaussian_logprob_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    mu = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    rho = np.array([0.5, 0.2, 1.3], dtype=np.float32)
    want = -(((x - mu) ** 2) / (2 * rho[:, None, None, None] ** 2)).reshape(3, -1).mean(1)
    got = gaussian_logprob(torch.tensor(x), torch.tensor(mu), torch.tensor(rho))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    scalar = gaussian_logprob(torch.tensor(x), torch.tensor(mu), 0.5)
    np.testing.assert_allclose(scalar.numpy(), -(((x - mu) ** 2) / 0.5).reshape(3, -1).mean(1), rtol=1e-5)
    assert gaussian_logprob(torch.tensor(mu), torch.tensor(mu), 0.3).tolist() == [0.0] * 3


def test_grpo_policy_loss_clipping_by_hand():
    eps = 0.2
    ratio = np.array([0.5, 1.1, 1.5, 0.5, 0.9, 1.5])
    adv = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    terms = np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)
    # by hand: A>0: r=0.5 -> 0.5 (not clipped), 1.1 -> 1.1, 1.5 -> 1.2 (clipped); A<0: 0.5 -> -0.8 (clipped),
    # 0.9 -> -0.9, 1.5 -> -1.5 (not clipped)
    np.testing.assert_allclose(terms, [0.5, 1.1, 1.2, -0.8, -0.9, -1.5])
    old = torch.tensor(np.log([0.7, 1.3, 0.2, 2.0, 0.4, 1.0]))
    new = (old + torch.tensor(np.log(ratio))).requires_grad_(True)
    loss, stats = grpo_policy_loss(new, old, torch.tensor(adv), eps)
    assert loss.item() == pytest.approx(-terms.mean(), rel=1e-9)
    assert stats["grpo/ratio_mean"] == pytest.approx(ratio.mean())
    assert stats["grpo/clip_frac"] == pytest.approx(4 / 6)  # |r - 1| > eps: 0.5, 1.5, 0.5, 1.5
    loss.backward()
    g = new.grad.numpy()
    # d/d logp of -mean(r A) = -r A / M where unclipped; 0 where the clipped branch is the minimum
    want = np.where([True, True, False, False, True, True], -ratio * adv / 6, 0.0)
    np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-15)
    # the tiny default clip (1e-4): any real ratio change is clipped for positive advantages
    loss, stats = grpo_policy_loss(torch.tensor([0.01]), torch.tensor([0.0]), torch.tensor([2.0]), 1e-4)
    assert loss.item() == pytest.approx(-(1 + 1e-4) * 2.0) and stats["grpo/clip_frac"] == 1.0
    loss, _ = grpo_policy_loss(torch.zeros(3), torch.zeros(3), torch.tensor([1.0, -2.0, 4.0]), 1e-4)
    assert loss.item() == pytest.approx(-1.0)


def test_cps_coefficients():
    c, s = cps_coefficients(0.9)
    assert (round(c, 4), round(s, 4)) == (0.1564, 0.9877)
    assert cps_coefficients(0.0) == (1.0, 0.0)
    c1, s1 = cps_coefficients(1.0)
    assert abs(c1) < 1e-15 and s1 == 1.0
    assert c * c + s * s == pytest.approx(1.0)


# -- the CPS policy step on tiny-sd3-random -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_policy():
    from dmdr_cli.config.loader import resolve
    from dmdr_cli.engine.rl import GRPO
    from dmdr_cli.engine.sampler import student_spec
    from dmdr_cli.families.loading import load_base
    from dmdr_cli.recipes.distill import build_roles

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = resolve("tiny-sd3-random", sets=["model.x0_end=0"])  # clean end point: x_t = (1-t) x0 + t eps exactly
    bundle = load_base(cfg)
    roles = build_roles(bundle, cfg)
    spec = student_spec(bundle.family, cfg.student)
    cond = bundle.family.encode_prompts(bundle, ["a red circle", "a green star"])
    yield bundle, roles, spec, cond, GRPO
    torch.set_num_threads(n)


def test_cps_eta_one_is_the_sde_renoise_and_eta_zero_the_euler_step(sd3_policy):
    bundle, roles, spec, cond, GRPO = sd3_policy
    fam = bundle.family
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.75])
    t_next = torch.tensor([0.75, 0.5])
    tn = t_next.view(-1, 1, 1, 1)
    with torch.no_grad(), roles.role("gen") as net:
        v = fam.predict(net, x, t, cond)
        x0 = fam.to_x0(x, v, t)
        torch.testing.assert_close(x0, x - t.view(-1, 1, 1, 1) * v)

        sde = GRPO(bundle, roles, spec, [], eta=1.0)
        mean, rho, x0_pol = sde._policy_step(net, x, t, t_next, cond)
        # eta = 1: the DMDR SDE backward simulation, x' = (1 - t') x0 + t' z
        torch.testing.assert_close(mean, (1 - tn) * x0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rho, t_next)
        torch.testing.assert_close(x0_pol, x0)

        ode = GRPO(bundle, roles, spec, [], eta=0.0)
        mean0, rho0, _ = ode._policy_step(net, x, t, t_next, cond)
        # eta = 0: exactly the Euler ODE step x + (t' - t) v
        torch.testing.assert_close(mean0, x + (tn - t.view(-1, 1, 1, 1)) * v, rtol=1e-5, atol=1e-5)
        assert rho0.abs().max() == 0

        cps = GRPO(bundle, roles, spec, [], eta=0.9)
        mean9, rho9, _ = cps._policy_step(net, x, t, t_next, cond)
        eps_hat = x + (1 - t.view(-1, 1, 1, 1)) * v
        torch.testing.assert_close(mean9, (1 - tn) * x0 + tn * math.cos(0.45 * math.pi) * eps_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rho9, t_next * math.sin(0.45 * math.pi))


def test_grpo_needs_two_steps(sd3_policy):
    import dataclasses

    from dmdr_cli.errors import ConfigError

    bundle, roles, spec, cond, GRPO = sd3_policy
    with pytest.raises(ConfigError, match="at least 2 steps"):
        GRPO(bundle, roles, dataclasses.replace(spec, grid=(0.75,)), [])
