"""A trained tiny teacher for the digits world: a real ``StableDiffusion3Pipeline`` (tiny ``SD3Transformer2DModel``,
tiny ``AutoencoderKL``, two frozen tiny CLIP text encoders with the locally built byte-level tokenizer, no T5),
trained on CPU in minutes on :func:`dmdr_cli.digits.world.dataset` renders. dmdr-only.

Pipeline (:func:`build_untrained`)
----------------------------------
- VAE: 3 ``DownEncoderBlock2D`` (channels 16/32/64, 1 layer each, no mid-block attention) → downsampling factor 4,
  16 latent channels: a 32×32 canvas is a ``16×8×8`` latent. ``shift_factor``/``scaling_factor`` are set after VAE
  training from the latent statistics of the training renders (SD3 convention ``(z − shift)·scale``).
- Transformer: ``SD3Transformer2DModel`` (patch 2 → 16 image tokens, width 128 = 4 heads × 32, ``num_layers``
  joint blocks; 6 layers ≈ 3.5M parameters).
- Text: two ``CLIPTextModelWithProjection`` (hidden 32, 2 layers, projection 32), frozen at their random init but
  with the token/position embeddings rescaled so the penultimate hidden states (what SD3 reads) have unit-order
  scale; the byte-level character tokenizer of :mod:`dmdr_cli.families.tiny` plus merges that keep the caption
  words whole (:func:`clip_tokenizer_short`), ``model_max_length`` 16 (captions need at most 12 tokens).
  No T5: the pipeline appends ``max_sequence_length`` zero tokens.

Training (:func:`train_teacher`)
--------------------------------
Rectified flow in dmdr's SD3 conventions (``x_t = (1 − t) x0 + t ε``, target ``v = ε − x0``, network time
``round(1000 t)``), ``t`` logit-normal(0, 1), text dropout to the empty prompt ``""`` (CFG), AdamW with linear
warm-up, grad-norm clip 1, EMA with warm-up (decay ``min(ema, (1 + k)/(10 + k))``). All randomness comes from one
seeded ``torch.Generator`` whose state is checkpointed, so a resumed run continues exactly.

The zero "T5" tokens: without T5, SD3's ``encode_prompt`` appends ``max_sequence_length`` (dmdr: 128) all-zero
tokens. They stay identical through every joint block (no positional embedding on the context stream), so they act
as ONE token whose attention key weighs ``log N`` more. Training runs with one such token and adds ``log N`` to its
attention logit (:class:`_NullBiasProcessor`), with ``N`` log-uniform in ``null_tokens`` per sample: exactly what
the full pipeline computes with ``N`` zeros, at a third of the cost, and valid for 128 (dmdr) and 256 (diffusers'
``__call__`` default) alike. The saved model is a plain diffusers model (default attention processor).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from dmdr_cli.families.sd3 import ZeroTokenAttnProcessor

__all__ = [
    "TeacherRecipe",
    "build_dataset",
    "build_untrained",
    "clip_tokenizer_short",
    "encode_prompts_compact",
    "sample_grid",
    "save_pipeline",
    "score_teacher",
    "train_all",
    "train_teacher",
    "train_vae",
]

SIZE = 32
MAX_TOKENS = 16
#: Words of the digits-world captions that the tokenizer keeps whole (numerals are single characters anyway).
WORDS: tuple[str, ...] = ("photo", "of", "an", "and", "left", "right", "above", "below", "two", "three", "four",
                          "red", "green", "blue", "yellow", "purple", "white")


@dataclass
class TeacherRecipe:
    """Everything that defines a teacher (saved as ``dmdr_teacher.json`` next to the pipeline)."""

    seed: int = 0
    size: int = SIZE
    n_train: int = 12000          # rendered (image, caption) pairs, split="train"
    # VAE
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4
    # transformer
    num_layers: int = 6
    heads: int = 4
    head_dim: int = 32
    steps: int = 3000
    batch: int = 64
    lr: float = 6e-4
    warmup: int = 100
    weight_decay: float = 0.01
    ema: float = 0.999
    text_dropout: float = 0.1
    null_tokens: tuple[int, int] = (64, 512)   # log-uniform N of the zero "T5" tokens (see module docstring)
    ckpt_every: int = 250
    max_minutes: float = 0.0      # > 0: stop (and checkpoint) after this much training time
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------


def clip_tokenizer_short(max_length: int = MAX_TOKENS):
    """A real ``CLIPTokenizer``: the byte-level character vocabulary of :func:`dmdr_cli.families.tiny.clip_tokenizer`
    (514 tokens) plus BPE merges that make every word of the digits-world captions one token (569 tokens in all;
    any other text falls back to characters), ``model_max_length`` ``max_length`` (captions need at most 12)."""
    from transformers import CLIPTokenizer

    from dmdr_cli.families.tiny import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for sym in symbols[1:]:
            if (cur, sym) not in merges:
                merges.append((cur, sym))
            cur += sym
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _text_encoder(vocab: int, hidden: int = 32, proj: int = 32, emb_std: float = 1.0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=proj,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    model = CLIPTextModelWithProjection(cfg)
    with torch.no_grad():  # unit-order token identities (init std 0.02 would leave the hidden states tiny)
        emb = model.text_model.embeddings
        emb.token_embedding.weight.normal_(0.0, emb_std)
        emb.position_embedding.weight.normal_(0.0, 0.5 * emb_std)
        model.text_projection.weight.normal_(0.0, 1.0 / math.sqrt(hidden))
    return model.eval().requires_grad_(False)


def _vae(size: int, latent_channels: int = 16, channels: tuple[int, ...] = (16, 32, 64)):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=size,
        scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=False,
    )


def _transformer(size: int, latent_channels: int, factor: int, num_layers: int, heads: int, head_dim: int,
                 joint_dim: int, pooled_dim: int):
    from diffusers import SD3Transformer2DModel

    latent = size // factor
    return SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=joint_dim, caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim,
        pos_embed_max_size=max(latent // 2, 4),
    )


def build_untrained(folder: str | Path | None = None, size: int = SIZE, *, seed: int = 0, num_layers: int = 6,
                    heads: int = 4, head_dim: int = 32, latent_channels: int = 16,
                    vae_channels: tuple[int, ...] = (16, 32, 64), clip_hidden: int = 32):
    """A random ``StableDiffusion3Pipeline`` of real classes sized for ``size``×``size`` digits canvases (see the
    module docstring); saved to ``folder`` (``save_pretrained``, safetensors) when given. Deterministic in ``seed``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok = clip_tokenizer_short()
    te1 = _text_encoder(len(tok), clip_hidden, clip_hidden)
    te2 = _text_encoder(len(tok), clip_hidden, clip_hidden)
    vae = _vae(size, latent_channels, tuple(vae_channels)).eval()
    factor = 2 ** (len(vae_channels) - 1)
    transformer = _transformer(size, latent_channels, factor, num_layers, heads, head_dim,
                               joint_dim=2 * clip_hidden, pooled_dim=2 * clip_hidden).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=clip_tokenizer_short(),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        save_pipeline(pipe, folder)
    return pipe


