"""Real preference/alignment scorers on local weights (EVALUATION.md §4.2–4.5), differentiable w.r.t. pixels.

All share :func:`dmdr_cli.rewards.base.clip_preprocess` (bicubic antialiased squash resize + CLIP mean/std).
The models are frozen (``eval()``, ``requires_grad_(False)``): gradients reach the input pixels only. Text
features are computed under ``torch.no_grad()`` since no gradient needs them. fp32 on CPU; on GPU the caller
picks the inference dtype (bf16 for SD3, fp16 for SDXL).

| scorer | model | score |
|---|---|---|
| ``clip`` | transformers ``CLIPModel`` (openai/clip-vit-large-patch14) | ``cos(f_img, f_txt)``; evaluation reports ``100·cos`` |
| ``pickscore`` | transformers ``CLIPModel`` (yuvalkirstain/PickScore_v1, arXiv 2305.01569) | ``logit_scale.exp()·cos`` |
| ``hps-v2``/``hps-v2.1`` | open_clip ViT-H-14 + HPS state dict (xswu/HPSv2, arXiv 2306.09341) | ``cos``; papers print ×100 |
| ``dfn5b-clip`` | open_clip ViT-H-14 + DFN5B weights (arXiv 2309.17425), GELU unless ``quickgelu`` | ``cos`` |
| ``aesthetic-v2`` | ViT-L/14 image embedding (L2-normalised) → linear MLP (improved-aesthetic-predictor) | raw output |
| ``imagereward`` | BLIP + MLP from the optional ``ImageReward`` package (arXiv 2304.05977) | ``(mlp − 0.16717)/1.03334`` |

transformers and open_clip are imported lazily, inside the constructors.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmdr_cli.errors import CheckpointError, ConfigError, ModelNotFoundError
from dmdr_cli.families.tiny import _bytes_to_unicode  # CLIP's byte-level alphabet, in CLIP's order
from dmdr_cli.rewards.assets import TOKENIZER_FOLDER
from dmdr_cli.rewards.base import (
    as_feature_tensor,
    check_inputs,
    clip_preprocess,
    cosine,
    image_features,
    text_features,
)

__all__ = [
    "AestheticMLP",
    "AestheticReward",
    "ClipReward",
    "ImageRewardReward",
    "OpenClipReward",
    "clip_bpe_tokenizer",
    "load_clip_tokenizer",
]

#: CLIP text context (tokens, including start and end).
CONTEXT_LENGTH = 77
#: open_clip's BPE file holds more merges than CLIP uses: the first 49152 − 256 − 2 lines after the header.
_N_MERGES = 49152 - 256 - 2


def _freeze(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


@contextlib.contextmanager
def _quiet_loading(transformers: bool = True) -> Iterator[None]:
    """Silence transformers' load report (a full CLIP snapshot has text keys a vision model does not use) and
    progress bars, and open_clip's "No pretrained weights loaded" warning (the weights are loaded right after)."""
    drop = _DropMessage("No pretrained weights loaded")
    logging.getLogger().addFilter(drop)
    restore: list[Any] = []
    if transformers:
        from transformers.utils import logging as hf_logging

        restore = [hf_logging, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()]
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)
        if restore:
            hf_logging, verbosity, bars = restore
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _one_line(err: BaseException, limit: int = 400) -> str:
    """An exception message on one line (state-dict errors span many), truncated."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _image_size(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


# ----------------------------------------------------------------------------------------------- tokenizers


@functools.lru_cache(maxsize=1)
def clip_bpe_tokenizer() -> Any:
    """The real 49,408-token CLIP tokenizer (OpenAI = LAION ViT-H-14) rebuilt from open_clip's bundled BPE file.

    Recipe of EVALUATION.md §6.4: vocabulary = 256 byte symbols, the same with ``</w>``, one entry per merge (the
    first 48,894 lines after the header), then ``<|startoftext|>``, ``<|endoftext|>``. Needs ``open_clip_torch``
    installed (for the file only; open_clip is not imported).
    """
    from transformers import CLIPTokenizer

    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    bpe = next((Path(d) / "bpe_simple_vocab_16e6.txt.gz" for d in locations
                if (Path(d) / "bpe_simple_vocab_16e6.txt.gz").is_file()), None)
    if bpe is None:
        raise ModelNotFoundError("no CLIP tokenizer files found and open_clip's BPE file is unavailable",
                                 "put vocab.json + merges.txt (or tokenizer.json) beside the weights, "
                                 "or pip install open_clip_torch")
    with gzip.open(bpe, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1:_N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)


def load_clip_tokenizer(*folders: Path | None) -> Any:
    """``CLIPTokenizer`` from the first folder holding tokenizer files, else :func:`clip_bpe_tokenizer`."""
    from transformers import CLIPTokenizer

    for folder in folders:
        if folder is not None and any(all((Path(folder) / f).is_file() for f in alt) for alt in TOKENIZER_FOLDER):
            return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return clip_bpe_tokenizer()


# ------------------------------------------------------------------------------------- transformers CLIP models


class ClipReward(nn.Module):
    """Cosine similarity of a transformers ``CLIPModel``'s image and text embeddings.

    ``s = cos(f_img(clip_preprocess(x)), f_txt(tok77(prompt)))`` — a cosine in ``[−1, 1]``; the CLIP-score metric
    of evaluation reports ``100·s`` (torchmetrics convention), Hessel et al.'s CLIPScore is ``2.5·max(s, 0)``.
    With ``logit_scale=True`` the score is ``exp(logit_scale)·s`` (PickScore, arXiv 2305.01569).
    """

    differentiable = True

    def __init__(
        self,
        model_dir: str | Path,
        *,
        name: str = "clip",
        tokenizer_dirs: tuple[Path | None, ...] = (),
        logit_scale: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        from transformers import CLIPModel

        self.name = name
        with _quiet_loading():
            model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
        self.model = _freeze(model, device, dtype)
        self.tokenizer = load_clip_tokenizer(Path(model_dir), *tokenizer_dirs)
        self.use_logit_scale = logit_scale
        self.image_size = _image_size(self.model.config.vision_config.image_size)
        self.max_length = min(CONTEXT_LENGTH, int(self.model.config.text_config.max_position_embeddings))

    def _text(self, prompts: list[str]) -> Tensor:
        device = self.model.logit_scale.device
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        with torch.no_grad():
            return text_features(self.model, tok["input_ids"].to(device), tok["attention_mask"].to(device))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_inputs(images, prompts)
        p = self.model.logit_scale
        pixels = clip_preprocess(images.to(p.device), self.image_size).to(p.dtype)
        score = cosine(image_features(self.model, pixels), self._text(prompts))
        if self.use_logit_scale:
            score = p.float().exp() * score
        return score.to(images.device)


# ------------------------------------------------------------------------------------------ open_clip models


def _import_open_clip(reward: str) -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ConfigError(f"reward '{reward}' needs open_clip", "pip install open_clip_torch") from err
    return open_clip


class OpenClipReward(nn.Module):
    """Cosine of an open_clip model's normalised image and text features (HPSv2/v2.1, DFN5B-CLIP).

    ``model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quickgelu)``, then the weights file
    is loaded strictly through ``open_clip.load_checkpoint`` (which unwraps HPS's ``{"state_dict": …}`` and a
    ``module.`` prefix, i.e. ``model.load_state_dict(ckpt["state_dict"], strict=True)`` for HPS files). Tokenizer
    ``open_clip.get_tokenizer(arch)`` (bundled BPE, 77 tokens). ``s = ⟨f̂_img, f̂_txt⟩`` with no logit scale.

    ``arch`` is overridable so tests can load a tiny registered config through the same path. DFN5B was trained
    with QuickGELU, DMDR loads it into plain-GELU ``ViT-H-14``: ``quickgelu=False`` reproduces DMDR (ALGORITHM.md
    §12.2); HPSv2 is GELU.
    """

    differentiable = True

    def __init__(
        self,
        weights: str | Path,
        *,
        name: str = "open-clip",
        arch: str = "ViT-H-14",
        quickgelu: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        open_clip = _import_open_clip(name)
        self.name = name
        try:
            with _quiet_loading(transformers=False):
                model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quickgelu)
        except RuntimeError as err:
            raise ConfigError(f"reward '{name}': unknown open_clip architecture '{arch}'") from err
        try:
            open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling, key or shape mismatch: all "wrong file"
            raise CheckpointError(f"reward '{name}': cannot load {weights} into open_clip {arch}: "
                                  f"{_one_line(err)}",
                                  "expected an open_clip state dict (HPS files: {'state_dict': ...})") from err
        self.model = _freeze(model, device, dtype)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.image_size = _image_size(model.visual.image_size)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_inputs(images, prompts)
        p = self.model.logit_scale
        pixels = clip_preprocess(images.to(p.device), self.image_size).to(p.dtype)
        f_img = self.model.encode_image(pixels)
        with torch.no_grad():
            f_txt = self.model.encode_text(self.tokenizer(list(prompts)).to(p.device))
        return cosine(f_img, f_txt).to(images.device)


# ------------------------------------------------------------------------------------------------ aesthetic


def load_vision_with_projection(folder: str | Path) -> Any:
    """``CLIPVisionModelWithProjection`` from a full ``CLIPModel`` snapshot or a vision-only one.

    For a full snapshot the vision config is taken from ``CLIPConfig.vision_config`` with the top-level
    ``projection_dim`` (a sub-config saved without it would default to 512 and mismatch ``visual_projection``).
    """
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    kwargs: dict[str, Any] = {}
    if getattr(config, "vision_config", None) is not None:
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        kwargs["config"] = vision_config
    with _quiet_loading():
        return CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True, **kwargs)


class AestheticMLP(nn.Module):
    """LAION improved-aesthetic-predictor head: ``Linear`` at 0, 2, 4, 6, 7, ``Dropout`` at 1, 3, 5, no activations.

    768 → 1024 → 128 → 64 → 16 → 1 for ViT-L/14; keys ``layers.{0,2,4,6,7}.{weight,bias}`` as in
    ``sac+logos+ava1-l14-linearMSE.pth``. ``input_size`` follows the CLIP projection (tests use a tiny one).
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding)


