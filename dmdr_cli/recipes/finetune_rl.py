"""``dmdr finetune-rl``: stage 2 of DMDR, joint distribution matching and RL (ALGORITHM.md 6).

    dmdr finetune-rl --from runs/sd3m --rl refl --out runs/sd3m-rl

Steps:
1. Read the stage-1 run's resolved config (plus any --config / --set / --rl / --reward on top).
2. Rebuild the same base + adapters, load the stage-1 checkpoint (adapters, optimiser states, counters)
   and set the stage-2 learning rates explicitly (loading restores the stage-1 ones: pitfall 12.3).
3. Build the RL plug-in (ReFL, DPO, GRPO, or none = "distillation only") and its rewards.
4. Continue the same loop with ``L_G = dmd_weight * L_dmd + L_rl`` for ``finetune_rl.max_steps`` more
   generator updates (``dmd_weight = 0`` is the "RL only" ablation).
5. ``--resume`` continues a stage-2 run exactly.
"""

from __future__ import annotations

from pathlib import Path

from dmdr_cli.config.loader import save_resolved
from dmdr_cli.engine.checkpoint import latest, read_state
from dmdr_cli.recipes.distill import (build_roles, check_run_dir, dmd_settings, identity, make_accelerator,
                                      prompt_source, sample_prompts)


def reward_terms(cfg, device):
    """(reward, weight, margin, prefix) for every configured reward, built from local weights only."""
    from dmdr_cli.rewards.registry import build_reward

    terms = []
    for spec in cfg.finetune_rl.rewards:
        reward = build_reward(spec["name"], path=spec.get("path", ""), device=device, **(spec.get("options") or {}))
        terms.append((reward, float(spec["weight"]), spec.get("margin"), spec.get("prefix", "")))
    return terms


def run(cfg, from_run: Path, run_dir: Path, *, resume: bool = False, sink=None):
    """Run stage 2 from ``from_run`` into ``run_dir``; returns the last checkpoint path."""
    from dmdr_cli.engine.metrics import FanOut, JsonlSink
    from dmdr_cli.engine.prompts import PromptStream
    from dmdr_cli.engine.rl import build_plugin
    from dmdr_cli.engine.sampler import student_spec
    from dmdr_cli.engine.trainer import Trainer, TrainPlan
    from dmdr_cli.families.loading import load_base, resolve_model_folder

    check_run_dir(run_dir, resume)
    source = latest(run_dir) if resume else latest(from_run)
    start = int(read_state(source).get("stage_start", 0)) if resume else int(read_state(source)["k"])
    resolve_model_folder(cfg.model)
    accel = make_accelerator(cfg)
    bundle = load_base(cfg, device=accel.device)
    roles = build_roles(bundle, cfg)
    spec = student_spec(bundle.family, cfg.student)
    f, d = cfg.finetune_rl, cfg.distill
    terms = reward_terms(cfg, accel.device) if f.rl != "none" else []
    plugin = build_plugin(f.rl, bundle=bundle, roles=roles, spec=spec, terms=terms, settings=f)
    prompts = prompt_source(cfg, "")
    stream = PromptStream(prompts, f.batch_size, cfg.runtime.seed + 1, accel.process_index, accel.num_processes)
    plan = TrainPlan(run_dir=run_dir, stage=f"finetune_rl:{f.rl}", max_steps=start + f.max_steps, lr_gen=f.lr,
                     lr_guide=f.lr_guide, wd_gen=d.weight_decay_gen, wd_guide=d.weight_decay_guide,
                     betas=(d.adam_beta1, d.adam_beta2), adam_eps=d.adam_eps, use_8bit_adam=d.use_8bit_adam,
                     checkpoint_every=f.checkpoint_every, sample_every=f.sample_every, keep_last=d.keep_last,
                     sde_input=cfg.student.sde_input, seed=cfg.runtime.seed + 1, resolution=cfg.model.resolution,
                     dmd=dmd_settings(cfg, dmd_weight=f.dmd_weight), identity=identity(cfg, bundle), stage_start=start,
                     ema_decay=f.ema_decay, group_simulation=d.group_simulation)
    sinks = FanOut(JsonlSink(run_dir / "metrics.jsonl"), sink) if accel.is_main_process else FanOut()
    trainer = Trainer(bundle, roles, spec, plan, stream, sinks, accel, sample_prompts=sample_prompts(prompts), rl_fn=plugin)
    trainer.restore(source, same_stage=resume)
    if accel.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)
        (run_dir / "parent.txt").write_text(f"{Path(from_run).resolve()}\n{source.name}\n")
    if f.rl == "dpo" and not resume:
        roles.sync_reference()  # the DPO reference is the generator at the start of stage 2
    last = trainer.run()
    if accel.is_main_process:
        from dmdr_cli.evaluation.plots import training_curves

        training_curves(run_dir)
    return last
