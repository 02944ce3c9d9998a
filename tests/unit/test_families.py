"""The family contract on the real (tiny) SD3 and SDXL pipelines: noise maths, conditioning, network calls,
latent codec, LoRA targets, network time input, and how base models are found on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmdr_cli.families.base import Cond, predict_cfg
from dmdr_cli.schedules.grids import sdxl_alphas_cumprod

TIMES = [1.0, 0.999, 0.9, 0.75, 0.5, 0.25, 0.05, 0.001]


@pytest.fixture(params=["sd3", "sdxl"])
def loaded(request):
    return request.getfixturevalue(f"{request.param}_loaded")


def latents(bundle, b: int, seed: int = 0) -> torch.Tensor:
    shape = bundle.family.latent_shape(bundle, 64)
    return torch.randn((b, *shape), generator=torch.Generator().manual_seed(seed))


def module_matches(names: list[str], target: str) -> list[str]:
    """PEFT's suffix rule for a string target: the module name is the target or ends with '.target'."""
    return [n for n in names if n == target or n.endswith("." + target)]


# -- (a) x0 round trip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", TIMES)
def test_sd3_x0_round_trip_clean_end_point(sd3_loaded, t):
    from dmdr_cli.families import make_family
    from dmdr_cli.config.loader import resolve

    fam = make_family(resolve("tiny-sd3-random", [], ["model.x0_end=0"]))
    assert fam.x0_end == 0.0
    x0, eps = latents(sd3_loaded[1], 2, 1), latents(sd3_loaded[1], 2, 2)
    tt = torch.full((2,), t)
    x_t = fam.add_noise(x0, eps, tt)
    assert torch.allclose(x_t, (1 - t) * x0 + t * eps, atol=1e-6)
    v = fam.target(x0, eps, tt)
    assert torch.equal(v, eps - x0)
    assert torch.allclose(fam.to_x0(x_t, v, tt), x0, atol=1e-5)
    assert torch.allclose(fam.eps_from(x_t, v, tt), eps, atol=1e-5)


@pytest.mark.parametrize("t", TIMES)
def test_sd3_x0_round_trip_faithful_end_point(sd3_loaded, t):
    cfg, bundle = sd3_loaded
    fam = bundle.family
    assert fam.x0_end == cfg.model.x0_end == 0.001
    x0, eps = latents(bundle, 2, 1), latents(bundle, 2, 2)
    tt = torch.full((2,), t)
    v = fam.target(x0, eps, tt)
    x0_hat = fam.to_x0(fam.add_noise(x0, eps, tt), v, tt)
    err = x0_hat - x0
    assert torch.allclose(err, 0.001 * v, atol=1e-5)          # exactly an Euler step to t = 0.001
    assert (err.abs() <= 0.001 * v.abs() + 1e-5).all()
    assert err.abs().max() > 1e-4                              # and really not the clean x0


@pytest.mark.parametrize("t", TIMES)
def test_sdxl_x0_round_trip(sdxl_loaded, t):
    fam = sdxl_loaded[1].family
    x0, eps = latents(sdxl_loaded[1], 2, 1), latents(sdxl_loaded[1], 2, 2)
    tt = torch.full((2,), t)
    x_t = fam.add_noise(x0, eps, tt)
    abar = sdxl_alphas_cumprod()[min(round(1000 * t), 999)].item()
    assert torch.allclose(x_t, abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps, atol=1e-5)
    assert torch.equal(fam.target(x0, eps, tt), eps.float())
    assert torch.allclose(fam.to_x0(x_t, eps, tt), x0, atol=1e-4)
    assert torch.allclose(fam.noise_std(tt), torch.full((2,), (1 - abar) ** 0.5), atol=1e-6)


def test_sdxl_reference_coefficients(sdxl_loaded):
    """ALGORITHM.md 1.3 table: sqrt(abar_399) = 0.65275, sqrt(1 - abar_399) = 0.75757."""
    fam = sdxl_loaded[1].family
    x0, eps = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    assert fam.add_noise(x0, eps, torch.tensor([0.399]))[0, 0, 0, 0].item() == pytest.approx(0.65275, abs=1e-5)
    assert fam.add_noise(eps, x0, torch.tensor([0.399]))[0, 0, 0, 0].item() == pytest.approx(0.75757, abs=1e-5)


# -- (b) conditioning -------------------------------------------------------------------------------------


