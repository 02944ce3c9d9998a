"""The four export formats: file layout, key conventions, and the diffusers scheduler of each family.

=============  ==============================================================================================
format         what is written
=============  ==============================================================================================
safetensors    one ``.safetensors``: the generator network (``transformer`` / ``unet``) with the ``gen`` adapter
               merged, keyed exactly like the stock diffusers model's state dict; dmdr metadata in the header.
diffusers      a pipeline folder (``save_pretrained``): the base pipeline's components, the merged network and
               a scheduler set up for the student's grid (sd3: ``FlowMatchEulerDiscreteScheduler`` with the
               training shift; sdxl: ``LCMScheduler``, called with the student's discrete timesteps).
lora           the ``gen`` adapter alone in diffusers' LoRA format (``transformer.<module>.lora_A.weight`` /
               ``unet.<module>.lora_B.weight``), loadable with ``pipe.load_lora_weights``.
comfyui        the same adapter with kohya-style keys: ``lora_transformer_<module>`` (SD3, the OneTrainer naming
               ComfyUI maps onto MMDiT) or ``lora_unet_<module>`` (SDXL, diffusers module names), each with
               ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``.
=============  ==============================================================================================

In both LoRA formats the adapter's scaling (PEFT ``scaling = alpha / r``, read from the layer) is folded into
the up/B matrix and alpha is written as the rank, so every loader, with or without alpha support, applies
``delta W = scaling * B @ A`` exactly. Several adapters on one layer are concatenated along the rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dmdr_cli.export import VerificationError
from dmdr_cli.export.merge import LoraFactor

NETWORK = {"sd3": "transformer", "sdxl": "unet"}
PIPELINE = {"sd3": "StableDiffusion3Pipeline", "sdxl": "StableDiffusionXLPipeline"}
NETWORK_CLASS = {"sd3": "SD3Transformer2DModel", "sdxl": "UNet2DConditionModel"}
KOHYA_PREFIX = {"sd3": "lora_transformer_", "sdxl": "lora_unet_"}
SCHEDULER = {"sd3": "FlowMatchEulerDiscreteScheduler", "sdxl": "LCMScheduler"}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
INFO_NAME = "dmdr_export.json"


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# -- output layout ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where an export goes: a folder (``is_dir``) or one weights file with its card beside it."""

    path: Path          # the folder, or the weights file
    is_dir: bool
    weights_name: str   # file name of the weights inside the folder / of the file itself

    @property
    def card_name(self) -> str:
        return "README.md" if self.is_dir else f"{Path(self.weights_name).stem}.README.md"

    @property
    def card(self) -> Path:
        return self.path / "README.md" if self.is_dir else self.path.with_name(self.card_name)

    def targets(self) -> list[Path]:
        """Every path this export creates (the folder, or the file and its card)."""
        return [self.path] if self.is_dir else [self.path, self.card]


def layout_for(fmt: str, out: Path) -> Layout:
    """``safetensors``/``comfyui``: one file (``.safetensors`` appended when missing); ``diffusers``: a folder;
    ``lora``: a folder with ``pytorch_lora_weights.safetensors``, or one file when ``out`` ends in ``.safetensors``."""
    out = Path(out).expanduser()
    if fmt == "diffusers":
        return Layout(out, True, "")
    if fmt == "lora" and out.suffix != ".safetensors":
        return Layout(out, True, LORA_WEIGHT_NAME)
    if out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    return Layout(out, False, out.name)


# -- tensors ---------------------------------------------------------------------------------------
def cast_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype`` (contiguous CPU), others unchanged."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in sd.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", **metadata})


