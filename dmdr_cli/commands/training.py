"""``dmdr distill`` (stage 1) and ``dmdr finetune-rl`` (stage 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdr_cli.commands.common import BaseOpt, ConfigOpt, SetOpt, guarded, resolve_config


@guarded
def distill(
    base: BaseOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Student steps N (student.steps).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Generator updates to run (distill.max_steps).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", "-p", help="Prompt file (.txt / .jsonl).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
) -> None:
    """Stage 1: distil the base model into an N-step student (DMD + DynaDG + DynaRS, ALGORITHM.md 3-5)."""
    extra = [f"student.steps={steps}"] if steps is not None else []
    extra += [f"distill.max_steps={max_steps}"] if max_steps is not None else []
    extra += [f"distill.prompts={prompts}"] if prompts is not None else []
    cfg = resolve_config(base, config, set_, extra)
    run_dir = out or Path("runs") / f"{cfg.name or 'custom'}-{cfg.student.steps}step"
    from dmdr_cli.recipes import distill as recipe
    from dmdr_cli.ui import console
    from dmdr_cli.ui.dashboard import Dashboard

    last = recipe.run(cfg, run_dir, resume=resume, sink=Dashboard("distill", every=max(1, cfg.distill.max_steps // 20)))
    if last is not None:
        console.success(f"stage 1 done: {run_dir} (last checkpoint {last.name})")


@guarded
def finetune_rl(
    from_run: Annotated[Optional[Path], typer.Option("--from", help="Stage-1 run directory to continue.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    rl: Annotated[Optional[str], typer.Option("--rl", help="refl | dpo | grpo | none (none = distillation only).")] = None,
    reward: Annotated[Optional[list[str]], typer.Option("--reward", help="NAME=WEIGHT (repeatable); replaces finetune_rl.rewards.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default: FROM-rl-RL).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Generator updates to run in stage 2 (finetune_rl.max_steps).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the stage-2 run in --out from its last checkpoint.")] = False,
) -> None:
    """Stage 2: joint DMD + RL (ReFL, DPO or GRPO) from a stage-1 run (ALGORITHM.md 6)."""
    from dmdr_cli.config.loader import resolve_run
    from dmdr_cli.errors import InputError

    if from_run is None:
        raise InputError("--from RUN_DIR is required", "pass the run directory written by `dmdr distill --out`")
    if not (from_run / "config.yaml").is_file():
        raise InputError(f"--from {from_run} is not a dmdr run directory (no config.yaml)",
                         "pass the folder given to `dmdr distill --out`")
    extra = [f"finetune_rl.rl={rl}"] if rl is not None else []
    extra += [f"finetune_rl.max_steps={max_steps}"] if max_steps is not None else []
    cfg = resolve_run(from_run, list(config or []), list(set_ or []) + extra)
    if reward:
        cfg.finetune_rl.rewards = _reward_specs(reward, cfg.finetune_rl.rewards)
    run_dir = out or from_run.with_name(f"{from_run.name}-rl-{cfg.finetune_rl.rl}")
    from dmdr_cli.recipes import finetune_rl as recipe
    from dmdr_cli.ui import console
    from dmdr_cli.ui.dashboard import Dashboard

    last = recipe.run(cfg, from_run, run_dir, resume=resume,
                      sink=Dashboard("finetune-rl", every=max(1, cfg.finetune_rl.max_steps // 20)))
    if last is not None:
        console.success(f"stage 2 done: {run_dir} (last checkpoint {last.name})")


def _reward_specs(items: list[str], current: list[dict]) -> list[dict]:
    """``--reward NAME=WEIGHT`` items as reward specs; margin/prefix/path kept from a configured entry of that name."""
    from dmdr_cli.config.loader import coerce
    from dmdr_cli.errors import ConfigError

    known = {r["name"]: r for r in current}
    out = []
    for item in items:
        name, sep, weight = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--reward expects NAME=WEIGHT, got {item!r}", "e.g. --reward hps-v2.1=0.3")
        spec = dict(known.get(name, {"name": name, "margin": 0.7, "prefix": "", "path": ""}))
        spec["weight"] = coerce(f"--reward {name}", weight, float)
        out.append(spec)
    return out
