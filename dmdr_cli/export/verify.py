"""Reload an export the way a user would and check it against dmdr's own student.

Checks, per format (all in fp32; TF32 off on CUDA):

- merged formats (``safetensors``, ``diffusers``): the network loads into a fresh stock model with
  ``strict=True`` (``safetensors``) / through ``DiffusionPipeline.from_pretrained`` (``diffusers``); every tensor
  equals the merged weights cast to the export dtype, bit for bit; for fp32 exports every LoRA-targeted weight is
  checked again against ``W_base + scaling * B @ A`` (relative error < 1e-3). The fp32 merge itself was checked
  with the same formula before anything was written (:func:`dmdr_cli.export.merge.check_merged`).
- LoRA formats (``lora``, ``comfyui``): a fresh base pipeline + ``load_lora_weights`` (diffusers' own kohya
  converter for SDXL ``comfyui`` files; ComfyUI's key map rebuilt from the model's keys for SD3); the adapter of
  every targeted layer gives ``delta W == scaling * B @ A`` of the student (relative error < 1e-3, against the
  factors as stored in the export dtype), and no other layer carries an adapter.
- sample: fixed-seed samples of dmdr's sampler on the reloaded export equal the student's samples (max |diff| of
  images in [0, 1] below :data:`SAMPLE_TOL`: fp32 1e-3; fp16 2e-2 and bf16 1e-1, plus a mean limit
  :data:`SAMPLE_MEAN_TOL`, because rounding every weight legitimately moves pixels; the weight checks above stay
  exact for every dtype). The student's samples are drawn before the student is released
  (:func:`student_reference`).
- stock pipeline (``diffusers``, ``lora``, ``comfyui``): ``pipe(prompt, **the model card's kwargs)`` runs the
  training grid (scheduler sigmas / timesteps) and equals the student run under the pipeline's own conventions;
  for sdxl these conventions are dmdr's (LCM at tau = 399), for sd3 the gap to dmdr's sampler (unrounded network
  time, end at 0 instead of ``x0_end``) is measured and reported.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from dmdr_cli.export import VerificationError
from dmdr_cli.export import formats as fm
from dmdr_cli.export.merge import LoraFactor, check_merged, expected_deltas, lora_factors

SDE_GLOBAL_SEED = 0  # global torch seed of the stock-call check of SDE sd3 students

#: max |image difference| (images in [0, 1]) between the reloaded export and the student, by export dtype
SAMPLE_TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 1e-1}
#: ... and on the mean |difference| for the reduced-precision dtypes (their rounding of every weight moves pixels)
SAMPLE_MEAN_TOL = {"fp16": 2e-3, "bf16": 1e-2}
LORA_TOL = 1e-3
GRID_TOL = 1e-5
PROMPTS = ("a red circle on a white background", "two blue squares")
SEEDS = (0, 1)


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Disable TF32 matmuls/convolutions on CUDA (they would dominate a 1e-3 comparison); restore on exit."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class Reference:
    """The student's own samples, computed before the student is released."""

    images: torch.Tensor              # dmdr's training-consistent sampler
    stock: torch.Tensor | None        # the student under the stock pipeline's conventions (None: same as images)


@dataclass
class Context:
    """Everything verification needs once the student itself is gone."""

    fmt: str
    family: Any                        # the family object (sd3 / sdxl)
    base_folder: str
    source: str
    device: torch.device
    dtype: str                         # export dtype name
    spec: Any                          # the student's SamplerSpec
    resolution: int
    shift: float
    stock_kwargs: dict
    network_config: Any
    use_t5: bool = True
    ref: Reference | None = None
    export_sd: dict[str, torch.Tensor] | None = None       # merged formats: exactly what was written
    base_targeted: dict[str, torch.Tensor] | None = None   # fp32 base weights of LoRA-targeted layers
    factors: list[LoraFactor] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def prompts(self) -> list[str]:
        return list(PROMPTS)

    @property
    def seeds(self) -> list[int]:
        return list(SEEDS)


# -- the student's reference -------------------------------------------------------------------------
@torch.no_grad()
def student_reference(bundle, net, spec, stock_kwargs: dict, shift: float, resolution: int) -> Reference:
    """dmdr's sample of the student (``net`` in its ``gen`` role), and for sd3 the same student run the way
    the stock pipeline runs it (so that the pipeline can be checked exactly)."""
    from dmdr_cli.engine.sampler import generate

    images = generate(bundle, net, spec, list(PROMPTS), list(SEEDS), resolution).float().cpu()
    stock = None
    if bundle.family.name == "sd3":
        stock = _sd3_stock_convention(bundle, net, stock_kwargs, shift, resolution,
                                      fm.stochastic_export("sd3", spec)).float().cpu()
    return Reference(images, stock)