def test_encode_prompts_shapes(loaded):
    cfg, bundle = loaded
    cond = bundle.family.encode_prompts(bundle, ["a red circle", "a blue square", "x"])
    assert len(cond) == 3
    shapes = {k: tuple(v.shape) for k, v in cond.tensors.items()}
    if bundle.family.name == "sd3":
        # CLIP-L + CLIP-G (77 tokens, 32 + 32 wide) padded to T5's width, then T5's max_sequence_length tokens
        assert shapes == {"encoder_hidden_states": (3, 77 + cfg.model.max_sequence_length, 64),
                          "pooled_projections": (3, 64)}
        assert cfg.model.max_sequence_length == 128
    else:
        assert shapes == {"encoder_hidden_states": (3, 77, 64), "text_embeds": (3, 32), "time_ids": (3, 6)}
        r = float(cfg.model.resolution)
        assert cond.tensors["time_ids"].tolist() == [[r, r, 0.0, 0.0, r, r]] * 3
    for v in cond.tensors.values():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_empty_prompt_encoding_is_not_zeros(loaded):
    bundle = loaded[1]
    empty = bundle.family.encode_prompts(bundle, [""])
    real = bundle.family.encode_prompts(bundle, ["a red circle"])
    for key in ("encoder_hidden_states", "pooled_projections" if bundle.family.name == "sd3" else "text_embeds"):
        assert empty.tensors[key].abs().sum() > 0, key
        assert not torch.allclose(empty.tensors[key], real.tensors[key]), key
    # deterministic
    again = bundle.family.encode_prompts(bundle, [""])
    assert all(torch.equal(again.tensors[k], v) for k, v in empty.tensors.items())


def test_cond_helpers():
    a = Cond({"h": torch.arange(6.0).view(2, 3), "p": torch.tensor([[1.0], [2.0]])})
    b = Cond({"h": torch.zeros(1, 3), "p": torch.zeros(1, 1)})
    assert len(a) == 2 and len(a.cat(b)) == 3
    assert torch.equal(a.index([1]).tensors["h"], torch.tensor([[3.0, 4.0, 5.0]]))
    assert b.expand(4).tensors["h"].shape == (4, 3)
    assert a.to(dtype=torch.float64).tensors["p"].dtype == torch.float64


# -- (c) network calls ------------------------------------------------------------------------------------


