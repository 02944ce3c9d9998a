"""Unit tests for dmdr_cli.schedules (grids: ALGORITHM.md §1.2, §1.3, §5.1; dynamic: §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmdr_cli.schedules.dynamic import (
    cosine_factor,
    dynadg_scale,
    dynars_params,
    sample_beta,
    sample_gamma,
    sample_timesteps,
)
from dmdr_cli.schedules.grids import (
    discrete_timestep,
    eps_student_grid,
    eps_teacher_grid,
    flow_shift,
    flow_student_grid,
    flow_teacher_grid,
    flow_time_input,
    sdxl_alphas_cumprod,
)

# --------------------------------------------------------------------------------------------------- grids


def test_flow_shift_float_and_tensor() -> None:
    assert flow_shift(0.5, 3.0) == pytest.approx(0.75)
    assert flow_shift(0.75, 3.0) == pytest.approx(0.9)
    assert flow_shift(1.0, 5.0) == pytest.approx(1.0)
    assert flow_shift(0.0, 5.0) == pytest.approx(0.0)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    t = flow_shift(s, 3.0)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    # RTDMD grid [1000, 750, 500, 250]/1000 shifted by 3 -> 1.0, 0.9, 0.75, 0.5 (§5.1 table).
    np.testing.assert_allclose(t.numpy(), [1.0, 0.9, 0.75, 0.5], atol=1e-12)
    # identity for S = 1
    np.testing.assert_allclose(flow_shift(s, 1.0).numpy(), s.numpy())
    with pytest.raises(ValueError):
        flow_shift(0.5, 0.0)


@pytest.mark.parametrize(
    ("shift", "expected", "tau"),
    [
        (3.0, [1.0, 0.90012, 0.75037, 0.50100], [1000, 900, 750, 501]),  # SD3-Medium
        (5.0, [1.0, 0.93758, 0.83361, 0.62594], [1000, 938, 834, 626]),  # SD3.5-Large
    ],
)
def test_flow_student_grid_fp32_column(shift: float, expected: list[float], tau: list[int]) -> None:
    grid = flow_student_grid(4, shift)
    assert len(grid) == 4 and all(isinstance(v, float) for v in grid)
    np.testing.assert_allclose(grid, expected, atol=5e-6)
    # independent NumPy computation in float64
    s = np.linspace(1.0, 0.001, 5)
    ref = shift * s / (1 + (shift - 1) * s)
    np.testing.assert_allclose(grid, ref[:4], rtol=1e-6)
    assert flow_time_input(torch.tensor(grid)).tolist() == [float(v) for v in tau]
    np.testing.assert_allclose(flow_student_grid(4, shift, dtype="fp64"), ref[:4], rtol=1e-14)


@pytest.mark.parametrize(
    ("shift", "expected"),
    [
        (3.0, [1.0, 0.8984375, 0.75, 0.5]),  # SD3-Medium, doc: 1.0, 0.8984, 0.75, 0.5
        (5.0, [1.0, 0.9375, 0.83203125, 0.625]),  # SD3.5-Large, doc: 1.0, 0.9375, 0.8320, 0.625
    ],
)
def test_flow_student_grid_bf16_column(shift: float, expected: list[float]) -> None:
    assert flow_student_grid(4, shift, dtype="bf16") == expected


def test_flow_student_grid_unshifted_and_edges() -> None:
    # §5.3: the unshifted grid is s = [1.0, 0.75025, 0.5005, 0.25075]
    np.testing.assert_allclose(flow_student_grid(4, 1.0), [1.0, 0.75025, 0.5005, 0.25075], atol=1e-7)
    # ImageNet SiT 1-step: t = 1.0, t_end = 0
    assert flow_student_grid(1, 1.0, t_end=0.0) == [1.0]
    assert flow_student_grid(2, 1.0, t_end=0.0) == [1.0, 0.5]
    with pytest.raises(ValueError):
        flow_student_grid(0, 3.0)
    with pytest.raises(ValueError):
        flow_student_grid(4, 3.0, dtype="fp16")
    with pytest.raises(ValueError):
        flow_student_grid(4, 3.0, t_end=1.0)


def test_flow_teacher_grid() -> None:
    np.testing.assert_allclose(flow_teacher_grid(4, 3.0), [1.0, 0.9, 0.75, 0.5], atol=1e-12)
    s = np.linspace(1.0, 0.0, 29)
    ref = 3.0 * s / (1 + 2.0 * s)
    grid = flow_teacher_grid(28, 3.0)
    assert len(grid) == 28
    np.testing.assert_allclose(grid, ref[:-1], rtol=1e-12)
    assert grid[-1] > 0.0


def test_discrete_timestep() -> None:
    t = torch.tensor([0.0, 0.0004, 0.0006, 0.249, 0.399, 0.7496, 0.999, 1.0, -0.1, 1.2])
    tau = discrete_timestep(t)
    assert tau.dtype == torch.int64
    assert tau.tolist() == [0, 0, 1, 249, 399, 750, 999, 999, 0, 999]
    assert discrete_timestep(torch.tensor(eps_student_grid(4))).tolist() == [999, 749, 499, 249]
    assert discrete_timestep(torch.tensor(eps_student_grid(1))).tolist() == [399]
    assert discrete_timestep(torch.rand(2, 3)).shape == (2, 3)


def test_flow_time_input() -> None:
    t = torch.tensor([1.0, 0.900119960308075, 0.7503747940063477, 0.5009989738464355])
    out = flow_time_input(t)
    assert out.dtype == torch.float32
    assert out.tolist() == [1000.0, 900.0, 750.0, 501.0]
    np.testing.assert_allclose(flow_time_input(t, rounding=False).numpy(), 1000 * t.numpy(), rtol=1e-6)
    # bf16 grid values stay exact integers (bf16 itself cannot hold 898)
    t_bf16 = torch.tensor(flow_student_grid(4, 3.0, dtype="bf16"), dtype=torch.bfloat16)
    assert flow_time_input(t_bf16).tolist() == [1000.0, 898.0, 750.0, 500.0]


def test_sdxl_alphas_cumprod_table() -> None:
    ac = sdxl_alphas_cumprod()
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    idx = [0, 249, 399, 499, 749, 999]
    sqrt_a = [0.99957, 0.82185, 0.65275, 0.52694, 0.23796, 0.06826]
    sqrt_1ma = [0.02915, 0.56971, 0.75757, 0.84990, 0.97128, 0.99767]
    np.testing.assert_allclose(ac[idx].sqrt().numpy(), sqrt_a, atol=5e-6)
    np.testing.assert_allclose((1 - ac[idx]).sqrt().numpy(), sqrt_1ma, atol=5e-6)
    assert ac[999].item() == pytest.approx(0.0047, abs=5e-5)
    # independent computation from the formula with a Python loop
    prod, ref = 1.0, []
    for i in range(1000):
        beta = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2
        prod *= 1.0 - beta
        ref.append(prod)
    np.testing.assert_allclose(ac.numpy(), ref, rtol=1e-12)
    assert bool((ac[1:] < ac[:-1]).all())


def test_eps_grids() -> None:
    assert eps_student_grid(1) == [0.399]
    assert eps_student_grid(1, one_step_timestep=500) == [0.5]
    assert eps_student_grid(4) == [0.999, 0.749, 0.499, 0.249]  # DMD2 4-step grid
    assert eps_teacher_grid(4) == [0.999, 0.749, 0.499, 0.249]
    assert eps_teacher_grid(1) == [0.999]
    assert eps_teacher_grid(2) == [0.999, 0.499]
    # diffusers "trailing" spacing, computed independently with NumPy
    for n in (2, 3, 4, 8, 25, 50):
        ref = (np.round(np.arange(1000, 0, -1000 / n)).astype(np.int64) - 1) / 1000
        np.testing.assert_allclose(eps_teacher_grid(n), ref, rtol=0, atol=0)
        assert eps_student_grid(n) == eps_teacher_grid(n)
    with pytest.raises(ValueError):
        eps_student_grid(0)
    with pytest.raises(ValueError):
        eps_student_grid(1, one_step_timestep=1000)


# --------------------------------------------------------------------------------------------------- dynamic

K = 1000
# §4.3 table: k/K, c_k, λ_r (0.5), λ_r (0.75), a_k, b_k, mean t, std t
TABLE = [
    (0.0, 1.0000, 0.500, 0.750, 4.000, 1.500, 0.727, 0.175),
    (0.25, 0.8536, 0.427, 0.640, 3.561, 1.427, 0.714, 0.185),
    (0.5, 0.5000, 0.250, 0.375, 2.500, 1.250, 0.667, 0.216),
    (0.75, 0.1464, 0.073, 0.110, 1.439, 1.073, 0.573, 0.264),
    (1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.500, 0.289),
]


def _beta_mean_std(a: float, b: float) -> tuple[float, float]:
    return a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))


@pytest.mark.parametrize("row", TABLE)
def test_dynamic_table(row: tuple[float, ...]) -> None:
    frac, c, lam05, lam075, a, b, mean, std = row
    k = int(frac * K)
    assert cosine_factor(k, K) == pytest.approx(c, abs=5e-5)
    assert dynadg_scale(k, K, 0.5) == pytest.approx(lam05, abs=5e-4)
    assert dynadg_scale(k, K, 0.75) == pytest.approx(lam075, abs=5e-4)
    a_k, b_k = dynars_params(k, K)
    assert (a_k, b_k) == (pytest.approx(a, abs=5e-4), pytest.approx(b, abs=5e-4))
    m, s = _beta_mean_std(a_k, b_k)
    assert m == pytest.approx(mean, abs=5e-4)
    assert s == pytest.approx(std, abs=5e-4)
    if frac < 1.0:  # the mode stays at (a0 − 1)/(a0 + b0 − 2) = 3/3.5
        assert (a_k - 1) / (a_k + b_k - 2) == pytest.approx(3.0 / 3.5, rel=1e-12)


def test_cosine_factor_edges() -> None:
    assert cosine_factor(0, 0) == 0.0
    assert cosine_factor(5, -1) == 0.0
    assert cosine_factor(2 * K, K) == 0.0
    assert cosine_factor(-3, K) == 1.0
    assert cosine_factor(1, 2) == pytest.approx(0.5)
    assert cosine_factor(1, 3) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))  # 0.75


def test_dynadg_edges() -> None:
    assert dynadg_scale(0, K, 0.5, enabled=False) == 0.0
    assert dynadg_scale(0, 0, 0.5) == 0.0  # K = 0: disabled (SDXL 1-step)
    assert dynadg_scale(K, K, 0.5) == 0.0
    assert dynadg_scale(K - 1, K, 0.5) > 0.0
    assert dynadg_scale(10 * K, K, 0.5) == 0.0


def test_dynars_edges() -> None:
    assert dynars_params(0, K, enabled=False) == (1.0, 1.0)
    assert dynars_params(0, 0) == (1.0, 1.0)
    assert dynars_params(5 * K, K) == (1.0, 1.0)
    assert dynars_params(0, K, a0=2.0, b0=3.0) == (2.0, 3.0)


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_sample_timesteps_beta_moments(frac: float) -> None:
    g = torch.Generator().manual_seed(1234)
    k = int(frac * K)
    t = sample_timesteps(200_000, k, K, sampler="beta_anneal", a0=4.0, b0=1.5, generator=g)
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    mean, std = _beta_mean_std(*dynars_params(k, K))
    # standard error of the mean ≈ 0.29/√200k ≈ 6.5e-4: tolerance = 5 sigma; seed is fixed, so no flakes
    assert float(t.mean()) == pytest.approx(mean, abs=3e-3)
    assert float(t.std()) == pytest.approx(std, abs=3e-3)


def _beta_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """Beta CDF by trapezoidal integration of the pdf on a fine grid (a, b ≥ 1: bounded pdf)."""
    grid = np.linspace(0.0, 1.0, 200_001)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    log_x = np.log(np.clip(grid, 1e-300, None))
    log_1mx = np.log1p(-np.clip(grid, None, 1 - 1e-16))
    pdf = np.exp(log_norm + (a - 1) * log_x + (b - 1) * log_1mx)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(grid))])
    return np.interp(x, grid, cdf)


def _ks_statistic(samples: np.ndarray, a: float, b: float) -> float:
    x = np.sort(samples)
    n = x.size
    cdf = _beta_cdf(x, a, b)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


def test_sample_timesteps_beta_distribution_ks() -> None:
    g = torch.Generator().manual_seed(7)
    k = int(0.25 * K)
    a, b = dynars_params(k, K)
    assert _beta_cdf(np.array([1.0]), a, b)[0] == pytest.approx(1.0, abs=1e-6)
    t = sample_timesteps(20_000, k, K, sampler="beta_anneal", a0=4.0, b0=1.5, generator=g).double().numpy()
    critical = 1.95 / math.sqrt(t.size)  # Kolmogorov–Smirnov, alpha = 0.001
    assert _ks_statistic(t, a, b) < critical
    # and it is clearly not the k = 0 distribution Beta(4, 1.5)
    assert _ks_statistic(t, 4.0, 1.5) > critical


def test_sample_timesteps_determinism_and_alias() -> None:
    kw = dict(sampler="beta_anneal", a0=4.0, b0=1.5)
    t1 = sample_timesteps(64, 10, K, generator=torch.Generator().manual_seed(0), **kw)
    t2 = sample_timesteps(64, 10, K, generator=torch.Generator().manual_seed(0), **kw)
    t3 = sample_timesteps(64, 10, K, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(t1, t2)
    assert not torch.equal(t1, t3)
    # the global RNG does not matter
    torch.manual_seed(99)
    t4 = sample_timesteps(64, 10, K, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(t1, t4)
    # successive draws from one generator differ
    g = torch.Generator().manual_seed(0)
    first = sample_timesteps(64, 10, K, generator=g, **kw)
    assert not torch.equal(first, sample_timesteps(64, 10, K, generator=g, **kw))
    # deprecated alias samples the same Beta
    kw_alias = dict(sampler="logit_normal", a0=4.0, b0=1.5)
    t5 = sample_timesteps(64, 10, K, generator=torch.Generator().manual_seed(0), **kw_alias)
    assert torch.equal(t1, t5)


def test_sample_timesteps_uniform() -> None:
    g = torch.Generator().manual_seed(3)
    t = sample_timesteps(200_000, 0, K, sampler="uniform", a0=4.0, b0=1.5, generator=g)
    assert t.dtype == torch.float32 and t.shape == (200_000,)
    assert float(t.min()) >= 0.001 and float(t.max()) < 1.0
    assert float(t.mean()) == pytest.approx(0.5005, abs=3e-3)
    assert float(t.std()) == pytest.approx(0.999 / math.sqrt(12), abs=3e-3)
    # no schedule: k does not matter
    t_a = sample_timesteps(32, 0, K, sampler="uniform", a0=4.0, b0=1.5, generator=torch.Generator().manual_seed(5))
    t_b = sample_timesteps(32, 900, K, sampler="uniform", a0=4.0, b0=1.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(t_a, t_b)


def test_sample_timesteps_errors_and_device() -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        sample_timesteps(4, 0, K, sampler="logit", a0=4.0, b0=1.5, generator=g)
    t = sample_timesteps(4, 0, K, sampler="beta_anneal", a0=4.0, b0=1.5, generator=g, device="cpu")
    assert t.device.type == "cpu"
    assert sample_timesteps(0, 0, K, sampler="beta_anneal", a0=4.0, b0=1.5, generator=g).shape == (0,)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5, 4.0])
def test_sample_gamma_moments(alpha: float) -> None:
    x = sample_gamma(100_000, alpha, torch.Generator().manual_seed(11))
    assert x.dtype == torch.float64 and bool((x > 0).all())
    # Gamma(α, 1): mean α, variance α
    assert float(x.mean()) == pytest.approx(alpha, rel=0.02)
    assert float(x.var()) == pytest.approx(alpha, rel=0.05)
    with pytest.raises(ValueError):
        sample_gamma(4, 0.0, torch.Generator())


def test_sample_beta_below_one() -> None:
    x = sample_beta(100_000, 0.5, 0.5, torch.Generator().manual_seed(2))
    assert float(x.mean()) == pytest.approx(0.5, abs=5e-3)
    assert float(x.var()) == pytest.approx(1 / 8, abs=3e-3)  # ab/((a+b)²(a+b+1))
