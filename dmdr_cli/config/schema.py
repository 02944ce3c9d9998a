"""The typed configuration schema: every default lives here, once.

Presets (``presets/*.yaml``) hold only what differs from these defaults. Precedence when resolving:
schema defaults < preset (``--base``) < ``--config`` files (in order) < ``--set key=value`` (in order).

Each field's ``help`` metadata is its documentation (shown by ``dmdr presets show --help-keys``).
Torch-free: this module is imported by ``dmdr --help`` paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def _f(default, help: str, **kw):  # noqa: A002 - "help" is the natural name here
    """A dataclass field with a help string (lists/dicts get a factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """Which base model, and how to load and run it."""

    family: str = _f("", "Model family: 'sd3' (flow matching) or 'sdxl' (epsilon). Empty: detect from model_index.json.")
    hub_id: str = _f("", "Hugging Face hub id of the base model (resolved from the local HF cache only).")
    path: str = _f("", "Local diffusers folder of the base model; takes precedence over hub_id.")
    tiny: str = _f("", "Built-in tiny model: 'digits' (the shipped, trained digits-world SD3 teacher) or 'sd3'/'sdxl' (random weights, built on first use; for tests).")
    allow_download: bool = _f(False, "Allow downloading missing weights from the hub (never done otherwise).")
    dtype: str = _f("fp32", "Weight dtype of the frozen base: fp32, bf16 or fp16.")
    resolution: int = _f(512, "Image resolution in pixels (square).")
    max_sequence_length: int = _f(128, "T5 max_sequence_length for SD3-family prompt encoding (training value: 128).")
    use_t5: bool = _f(True, "SD3 family: use the T5 text encoder when the checkpoint has one.")
    shift: float = _f(3.0, "Flow families: static time shift S used for the student grid.")
    generator_init: str = _f("", "Weights (safetensors/bin) to initialise a full-weight generator from (SDXL 1-step: DMD2's regression checkpoint).")
    x0_end: float = _f(0.001, "Flow families: end point of x0 conversion and of the student grid (0.001 faithful, 0 clean).")
    decode_dtype: str = _f("", "VAE decode of sample/eval images and training's sample grids (never a loss's decode, nor the export check): '' in the VAE's own dtype; 'bf16' under bf16 autocast; 'auto' bf16 where the hardware runs it natively (CUDA with bf16, a CPU with AMX or AVX512-BF16), else ''.")


@dataclass
class TeacherConfig:
    """How the multi-step teacher samples (sample/eval of the base model)."""

    steps: int = _f(28, "Number of teacher sampling steps.")
    guidance: float = _f(7.0, "Classifier-free guidance scale of the teacher.")
    guidance_t_min: float = _f(0.0, "Guidance interval: CFG only at sampler steps with t >= this, the conditional prediction below; 0 = every step.")


@dataclass
class StudentConfig:
    """The few-step student: its time grid and how it samples."""

    steps: int = _f(4, "Number of student steps N.")
    grid: list = _f([], "Explicit student time grid (N values in (0, 1], t=1 is noise); empty: computed from shift.")
    grid_dtype: str = _f("fp32", "Compute the grid in 'fp32' (clean) or 'bf16' (the official run's rounding).")
    simulation: str = _f("ode", "Backward simulation / sampling mode: 'ode' or 'sde'.")
    sde_input: str = _f("official", "SDE generator input: 'official' or 'dmd2' (ALGORITHM.md 3.2).")
    pure_noise_first: bool = _f(False, "Feed pure noise at the first grid step (SDXL: tau=399 1-step, tau=999).")
    use_ema: bool = _f(True, "sample/eval/export a run's EMA generator weights when its checkpoint has them (ema_decay > 0); false: the raw last iterate.")


@dataclass
class LoraConfig:
    """The two adapters on the one frozen base network."""

    gen_rank: int = _f(64, "Rank of the generator ('gen') LoRA.")
    gen_alpha: int = _f(128, "Alpha of the generator LoRA (scaling = alpha / rank).")
    guide_rank: int = _f(32, "Rank of the guide (fake score / DynaDG) LoRA.")
    guide_alpha: int = _f(32, "Alpha of the guide LoRA.")
    targets: list = _f([], "LoRA target modules; empty: the family's defaults.")
    full_generator: bool = _f(False, "Train a full-weight generator copy instead of a LoRA (SDXL 1-step).")


@dataclass
class RuntimeConfig:
    """Devices, precision and reproducibility."""

    seed: int = _f(30, "Global seed (each rank uses seed + rank).")
    device: str = _f("auto", "'auto', 'cpu' or 'cuda'.")
    mixed_precision: str = _f("no", "accelerate mixed precision: 'no', 'bf16' or 'fp16'.")
    gradient_checkpointing: bool = _f(False, "Activation checkpointing in the base network.")


@dataclass
class DistillConfig:
    """Stage 1: cold-start distribution matching (DMD + DynaDG + DynaRS)."""

    max_steps: int = _f(2000, "Generator updates to run (all schedules count generator steps).")
    batch_size: int = _f(8, "Prompts per inner step, per process.")
    lr: float = _f(1e-6, "Generator learning rate (constant).")
    lr_guide: float = _f(5e-7, "Guide (fake score) learning rate (constant).")
    weight_decay_gen: float = _f(0.01, "AdamW weight decay of the generator.")
    weight_decay_guide: float = _f(0.0, "AdamW weight decay of the guide.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (needs CUDA and bitsandbytes).")
    grad_clip: float = _f(1.0, "Gradient-norm clip of each optimiser.")
    ttur: int = _f(5, "Critic updates per generator update.")
    group_simulation: bool = _f(True, "Run the backward simulations of the inner steps that see the same generator weights (up to ttur + 1) as one batch: same distribution, fewer network calls (both stages); false: one simulation per inner step (less no-grad activation memory).")
    real_cfg: float = _f(7.0, "Real-score CFG w0; each DMD call draws w ~ U[w0 - jitter, w0 + jitter]; <= 1 disables CFG.")
    cfg_jitter: float = _f(0.5, "Half-width of the real-score CFG jitter.")
    real_cfg_t_min: float = _f(0.0, "Guidance interval of the real score: CFG only where the DMD renoise time t >= this (per sample), the plain conditional score (w = 1) below; 0 = CFG at every t (the official recipes).")
    fake_scale: float = _f(2.0, "LoRA scale of the guide adapter as fake score (lambda_f).")
    dynadg: bool = _f(True, "DynaDG: real score = base + lambda_r(k) * guide, cosine-annealed.")
    dynadg_scale0: float = _f(0.5, "DynaDG initial real-score adapter scale lambda_r0.")
    dynamic_steps: int = _f(2000, "Horizon K (generator steps) of DynaDG and DynaRS.")
    t_sampler: str = _f("beta_anneal", "Critic/DMD renoise timesteps: 'beta_anneal' (DynaRS) or 'uniform'.")
    beta_a0: float = _f(4.0, "DynaRS initial Beta a0.")
    beta_b0: float = _f(1.5, "DynaRS initial Beta b0.")
    nan_mode: str = _f("faithful", "Non-finite DMD gradients: 'faithful' (torch nan_to_num) or 'clean' (zero + skip step).")
    prompts: str = _f("hf:DyJiang/dmdr/t2i-2m-filtered-prompts.txt",
                      "Training prompts: a .txt/.jsonl file, builtin:NAME, or hf:REPO/FILE (read from the HF cache only).")
    checkpoint_every: int = _f(500, "Checkpoint every this many generator steps.")
    sample_every: int = _f(100, "Write a sample grid every this many generator steps.")
    keep_last: int = _f(3, "Checkpoints to keep.")
    ema_decay: float = _f(0.0, "EMA decay of the generator weights (0 = off, as the official recipes; e.g. 0.98). The EMA is the student sample/eval/export use, and stage 2 starts from it.")
    regression_weight: float = _f(0.0, "Weight of the teacher-trajectory regression (DMD1's paired term on teacher ODE trajectories, made once before training; 0 = off, as DMDR).")
    regression_pairs: int = _f(512, "Teacher ODE trajectories made for the regression term (teacher.steps, teacher.guidance).")
    regression_batch: int = _f(8, "Regression pairs per generator update.")
    regression_t_max: float = _f(1.0, "Regression only at the student grid times <= this (1 = every grid step).")


@dataclass
class RewardSpec:
    """One reward term of the RL objective."""

    name: str = _f("", "Reward registry name (e.g. clip, hps-v2.1, pickscore, aesthetic-v2, digit-cls).")
    weight: float = _f(1.0, "Weight of this reward's loss.")
    margin: Optional[float] = _f(0.7, "ReFL hinge margin; null: plain -reward.")
    prefix: str = _f("", "Text prepended to the prompt for this reward (HPS 'magic prompt').")
    path: str = _f("", "Local weights of the reward model.")
    options: dict = _f({}, "Builder options of the reward (e.g. digit-cls term weights {color_weight: 1.0}); unknown ones are refused.")


@dataclass
class FinetuneRLConfig:
    """Stage 2: joint DMD + RL, resumed from a stage-1 run."""

    rl: str = _f("refl", "RL plug-in: refl, dpo, grpo or none.")
    max_steps: int = _f(2000, "Generator updates to run in stage 2.")
    batch_size: int = _f(4, "Prompts per inner step, per process.")
    lr: float = _f(5e-7, "Stage-2 generator learning rate (re-applied after loading optimiser state).")
    lr_guide: float = _f(2e-7, "Stage-2 guide learning rate (re-applied after loading optimiser state).")
    dmd_weight: float = _f(1.0, "Weight of the DMD loss (0 = 'RL only' ablation).")
    rewards: list = _f([], "Reward terms: list of {name, weight, margin, prefix, path, options}.", item=RewardSpec)
    dpo_beta: float = _f(1000.0, "DPO beta (scale of x0-error differences).")
    dpo_samples: int = _f(4, "DPO samples per prompt (best vs worst).")
    dpo_weight: float = _f(1.0, "DPO loss weight.")
    grpo_group: int = _f(8, "GRPO group size (samples per prompt).")
    grpo_eta: float = _f(0.9, "GRPO CPS stochasticity eta.")
    grpo_clip: float = _f(1e-4, "GRPO ratio clip epsilon.")
    checkpoint_every: int = _f(500, "Checkpoint every this many generator steps.")
    sample_every: int = _f(100, "Write a sample grid every this many generator steps.")
    ema_decay: float = _f(0.0, "EMA decay of the generator weights in stage 2 (0 = off). Stage 2 starts from stage 1's EMA when it has one either way.")


@dataclass
class SampleConfig:
    """Defaults of ``dmdr sample``."""

    seed: int = _f(0, "Seed of the first image; image i of a prompt uses seed + i.")
    n: int = _f(1, "Images per prompt.")
    batch_size: int = _f(4, "Images generated per network call.")
    grid: bool = _f(False, "Also write a grid image of all samples.")


@dataclass
class EvalConfig:
    """Defaults of ``dmdr eval``."""

    bench: str = _f("geneval", "Benchmark: geneval, fid, kid, rewards, dpg, digits.")
    images_per_prompt: int = _f(4, "Images per prompt.")
    seed: int = _f(42, "Seed (GenEval's reference generator reseeds 42 per prompt).")
    max_prompts: int = _f(0, "Evaluate only the first N prompts (0 = all).")
    batch_size: int = _f(4, "Images per generator call (per-image seeds: images do not depend on it); seconds per image are measured at this batch.")
    timing_rounds: int = _f(3, "With two or more models: after generating, each model regenerates the first batch this many times, the models taking turns, and its median is its seconds per image (machine drift cancels); 0: the median over its generation batches.")


@dataclass
class ExportConfig:
    """Defaults of ``dmdr export``."""

    format: str = _f("safetensors", "safetensors, diffusers, lora or comfyui.")
    dtype: str = _f("fp16", "fp16, bf16 or fp32.")
    verify: bool = _f(True, "Reload the export and check it against the student.")


@dataclass
class DmdrConfig:
    """The whole resolved configuration of a dmdr run."""

    name: str = _f("", "Preset name (informational).")
    description: str = _f("", "One line describing the preset.")
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune_rl: FinetuneRLConfig = field(default_factory=FinetuneRLConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# Allowed values of string enums, checked on resolution (key -> choices).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.family": ("", "sd3", "sdxl"),
    "model.tiny": ("", "sd3", "sdxl", "digits"),
    "model.dtype": ("fp32", "bf16", "fp16"),
    "model.decode_dtype": ("", "auto", "bf16"),
    "student.grid_dtype": ("fp32", "bf16"),
    "student.simulation": ("ode", "sde"),
    "student.sde_input": ("official", "dmd2"),
    "runtime.device": ("auto", "cpu", "cuda"),
    "runtime.mixed_precision": ("no", "bf16", "fp16"),
    "distill.t_sampler": ("beta_anneal", "uniform", "logit_normal"),
    "distill.nan_mode": ("faithful", "clean"),
    "finetune_rl.rl": ("refl", "dpo", "grpo", "none"),
    "eval.bench": ("geneval", "fid", "kid", "rewards", "dpg", "digits"),
    "export.format": ("safetensors", "diffusers", "lora", "comfyui"),
    "export.dtype": ("fp16", "bf16", "fp32"),
}