def combined_factors(factors: list[LoraFactor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B_scaled) with every adapter on the module concatenated along the rank, so that
    ``B_scaled @ A == sum_i scaling_i * B_i @ A_i``."""
    grouped: dict[str, list[LoraFactor]] = {}
    for f in factors:
        grouped.setdefault(f.module, []).append(f)
    out = {}
    for module, fs in grouped.items():
        out[module] = (torch.cat([f.A for f in fs], 0), torch.cat([f.B * f.scaling for f in fs], 1))
    return out


def lora_state_dict(factors: list[LoraFactor], family: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """diffusers LoRA format: ``<network>.<module>.lora_A.weight`` / ``.lora_B.weight`` (scaling folded into B)."""
    prefix = NETWORK[family]
    out = {}
    for module, (a, b) in combined_factors(factors).items():
        out[f"{prefix}.{module}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"{prefix}.{module}.lora_B.weight"] = b.to(dtype).contiguous()
    return out


def kohya_name(module: str, family: str) -> str:
    return KOHYA_PREFIX[family] + module.replace(".", "_")


def kohya_state_dict(factors: list[LoraFactor], family: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """kohya/ComfyUI format: ``<prefix><module with . -> _>.lora_down.weight`` (A), ``.lora_up.weight`` (scaled B),
    ``.alpha`` (= rank, i.e. scale 1). Raises if two modules collapse onto one name."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    for module, (a, b) in combined_factors(factors).items():
        name = kohya_name(module, family)
        if name in seen:
            raise VerificationError(f"modules {seen[name]} and {module} both map to the kohya name {name}")
        seen[name] = module
        out[f"{name}.lora_down.weight"] = a.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = b.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]), dtype=torch.float32)
    return out


def kohya_key_map(weight_keys, family: str) -> dict[str, str]:
    """kohya name -> module, built the way ComfyUI builds its LoRA key map: from the model's own ``.weight``
    keys, ``<prefix>`` + key with dots replaced by underscores (ComfyUI ``comfy/lora.py`` for SD3: the
    "OneTrainer" ``lora_transformer_`` entries)."""
    return {kohya_name(k[: -len(".weight")], family): k[: -len(".weight")] for k in weight_keys if k.endswith(".weight")}


def kohya_to_diffusers(sd: dict[str, torch.Tensor], key_map: dict[str, str], family: str) -> dict[str, torch.Tensor]:
    """Map a kohya-style LoRA back to diffusers keys through ``key_map`` (alpha / rank folded into B)."""
    prefix = NETWORK[family]
    out = {}
    names = {k.split(".", 1)[0] for k in sd}
    for name in sorted(names):
        if name not in key_map:
            raise VerificationError(f"kohya key {name} matches no module of the base network")
        down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
        alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else float(down.shape[0])
        out[f"{prefix}.{key_map[name]}.lora_A.weight"] = down
        out[f"{prefix}.{key_map[name]}.lora_B.weight"] = up * (alpha / down.shape[0])
    return out


# -- family specifics of the diffusers pipeline ----------------------------------------------------
def unshift(t: float, shift: float) -> float:
    """Inverse of the static flow shift ``t = S s / (1 + (S - 1) s)``: ``s = t / (S - (S - 1) t)``."""
    return t / (shift - (shift - 1.0) * t)


def stochastic_export(family: str, spec) -> bool:
    """Whether an sd3 student (``spec``: anything with ``mode`` and ``steps``, a sampler spec or the card's
    ExportInfo) samples with re-noising (SDE, ALGORITHM.md 5.2): its scheduler then sets
    ``stochastic_sampling=True`` (``x <- (1 - s') x0 + s' eps``, dmdr's SDE step) instead of Euler steps."""
    return family == "sd3" and spec.mode == "sde" and spec.steps > 1