def save_pipeline(pipe, folder: str | Path, *, recipe: TeacherRecipe | None = None, half: bool = True,
                  info: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) of ``pipe`` into ``folder``; weights stored in fp16 with ``half`` (loaders
    upcast to the requested dtype), plus ``dmdr_teacher.json`` (recipe and measurements)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = pipe
    if half:
        saved = copy.copy(pipe)  # shallow: swap in fp16 copies of the modules
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            saved.register_modules(**{name: copy.deepcopy(getattr(pipe, name)).to(torch.float16)})
    saved.save_pretrained(folder, safe_serialization=True)
    meta = {"kind": "dmdr-digits-teacher", "version": 1, "recipe": asdict(recipe) if recipe else None, **(info or {})}
    (folder / "dmdr_teacher.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_pipeline(folder: str | Path, dtype=torch.float32):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, dtype=dtype,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    return pipe


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def build_dataset(n: int, seed: int = 0, size: int = SIZE, split: str = "train",
                  cache: bool = True) -> tuple[np.ndarray, list[str]]:
    """``(uint8 [n, size, size, 3], captions)`` of :func:`dmdr_cli.digits.world.dataset` (all six tasks), cached
    under ``$DMDR_HOME/cache`` (rendering costs about 6 ms an image)."""
    from dmdr_cli.digits import world
    from dmdr_cli.families.tiny import dmdr_home

    path = dmdr_home() / "cache" / f"digits-teacher-data-{split}-{n}-{seed}-{size}.npz"
    if cache and path.is_file():
        z = np.load(path)
        return z["images"], [str(c) for c in z["captions"]]
    images = np.zeros((n, size, size, 3), np.uint8)
    captions = []
    for i, (img, cap, _meta) in enumerate(world.dataset(n, seed=seed, split=split, size=size)):
        images[i] = np.asarray(img)
        captions.append(cap)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, images=images, captions=np.array(captions))
        tmp.replace(path)
    return images, captions


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (mean over the batch of per-image PSNR)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def train_vae(vae, images: np.ndarray, *, steps: int = 1500, batch: int = 64, lr: float = 2e-3, kl: float = 1e-4,
              seed: int = 0, test_images: np.ndarray | None = None, log: Callable[[str], None] = print) -> dict:
    """Fit ``vae`` (in place) to images (uint8 NHWC): MSE + 0.5·L1 reconstruction of a posterior sample plus
    ``kl`` × the per-element KL; AdamW, cosine decay. Then sets ``shift_factor``/``scaling_factor`` from the
    posterior means of the training images. Returns ``{"psnr", "psnr_train", "shift", "scale", "seconds"}``."""
    g = torch.Generator().manual_seed(seed)
    data = _to_tensor(images) * 2 - 1
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    t0 = time.time()
    for k in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        x = data[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + kl * post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if k % 250 == 0 or k == steps - 1:
            log(f"vae step {k} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    seconds = time.time() - t0
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(data[s:s + 256]).latent_dist.mean for s in range(0, min(len(data), 4096), 256)])
        shift, std = float(means.mean()), float(means.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
        out = {"shift": shift, "scale": 1.0 / std, "seconds": seconds,
               "psnr_train": _recon_psnr(vae, images[:512])}
        if test_images is not None:
            out["psnr"] = _recon_psnr(vae, test_images)
    log(f"vae: {seconds:.0f} s, PSNR train {out['psnr_train']:.2f} dB, held-out {out.get('psnr', float('nan')):.2f} dB")
    return out


@torch.no_grad()
def _recon_psnr(vae, images: np.ndarray) -> float:
    x = _to_tensor(images)
    rec = torch.cat([vae.decode(vae.encode(x[s:s + 256] * 2 - 1).latent_dist.mode()).sample
                     for s in range(0, len(x), 256)])
    return psnr(((rec + 1) / 2).clamp(0, 1), x)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray) -> torch.Tensor:
    """Latents ``(E(img).mode − shift)·scale`` (dmdr's SD3 codec) of uint8 NHWC images."""
    x = _to_tensor(images) * 2 - 1
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    return torch.cat([(vae.encode(x[s:s + 256]).latent_dist.mode() - shift) * scale for s in range(0, len(x), 256)])


