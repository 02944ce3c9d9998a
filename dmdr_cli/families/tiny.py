"""Tiny but real models for tests and CPU demos: the same diffusers/transformers classes as SD3 and SDXL at
toy size, with tokenizers written locally (no hub), saved with ``save_pretrained`` and then loaded back
through the very same loader as real checkpoints.

Built deterministically (fixed seed) on first use into ``$DMDR_HOME/tiny/<kind>-v<version>``.
"""

from __future__ import annotations

from pathlib import Path

from dmdr_cli.io import dmdr_home

TINY_VERSION = 1
TINY_KINDS = ("sd3", "sdxl")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet (256 printable stand-ins for the bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer():
    """A real ``CLIPTokenizer`` with a byte-level character vocabulary (514 tokens, no merges)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A real ``T5Tokenizer`` (unigram) built from an in-memory piece list, no sentencepiece file."""
    from transformers import T5Tokenizer

    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in alphabet] + [("\u2581" + c, -2.5) for c in alphabet]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_text(hidden: int, proj: int, vocab: int, with_projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=proj,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _vae(latent_channels: int, scaling: float, shift: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        scaling_factor=scaling, shift_factor=shift, sample_size=64,
    ).eval()


def build_sd3(folder: Path, seed: int = 0) -> None:
    """Tiny ``StableDiffusion3Pipeline``: 2-layer transformer, CLIP-L/G (hidden 32) and T5 (d_model 64)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=16,
    ).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=64, d_ff=64, d_kv=16, num_layers=1,
                                 num_heads=2, dropout_rate=0.0)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, 1.5305, 0.0609),
        text_encoder=_clip_text(32, 32, len(tok)), tokenizer=tok,
        text_encoder_2=_clip_text(32, 32, len(tok)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_sdxl(folder: Path, seed: int = 0) -> None:
    """Tiny ``StableDiffusionXLPipeline``: 2-level UNet with cross-attention, two CLIP encoders."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    text_1 = _clip_text(32, 32, len(tok), with_projection=False)
    text_2 = _clip_text(32, 32, len(tok))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        transformer_layers_per_block=1, use_linear_projection=True,
    ).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(4, 0.13025, None), text_encoder=text_1, text_encoder_2=text_2, tokenizer=tok,
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random transformers ``CLIPModel`` (hidden 32, 1 layer, projection 16, 32x32 images) and its byte-level
    tokenizer, saved like a hub snapshot: the stand-in for CLIP-family scorers and colour classifiers in tests."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    tok = clip_tokenizer()
    v = len(tok)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=v - 2, eos_token_id=v - 1,
                         pad_token_id=v - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


_BUILDERS = {"sd3": build_sd3, "sdxl": build_sdxl}


def shipped_folder(name: str) -> Path:
    """A pipeline folder shipped inside the package (``dmdr_cli/assets/<name>``)."""
    return Path(__file__).resolve().parents[1] / "assets" / name


#: Trained tiny models shipped with the package (``model.tiny`` name -> asset folder).
SHIPPED = {"digits": "digits-teacher"}


def ensure_tiny(kind: str, home: Path | None = None) -> Path:
    """Path of the tiny ``kind`` pipeline folder: a shipped trained model, or a random one built atomically on
    first use."""
    from dmdr_cli.errors import ConfigError, ModelNotFoundError
    from dmdr_cli.io import AtomicDir

    if kind in SHIPPED:
        folder = shipped_folder(SHIPPED[kind])
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(f"the shipped '{kind}' model is missing from {folder}",
                                     "reinstall dmdr (pip install --force-reinstall dmdr), or retrain it with "
                                     "scripts/train_digits_teacher.py and pass --set model.path=DIR")
        return folder

    if kind not in _BUILDERS:
        raise ConfigError(f"unknown tiny model '{kind}'", f"choose one of {', '.join([*SHIPPED, *_BUILDERS])}")
    folder = (home or dmdr_home()) / "tiny" / f"{kind}-v{TINY_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    from dmdr_cli.engine.runtime import quiet_libraries

    quiet_libraries()
    try:
        with AtomicDir(folder) as tmp:
            _BUILDERS[kind](tmp)
    except Exception:
        if (folder / "model_index.json").is_file():  # another process built it concurrently
            return folder
        raise
    return folder
