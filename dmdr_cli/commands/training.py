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
    rl: Annotated[Optional[str], typer.Option("--rl", help="refl | dpo | grpo | none.")] = None,
    reward: Annotated[Optional[list[str]], typer.Option("--reward", help="NAME=WEIGHT (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Generator updates to run.")] = None,
) -> None:
    """Stage 2: joint DMD + RL (ReFL, DPO or GRPO) from a stage-1 run (ALGORITHM.md 6)."""
    from dmdr_cli.errors import InputError

    if from_run is None:
        raise InputError("--from RUN_DIR is required", "pass the run directory written by `dmdr distill --out`")
    extra = [f"finetune_rl.rl={rl}"] if rl is not None else []
    extra += [f"finetune_rl.max_steps={max_steps}"] if max_steps is not None else []
    cfg = resolve_config(None, config, set_, extra)
    _check_engine(cfg, "finetune-rl")


def _check_engine(cfg, command: str) -> None:
    """Fail early on a missing base model, then on the (not yet shipped) training engine."""
    from dmdr_cli.errors import DmdrError
    from dmdr_cli.families.loading import resolve_model_folder

    resolve_model_folder(cfg.model)
    raise DmdrError(f"`dmdr {command}`: the training engine is not part of dmdr 0.1.0 yet",
                    "track the DMDR training-engine issue; `dmdr sample` and `dmdr presets` work today")