# --------------------------------------------------------------------------------------------------------------
# Transformer training
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts_compact(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds [B, 16 + 1, D], pooled [B, P])``: ``encode_prompt`` with ONE zero "T5" token instead of
    ``max_sequence_length`` (see the module docstring)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, prompt_3=prompts,
                                              device=torch.device("cpu"), do_classifier_free_guidance=False,
                                              max_sequence_length=1)
    return embeds.float(), pooled.float()


# one zero token + log N on its logit: the SD3 family's processor, with a per-sample bias set by the trainer
_NullBiasProcessor = ZeroTokenAttnProcessor


def _install_null_bias(transformer) -> _NullBiasProcessor:
    proc = _NullBiasProcessor()
    transformer.set_attn_processor(proc)
    return proc


def _ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def train_teacher(pipe, latents: torch.Tensor, captions: list[str], *, recipe: TeacherRecipe,
                  ckpt_dir: str | Path | None = None, log: Callable[[str], None] = print,
                  on_checkpoint: Callable[[int, float, Any], None] | None = None) -> dict:
    """Rectified-flow training of ``pipe.transformer`` on ``(latents, captions)`` (module docstring). Resumes from
    ``ckpt_dir/last.pt`` when present; checkpoints every ``recipe.ckpt_every`` steps and at the end. Leaves the EMA
    weights in ``pipe.transformer``. ``on_checkpoint(step, train_seconds, ema_model)`` is called at checkpoints.
    Returns ``{"steps", "seconds", "sec_per_step", "loss" (mean of the last 100), "losses" (every step)}``."""
    from dmdr_cli.schedules.grids import flow_time_input

    torch.manual_seed(recipe.seed)
    model = pipe.transformer
    model.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    proc = _install_null_bias(model)
    uniq = sorted(set(captions)) + [""]
    pos = {c: i for i, c in enumerate(uniq)}
    emb, pooled = encode_prompts_compact(pipe, uniq)
    cap_idx = torch.tensor([pos[c] for c in captions])
    empty = pos[""]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.99), weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(recipe.seed + 1)
    step, seconds, losses = 0, 0.0, []
    ckpt = Path(ckpt_dir) / "last.pt" if ckpt_dir else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["gen"])
        step, seconds, losses = state["step"], state["seconds"], state["losses"]
        log(f"resumed from {ckpt} at step {step}")
    lo, hi = math.log(recipe.null_tokens[0]), math.log(recipe.null_tokens[1])
    s_ctx = emb.shape[1]
    n_img = (latents.shape[-1] // 2) * (latents.shape[-2] // 2)

    def save() -> None:
        if ckpt is None:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": g.get_state(), "step": step, "seconds": seconds, "losses": losses,
                    "recipe": asdict(recipe)}, tmp)
        tmp.replace(ckpt)

    t_start = time.time() - seconds
    while step < recipe.steps:
        if recipe.max_minutes and seconds >= 60 * recipe.max_minutes:
            log(f"time budget {recipe.max_minutes} min reached at step {step}")
            break
        idx = torch.randint(len(latents), (recipe.batch,), generator=g)
        x0 = latents[idx]
        ci = cap_idx[idx].clone()
        ci[torch.rand(recipe.batch, generator=g) < recipe.text_dropout] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(recipe.batch, generator=g))
        log_n = lo + (hi - lo) * torch.rand(recipe.batch, generator=g)
        bias = torch.zeros(recipe.batch, 1, 1, n_img + s_ctx)
        bias[:, 0, 0, -1] = log_n
        proc.bias = bias
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * noise
        out = model(hidden_states=x_t, timestep=flow_time_input(t), encoder_hidden_states=emb[ci],
                    pooled_projections=pooled[ci], return_dict=False)[0]
        loss = F.mse_loss(out.float(), noise - x0)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _ema_update(ema, model, min(recipe.ema, (1 + step) / (10 + step)))
        step += 1
        losses.append(loss.item())
        seconds = time.time() - t_start
        if step % 50 == 0:
            log(f"step {step} loss {np.mean(losses[-50:]):.4f} {seconds:.0f} s ({seconds / step:.3f} s/step)")
        if step % recipe.ckpt_every == 0 or step == recipe.steps:
            save()
            if on_checkpoint is not None:
                on_checkpoint(step, seconds, ema)
                t_start = time.time() - seconds  # callbacks do not count as training time
    save()
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model.load_state_dict(ema.state_dict())
    model.set_attn_processor(JointAttnProcessor2_0())
    model.eval().requires_grad_(False)
    return {"steps": step, "seconds": seconds, "sec_per_step": seconds / max(step, 1),
            "loss": float(np.mean(losses[-100:])) if losses else float("nan"), "losses": losses}