class AestheticReward(nn.Module):
    """LAION aesthetic predictor v2: ``s = MLP(f_img / ‖f_img‖)``, raw regression output (about 1–10).

    ``f_img`` = projected image embedding of ``CLIPVisionModelWithProjection`` (openai/clip-vit-large-patch14;
    loads from a full ``CLIPModel`` snapshot). Prompts are ignored. Source: christophschuhmann/improved-aesthetic-
    predictor (Apache-2.0), whose inference L2-normalises the CLIP embedding before the MLP.
    """

    differentiable = True

    def __init__(
        self,
        mlp_path: str | Path,
        clip_dir: str | Path,
        *,
        name: str = "aesthetic-v2",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.name = name
        vision = load_vision_with_projection(clip_dir)
        mlp = AestheticMLP(int(vision.visual_projection.out_features))
        try:
            state = torch.load(str(mlp_path), map_location="cpu", weights_only=True)
            mlp.load_state_dict(state, strict=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"reward '{name}': cannot load the aesthetic MLP from {mlp_path}: "
                                  f"{_one_line(err)}",
                                  "expected keys layers.{0,2,4,6,7}.{weight,bias} with input size "
                                  f"{mlp.input_size} (the CLIP projection dim)") from err
        self.vision = _freeze(vision, device, dtype)
        self.mlp = _freeze(mlp, device, dtype)
        self.image_size = _image_size(vision.config.image_size)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_inputs(images, prompts)
        p = self.vision.visual_projection.weight
        pixels = clip_preprocess(images.to(p.device), self.image_size).to(p.dtype)
        emb = as_feature_tensor(self.vision(pixel_values=pixels))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb).squeeze(-1).float().to(images.device)


