"""The digits-world teacher (dmdr_cli.digits.teacher): the untrained pipeline's shapes, the exactness of the
compact zero-token training trick, that training lowers the loss and resumes exactly, and the save/load round trip
through dmdr's own loader. Small models only (< 30 s in all)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from dmdr_cli.digits import teacher as T

SMALL = dict(num_layers=1, heads=2, head_dim=16)


@pytest.fixture(scope="module")
def small_pipe():
    return T.build_untrained(None, seed=0, **SMALL)


def _data(n: int = 24):
    from dmdr_cli.digits import world

    lines = world.make_metadata(n, 0, split="train")
    g = torch.Generator().manual_seed(0)
    caps = [ln["prompt"] for ln in lines]
    # latents with a per-digit structure the network can learn quickly
    base = torch.randn(10, 16, 8, 8, generator=g)
    digit = [world.CLASSES.index(ln["include"][0]["class"]) for ln in lines]
    lat = base[digit] + 0.1 * torch.randn(n, 16, 8, 8, generator=g)
    return lat, caps


def test_untrained_pipeline_shapes(small_pipe):
    pipe = small_pipe
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert pipe.text_encoder_3 is None
    assert pipe.transformer.config.in_channels == 16
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert tuple(z.shape) == (1, 16, 8, 8)
    full = T.build_untrained(None, seed=0)
    n = sum(p.numel() for p in full.transformer.parameters())
    assert 2e6 <= n <= 4e6


def test_tokenizer_keeps_caption_words_whole():
    from dmdr_cli.digits import world

    tok = T.clip_tokenizer_short()
    assert tok.model_max_length == T.MAX_TOKENS
    longest = max(len(tok(ln["prompt"]).input_ids) for tag in world.TASKS for ln in world.prompt_space(tag))
    assert longest <= T.MAX_TOKENS
    toks = tok.convert_ids_to_tokens(tok("a photo of a purple 3 left of an 8").input_ids)
    assert toks[1:-1] == ["a</w>", "photo</w>", "of</w>", "a</w>", "purple</w>", "3</w>", "left</w>", "of</w>",
                          "an</w>", "8</w>"]


def test_prompt_embeddings_are_distinct(small_pipe):
    from dmdr_cli.digits import world

    prompts = [ln["prompt"] for tag in world.TASKS for ln in world.prompt_space(tag)[:12]] + [""]
    emb, pooled = T.encode_prompts_compact(small_pipe, prompts)
    flat = emb.flatten(1)
    d = torch.cdist(flat, flat)
    d.fill_diagonal_(float("inf"))
    assert float(d.min()) > 0.1 * float(d[d.isfinite()].median())
    assert 0.3 < float(emb[:, :-1].std()) < 5.0  # unit-order scale (rescaled frozen encoders)


def test_compact_null_token_is_exact(small_pipe):
    """One zero token with +log N on its attention logit == the pipeline's N zero "T5" tokens."""
    import copy

    tr = copy.deepcopy(small_pipe.transformer)
    with torch.no_grad():
        torch.nn.init.normal_(tr.context_embedder.bias, std=0.5)
    prompts = ["a photo of a 3", "a photo of two 5s"]
    full, _, pooled, _ = small_pipe.encode_prompt(prompt=prompts, prompt_2=prompts, prompt_3=prompts,
                                                  device=torch.device("cpu"), do_classifier_free_guidance=False,
                                                  max_sequence_length=128)
    emb, pooled_c = T.encode_prompts_compact(small_pipe, prompts)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([250.0, 800.0])
    with torch.no_grad():
        ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled,
                 return_dict=False)[0]
        proc = T._install_null_bias(tr)
        bias = torch.zeros(2, 1, 1, 16 + emb.shape[1])
        bias[..., -1] = math.log(128)
        proc.bias = bias
        got = tr(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled_c,
                 return_dict=False)[0]
    assert torch.allclose(ref, got, atol=1e-5)


def test_training_lowers_loss_and_resumes_exactly(tmp_path):
    lat, caps = _data()
    recipe = T.TeacherRecipe(steps=40, batch=16, lr=2e-3, warmup=5, ckpt_every=1000, **SMALL)
    pipe = T.build_untrained(None, seed=0, **SMALL)
    info = T.train_teacher(pipe, lat, caps, recipe=recipe, log=lambda s: None)
    losses = info["losses"]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8

    short = replace(recipe, steps=6)
    one = T.build_untrained(None, seed=0, **SMALL)
    T.train_teacher(one, lat, caps, recipe=short, log=lambda s: None)
    two = T.build_untrained(None, seed=0, **SMALL)
    T.train_teacher(two, lat, caps, recipe=replace(recipe, steps=3), ckpt_dir=tmp_path, log=lambda s: None)
    three = T.build_untrained(None, seed=0, **SMALL)  # same frozen text encoders; the transformer comes from the
    with torch.no_grad():                              # checkpoint, so scrambling it must not matter
        for p in three.transformer.parameters():
            p.normal_()
    T.train_teacher(three, lat, caps, recipe=short, ckpt_dir=tmp_path, log=lambda s: None)
    for (k, a), b in zip(one.transformer.state_dict().items(), three.transformer.state_dict().values()):
        assert torch.equal(a, b), k


def test_save_load_roundtrip_through_load_base(small_pipe, tmp_path):
    from dmdr_cli.engine.sampler import generate, teacher_spec

    folder = T.save_pipeline(small_pipe, tmp_path / "teacher")
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert size < 4e6
    cfg, bundle = T.load_bundle(folder)
    assert bundle.family.name == "sd3"
    assert bundle.family.latent_shape(bundle, 32) == (16, 8, 8)
    assert bundle.pipe.tokenizer.model_max_length == T.MAX_TOKENS
    for k, v in small_pipe.transformer.state_dict().items():
        assert torch.equal(bundle.pipe.transformer.state_dict()[k], v.half().float()), k
    spec = teacher_spec(bundle.family, 2, 3.0)
    images = generate(bundle, bundle.network, spec, ["a photo of a 3", "a photo of a red 7"], [0, 1], 32)
    assert tuple(images.shape) == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    again = generate(bundle, bundle.network, spec, ["a photo of a red 7"], [1], 32)
    assert torch.allclose(again[0], images[1], atol=1e-5)
