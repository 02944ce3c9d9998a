"""Unit tests for dmdr_cli.losses.dmd (ALGORITHM.md §3.1, §3.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmdr_cli.losses.dmd import cfg_combine, dmd_loss, fake_score_loss, interval_cfg, sample_cfg_scale

SHAPE = (2, 3, 4, 5)


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g).to(dtype).requires_grad_(True)
    x0_fake = torch.randn(SHAPE, generator=g).to(dtype)
    x0_real = torch.randn(SHAPE, generator=g).to(dtype)
    return x0, x0_fake, x0_real


def _numpy_reference(x0: np.ndarray, f: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Hand computation of §3.1 in float64: (w_n per sample, g, loss)."""
    w_n = np.abs(x0 - r).reshape(x0.shape[0], -1).mean(axis=1) + 1e-8
    g = (f - r) / w_n[:, None, None, None]
    loss = 0.5 * np.mean(g**2)  # x̂0 − sg(x̂0 − g) = g numerically
    return w_n, g, float(loss)


def test_dmd_loss_matches_numpy_and_gradient() -> None:
    x0, x0_fake, x0_real = _inputs()
    loss, stats = dmd_loss(x0, x0_fake, x0_real)
    w_n, g, ref_loss = _numpy_reference(*(t.detach().double().numpy() for t in (x0, x0_fake, x0_real)))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    loss.backward()
    # ∂L/∂x̂0 = g / (B·C·H·W)
    np.testing.assert_allclose(x0.grad.double().numpy(), g / x0.numel(), rtol=1e-5, atol=1e-9)
    assert stats["dmd/grad_abs_mean"] == pytest.approx(float(np.abs(g).mean()), rel=1e-5)
    assert stats["dmd/w_n_mean"] == pytest.approx(float(w_n.mean()), rel=1e-6)
    assert stats["dmd/nonfinite"] == 0.0
    x = x0.detach().double().numpy()
    assert stats["dmd/x0_mean"] == pytest.approx(float(x.mean()), abs=1e-6)
    assert stats["dmd/x0_std"] == pytest.approx(float(x.std(ddof=1)), rel=1e-5)
    assert set(stats) == {"dmd/grad_abs_mean", "dmd/w_n_mean", "dmd/nonfinite", "dmd/x0_mean", "dmd/x0_std"}
    assert all(isinstance(v, float) for v in stats.values())


def test_dmd_loss_hand_computed_small_case() -> None:
    # B = 1, C·H·W = 2: x̂0 = [1, 3], x0_r = [0, 1] → w_n = (1 + 2)/2 = 1.5; x0_f − x0_r = [3, −1.5] → g = [2, −1]
    x0 = torch.tensor([[[[1.0, 3.0]]]], requires_grad=True)
    x0_real = torch.tensor([[[[0.0, 1.0]]]])
    x0_fake = torch.tensor([[[[3.0, -0.5]]]])
    loss, stats = dmd_loss(x0, x0_fake, x0_real)
    assert loss.item() == pytest.approx(0.5 * (4 + 1) / 2)
    loss.backward()
    assert x0.grad.flatten().tolist() == pytest.approx([1.0, -0.5])  # g / 2
    assert stats["dmd/w_n_mean"] == pytest.approx(1.5)
    assert stats["dmd/grad_abs_mean"] == pytest.approx(1.5)
    # gradient descent moves x̂0 towards x0_r − x0_f direction
    step = -x0.grad
    assert torch.all(torch.sign(step) == torch.sign(x0_real - x0_fake))


def test_dmd_loss_normaliser_is_per_sample_and_scale_free() -> None:
    x0, x0_fake, x0_real = _inputs(seed=1)
    _, stats = dmd_loss(x0, x0_fake, x0_real)
    loss_a, _ = dmd_loss(x0, x0_fake, x0_real)
    loss_a.backward()
    grad_a = x0.grad.clone()
    # scale sample 1's displacements from x0_real by 10: g (hence the gradient) is unchanged
    scale = torch.tensor([1.0, 10.0]).view(2, 1, 1, 1)
    x0_b = (x0_real + scale * (x0.detach() - x0_real)).requires_grad_(True)
    x0_fake_b = x0_real + scale * (x0_fake - x0_real)
    loss_b, stats_b = dmd_loss(x0_b, x0_fake_b, x0_real)
    loss_b.backward()
    np.testing.assert_allclose(x0_b.grad.numpy(), grad_a.numpy(), rtol=1e-4, atol=1e-9)
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-4)
    assert stats_b["dmd/w_n_mean"] > stats["dmd/w_n_mean"]


def test_dmd_loss_targets_are_detached_and_fp32() -> None:
    x0, x0_fake, x0_real = _inputs(seed=2, dtype=torch.bfloat16)
    x0_fake.requires_grad_(True)
    x0_real.requires_grad_(True)
    loss, _ = dmd_loss(x0, x0_fake, x0_real)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x0.grad is not None and x0.grad.dtype == torch.bfloat16
    assert x0_fake.grad is None and x0_real.grad is None
    _, g, ref_loss = _numpy_reference(*(t.detach().double().numpy() for t in (x0, x0_fake, x0_real)))
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)  # computed from upcast inputs in fp32


def _with_nonfinite() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x0, x0_fake, x0_real = _inputs(seed=3)
    x0_fake = x0_fake.clone()
    x0_fake[0, 0, 0, 0] = float("nan")
    x0_fake[1, 1, 1, 1] = float("inf")
    return x0, x0_fake, x0_real