@torch.no_grad()
def test_predict_shape_and_cfg(loaded):
    bundle = loaded[1]
    fam, net = bundle.family, bundle.network
    x = latents(bundle, 2)
    t = torch.tensor([0.9, 0.5])
    cond = fam.encode_prompts(bundle, ["a red circle", "a blue square"])
    uncond = fam.encode_prompts(bundle, [""])
    out_c = fam.predict(net, x, t, cond)
    assert out_c.shape == x.shape and torch.isfinite(out_c).all()
    out_u = fam.predict(net, x, t, uncond.expand(2))
    assert not torch.allclose(out_u, out_c)  # the prompt matters
    w = 4.5
    guided = predict_cfg(fam, net, x, t, cond, uncond, w)
    assert torch.allclose(guided, out_u + w * (out_c - out_u), atol=1e-4, rtol=1e-4)
    # guidance <= 1 or no uncond: a single conditional pass
    assert torch.allclose(predict_cfg(fam, net, x, t, cond, uncond, 1.0), out_c, atol=1e-5)
    assert torch.allclose(predict_cfg(fam, net, x, t, cond, None, w), out_c, atol=1e-5)
    # a per-sample guidance tensor (guidance interval): row b gets its own w_b; all <= 1 is the conditional pass
    per_row = predict_cfg(fam, net, x, t, cond, uncond, torch.tensor([w, 1.0]))
    assert torch.allclose(per_row[0], guided[0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(per_row[1], out_c[1], atol=1e-4, rtol=1e-4)
    assert torch.allclose(predict_cfg(fam, net, x, t, cond, uncond, torch.ones(2)), out_c, atol=1e-5)


# -- (d) latent codec -------------------------------------------------------------------------------------


@torch.no_grad()
def test_decode_and_encode_images(loaded):
    cfg, bundle = loaded
    fam = bundle.family
    assert fam.latent_shape(bundle, 64) == ((16 if fam.name == "sd3" else 4), 8, 8)
    z = latents(bundle, 2)
    img = fam.decode(bundle, z)
    assert img.shape == (2, 3, 64, 64) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1 and img.std() > 0
    z2 = fam.encode_images(bundle, img)
    assert z2.shape == z.shape and torch.isfinite(z2).all()
    img2 = fam.decode(bundle, z2)
    assert img2.shape == (2, 3, 64, 64) and img2.min() >= 0 and img2.max() <= 1


def test_latent_scaling_constants(sd3_loaded, sdxl_loaded):
    """ALGORITHM.md 1.4: SD3 z = (E - 0.0609) * 1.5305; SDXL z = 0.13025 E (the tiny VAEs keep these)."""
    vae3 = sd3_loaded[1].pipe.vae.config
    assert (vae3.scaling_factor, vae3.shift_factor) == (1.5305, 0.0609)
    vaexl = sdxl_loaded[1].pipe.vae.config
    assert vaexl.scaling_factor == 0.13025 and not vaexl.shift_factor


# -- (e) LoRA targets ------------------------------------------------------------------------------------


def test_sd3_lora_targets_all_match(sd3_loaded):
    fam, net = sd3_loaded[1].family, sd3_loaded[1].network
    assert fam.lora_targets == ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    modules = dict(net.named_modules())
    for target in fam.lora_targets:
        hits = module_matches(list(modules), target)
        assert hits, f"{target} matches no module"
        assert all(isinstance(modules[h], torch.nn.Linear) for h in hits), target


def test_sdxl_lora_targets_all_match(sdxl_loaded):
    fam, net = sdxl_loaded[1].family, sdxl_loaded[1].network
    expected = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
    assert set(fam.lora_targets) == set(expected)
    modules = dict(net.named_modules())
    # conv_shortcut exists only where a ResNet block changes channels: the tiny UNet goes 32 -> 64
    assert tuple(net.config.block_out_channels) == (32, 64)
    for target in expected:
        hits = module_matches(list(modules), target)
        assert hits, f"{target} matches no module"
        assert all(isinstance(modules[h], (torch.nn.Linear, torch.nn.Conv2d)) for h in hits), target


# -- (f) network time input ------------------------------------------------------------------------------


def _captured_timestep(fam, net, x, t, cond):
    seen = {}

    def hook(module, args, kwargs):
        seen["t"] = kwargs["timestep"] if "timestep" in kwargs else args[1]

    handle = net.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = fam.predict(net, x, t, cond)
    finally:
        handle.remove()
    return seen["t"], out


def test_sd3_time_input_is_rounded(sd3_loaded):
    bundle = sd3_loaded[1]
    fam, net = bundle.family, bundle.network
    x = latents(bundle, 3)
    cond = fam.encode_prompts(bundle, ["a"] * 3)
    tau, out_a = _captured_timestep(fam, net, x, torch.tensor([0.9004, 0.50100, 0.8984375]), cond)
    assert tau.dtype == torch.float32
    assert tau.tolist() == [900.0, 501.0, 898.0]
    _, out_b = _captured_timestep(fam, net, x, torch.tensor([0.9, 0.501, 0.898]), cond)
    assert torch.equal(out_a, out_b)  # same rounded network time -> the very same output
    _, out_c = _captured_timestep(fam, net, x, torch.tensor([0.9006, 0.501, 0.898]), cond)
    assert not torch.allclose(out_c[0], out_a[0])  # 901 != 900
    assert torch.equal(out_c[1:], out_a[1:])


def test_sd3_time_input_stays_exact_in_bf16(tiny_sd3_dir):
    """bf16 cannot hold 898 (it rounds to 896): the network time must be passed in fp32."""
    from dmdr_cli.config.loader import resolve
    from dmdr_cli.families.loading import load_base

    bundle = load_base(resolve("tiny-sd3-random", [], ["model.dtype=bf16", "runtime.device=cpu"]))
    assert next(bundle.network.parameters()).dtype == torch.bfloat16
    fam = bundle.family
    x = latents(bundle, 2).to(torch.bfloat16)
    cond = fam.encode_prompts(bundle, ["a", "b"])
    tau, out = _captured_timestep(fam, bundle.network, x, torch.tensor([0.8984375, 0.75037]), cond)
    assert tau.tolist() == [898.0, 750.0]
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def test_sdxl_timestep_is_clamped_and_rounded(sdxl_loaded):
    bundle = sdxl_loaded[1]
    fam, net = bundle.family, bundle.network
    x = latents(bundle, 4)
    cond = fam.encode_prompts(bundle, ["a"] * 4)
    tau, out_a = _captured_timestep(fam, net, x, torch.tensor([1.0, 0.3994, 0.0001, 0.7496]), cond)
    assert tau.dtype == torch.int64
    assert tau.tolist() == [999, 399, 0, 750]  # clamp(round(1000 t), 0, 999)
    _, out_b = _captured_timestep(fam, net, x, torch.tensor([0.999, 0.399, 0.0, 0.75]), cond)
    assert torch.equal(out_a, out_b)
    _, out_c = _captured_timestep(fam, net, x, torch.tensor([0.999, 0.4006, 0.0, 0.75]), cond)
    assert not torch.allclose(out_c[1], out_a[1])  # 401 != 399


# -- (g) finding and loading base models ------------------------------------------------------------------


def test_missing_hub_model_names_hub_id_and_model_path(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from dmdr_cli.config.schema import ModelConfig
    from dmdr_cli.errors import ModelNotFoundError
    from dmdr_cli.families.loading import resolve_model_folder

    empty = tmp_path / "hf-cache"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(empty))
    hub_id = "stabilityai/stable-diffusion-3-medium-diffusers"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_folder(ModelConfig(family="sd3", hub_id=hub_id))
    msg = str(err.value)
    assert hub_id in msg and "model.path" in msg
    assert str(empty) in msg          # it really looked in the (empty) cache we pointed it at
    assert "transformer/" in msg      # and says which layout to provide
    assert list(empty.iterdir()) == []  # nothing was downloaded or created


def test_hub_model_found_in_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from dmdr_cli.config.schema import ModelConfig
    from dmdr_cli.families.loading import resolve_model_folder

    repo = tmp_path / "models--org--model"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    folder, source = resolve_model_folder(ModelConfig(hub_id="org/model"))
    assert folder == snap and source == "org/model"


def test_model_path_without_model_index(tmp_path):
    from dmdr_cli.config.schema import ModelConfig
    from dmdr_cli.errors import ModelNotFoundError
    from dmdr_cli.families.loading import resolve_model_folder

    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_folder(ModelConfig(family="sdxl", path=str(tmp_path)))
    assert str(tmp_path) in str(err.value) and "model_index.json" in str(err.value) and "unet/" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="no base model given"):
        resolve_model_folder(ModelConfig())


def test_model_path_and_tiny_resolution(tiny_sd3_dir):
    from dmdr_cli.config.schema import ModelConfig
    from dmdr_cli.families.loading import resolve_model_folder

    assert resolve_model_folder(ModelConfig(path=str(tiny_sd3_dir))) == (Path(tiny_sd3_dir), str(tiny_sd3_dir))
    assert resolve_model_folder(ModelConfig(tiny="sd3")) == (Path(tiny_sd3_dir), "tiny-sd3")


def test_broken_pipeline_folder_is_model_not_found(tmp_path):
    from dmdr_cli.config.loader import resolve
    from dmdr_cli.errors import ModelNotFoundError
    from dmdr_cli.families.loading import load_base

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    cfg = resolve(str(tmp_path), [], ["runtime.device=cpu"])
    assert cfg.model.family == "sdxl"
    with pytest.raises(ModelNotFoundError, match="could not load the sdxl pipeline"):
        load_base(cfg)


@pytest.mark.parametrize("kind, cls_name, net_attr", [("sd3", "StableDiffusion3Pipeline", "transformer"),
                                                       ("sdxl", "StableDiffusionXLPipeline", "unet")])
def test_tiny_folders_reload_through_stock_diffusers(request, kind, cls_name, net_attr):
    import diffusers

    folder = request.getfixturevalue(f"tiny_{kind}_dir")
    assert json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == cls_name
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert type(pipe).__name__ == cls_name
    ours = request.getfixturevalue(f"{kind}_loaded")[1]
    a, b = getattr(pipe, net_attr).state_dict(), ours.network.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights as our loader reads


def test_sd3_without_t5_compacts_the_zero_tokens_exactly():
    """The shipped digits teacher has no T5: dmdr encodes ONE zero token with +log N on its logit; the prediction
    equals stock diffusers' with N = max_sequence_length zero tokens and the default attention processor."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from dmdr_cli.config.loader import resolve
    from dmdr_cli.families.loading import load_base
    from dmdr_cli.families.sd3 import ZeroTokenAttnProcessor

    cfg = resolve("tiny-sd3", [], ["runtime.device=cpu"])
    bundle = load_base(cfg)
    fam, net = bundle.family, bundle.network
    assert not bundle.info["t5"] and isinstance(next(iter(net.attn_processors.values())), ZeroTokenAttnProcessor)
    prompts = ["a photo of a red 3 and a blue 7", ""]
    compact = fam.encode_prompts(bundle, prompts)
    assert compact.tensors["encoder_hidden_states"].shape[1] == 16 + 1  # 16 CLIP tokens + one zero token
    embeds, _, pooled, _ = bundle.pipe.encode_prompt(prompt=prompts, prompt_2=prompts, prompt_3=prompts,
                                                     device=bundle.device, do_classifier_free_guidance=False,
                                                     max_sequence_length=fam.max_sequence_length)
    full = Cond({"encoder_hidden_states": embeds, "pooled_projections": pooled})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *fam.latent_shape(bundle, 32), generator=g)
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        fast = fam.predict(net, x, t, compact)
        procs = net.attn_processors
        net.set_attn_processor(JointAttnProcessor2_0())
        try:
            ref = fam.predict(net, x, t, full)
        finally:
            net.set_attn_processor(procs)
    assert embeds.shape[1] == 16 + fam.max_sequence_length
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