def train_all(out: str | Path, recipe: TeacherRecipe | None = None, *, work: str | Path | None = None,
              log: Callable[[str], None] = print,
              on_checkpoint: Callable[[int, float, Any], None] | None = None) -> Path:
    """The whole recipe: build → train the VAE → encode the renders → train the transformer → save the diffusers
    folder ``out``. ``work`` (default ``out.parent/<out.name>-work``) holds the VAE and the resumable checkpoint."""
    recipe = recipe or TeacherRecipe()
    out = Path(out)
    work = Path(work) if work else out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    pipe = build_untrained(None, recipe.size, seed=recipe.seed, num_layers=recipe.num_layers, heads=recipe.heads,
                           head_dim=recipe.head_dim)
    t0 = time.time()
    images, captions = build_dataset(recipe.n_train, recipe.seed, recipe.size, "train")
    test_images, _ = build_dataset(512, recipe.seed + 1, recipe.size, "test")
    log(f"data: {len(images)} train renders, {len(set(captions))} distinct captions ({time.time() - t0:.0f} s)")
    vae_path = work / "vae"
    if (vae_path / "config.json").is_file():
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(vae_path).eval().requires_grad_(False)
        vae_info = json.loads((work / "vae.json").read_text())
        log(f"VAE loaded from {vae_path}")
    else:
        vae_info = train_vae(pipe.vae, images, steps=recipe.vae_steps, batch=recipe.vae_batch, lr=recipe.vae_lr,
                             kl=recipe.vae_kl, seed=recipe.seed, test_images=test_images, log=log)
        pipe.vae.save_pretrained(vae_path)
        (work / "vae.json").write_text(json.dumps(vae_info, indent=2))
    latents = encode_latents(pipe.vae, images)
    log(f"latents {tuple(latents.shape)} mean {latents.mean():.3f} std {latents.std():.3f}")
    info = train_teacher(pipe, latents, captions, recipe=recipe, ckpt_dir=work / "ckpt", log=log,
                         on_checkpoint=on_checkpoint)
    losses = info.pop("losses")
    info["loss_curve"] = [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)]
    save_pipeline(pipe, out, recipe=recipe, info={"vae": vae_info, "train": info})
    log(f"saved {out} ({sum(f.stat().st_size for f in out.rglob('*.safetensors')) / 1e6:.2f} MB of safetensors)")
    return out


