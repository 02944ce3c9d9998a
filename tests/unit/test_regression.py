"""Teacher-trajectory regression (engine.regression) on tiny-sd3-random, checked against independent
computations: the teacher sampler of engine.sampler for the trajectories, a by-hand MSE for the loss."""

from __future__ import annotations

import pytest
import torch

from dmdr_cli.config.loader import resolve
from dmdr_cli.engine.regression import (TeacherPairs, load_pairs, make_pairs, merged_grid, regression_loss, save_pairs,
                                        teacher_trajectories)
from dmdr_cli.engine.sampler import PromptEncodings, SamplerSpec, run_sampler, student_spec
from dmdr_cli.errors import ConfigError
from dmdr_cli.families.loading import load_base
from dmdr_cli.recipes.distill import build_roles

PROMPTS = ["a red circle", "two blue squares", "a green star"]


@pytest.fixture(scope="module")
def st(tiny_sd3_dir):
    cfg = resolve("tiny-sd3-random", sets=[])
    bundle = load_base(cfg)
    roles = build_roles(bundle, cfg)
    with torch.no_grad():  # a student that is not the teacher
        g = torch.Generator().manual_seed(3)
        for n, p in roles.gen_parameters().items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cfg, bundle, roles


def test_merged_grid_inserts_the_student_times():
    assert merged_grid([1.0, 0.75, 0.5, 0.25], (1.0, 0.6, 0.25)) == [1.0, 0.75, 0.6, 0.5, 0.25]
    assert merged_grid([1.0, 0.5], (1.0, 0.5)) == [1.0, 0.5]


def test_trajectories_are_the_teacher_sampler_stopped_at_each_student_time(st):
    cfg, bundle, roles = st
    fam = bundle.family
    record = (1.0, 0.8, 0.5714)
    grid = merged_grid(fam.teacher_grid(6), record)
    cond = fam.encode_prompts(bundle, PROMPTS[:2])
    uncond = fam.encode_prompts(bundle, [""])
    noise = torch.randn((2, *fam.latent_shape(bundle, cfg.model.resolution)), generator=torch.Generator().manual_seed(0))
    with roles.role("teacher") as net:
        seen, y = teacher_trajectories(fam, net, grid, record, cond, uncond, noise, guidance=4.0)
        torch.testing.assert_close(seen[0], noise.float())
        for t_rec, x in zip(record[1:], seen[1:]):
            k = grid.index(t_rec)  # the sampler's ODE over the grid prefix, ending at t_rec
            ref = run_sampler(fam, net, SamplerSpec(tuple(grid[:k]), t_rec, "ode", 4.0), cond, uncond, noise)
            torch.testing.assert_close(x, ref.float(), atol=1e-5, rtol=1e-5)
        full = run_sampler(fam, net, SamplerSpec(tuple(grid), 0.0, "ode", 4.0), cond, uncond, noise)
        torch.testing.assert_close(y, full.float(), atol=1e-5, rtol=1e-5)
        x = noise.float()  # by hand: Euler x <- x + (t' - t)(v_u + 4 (v_c - v_u)) over the grid to 0
        for i, t_i in enumerate(grid):
            t = torch.full((2,), t_i)
            v_c, v_u = fam.predict(net, x, t, cond), fam.predict(net, x, t, uncond.expand(2))
            x = x + ((grid[i + 1] if i + 1 < len(grid) else 0.0) - t_i) * (v_u + 4.0 * (v_c - v_u))
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="not on the integration grid"):
            teacher_trajectories(fam, net, fam.teacher_grid(6), (1.0, 0.123), cond, uncond, noise, guidance=4.0)


def test_pairs_are_seeded_per_pair_and_do_not_depend_on_the_batch(st):
    cfg, bundle, roles = st
    fam = bundle.family
    spec = student_spec(fam, cfg.student)
    shape = fam.latent_shape(bundle, cfg.model.resolution)
    kw = dict(teacher_steps=4, guidance=3.0, guidance_t_min=0.0, latent_shape=shape, encode=PromptEncodings(fam, bundle))
    a = make_pairs(bundle, roles, PROMPTS, 5, spec.grid, seed=7, batch=64, **kw)
    b = make_pairs(bundle, roles, PROMPTS, 5, spec.grid, seed=7, batch=2, **kw)
    c = make_pairs(bundle, roles, PROMPTS, 5, spec.grid, seed=8, batch=64, **kw)
    assert len(a) == 5 and a.xs.shape == (spec.steps, 5, *shape) and a.y.shape == (5, *shape)
    assert a.prompts == b.prompts and set(a.prompts) <= set(PROMPTS)
    torch.testing.assert_close(a.xs, b.xs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.y, b.y, atol=1e-5, rtol=1e-5)
    assert (a.xs[0] - c.xs[0]).abs().max() > 0.1  # another seed, other noise
    # row 0 is the pair's own noise: N(0, 1) from its generator
    assert float(a.xs[0].std()) == pytest.approx(1.0, abs=0.25)


