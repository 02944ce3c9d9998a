"""The model card (``README.md``) and the metadata written with every export."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmdr_cli.export import formats as fm

METHOD = "DMDR: Distribution Matching Distillation + Reinforcement Learning (arXiv 2511.13649)"


@dataclass
class ExportInfo:
    """What the card and the metadata describe."""

    fmt: str
    dtype: str
    family: str
    base_model: str             # hub id, preset name of a built-in model, or local path
    base_ref: str               # what from_pretrained takes in the snippets: hub id or local folder
    run: str                    # run directory name
    checkpoint: str             # step-XXXXXX
    step: int
    stage: str
    steps: int
    grid: list[float]
    t_end: float
    mode: str
    shift: float
    x0_end: float
    resolution: int
    max_sequence_length: int
    use_t5: bool
    config_hash: str
    dmdr_version: str
    preset: str = ""
    description: str = ""
    lora_rank: int = 0
    lora_alpha: int = 0
    full_generator: bool = False
    stock_kwargs: dict = field(default_factory=dict)
    stock_exact: bool = False
    weights_name: str = ""
    is_dir: bool = False


def metadata(info: ExportInfo) -> dict[str, str]:
    """String metadata for safetensors headers (and ``dmdr_export.json``)."""
    meta = {
        "dmdr_version": info.dmdr_version, "dmdr_export_format": info.fmt, "dtype": info.dtype,
        "method": METHOD, "base_model": info.base_model, "family": info.family,
        "network": fm.NETWORK[info.family], "steps": str(info.steps), "grid": json.dumps(info.grid),
        "t_end": repr(info.t_end), "sampler_mode": info.mode, "guidance_scale": "0",
        "resolution": str(info.resolution), "config_hash": info.config_hash, "run": info.run,
        "checkpoint": info.checkpoint, "checkpoint_step": str(info.step), "stage": info.stage, "preset": info.preset,
    }
    if info.family == "sd3":
        meta.update(shift=repr(info.shift), x0_end=repr(info.x0_end), max_sequence_length=str(info.max_sequence_length))
    else:
        meta["timesteps"] = json.dumps(info.stock_kwargs.get("timesteps", []))
    if info.fmt in ("lora", "comfyui"):
        meta.update(lora_rank=str(info.lora_rank), lora_alpha=str(info.lora_alpha),
                    lora_scaling=repr(info.lora_alpha / info.lora_rank), lora_scaling_folded_into="lora_B / lora_up")
    if info.fmt == "comfyui":  # kohya-style fields read by some UIs
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(info.lora_rank),
                    ss_network_alpha=str(info.lora_rank), ss_base_model_version=info.family)
    return meta


def info_json(info: ExportInfo, verification: dict | None) -> str:
    return json.dumps({"export": asdict(info), "metadata": metadata(info), "verification": verification},
                      indent=2, default=str)


def read_evals(run_dir: Path) -> list[tuple[str, dict]]:
    """The run's ``eval/<bench>/summary.json`` and ``eval/<bench>/<model>/summary.json`` (what ``dmdr eval`` writes)
    as (``bench[/model]``, flat dict of short scalars); unreadable files are skipped."""
    root = Path(run_dir) / "eval"
    out = []
    for path in sorted([*root.glob("*/summary.json"), *root.glob("*/*/summary.json")]):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            flat = {k: v for k, v in _flatten(data).items() if not (isinstance(v, str) and len(v) > 80)}
            out.append((path.parent.relative_to(root).as_posix(), flat))
    return out


def _flatten(data: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _call(info: ExportInfo) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in info.stock_kwargs.items())
    return f'image = pipe("a photo of a red fox in the snow", {args}).images[0]'


def _scheduler_line(info: ExportInfo) -> str:
    if info.family == "sd3":
        extra = ", stochastic_sampling=True" if fm.stochastic_export(info.family, info) else ""
        return (f"pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                f"shift={info.shift!r}{extra})  # the training shift" + (" and the SDE student's re-noising" if extra else ""))
    return "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)"


def _no_t5(info: ExportInfo) -> str:
    return ", text_encoder_3=None, tokenizer_3=None" if info.family == "sd3" and not info.use_t5 else ""


def _snippet(info: ExportInfo, name: str) -> str:
    sched_cls = fm.SCHEDULER[info.family]
    base = info.base_ref
    if info.fmt == "diffusers":
        return "\n".join([
            "import torch", "from diffusers import DiffusionPipeline", "",
            f'pipe = DiffusionPipeline.from_pretrained("{name}", torch_dtype=torch.float16{_no_t5(info)}).to("cuda")',
            f"# {sched_cls} comes configured; pass the student's grid explicitly:", _call(info)])
    if info.fmt == "safetensors":
        net = fm.NETWORK_CLASS[info.family]
        sub = fm.NETWORK[info.family]
        return "\n".join([
            "import torch", f"from diffusers import DiffusionPipeline, {net}, {sched_cls}",
            "from safetensors.torch import load_file", "",
            f'config = {net}.load_config("{base}", subfolder="{sub}")',
            'with torch.device("meta"):', f"    {sub} = {net}.from_config(config)",
            f'{sub}.load_state_dict(load_file("{name}"), strict=True, assign=True)',
            f'pipe = DiffusionPipeline.from_pretrained("{base}", {sub}={sub}.to(torch.float16), '
            f'torch_dtype=torch.float16{_no_t5(info)}).to("cuda")',
            _scheduler_line(info), _call(info)])
    if info.fmt == "lora":
        return "\n".join([
            "import torch", f"from diffusers import DiffusionPipeline, {sched_cls}", "",
            f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16{_no_t5(info)}).to("cuda")',
            _scheduler_line(info),
            f'pipe.load_lora_weights("{name}")',
            _call(info)])
    return ""


def _settings(info: ExportInfo) -> list[str]:
    grid = ", ".join(f"{t:.6g}" for t in info.grid)
    lines = [f"- **steps:** {info.steps}", "- **guidance:** none (`guidance_scale=0`; the student is guidance-free)",
             f"- **resolution:** {info.resolution} px"]
    if info.family == "sd3":
        lines += [
            f"- **time grid (model inputs, t = 1 is noise):** [{grid}], "
            + ("re-noising (SDE) steps `x <- (1 - t') x0 + t' eps` (`stochastic_sampling=True`; the SD3 pipeline "
               "draws `eps` from the global RNG, not from `generator=`: call `torch.manual_seed(S)` first for "
               "reproducible images)" if fm.stochastic_export(info.family, info) else "Euler steps")
            + f", ending at t = {info.x0_end:g}",
            f"- **scheduler:** `FlowMatchEulerDiscreteScheduler` with `shift={info.shift:g}`, called with "
            f"`sigmas={info.stock_kwargs.get('sigmas')}`: these are the grid *before* the shift, because diffusers "
            "shifts custom sigmas again (ALGORITHM.md 5.3)",
            f"- **T5 length:** `max_sequence_length={info.max_sequence_length}` (the training value; diffusers' default is 256)",
            f"- do **not** call it with `num_inference_steps={info.steps}` alone: diffusers' default grid "
            "`shift(linspace(1, sigma_min, N))` evaluates the model at a nearly clean last point, not the training grid",
        ]
        if not info.use_t5:
            lines.append("- trained **without T5**: load the pipeline with `text_encoder_3=None, tokenizer_3=None` (a diffusers "
                         "export has no T5 folder, and diffusers refuses to load it without these arguments)")
    else:
        ts = info.stock_kwargs.get("timesteps")
        lines += [
            f"- **timesteps:** {ts} (discrete, of 1000); the input is pure Gaussian noise",
            f"- **scheduler:** `LCMScheduler` called with `timesteps={ts}`; at these timesteps its boundary coefficients "
            "are c_skip ~ 1.6e-8, c_out ~ 1, i.e. exactly the student's `x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)`",
            f"- do **not** call it with `num_inference_steps={info.steps}` alone: LCM then picks timestep 999",
            "- LCM logs a warning that the custom schedule does not start at 999: expected",
        ]
        if info.steps > 1 and info.mode != "sde":
            lines.append("- this student was trained with ODE backward simulation; LCM re-noises between steps (SDE "
                         "style), so the diffusers pipeline only approximates dmdr's sampler")
    lines.append(f"- the training-consistent reference sampler is dmdr's own: `dmdr sample PROMPT --ckpt RUN_DIR` on the "
                 f"run directory `{info.run}` (ALGORITHM.md 5.2)")
    return lines


def _verification(info: ExportInfo, verification: dict | None) -> list[str]:
    if not verification:
        return ["Not verified."]
    lines = ["Checked by `dmdr export` (all in fp32):", ""]
    merge = verification.get("merge")
    if merge:
        lines.append(f"- fp32 merge: every one of {merge['targeted']} LoRA-targeted weights equals `W_base + scaling * B @ A` "
                     f"(max relative error {merge['max_rel_err']:.2e}, limit 1e-3); the other {merge['untouched']} tensors "
                     "are the base weights, bit for bit")
        if "forward_max_rel_err" in merge:
            lines.append(f"- every merged layer's forward equals the adapter layer's forward on a fixed input "
                         f"(max relative error {merge['forward_max_rel_err']:.2e})")
    reload = verification.get("reload")
    if reload is None:
        return lines + ["- **the export was not reloaded and compared with the student (`--no-verify`)**"]
    weights = reload.get("weights")
    if weights:
        lines.append(f"- the reloaded network ({weights['tensors']} tensors, stock keys, `strict=True`) is bit-identical "
                     f"to the exported weights in {info.dtype}")
    lora = reload.get("lora")
    if lora:
        how = reload.get("loader", "`load_lora_weights`")
        lines.append(f"- loaded onto the base model ({how}): {lora['layers']} layers, each with delta W = scaling * B @ A "
                     f"of the student (max relative error {lora['max_rel_err']:.2e})")
    if "sample_max_diff" in reload:
        loose = "" if info.dtype == "fp32" else (f"; {info.dtype} rounding of every weight moves pixels, hence the looser "
                                                  "limit; computed in fp32 from the upcast weights")
        lines.append(f"- a fixed-seed sample of dmdr's sampler on the reloaded export matches the student: max |diff| "
                     f"{reload['sample_max_diff']:.2e} (images in [0, 1]; limit {verification['sample_tol']:g}{loose})")
    if "stock_vs_student_same_conventions" in reload:
        lines.append(f"- the stock pipeline call above runs the training grid and matches the student run with the "
                     f"pipeline's own conventions: max |diff| {reload['stock_vs_student_same_conventions']:.2e}")
    if "stock_vs_dmdr_sampler" in reload:
        gap = reload["stock_vs_dmdr_sampler"]
        if info.stock_exact:
            lines.append(f"- the stock pipeline call above runs the training grid and matches dmdr's sampler: max |diff| {gap:.2e}")
        else:
            why = (" (diffusers feeds `1000 * sigma` unrounded to the network where dmdr feeds `round(1000 t)`, and "
                   "integrates to 0 instead of `x0_end`)") if info.family == "sd3" else ""
            if fm.stochastic_export(info.family, info):
                why = (" (an SDE student: the pipeline re-noises with draws from the global RNG, dmdr with per-image "
                       "generators, so the two give different samples of the same model; the check that matters is the "
                       "line above)")
            lines.append(f"- the stock pipeline call differs from dmdr's training-consistent sampler by max |diff| {gap:.2e}{why}")
    if info.fmt == "comfyui":
        lines.append("- ComfyUI itself was not run: " + (
            "the keys were loaded back through diffusers' kohya converter, which follows the same naming ComfyUI maps"
            if info.family == "sdxl" else
            "the keys were mapped back with the table ComfyUI builds for SD3 (`lora_transformer_` + the diffusers key "
            "with dots as underscores) and loaded with diffusers"))
    return lines


def render(info: ExportInfo, name: str, verification: dict | None, evals: list[tuple[str, dict]]) -> str:
    """The model card; ``name`` is how the snippet refers to the export (its path as given)."""
    tags = ["text-to-image", "dmdr", "distillation", "few-step", info.family]
    if info.fmt in ("lora", "comfyui"):
        tags.append("lora")
    front = ["---", "library_name: diffusers"]
    if info.base_ref == info.base_model and "/" in info.base_model and not Path(info.base_model).exists():
        front.append(f"base_model: {json.dumps(info.base_model)}")       # a hub id, not a local folder
    front += ["pipeline_tag: text-to-image", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    kind = {"safetensors": "merged generator weights (single safetensors file)", "diffusers": "diffusers pipeline folder",
            "lora": "LoRA (diffusers format)", "comfyui": "LoRA (kohya / ComfyUI key format)"}[info.fmt]
    out = front + [
        f"# {info.run}: {info.steps}-step DMDR student of {info.base_model}", "",
        f"A {info.steps}-step, guidance-free text-to-image generator distilled from `{info.base_model}` with {METHOD}, "
        f"trained with `dmdr` {info.dmdr_version}. This export: {kind}, {info.dtype}.", "",
        "## Model", "",
        f"- **base model:** `{info.base_model}` ({info.family} family, network `{fm.NETWORK[info.family]}`)",
        f"- **method:** {METHOD}; stage `{info.stage}`, generator step {info.step} (`{info.checkpoint}`)",
        f"- **preset:** `{info.preset}`" + (f": {info.description}" if info.description else ""),
        "- **generator:** " + ("full-weight network" if info.full_generator else
                                f"LoRA rank {info.lora_rank}, alpha {info.lora_alpha} (scaling {info.lora_alpha / max(info.lora_rank, 1):g})"
                                + ("; merged into the base weights" if info.fmt in ("safetensors", "diffusers") else
                                   "; the scaling is folded into the up/B matrices, alpha = rank")),
        f"- **training config hash:** `{info.config_hash}` (run `{info.run}`)",
        "", "## Recommended sampler settings", ""] + _settings(info) + ["", "## How to load", ""]
    snippet = _snippet(info, name)
    if snippet:
        out += ["```python", snippet, "```", ""]
    if info.fmt == "comfyui":
        prefix = fm.KOHYA_PREFIX[info.family]
        out += [f"Copy the file into `ComfyUI/models/loras/` and apply it with a `LoraLoader` (model strength 1.0; it has "
                f"no text-encoder weights) on the base checkpoint. Keys: `{prefix}<module>.lora_down.weight` / "
                "`.lora_up.weight` / `.alpha`, module names of the diffusers model with dots as underscores. Use the "
                "step count, grid and no CFG (cfg 1.0) from above; sampling settings inside ComfyUI were not tested.", ""]
        if info.family == "sdxl":
            out += ["With diffusers: `pipe.load_lora_weights(path)` reads this file through its kohya converter.", ""]
    if evals:
        out += ["## Evaluation", "", "From the run's `eval/` folder (`dmdr eval`; a number is comparable with published "
                "ones only where it says `canonical: True`, and it may refer to another checkpoint of the run):", ""]
        for bench, values in evals:
            out += [f"**{bench}**", "", "| metric | value |", "|---|---|"]
            out += [f"| {k} | {_fmt(v)} |" for k, v in list(values.items())[:40]]
            out.append("")
    out += ["## Verification", ""] + _verification(info, verification) + [""]
    out += ["## Provenance and licence", "",
            f"Exported by `dmdr export --format {info.fmt} --dtype {info.dtype}` from `{info.run}/checkpoints/{info.checkpoint}`. "
            "DMDR trains a `gen` LoRA (or a full generator) on one frozen copy of the base network; "
            "stage 2 (RL) keeps training the same adapter, so this export contains both stages. "
            f"The weights are a derivative of `{info.base_model}`; its licence applies.", ""]
    return "\n".join(out)