# --------------------------------------------------------------------------------------------------------------
# Sampling and scoring with dmdr's own sampler and the digits GenEval detector
# --------------------------------------------------------------------------------------------------------------


def load_bundle(folder: str | Path, sets: list[str] | None = None):
    """``(cfg, Bundle)`` of a teacher folder through dmdr's own loader (``--set model.path=DIR``, family sd3)."""
    from dmdr_cli.config.loader import resolve
    from dmdr_cli.families.loading import load_base

    cfg = resolve("tiny-sd3", [], ["runtime.device=cpu", f"model.path={folder}", "model.family=sd3", *(sets or [])])
    return cfg, load_base(cfg)


def sample_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 3) -> Path:
    """Save ``B×3×H×W`` images in [0, 1] as a PNG grid (nearest-neighbour upscaled by ``scale``, 2-px gaps)."""
    from PIL import Image

    b, _, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(b / ncol)
    gap = 2
    grid = np.full((nrows * (h * scale + gap), ncol * (w * scale + gap), 3), 64, np.uint8)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        tile = arr[i].repeat(scale, 0).repeat(scale, 1)
        y, x = r * (h * scale + gap), c * (w * scale + gap)
        grid[y:y + h * scale, x:x + w * scale] = tile
    Image.fromarray(grid).save(path)
    return Path(path)


def score_teacher(folder: str | Path | None = None, n_prompts: int = 60, *, steps: int = 28, guidance: float = 4.0,
                  images_per_prompt: int = 1, seed: int = 42, split: str = "test", batch: int = 32,
                  tags: tuple[str, ...] | None = None, grid: str | Path | None = None, bundle=None,
                  log: Callable[[str], None] = print) -> dict:
    """Generate with dmdr's teacher sampler (:func:`dmdr_cli.engine.sampler.teacher_spec` / ``generate``) on
    ``n_prompts`` prompts of ``split`` (``test``: held-out compositions, the default; ``train``; ``all``: both;
    :func:`dmdr_cli.digits.world.make_metadata`, shared round-robin over ``tags``, line ``i`` image ``j`` seeded
    ``seed + 1000 i + j``) and score each image with the ``digits`` detector and GenEval's rules.
    Returns :func:`dmdr_cli.evaluation.geneval.summarize` plus ``seconds``; writes a PNG grid to ``grid``."""
    from dmdr_cli.digits import world
    from dmdr_cli.digits.detector import make_detector
    from dmdr_cli.engine.sampler import generate, teacher_spec
    from dmdr_cli.evaluation.geneval import evaluate_detections, summarize

    if bundle is None:
        _, bundle = load_bundle(folder)
    lines = world.make_metadata(n_prompts, seed, tags=tags or world.TASKS, split=None if split == "all" else split)
    jobs = [(line, seed + 1000 * i + j) for i, line in enumerate(lines) for j in range(images_per_prompt)]
    spec = teacher_spec(bundle.family, steps, guidance)
    t0 = time.time()
    outs = []
    for s in range(0, len(jobs), batch):
        part = jobs[s:s + batch]
        outs.append(generate(bundle, bundle.network, spec, [ln["prompt"] for ln, _ in part],
                             [sd for _, sd in part], SIZE))
    images = torch.cat(outs).float().cpu()
    gen_seconds = time.time() - t0
    det = make_detector()
    rows = []
    for (line, _), img in zip(jobs, images):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        dets, color_of = det(None, arr)
        ok, reason = evaluate_detections(line, dets, color_of=color_of)
        rows.append({"tag": line["tag"], "correct": ok, "metadata": json.dumps(line), "reason": reason,
                     "prompt": line["prompt"]})
    summary = summarize(rows)
    summary["seconds"] = gen_seconds
    summary["rows"] = rows
    if grid is not None:
        sample_grid(images, grid, nrow=min(len(images), 10))
    log("  ".join(f"{t} {v['accuracy']:.2f} ({v['n_correct']}/{v['n']})" for t, v in summary["tasks"].items())
        + f"  overall {summary['overall']:.3f}  [{gen_seconds:.0f} s]")
    return summary