def _sd3_stock_convention(bundle, net, stock_kwargs: dict, shift: float, resolution: int,
                          stochastic: bool = False) -> torch.Tensor:
    """The flow Euler loop of ``StableDiffusion3Pipeline`` + ``FlowMatchEulerDiscreteScheduler``: network time
    ``scheduler.timesteps`` (= 1000 sigma, unrounded), steps between ``scheduler.sigmas`` ending at 0. With
    ``stochastic`` (``stochastic_sampling=True``): ``x0 = x - s v``, ``x <- (1 - s') x0 + s' eps`` with ``eps``
    drawn from the *global* RNG seeded with :data:`SDE_GLOBAL_SEED` (``StableDiffusion3Pipeline`` does not pass
    ``generator=`` to ``scheduler.step``, so its re-noising is seeded by ``torch.manual_seed`` only; the initial
    noise still comes from the per-sample generators), one full-batch draw per step."""
    from dmdr_cli.engine.sampler import per_sample_noise

    family = bundle.family
    sched = fm.export_scheduler("sd3", bundle.pipe.scheduler.config, shift, stochastic)
    sched.set_timesteps(sigmas=stock_kwargs["sigmas"])
    sigmas, timesteps = sched.sigmas.tolist(), sched.timesteps
    generators = [torch.Generator().manual_seed(int(s)) for s in SEEDS]
    x = per_sample_noise(generators, family.latent_shape(bundle, resolution), bundle.device).to(bundle.dtype)
    cond = family.encode_prompts(bundle, list(PROMPTS))
    dtype = next(net.parameters()).dtype
    if stochastic:
        torch.manual_seed(SDE_GLOBAL_SEED)
    for i in range(len(timesteps)):
        v = net(hidden_states=x.to(dtype), timestep=timesteps[i].to(bundle.device).expand(x.shape[0]),
                encoder_hidden_states=cond.tensors["encoder_hidden_states"].to(dtype),
                pooled_projections=cond.tensors["pooled_projections"].to(dtype), return_dict=False)[0]
        if stochastic:
            eps = torch.randn(x.shape, dtype=torch.float32, device=bundle.device)
            x0 = x.float() - sigmas[i] * v.float()
            x = ((1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps).to(x.dtype)
        else:
            x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
    return family.decode(bundle, x)


# -- helpers -----------------------------------------------------------------------------------------
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def _compare(what: str, got: torch.Tensor, want: torch.Tensor, dtype: str) -> float:
    """Max |diff| of two image batches; above the dtype's limits (max, and mean for fp16/bf16) is an error."""
    if got.shape != want.shape:
        raise VerificationError(f"sample check: {what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    diff = (got.float().cpu() - want.float().cpu()).abs()
    worst, mean = float(diff.max()), float(diff.mean())
    max_tol, mean_tol = SAMPLE_TOL[dtype], SAMPLE_MEAN_TOL.get(dtype)
    if not worst < max_tol or (mean_tol is not None and not mean < mean_tol):
        limit = f"limit {max_tol:g}" + (f", mean {mean:.3g} (limit {mean_tol:g})" if mean_tol is not None else "")
        raise VerificationError(f"sample check: {what} differs from dmdr's student by max |diff| {worst:.3g} ({limit})")
    return worst


def _prepare(pipe, device):
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dmdr_sample(ctx: Context, pipe) -> torch.Tensor:
    """dmdr's own sampler (the student spec) on the networks of a reloaded pipeline."""
    from dmdr_cli.engine.sampler import generate
    from dmdr_cli.families.base import Bundle

    bundle = Bundle(ctx.family, pipe, ctx.source, ctx.base_folder, ctx.device, torch.float32)
    with torch.no_grad():
        return generate(bundle, ctx.family.network_of(pipe), ctx.spec, ctx.prompts, ctx.seeds, ctx.resolution)


def _stock_sample(ctx: Context, pipe, report: dict) -> None:
    """``pipe(prompts, **stock_kwargs)`` as the model card documents it; checks the grid it ran and the image."""
    generators = [torch.Generator().manual_seed(int(s)) for s in ctx.seeds]
    if fm.stochastic_export(ctx.name, ctx.spec):
        report["stock_renoises"] = True  # its images differ from dmdr's sampler by the re-noising draws
        torch.manual_seed(SDE_GLOBAL_SEED)  # the SD3 pipeline re-noises from the global RNG (see _sd3_stock_convention)
    with torch.no_grad():
        images = pipe(ctx.prompts, generator=generators, output_type="pt", **ctx.stock_kwargs).images
    sched = pipe.scheduler
    if ctx.name == "sd3":
        ran = [float(s) for s in sched.sigmas[: ctx.spec.steps]]
        err = max(abs(a - b) for a, b in zip(ran, ctx.spec.grid))
        if len(ran) != ctx.spec.steps or not err < GRID_TOL:
            raise VerificationError(f"the stock pipeline ran sigmas {[round(s, 5) for s in ran]}, not the training grid "
                                    f"{[round(t, 5) for t in ctx.spec.grid]}")
    else:
        ran = [int(t) for t in sched.timesteps]
        if ran != list(ctx.stock_kwargs["timesteps"]):
            raise VerificationError(f"the stock pipeline ran timesteps {ran}, not {ctx.stock_kwargs['timesteps']}")
    ref = ctx.ref
    if ref.stock is not None:
        report["stock_vs_student_same_conventions"] = _compare("the stock pipeline call", images, ref.stock, ctx.dtype)
        report["stock_vs_dmdr_sampler"] = _max_diff(images, ref.images)
    elif fm.stock_call_exact(ctx.name, ctx.spec):
        report["stock_vs_dmdr_sampler"] = _compare("the stock pipeline call", images, ref.images, ctx.dtype)
    else:
        report["stock_vs_dmdr_sampler"] = _max_diff(images, ref.images)


def _base_pipeline(ctx: Context, **components):
    """The base model as a user loads it: ``DiffusionPipeline.from_pretrained`` in fp32 (``components`` passed in)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(ctx.base_folder, torch_dtype=torch.float32, local_files_only=True,
                                             **_no_t5(ctx), **components)


def _no_t5(ctx: Context) -> dict:
    """An SD3 student trained without T5 is loaded (and exported) without it: diffusers cannot reload a saved
    pipeline whose ``text_encoder_3`` is null unless it is passed as ``None`` again."""
    return {} if (ctx.name != "sd3" or ctx.use_t5) else {"text_encoder_3": None, "tokenizer_3": None}


def _check_network_tensors(ctx: Context, reloaded: dict[str, torch.Tensor], what: str) -> dict:
    """Reloaded network == the merged tensors written (bitwise, in the export dtype); fp32: formula check too."""
    written = ctx.export_sd
    if set(reloaded) != set(written):
        extra, missing = sorted(set(reloaded) - set(written)), sorted(set(written) - set(reloaded))
        raise VerificationError(f"{what}: keys differ from the merged network (extra {extra[:2]}, missing {missing[:2]})")
    dtype = fm.torch_dtype(ctx.dtype)
    for key, want in written.items():
        got = reloaded[key].detach().cpu()
        got = got.to(dtype) if got.is_floating_point() else got
        if not torch.equal(got, want):
            raise VerificationError(f"{what}: {key} is not the merged weight that was written")
    out = {"tensors": len(written)}
    if ctx.dtype == "fp32" and ctx.factors:
        subset = {k: reloaded[k].detach().float().cpu() for k in ctx.base_targeted}
        out.update(check_merged(subset, ctx.base_targeted, ctx.factors, what=what))
    return out


def _exported_deltas(ctx: Context) -> dict[str, torch.Tensor]:
    """``B @ A`` of the LoRA exactly as stored (export dtype, scaling folded into B), per stock weight key."""
    dtype = fm.torch_dtype(ctx.dtype)
    out = {}
    for module, (a, b) in fm.combined_factors(ctx.factors).items():
        f = LoraFactor(module, "export", a.to(dtype).float(), b.to(dtype).float(), 1.0)
        out[f.key] = f.delta()
    return out


def _check_loaded_lora(ctx: Context, net) -> dict:
    """Every targeted layer of ``net`` carries the loaded adapter and its delta is the student's ``scaling * B @ A``."""
    adapters = list(getattr(net, "peft_config", {}) or {})
    if not adapters:
        raise VerificationError("load_lora_weights put no adapter on the network")
    got = expected_deltas(lora_factors(net, adapters))
    want = _exported_deltas(ctx)
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise VerificationError(f"the loaded LoRA covers other layers than the student's (extra {extra[:2]}, missing {missing[:2]})")
    worst = 0.0
    for key, w in want.items():
        norm = float(w.norm())
        rel = float((got[key] - w).norm()) / norm if norm else float(got[key].abs().max())
        worst = max(worst, rel)
        if not rel < LORA_TOL:
            raise VerificationError(f"the loaded LoRA gives {key} a delta that differs from scaling*B@A by relative "
                                    f"error {rel:.3g} (limit {LORA_TOL:g})")
    return {"layers": len(want), "max_rel_err": worst}


# -- per format --------------------------------------------------------------------------------------
def verify(ctx: Context, staged: Path) -> dict:
    """Run the checks of ``ctx.fmt`` on the export staged at ``staged`` (a folder, or the weights file)."""
    with exact_fp32():
        return {"safetensors": _verify_safetensors, "diffusers": _verify_diffusers,
                "lora": _verify_lora, "comfyui": _verify_comfyui}[ctx.fmt](ctx, staged)


def _verify_safetensors(ctx: Context, path: Path) -> dict:
    """As the card says: the stock class from the base config on the meta device, ``load_state_dict(strict=True)``,
    then the base pipeline with that network passed in."""
    import diffusers
    from safetensors.torch import load_file

    cls = getattr(diffusers, fm.NETWORK_CLASS[ctx.name])
    config = cls.load_config(ctx.base_folder, subfolder=fm.NETWORK[ctx.name])
    net = fm.fresh_network(ctx.name, config, load_file(str(path)))   # strict=True
    report = {"weights": _check_network_tensors(ctx, net.state_dict(), "reloaded safetensors")}
    pipe = _prepare(_base_pipeline(ctx, **{fm.NETWORK[ctx.name]: net.float()}), ctx.device)
    report["sample_max_diff"] = _compare("the merged network", _dmdr_sample(ctx, pipe), ctx.ref.images, ctx.dtype)
    return report


def _verify_diffusers(ctx: Context, folder: Path) -> dict:
    from diffusers import DiffusionPipeline

    from dmdr_cli.config.presets import detect_family

    if detect_family(folder) != ctx.name:
        raise VerificationError(f"model_index.json of the export is not detected as family {ctx.name}")
    pipe = _prepare(DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True,
                                                      **_no_t5(ctx)), ctx.device)
    if type(pipe).__name__ != fm.PIPELINE[ctx.name] or type(pipe.scheduler).__name__ != fm.SCHEDULER[ctx.name]:
        raise VerificationError(f"the export loads as {type(pipe).__name__} with {type(pipe.scheduler).__name__}, "
                                f"expected {fm.PIPELINE[ctx.name]} with {fm.SCHEDULER[ctx.name]}")
    if ctx.name == "sd3" and float(pipe.scheduler.shift) != float(ctx.shift):
        raise VerificationError(f"the exported scheduler has shift {pipe.scheduler.shift}, the student trained with {ctx.shift}")
    network = ctx.family.network_of(pipe)
    report = {"weights": _check_network_tensors(ctx, network.state_dict(), "reloaded pipeline")}
    report["sample_max_diff"] = _compare("the reloaded pipeline (dmdr sampler)", _dmdr_sample(ctx, pipe),
                                         ctx.ref.images, ctx.dtype)
    _stock_sample(ctx, pipe, report)
    return report


def _with_lora(ctx: Context, load) -> dict:
    """Fresh base pipeline, ``load(pipe)`` puts the LoRA on it, then the adapter, sample and stock checks."""
    pipe = _base_pipeline(ctx)
    pipe.scheduler = fm.export_scheduler(ctx.name, pipe.scheduler.config, ctx.shift,
                                         fm.stochastic_export(ctx.name, ctx.spec))
    load(pipe)
    _prepare(pipe, ctx.device)
    report = {"lora": _check_loaded_lora(ctx, ctx.family.network_of(pipe))}
    report["sample_max_diff"] = _compare("the base model + exported LoRA", _dmdr_sample(ctx, pipe),
                                         ctx.ref.images, ctx.dtype)
    _stock_sample(ctx, pipe, report)
    return report


def _verify_lora(ctx: Context, path: Path) -> dict:
    return _with_lora(ctx, lambda pipe: pipe.load_lora_weights(str(path)))


def _verify_comfyui(ctx: Context, path: Path) -> dict:
    from safetensors.torch import load_file

    if ctx.name == "sdxl":  # diffusers' own kohya -> diffusers converter (lora_conversion_utils)
        return {**_with_lora(ctx, lambda pipe: pipe.load_lora_weights(str(path))), "loader": "diffusers kohya converter"}

    def load(pipe):  # SD3: diffusers has no kohya converter; rebuild ComfyUI's key map from the model's keys
        sd = load_file(str(path))
        key_map = fm.kohya_key_map(ctx.family.network_of(pipe).state_dict().keys(), ctx.name)
        pipe.load_lora_weights(fm.kohya_to_diffusers(sd, key_map, ctx.name))

    return {**_with_lora(ctx, load), "loader": "ComfyUI-style key map (lora_transformer_*) -> diffusers"}
