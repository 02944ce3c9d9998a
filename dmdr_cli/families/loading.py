"""Find and load a base model: a local diffusers folder, a tiny built-in model, or a hub id resolved from the
Hugging Face cache with ``local_files_only=True``. Nothing is downloaded unless ``model.allow_download``.
"""

from __future__ import annotations

import os
from pathlib import Path

from dmdr_cli.errors import ModelNotFoundError

EXPECTED_LAYOUT = {
    "sd3": "model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer*/, scheduler/",
    "sdxl": "model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/",
}


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return os.path.expanduser("~/.cache/huggingface/hub")


def _missing(hub_id: str, family: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"base model '{hub_id}' is not on this machine (looked in the Hugging Face cache {_hf_cache_dir()})",
        f"on a connected machine run `hf download {hub_id}` (huggingface_hub < 0.34: `huggingface-cli download`) into that cache, "
        f"or put the diffusers folder "
        f"({EXPECTED_LAYOUT.get(family, 'model_index.json + components')}) anywhere and pass --set model.path=DIR; "
        "--set model.allow_download=true lets dmdr download it",
    )


def resolve_model_folder(model_cfg) -> tuple[Path, str]:
    """(folder, source label) of the base model described by ``model_cfg`` (a ``ModelConfig``)."""
    if model_cfg.path:
        folder = Path(model_cfg.path).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(f"model.path {folder} is not a diffusers pipeline folder (no model_index.json)",
                                     f"expected {EXPECTED_LAYOUT.get(model_cfg.family, 'a save_pretrained folder')}")
        return folder, str(folder)
    if model_cfg.tiny:
        from dmdr_cli.families.tiny import ensure_tiny

        return ensure_tiny(model_cfg.tiny), f"tiny-{model_cfg.tiny}"
    if model_cfg.hub_id:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model_cfg.hub_id, local_files_only=True)), model_cfg.hub_id
        except Exception:
            if not model_cfg.allow_download:
                raise _missing(model_cfg.hub_id, model_cfg.family) from None
        try:
            return Path(snapshot_download(model_cfg.hub_id)), model_cfg.hub_id
        except Exception as exc:
            raise ModelNotFoundError(f"could not download '{model_cfg.hub_id}': {type(exc).__name__}",
                                     "check the network and your hub token, or pass --set model.path=DIR") from None
    raise ModelNotFoundError("no base model given", "use --base PRESET|DIR|HUB_ID or --set model.path=DIR")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError("runtime.device is 'cuda' but no CUDA device is available", "use --set runtime.device=cpu")
    return torch.device(name)


def native_bf16(device) -> bool:
    """Whether ``device`` runs bf16 matmuls/convolutions in hardware: a CUDA GPU with bf16, or a CPU with AMX
    tiles or AVX512-BF16 (elsewhere CPU bf16 is emulated and need not beat fp32)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(p()) for p in probes if p is not None)


def decode_autocast(name: str, device):
    """The autocast dtype of ``model.decode_dtype`` on ``device`` (``None``: decode in the VAE's dtype)."""
    import torch

    if name == "bf16" or (name == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def load_base(cfg, device=None):
    """Load the base model of a resolved config through its family: returns a ``Bundle``."""
    from dmdr_cli.config.presets import detect_family
    from dmdr_cli.families import make_family

    from dmdr_cli.engine.runtime import quiet_libraries

    quiet_libraries()
    folder, source = resolve_model_folder(cfg.model)
    name = cfg.model.family or detect_family(folder)
    family = make_family(cfg, name)
    device = device or pick_device(cfg.runtime.device)
    dtype = torch_dtype(cfg.model.dtype)
    if device.type == "cpu" and dtype == __import__("torch").float16:
        dtype = torch_dtype("fp32")  # fp16 kernels are missing/slow on CPU; keep the same code path in fp32
    try:
        bundle = family.load(str(folder), device=device, dtype=dtype, source=source)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"could not load the {name} pipeline from {folder}: {str(exc).splitlines()[0][:200]}",
                                 f"expected {EXPECTED_LAYOUT[name]}") from None
    bundle.decode_autocast = decode_autocast(cfg.model.decode_dtype, device)
    return bundle
