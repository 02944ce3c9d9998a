"""The family-agnostic sampler on the tiny SD3 and SDXL pipelines (ALGORITHM.md 5.1 / 5.2)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from dmdr_cli.engine.sampler import SamplerSpec, generate, run_sampler, student_spec, teacher_spec

# Batched CPU kernels are not bitwise batch-invariant (another batch size can pick another BLAS blocking), so
# "the same image whatever the batch" holds up to float rounding: ~3e-6 in [0, 1] on the tiny models.
BATCH_ATOL = 1e-4


def noise_for(bundle, seeds):
    shape = bundle.family.latent_shape(bundle, 64)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


# -- specs ---------------------------------------------------------------------------------------------


def test_student_spec_tiny_sd3(sd3_loaded):
    cfg, bundle = sd3_loaded
    spec = student_spec(bundle.family, cfg.student)
    assert spec.steps == 4 and spec.mode == "ode" and spec.guidance == 1.0 and not spec.pure_noise_first
    assert spec.t_end == 0.001
    # ALGORITHM.md 5.1, SD3 shift 3, fp32 column
    assert spec.grid == pytest.approx((1.0, 0.90012, 0.75037, 0.50100), abs=1e-5)
    assert all(np.float32(t) == t for t in spec.grid)  # fp32 values
    assert [round(1000 * t) for t in spec.grid] == [1000, 900, 750, 501]
    # an explicit --steps overrides the config's N; bf16 grid on request
    assert student_spec(bundle.family, cfg.student, steps=1).grid == (1.0,)
    bf16 = dataclasses.replace(cfg.student, grid_dtype="bf16")
    assert student_spec(bundle.family, bf16).grid == (1.0, 0.8984375, 0.75, 0.5)


def test_student_spec_tiny_sdxl(sdxl_loaded):
    cfg, bundle = sdxl_loaded
    spec = student_spec(bundle.family, cfg.student)
    assert spec.grid == (0.399,) and spec.t_end == 0.0
    assert spec.mode == cfg.student.simulation == "sde"
    assert spec.pure_noise_first is True
    # 4 steps on SDXL: DMD2's trailing grid
    assert student_spec(bundle.family, cfg.student, steps=4).grid == (0.999, 0.749, 0.499, 0.249)


def test_teacher_spec(sd3_loaded, sdxl_loaded):
    s3 = teacher_spec(sd3_loaded[1].family, 28, 7.0)
    assert (s3.steps, s3.t_end, s3.mode, s3.guidance) == (28, 0.0, "ode", 7.0) and s3.grid[0] == 1.0
    assert list(s3.grid) == sorted(s3.grid, reverse=True)
    sx = teacher_spec(sdxl_loaded[1].family, 4, 5.0)
    assert sx.grid == (0.999, 0.749, 0.499, 0.249) and sx.t_end == 0.0


# -- hand-checked steps -----------------------------------------------------------------------------------


@torch.no_grad()
def test_sd3_one_ode_step_is_euler_to_t_end(sd3_loaded):
    cfg, bundle = sd3_loaded
    fam, net = bundle.family, bundle.network
    spec = student_spec(fam, cfg.student, steps=1)
    assert spec.grid == (1.0,) and spec.t_end == 0.001
    z = noise_for(bundle, [3, 4])
    cond = fam.encode_prompts(bundle, ["a red circle", "a blue square"])
    v = fam.predict(net, z, torch.ones(2), cond)
    x = run_sampler(fam, net, spec, cond, None, z)
    assert torch.allclose(x, z + (0.001 - 1.0) * v, atol=1e-6)


@torch.no_grad()
def test_sd3_two_ode_steps(sd3_loaded):
    cfg, bundle = sd3_loaded
    fam, net = bundle.family, bundle.network
    spec = SamplerSpec((1.0, 0.6), 0.001, "ode")
    z = noise_for(bundle, [5])
    cond = fam.encode_prompts(bundle, ["a"])
    x1 = z + (0.6 - 1.0) * fam.predict(net, z, torch.ones(1), cond)
    x2 = x1 + (0.001 - 0.6) * fam.predict(net, x1, torch.full((1,), 0.6), cond)
    assert torch.allclose(run_sampler(fam, net, spec, cond, None, z), x2, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_sdxl_one_step_at_399(sdxl_loaded, mode):
    cfg, bundle = sdxl_loaded
    fam, net = bundle.family, bundle.network
    spec = dataclasses.replace(student_spec(fam, cfg.student), mode=mode)
    z = noise_for(bundle, [7, 8])
    cond = fam.encode_prompts(bundle, ["a red circle", "a blue square"])
    eps_hat = fam.predict(net, z, torch.full((2,), 0.399), cond)
    expected = (z - 0.75757 * eps_hat) / 0.65275  # ALGORITHM.md 5.2
    x = run_sampler(fam, net, spec, cond, None, z, generators=[torch.Generator().manual_seed(0)] * 2)
    assert torch.allclose(x, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


# -- seeds and batches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd3", "sdxl"])
def test_same_seed_same_image_whatever_the_batch(request, which):
    cfg, bundle = request.getfixturevalue(f"{which}_loaded")
    spec = student_spec(bundle.family, cfg.student, steps=2 if which == "sd3" else None)
    both = generate(bundle, bundle.network, spec, ["a red circle", "a blue square"], [11, 12], 64)
    alone = generate(bundle, bundle.network, spec, ["a blue square"], [12], 64)
    assert both.shape == (2, 3, 64, 64) and alone.shape == (1, 3, 64, 64)
    assert (both[1] - alone[0]).abs().max() < BATCH_ATOL
    again = generate(bundle, bundle.network, spec, ["a red circle", "a blue square"], [11, 12], 64)
    assert torch.equal(again, both)  # same batch, same seeds: bitwise identical


def test_different_seeds_different_images(sd3_loaded):
    cfg, bundle = sd3_loaded
    spec = student_spec(bundle.family, cfg.student, steps=2)
    imgs = generate(bundle, bundle.network, spec, ["a red circle"] * 2, [0, 1], 64)
    assert (imgs[0] - imgs[1]).abs().mean() > 1e-2


def test_teacher_cfg_changes_the_image(sdxl_loaded):
    cfg, bundle = sdxl_loaded
    fam = bundle.family
    plain = generate(bundle, bundle.network, teacher_spec(fam, 2, 1.0), ["a red circle"], [0], 64)
    guided = generate(bundle, bundle.network, teacher_spec(fam, 2, 6.0), ["a red circle"], [0], 64)
    uncond = fam.encode_prompts(bundle, [""])
    guided2 = generate(bundle, bundle.network, teacher_spec(fam, 2, 6.0), ["a red circle"], [0], 64, uncond)
    assert (plain - guided).abs().max() > 1e-3
    assert torch.allclose(guided, guided2, atol=1e-6)  # the default uncond is the encoding of ""


@torch.no_grad()
def test_teacher_guidance_interval(sdxl_loaded, monkeypatch):
    """``teacher.guidance_t_min``: CFG at the steps with t >= t_min, the conditional prediction below; an interval
    below the whole grid is the plain CFG sampler, one above it the unguided one."""
    import dmdr_cli.engine.sampler as sampler_mod

    cfg, bundle = sdxl_loaded
    fam = bundle.family
    seen = []
    real = sampler_mod.predict_cfg

    def spy(family, net, x, t, cond, uncond, w):
        seen.append((round(float(t[0]), 4), float(w[0]) if isinstance(w, torch.Tensor) else w))
        return real(family, net, x, t, cond, uncond, w)

    monkeypatch.setattr(sampler_mod, "predict_cfg", spy)
    spec = teacher_spec(fam, 4, 6.0, guidance_t_min=0.5)
    grid = spec.grid
    interval = generate(bundle, bundle.network, spec, ["a red circle"], [0], 64)
    assert [w for _, w in seen] == [6.0 if t >= 0.5 else 1.0 for t in grid]
    assert 1.0 in [w for _, w in seen] and 6.0 in [w for _, w in seen]
    everywhere = generate(bundle, bundle.network, teacher_spec(fam, 4, 6.0), ["a red circle"], [0], 64)
    assert torch.equal(generate(bundle, bundle.network, teacher_spec(fam, 4, 6.0, 1e-6), ["a red circle"], [0], 64),
                       everywhere)
    plain = generate(bundle, bundle.network, teacher_spec(fam, 4, 1.0), ["a red circle"], [0], 64)
    above = generate(bundle, bundle.network, teacher_spec(fam, 4, 6.0, 0.9999), ["a red circle"], [0], 64)
    assert torch.equal(above, plain)  # SDXL's grid starts at t = 0.999: no step left to guide
    assert (interval - everywhere).abs().max() > 1e-3 and (interval - plain).abs().max() > 1e-3


@torch.no_grad()
def test_sde_reproducible_with_per_sample_generators(sd3_loaded):
    cfg, bundle = sd3_loaded
    fam, net = bundle.family, bundle.network
    spec = SamplerSpec((1.0, 0.75, 0.5), 0.001, "sde")
    cond = fam.encode_prompts(bundle, ["a", "b"])
    z = noise_for(bundle, [1, 2])

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a, a_x0s = run_sampler(fam, net, spec, cond, None, z, gens([1, 2]), return_x0s=True)
    b = run_sampler(fam, net, spec, cond, None, z, gens([1, 2]))
    c = run_sampler(fam, net, spec, cond, None, z, gens([1, 3]))
    assert torch.equal(a, b)
    assert torch.allclose(a[0], c[0], atol=1e-5) and (a[1] - c[1]).abs().max() > 1e-3  # only sample 1 changed
    ode = run_sampler(fam, net, dataclasses.replace(spec, mode="ode"), cond, None, z)
    assert (a - ode).abs().max() > 1e-3
    # SDE: X0[i] = to_x0 at each step; the last one is the result
    assert len(a_x0s) == 3 and torch.equal(a_x0s[-1], a)
    assert not torch.allclose(a_x0s[0], a_x0s[1])
    with pytest.raises(ValueError, match="generators or noise_fn"):
        run_sampler(fam, net, spec, cond, None, z)


@torch.no_grad()
def test_sde_noise_fn_is_used(sd3_loaded):
    cfg, bundle = sd3_loaded
    fam, net = bundle.family, bundle.network
    spec = SamplerSpec((1.0, 0.5), 0.001, "sde")
    cond = fam.encode_prompts(bundle, ["a"])
    z = noise_for(bundle, [1])
    zero = run_sampler(fam, net, spec, cond, None, z, noise_fn=torch.zeros_like)
    x0 = fam.to_x0(z, fam.predict(net, z, torch.ones(1), cond), torch.ones(1))
    x_half = fam.add_noise(x0, torch.zeros_like(x0), torch.full((1,), 0.5))  # = 0.5 x0
    expected = fam.to_x0(x_half, fam.predict(net, x_half, torch.full((1,), 0.5), cond), torch.full((1,), 0.5))
    assert torch.allclose(zero, expected, atol=1e-5)


@torch.no_grad()
def test_return_x0s_in_ode_mode(sd3_loaded):
    cfg, bundle = sd3_loaded
    fam, net = bundle.family, bundle.network
    spec = student_spec(fam, cfg.student, steps=3)
    cond = fam.encode_prompts(bundle, ["a"])
    z = noise_for(bundle, [9])
    x, x0s = run_sampler(fam, net, spec, cond, None, z, return_x0s=True)
    assert len(x0s) == 3
    assert all(torch.equal(e, x) for e in x0s)
    assert torch.equal(run_sampler(fam, net, spec, cond, None, z), x)


def test_seconds_per_image_leaves_out_the_warm_up_call():
    from dmdr_cli.engine.generators import ImageGenerator

    g = ImageGenerator(label="x", bundle=None, spec=None, resolution=32)
    assert math.isnan(g.seconds_per_image)  # before any call
    g.calls = [(5.0, 4)]  # a single call is all there is: it counts
    assert g.seconds_per_image == 5.0 / 4
    g.calls = [(5.0, 4), (1.0, 4), (0.5, 2)]  # warm-up (first call) left out; median per image, by images
    assert g.seconds_per_image == 0.25
    g.calls = [(9.0, 4), (1.0, 4), (1.2, 4), (4.0, 4)]  # one slow batch does not move it
    assert g.seconds_per_image == 0.3
    g.calls = [(9.0, 4), (1.0, 4), (0.2, 1), (0.2, 1), (0.2, 1)]  # weighted: the 4-image batch holds the middle
    assert g.seconds_per_image == 0.25


# -- text conditioning, once per distinct prompt --------------------------------------------------------


@pytest.mark.parametrize("which", ["sd3_loaded", "sdxl_loaded"])
def test_encode_unique_and_prompt_encodings_equal_direct_encoding(request, which):
    from dmdr_cli.engine.sampler import PromptEncodings, encode_unique

    _, bundle = request.getfixturevalue(which)
    fam = bundle.family
    prompts = ["a red circle", "two blue squares", "a red circle", "a green 3", "a red circle"]
    direct = fam.encode_prompts(bundle, prompts)
    once = encode_unique(fam, bundle, prompts)
    cache = PromptEncodings(fam, bundle)
    cached = [cache(prompts), cache(prompts[::-1])]  # the second call encodes nothing new
    assert len(cache.rows) == 3 and cache.bytes > 0
    for key, ref in direct.tensors.items():
        torch.testing.assert_close(once.tensors[key], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached[0].tensors[key], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached[1].tensors[key], ref.flip(0), rtol=1e-5, atol=1e-6)
    for row in (0, 2, 4):  # a repeated prompt: identical rows
        assert all(torch.equal(v[row], v[0]) for v in once.tensors.values())

    capped = PromptEncodings(fam, bundle, max_bytes=cache.bytes // 3)  # room for one prompt's rows
    out = capped(prompts)
    assert len(capped.rows) == 1 and capped.bytes <= cache.bytes // 3
    for key, ref in direct.tensors.items():  # prompts past the cap are still encoded, just not kept
        torch.testing.assert_close(out.tensors[key], ref, rtol=1e-5, atol=1e-6)


def test_interleaved_timing_alternates_models_on_the_first_batch():
    from dmdr_cli.evaluation.report import _timing_note
    from dmdr_cli.evaluation.timing import interleaved_seconds

    log = []

    class Fake:
        def __init__(self, name, times):
            self.name, self.times = name, iter(times)
            self.first_inputs = (["a 1", "a 2"], [42, 43])

        def time_call(self, prompts, seeds):
            log.append((self.name, tuple(prompts), tuple(seeds)))
            return next(self.times)

    gens = {"teacher": Fake("teacher", [1.0, 9.0, 1.2]), "student": Fake("student", [0.1, 0.12, 0.5])}
    got = interleaved_seconds(gens, rounds=3)
    assert [n for n, _, _ in log] == ["teacher", "student"] * 3  # the models take turns
    assert {(p, s) for _, p, s in log} == {(("a 1", "a 2"), (42, 43))}  # on one batch, the same for all
    assert got["seconds_per_image"] == {"teacher": 1.2, "student": 0.12}  # medians: one slow call does not count
    assert got["rounds"] == 3 and got["images"] == 2 and got["samples"]["teacher"] == [1.0, 9.0, 1.2]
    assert interleaved_seconds(gens, rounds=0) is None
    assert interleaved_seconds({"student": gens["student"]}, rounds=3) is None  # nothing to compare
    gens["student"].first_inputs = None
    assert interleaved_seconds(gens, rounds=3) is None  # a model that generated nothing
    note = _timing_note({"timing": {"mode": "interleaved", "rounds": 3, "images": 96}})
    assert note == "median of 3 calls of the first 96 images per model, the models taking turns after generation"
    assert _timing_note({"timing": {"mode": "generation", "images": 48}}).startswith("median over batches of 48")


# -- decode dtype (model.decode_dtype) -----------------------------------------------------------------------


def test_decode_dtype_resolution(monkeypatch):
    from dmdr_cli.families import loading

    cpu = torch.device("cpu")
    assert loading.decode_autocast("", cpu) is None
    assert loading.decode_autocast("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(loading, "native_bf16", lambda device: False)
    assert loading.decode_autocast("auto", cpu) is None
    monkeypatch.setattr(loading, "native_bf16", lambda device: True)
    assert loading.decode_autocast("auto", cpu) is torch.bfloat16


def test_native_bf16_follows_the_cpu_probes(monkeypatch):
    from dmdr_cli.families.loading import native_bf16

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not native_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert native_bf16(torch.device("cpu"))


@pytest.mark.parametrize("which", ["sd3", "sdxl"])
def test_bf16_decode_only_rounds_the_images(request, which):
    """bf16 autocast changes the decode by rounding only (the same latents as in fp32), returns fp32 images in
    [0, 1], and leaves the bundle decoding in fp32 afterwards."""
    cfg, bundle = request.getfixturevalue(f"{which}_loaded")
    spec = student_spec(bundle.family, cfg.student, steps=2 if which == "sd3" else None)
    prompts, seeds = ["a red circle", "a blue square"], [11, 12]
    ref = generate(bundle, bundle.network, spec, prompts, seeds, 64)
    fast_bundle = dataclasses.replace(bundle, decode_autocast=torch.bfloat16)
    fast = generate(fast_bundle, bundle.network, spec, prompts, seeds, 64)
    assert fast.dtype == torch.float32 and fast.min() >= 0 and fast.max() <= 1
    diff = (fast - ref).abs()
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.01  # rounding, not another image
    assert torch.equal(generate(bundle, bundle.network, spec, prompts, seeds, 64), ref)


def test_decode_dtype_reaches_the_bundle_and_rejects_unknown_values(tiny_sd3_dir):
    from dmdr_cli.config.loader import resolve
    from dmdr_cli.errors import ConfigError
    from dmdr_cli.families.loading import load_base

    cfg = resolve("tiny-sd3-random", [], ["runtime.device=cpu", "model.decode_dtype=bf16"])
    assert load_base(cfg).decode_autocast is torch.bfloat16
    with pytest.raises(ConfigError, match="decode_dtype"):
        resolve("tiny-sd3-random", [], ["model.decode_dtype=fp16"])


def test_teacher_generator_names_its_guidance_interval(sdxl_loaded):
    from dmdr_cli.config.loader import resolve
    from dmdr_cli.engine.generators import teacher_of
    from dmdr_cli.errors import ConfigError

    cfg, bundle = sdxl_loaded
    gen = teacher_of(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, guidance=6.0, guidance_t_min=0.5)),
                     bundle)
    assert gen.label.endswith("CFG 6 at t >= 0.5") and gen.describe()["guidance_t_min"] == 0.5
    from dmdr_cli.losses.dmd import interval_cfg

    assert interval_cfg(gen.spec.guidance, torch.tensor([0.749, 0.249]), gen.spec.guidance_t_min).tolist() == [6.0, 1.0]
    assert teacher_of(cfg, bundle).label.endswith(f"CFG {cfg.teacher.guidance:g}")
    with pytest.raises(ConfigError, match="teacher.guidance_t_min"):
        resolve("tiny-sdxl", sets=["teacher.guidance_t_min=-0.1"])
