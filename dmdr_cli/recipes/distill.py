"""``dmdr distill``: stage 1 of DMDR, the cold start (ALGORITHM.md 3-5).

    dmdr distill --base sd3-medium --steps 4 --out runs/sd3m

Steps:
1. Start accelerate (one process, or ``accelerate launch`` / ``torchrun``; CPU uses gloo) and seed
   ``seed + rank``.
2. Load the frozen base once and put two LoRA adapters on it: ``gen`` (the student) and ``guide`` (the
   critic, also the DynaDG real score). Only SDXL 1-step asks for a full-weight generator copy.
3. Build the student sampler (grid of 5.1, ODE or SDE) and the prompt stream (image-free).
4. Loop: backward simulation, critic update every inner step, generator update every ``ttur`` steps with
   the normalised DMD loss, DynaDG real score and DynaRS timesteps; log, sample, checkpoint atomically.
5. ``--resume`` continues exactly from the last checkpoint (weights, optimisers, RNG, prompt position).
"""

from __future__ import annotations

from pathlib import Path

from dmdr_cli.config.loader import save_resolved
from dmdr_cli.engine.checkpoint import checkpoint_dirs, latest
from dmdr_cli.errors import InputError


def make_accelerator(cfg):
    """The accelerate runtime. Call it only after the model is known to exist: it is process-wide state.

    ``cpu=True`` on CPU also makes ``accelerate launch --multi_gpu`` runs join a gloo process group instead of
    silently training independent copies (the trainer verifies this at every checkpoint).
    """
    from accelerate import Accelerator

    cpu = cfg.runtime.device == "cpu" or not __import__("torch").cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=cfg.runtime.mixed_precision)