# ---------------------------------------------------------------------------------------------- ImageReward


def imagereward_available() -> bool:
    """Whether the optional ``ImageReward`` package (PyPI ``image-reward``) is importable."""
    return importlib.util.find_spec("ImageReward") is not None


class ImageRewardReward(nn.Module):
    """ImageReward (arXiv 2304.05977): BLIP ViT-L/16 + BERT cross-attention → [CLS] → MLP, standardised.

    ``s = (MLP(h_CLS) − 0.16717362830052426) / 1.0333394966054072``; text tokenised by BLIP's BERT tokenizer to 35
    tokens; image = :func:`clip_preprocess` at 224 (ImageReward's PIL path is resize + centre crop, equal geometry
    for square images). Needs the optional ``ImageReward`` package and, for its tokenizer, ``bert-base-uncased``
    in the Hugging Face cache (EVALUATION.md §4.4). Untested here: the package is not a dependency.
    """

    differentiable = True
    MEAN = 0.16717362830052426
    STD = 1.0333394966054072

    def __init__(
        self,
        checkpoint: str | Path,
        med_config: str | Path,
        *,
        name: str = "imagereward",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not imagereward_available():
            raise ConfigError("reward 'imagereward' needs the optional ImageReward package",
                              "install the imagereward extra: pip install 'dmdr[imagereward]' "
                              "(= image-reward + openai-clip)")
        from ImageReward.ImageReward import ImageReward

        self.name = name
        try:
            model = ImageReward(med_config=str(med_config), device="cpu")
        except OSError as err:
            raise ModelNotFoundError("reward 'imagereward': the bert-base-uncased tokenizer is not in the "
                                     "Hugging Face cache", "pre-populate it (EVALUATION.md §4.4)") from err
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=False)  # as upstream ImageReward.load (position-id buffers differ)
        self.model = _freeze(model, device, dtype)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_inputs(images, prompts)
        blip = self.model.blip
        p = self.model.mlp.layers[0].weight
        pixels = clip_preprocess(images.to(p.device), 224).to(p.dtype)
        tok = blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt").to(p.device)
        image_embeds = blip.visual_encoder(pixels)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=p.device)
        out = blip.text_encoder(tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=atts, return_dict=True)
        raw = self.model.mlp.layers(out.last_hidden_state[:, 0, :]).squeeze(-1).float()
        return ((raw - self.MEAN) / self.STD).to(images.device)