def test_dmd_loss_faithful_nan_to_num() -> None:
    x0, x0_fake, x0_real = _with_nonfinite()
    loss, stats = dmd_loss(x0, x0_fake, x0_real, nan_mode="faithful")
    assert stats["dmd/nonfinite"] == 2.0
    loss.backward()
    grad = x0.grad
    n = x0.numel()
    assert grad[0, 0, 0, 0].item() == 0.0  # NaN → 0
    # +inf → float-max in g (hence the mean |g| is huge) ...
    assert stats["dmd/grad_abs_mean"] >= torch.finfo(torch.float32).max / n * 0.99
    # ... and, as in the official code, the squared-difference backward overflows there (§12.14: use `clean`)
    assert not torch.isfinite(grad[1, 1, 1, 1]).item()
    assert not np.isfinite(loss.item())
    # other entries are untouched
    _, g, _ = _numpy_reference(*(t.detach().double().numpy() for t in _inputs(seed=3)))
    np.testing.assert_allclose(grad[0, 1].numpy(), g[0, 1] / n, rtol=1e-5)


def test_dmd_loss_clean_mode_zeroes_and_counts() -> None:
    x0, x0_fake, x0_real = _with_nonfinite()
    loss, stats = dmd_loss(x0, x0_fake, x0_real, nan_mode="clean")
    assert stats["dmd/nonfinite"] == 2.0
    assert np.isfinite(loss.item()) and np.isfinite(stats["dmd/grad_abs_mean"])
    loss.backward()
    assert x0.grad[0, 0, 0, 0].item() == 0.0 and x0.grad[1, 1, 1, 1].item() == 0.0
    assert torch.isfinite(x0.grad).all()
    # w_n does not involve x0_fake, so the finite entries match the reference
    _, g, _ = _numpy_reference(*(t.detach().double().numpy() for t in _inputs(seed=3)))
    g[0, 0, 0, 0] = 0.0
    g[1, 1, 1, 1] = 0.0
    np.testing.assert_allclose(x0.grad.double().numpy(), g / x0.numel(), rtol=1e-5, atol=1e-9)
    assert loss.item() == pytest.approx(0.5 * float(np.mean(g**2)), rel=1e-5)


def test_dmd_loss_errors() -> None:
    x0, x0_fake, x0_real = _inputs()
    with pytest.raises(ValueError):
        dmd_loss(x0, x0_fake, x0_real, nan_mode="zero")
    with pytest.raises(ValueError):
        dmd_loss(x0, x0_fake[:1], x0_real)
    with pytest.raises(ValueError):
        dmd_loss(x0.flatten(), x0_fake.flatten(), x0_real.flatten())


def test_fake_score_loss() -> None:
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(SHAPE, generator=g).to(torch.bfloat16).requires_grad_(True)
    target = torch.randn(SHAPE, generator=g).to(torch.bfloat16)
    loss = fake_score_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    p, t = pred.detach().double().numpy(), target.double().numpy()
    ref = ((p - t) ** 2).reshape(2, -1).mean(axis=1).mean()
    assert loss.item() == pytest.approx(float(ref), rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(pred.grad.double().numpy(), 2 * (p - t) / p.size, rtol=1e-2, atol=1e-4)
    assert fake_score_loss(target, target).item() == 0.0
    with pytest.raises(ValueError):
        fake_score_loss(pred, target[:1])


def test_cfg_combine() -> None:
    u = torch.tensor([1.0, 2.0, -1.0])
    c = torch.tensor([3.0, 0.0, -1.0])
    assert cfg_combine(u, c, 4.5).tolist() == pytest.approx([1 + 4.5 * 2, 2 - 4.5 * 2, -1.0])
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.equal(cfg_combine(u, c, 0.0), u)
    w = torch.tensor([2.0, 3.0]).view(2, 1)
    out = cfg_combine(u.expand(2, 3), c.expand(2, 3), w)
    assert torch.allclose(out, torch.stack([u + 2 * (c - u), u + 3 * (c - u)]))


def test_sample_cfg_scale() -> None:
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert sample_cfg_scale(1.0, 0.5, g) == 1.0
    assert sample_cfg_scale(0.0, 0.5, g) == 1.0
    assert torch.equal(g.get_state(), state)  # nothing drawn when CFG is off
    draws = np.array([sample_cfg_scale(4.5, 0.5, g) for _ in range(4000)])
    assert draws.min() >= 4.0 and draws.max() <= 5.0
    assert draws.min() < 4.01 and draws.max() > 4.99
    assert draws.mean() == pytest.approx(4.5, abs=0.02)
    assert draws.std() == pytest.approx(1.0 / np.sqrt(12), abs=0.01)  # U[w0 − 0.5, w0 + 0.5]
    a = sample_cfg_scale(3.5, 0.5, torch.Generator().manual_seed(9))
    b = sample_cfg_scale(3.5, 0.5, torch.Generator().manual_seed(9))
    assert a == b and isinstance(a, float)
    assert sample_cfg_scale(3.5, 0.0, g) == 3.5
    with pytest.raises(ValueError):
        sample_cfg_scale(3.5, -0.1, g)


def test_interval_cfg() -> None:
    t = torch.tensor([0.95, 0.4, 0.39, 0.0])
    w = interval_cfg(6.0, t, 0.4)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
    assert w.tolist() == [6.0, 6.0, 1.0, 1.0]  # guided from t_min (inclusive) up to pure noise
    assert interval_cfg(6.0, t, 0.0) == 6.0  # no interval: the scalar, every t
    assert interval_cfg(1.0, t, 0.4) == 1.0  # CFG off stays off (no unconditional pass)
    with pytest.raises(ValueError):
        interval_cfg(6.0, t, -0.1)