def build_roles(bundle, cfg):
    """The adapter layout for this config on the loaded base (targets default to the family's)."""
    import warnings

    from dmdr_cli.engine.networks import Roles

    init = None
    if cfg.lora.full_generator and cfg.model.generator_init:
        from dmdr_cli.engine.checkpoint import CheckpointError

        try:
            from safetensors.torch import load_file

            path = cfg.model.generator_init
            init = load_file(path) if path.endswith(".safetensors") else __import__("torch").load(path, map_location="cpu")
        except Exception as exc:
            raise CheckpointError(f"model.generator_init {cfg.model.generator_init} could not be read ({type(exc).__name__})",
                                  "point it at DMD2's regression checkpoint (.bin or .safetensors)") from None
    net = bundle.network
    if cfg.runtime.gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
        net.enable_gradient_checkpointing()
    # LoRA A matrices are drawn from the global RNG: seed it identically on every rank so runs are
    # reproducible and all ranks start from the same adapters (gradients are all-reduced, not weights).
    __import__("torch").manual_seed(cfg.runtime.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns on the second adapter: that is the design
        return Roles(net, targets=tuple(cfg.lora.targets) or bundle.family.lora_targets,
                     gen_rank=cfg.lora.gen_rank, gen_alpha=cfg.lora.gen_alpha, guide_rank=cfg.lora.guide_rank,
                     guide_alpha=cfg.lora.guide_alpha, fake_scale=cfg.distill.fake_scale,
                     full_generator=cfg.lora.full_generator, generator_init=init)


def dmd_settings(cfg, dmd_weight: float = 1.0):
    from dmdr_cli.engine.dmdr import DMDSettings

    d = cfg.distill
    return DMDSettings(ttur=d.ttur, real_cfg=d.real_cfg, cfg_jitter=d.cfg_jitter, real_cfg_t_min=d.real_cfg_t_min,
                       dynadg=d.dynadg, dynadg_scale0=d.dynadg_scale0, dynamic_steps=d.dynamic_steps,
                       t_sampler="beta_anneal" if d.t_sampler == "logit_normal" else d.t_sampler,
                       beta_a0=d.beta_a0, beta_b0=d.beta_b0, nan_mode=d.nan_mode, grad_clip=d.grad_clip,
                       dmd_weight=dmd_weight)


def identity(cfg, bundle) -> dict:
    """What a checkpoint must match to be resumed or continued by this config."""
    lo = cfg.lora
    return {"family": bundle.family.name, "base": bundle.source,
            "lora": {"gen": [lo.gen_rank, lo.gen_alpha], "guide": [lo.guide_rank, lo.guide_alpha],
                     "full_generator": lo.full_generator, "targets": list(lo.targets) or list(bundle.family.lora_targets)}}


def prompt_source(cfg, explicit: str) -> list[str]:
    from dmdr_cli.engine.prompts import load_source

    return load_source(explicit or cfg.distill.prompts)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not checkpoint_dirs(run_dir):
            raise InputError(f"--resume: {run_dir} has no checkpoint to resume from", "drop --resume to start a new run")
    elif checkpoint_dirs(run_dir):
        raise InputError(f"{run_dir} already holds a run", "pass --resume to continue it, or choose another --out")


def sample_prompts(prompts: list[str], n: int = 4) -> list[str]:
    """The fixed prompts of the periodic sample grids: spread over the prompt list (task-ordered lists such as
    ``builtin:digits`` then show every kind of prompt)."""
    return prompts[::max(1, len(prompts) // n)][:n]


def teacher_pairs(cfg, bundle, roles, prompts: list[str], spec, trainer, run_dir: Path, is_main: bool):
    """The regression term's teacher ODE trajectories (engine.regression): made once with the frozen base and
    kept in the run directory, so ``--resume`` reads them instead of integrating the teacher again."""
    import time

    from dmdr_cli.engine.regression import PAIRS_FILE, load_pairs, make_pairs, pairs_key, save_pairs

    d, t = cfg.distill, cfg.teacher
    settings = dict(n=d.regression_pairs, grid=list(spec.grid), steps=t.steps, guidance=t.guidance,
                    guidance_t_min=t.guidance_t_min, seed=cfg.runtime.seed, base=bundle.source,
                    resolution=cfg.model.resolution, prompts=pairs_key(prompts=prompts))
    key = pairs_key(**settings)
    path = run_dir / PAIRS_FILE
    pairs = load_pairs(path, key, bundle.device)
    if pairs is not None:
        trainer.sink.event(f"teacher pairs: {len(pairs)} ODE trajectories read from {PAIRS_FILE}")
        return pairs
    start = time.perf_counter()
    pairs = make_pairs(bundle, roles, prompts, d.regression_pairs, spec.grid, teacher_steps=t.steps,
                       guidance=t.guidance, guidance_t_min=t.guidance_t_min, seed=cfg.runtime.seed,
                       latent_shape=trainer.latent_shape, encode=trainer.encode)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_pairs(path, pairs, key)
    trainer.sink.event(f"teacher pairs: {len(pairs)} ODE trajectories ({t.steps} steps, CFG {t.guidance:g}) made in "
                       f"{time.perf_counter() - start:.0f} s for the regression term")
    return pairs


def run(cfg, run_dir: Path, *, resume: bool = False, sink=None):
    """Run stage 1 into ``run_dir``; returns the last checkpoint path."""
    from dmdr_cli.engine.metrics import FanOut, JsonlSink
    from dmdr_cli.engine.prompts import PromptStream
    from dmdr_cli.engine.sampler import student_spec
    from dmdr_cli.engine.trainer import Trainer, TrainPlan
    from dmdr_cli.families.loading import load_base, resolve_model_folder

    check_run_dir(run_dir, resume)
    resolve_model_folder(cfg.model)  # fail on missing weights before any process-wide state exists
    accel = make_accelerator(cfg)
    bundle = load_base(cfg, device=accel.device)
    roles = build_roles(bundle, cfg)
    spec = student_spec(bundle.family, cfg.student)
    prompts = prompt_source(cfg, "")
    stream = PromptStream(prompts, cfg.distill.batch_size, cfg.runtime.seed, accel.process_index, accel.num_processes)
    d = cfg.distill
    plan = TrainPlan(run_dir=run_dir, stage="distill", max_steps=d.max_steps, lr_gen=d.lr, lr_guide=d.lr_guide,
                     wd_gen=d.weight_decay_gen, wd_guide=d.weight_decay_guide, betas=(d.adam_beta1, d.adam_beta2),
                     adam_eps=d.adam_eps, use_8bit_adam=d.use_8bit_adam, checkpoint_every=d.checkpoint_every,
                     sample_every=d.sample_every, keep_last=d.keep_last, sde_input=cfg.student.sde_input,
                     seed=cfg.runtime.seed, resolution=cfg.model.resolution, dmd=dmd_settings(cfg),
                     identity=identity(cfg, bundle), ema_decay=d.ema_decay, group_simulation=d.group_simulation,
                     regression_weight=d.regression_weight, regression_batch=d.regression_batch,
                     regression_t_max=d.regression_t_max)
    sinks = FanOut(JsonlSink(run_dir / "metrics.jsonl"), sink) if accel.is_main_process else FanOut()
    trainer = Trainer(bundle, roles, spec, plan, stream, sinks, accel, sample_prompts=sample_prompts(prompts))
    if d.regression_weight > 0:
        trainer.pairs = teacher_pairs(cfg, bundle, roles, prompts, spec, trainer, run_dir, accel.is_main_process)
    if resume:
        trainer.restore(latest(run_dir), same_stage=True)
    if accel.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)
    last = trainer.run()
    if accel.is_main_process:
        from dmdr_cli.evaluation.plots import training_curves

        training_curves(run_dir)
    return last