def export_scheduler(family: str, base_config, shift: float, stochastic: bool = False):
    """The scheduler saved with a diffusers export (ALGORITHM.md 5.2/5.3).

    sd3: ``FlowMatchEulerDiscreteScheduler`` built with the training shift (``from_config(..., shift=S)``; assigning
    ``config["shift"]`` afterwards would have no effect) and static shifting; ``stochastic`` (an SDE student, see
    :func:`stochastic_export`) turns on its ``stochastic_sampling``. sdxl: ``LCMScheduler``; with the
    student's discrete timesteps (``timesteps=[399]``) its boundary coefficients are ``c_skip ~ 1.6e-8``,
    ``c_out ~ 1``, i.e. the 1-step student's ``x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)``.
    """
    import diffusers

    if family == "sd3":
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            base_config, shift=float(shift), use_dynamic_shifting=False, shift_terminal=None, invert_sigmas=False,
            use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
            stochastic_sampling=bool(stochastic))
    return diffusers.LCMScheduler.from_config(base_config, prediction_type="epsilon", clip_sample=False,
                                              thresholding=False)


def stock_call_kwargs(family: str, spec, shift: float, resolution: int, max_sequence_length: int) -> dict:
    """Arguments of ``pipe(prompt, **kwargs)`` that run the student's grid through the stock pipeline.

    sd3: ``sigmas`` = the *unshifted* grid (the scheduler shifts custom sigmas again, ALGORITHM.md 5.3), no CFG,
    the training T5 length. sdxl: ``timesteps`` = the discrete student timesteps (399 for 1 step), no CFG.
    """
    from dmdr_cli.schedules.grids import discrete_timestep

    kwargs: dict = {"guidance_scale": 0.0, "height": resolution, "width": resolution}
    if family == "sd3":
        kwargs["sigmas"] = [round(unshift(float(t), shift), 6) for t in spec.grid]
        kwargs["max_sequence_length"] = max_sequence_length
    else:
        kwargs["timesteps"] = [int(v) for v in discrete_timestep(torch.tensor(spec.grid, dtype=torch.float64))]
    return kwargs


def stock_call_exact(family: str, spec) -> bool:
    """Whether the stock pipeline call reproduces dmdr's sampler up to float error.

    sdxl with LCM: yes for 1 step and for SDE students (LCM re-noises like dmdr's SDE sampler). sd3: no; diffusers
    feeds ``1000 * sigma`` unrounded to the transformer (dmdr: ``round(1000 t)``) and ends at sigma = 0, not at
    ``x0_end``; the gap is measured and reported instead.
    """
    return family == "sdxl" and (spec.steps == 1 or spec.mode == "sde")


def fresh_network(family: str, config, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A stock diffusers network built from ``config`` on the meta device and filled with ``load_state_dict(strict=True,
    assign=True)``: exactly the keys of the stock model, nothing silently dropped."""
    import diffusers

    cls = getattr(diffusers, NETWORK_CLASS[family])
    with torch.device("meta"):
        net = cls.from_config(config)
    try:
        net.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise VerificationError(f"the exported weights do not load into a fresh {cls.__name__} with strict=True: "
                                f"{str(exc).splitlines()[0][:200]}") from None
    return net.eval().requires_grad_(False)


def pipeline_components(pipe) -> dict:
    """Every constructor component of ``pipe``, ``None`` for absent ones (``pipe.components`` drops components that
    were loaded as ``None``, e.g. SD3 without T5, and the constructor then refuses the dict)."""
    expected, _ = pipe._get_signature_keys(pipe)
    return {name: getattr(pipe, name, None) for name in expected}


def save_diffusers(folder: Path, pipe, family: str, network: torch.nn.Module, scheduler, dtype: torch.dtype) -> None:
    """``save_pretrained`` of the base pipeline's components with ``network`` and ``scheduler`` swapped in, every
    module cast to ``dtype`` (the components of ``pipe`` are cast in place: call it after the last use of ``pipe``)."""
    components = pipeline_components(pipe)
    components[NETWORK[family]] = network
    components["scheduler"] = scheduler
    for value in components.values():
        if isinstance(value, torch.nn.Module):  # safetensors stores contiguous tensors (the loaded VAE is channels_last)
            value.to(dtype=dtype, memory_format=torch.contiguous_format)
    type(pipe)(**components).save_pretrained(folder, safe_serialization=True)