def random_pairs(cfg, bundle, grid, seed: int) -> TeacherPairs:
    """Three made-up trajectories (random points and ends) over ``grid``, for the loss tests."""
    shape = bundle.family.latent_shape(bundle, cfg.model.resolution)
    g = torch.Generator().manual_seed(seed)
    return TeacherPairs(grid, PROMPTS, torch.randn((len(grid), 3, *shape), generator=g), torch.randn((3, *shape), generator=g))


def test_regression_loss_matches_a_hand_computation(st):
    cfg, bundle, roles = st
    fam = bundle.family
    grid = (1.0, 0.8, 0.5)
    pairs = random_pairs(cfg, bundle, grid, seed=11)
    gen = torch.Generator().manual_seed(5)
    ref = torch.Generator().manual_seed(5)
    loss, stats = regression_loss(roles, fam, pairs, 4, gen, PromptEncodings(fam, bundle))
    rows = torch.randint(0, 3, (4,), generator=ref)
    idx = torch.randint(0, 3, (4,), generator=ref)
    expected = 0.0
    with torch.no_grad(), roles.role("gen") as net:
        for r, i in zip(rows.tolist(), idx.tolist()):
            x = pairs.xs[i, r:r + 1]
            t = torch.tensor([grid[i]])
            v = fam.predict(net, x, t, fam.encode_prompts(bundle, [PROMPTS[r]]))
            x0 = x + (fam.x0_end - grid[i]) * v  # SD3: x0_hat = x_t + (x0_end - t) v_hat
            expected += float(((x0 - pairs.y[r:r + 1]) ** 2).mean()) / 4
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert stats["loss/reg"] == pytest.approx(float(loss.detach()))
    # the gradient reaches the generator only
    roles.activate("gen")
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in roles.gen_parameters().values())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in roles.guide_parameters().values())
    for p in roles.trainable():
        p.grad = None


def test_regression_t_max_keeps_the_low_noise_grid_steps(st):
    """``t_max``: grid indices are drawn among the times <= t_max only (here 0.8 and 0.5 of [1, 0.8, 0.5])."""
    cfg, bundle, roles = st
    fam = bundle.family
    grid = (1.0, 0.8, 0.5)
    pairs = random_pairs(cfg, bundle, grid, seed=2)
    seen = []
    original = fam.predict

    def spy(net, x, t, cond):
        seen.extend(t.tolist())
        return original(net, x, t, cond)

    fam_spy = type("F", (), {"predict": staticmethod(spy), "to_x0": staticmethod(fam.to_x0)})()
    enc = PromptEncodings(fam, bundle)
    with torch.no_grad():
        regression_loss(roles, fam_spy, pairs, 64, torch.Generator().manual_seed(0), enc, t_max=0.85)
    assert sorted(set(round(v, 4) for v in seen)) == [0.5, 0.8]
    seen.clear()
    with torch.no_grad():
        regression_loss(roles, fam_spy, pairs, 64, torch.Generator().manual_seed(0), enc, t_max=1.0)
    assert sorted(set(round(v, 4) for v in seen)) == [0.5, 0.8, 1.0]
    with pytest.raises(ValueError, match="no student grid time"):
        regression_loss(roles, fam_spy, pairs, 4, torch.Generator().manual_seed(0), enc, t_max=0.3)


@pytest.mark.parametrize("setting", ["distill.regression_weight=-0.5", "distill.regression_pairs=0",
                                     "distill.regression_batch=0", "distill.regression_t_max=0",
                                     "distill.regression_t_max=1.5"])
def test_regression_settings_are_checked(setting):
    with pytest.raises(ConfigError, match=setting.split("=")[0]):
        resolve("tiny-sd3-random", sets=[setting])


def test_cached_pairs_are_read_back_only_with_their_key(st, tmp_path):
    cfg, bundle, _ = st
    pairs = random_pairs(cfg, bundle, (1.0, 0.8, 0.5), seed=4)
    path = tmp_path / "pairs.safetensors"
    assert load_pairs(path, "k1", bundle.device) is None  # missing
    save_pairs(path, pairs, "k1")
    back = load_pairs(path, "k1", bundle.device)
    assert back.grid == pairs.grid and back.prompts == pairs.prompts
    assert torch.equal(back.xs, pairs.xs) and torch.equal(back.y, pairs.y)
    assert load_pairs(path, "k2", bundle.device) is None  # made with other settings
    path.write_bytes(path.read_bytes()[:100])
    assert load_pairs(path, "k1", bundle.device) is None  # damaged
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.safetensors"]  # no temp file left by the atomic write
