"""``dmdr eval``: benchmarks on generated or existing images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdr_cli.commands.common import BaseOpt, ConfigOpt, SetOpt, guarded, resolve_config


@guarded
def evaluate(
    bench: Annotated[Optional[str], typer.Option("--bench", help="geneval | fid | kid | rewards | dpg.")] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="Run directory or diffusers folder to evaluate.")] = None,
    base: BaseOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Score an existing image folder instead of generating.")] = None,
) -> None:
    """Evaluate a model or an image folder on a benchmark (GenEval, FID/KID, reward metrics, DPG-Bench)."""
    from dmdr_cli.errors import DmdrError

    cfg = resolve_config(base, config, set_, [f"eval.bench={bench}"] if bench else [])
    raise DmdrError(f"`dmdr eval --bench {cfg.eval.bench}`: evaluation is not part of dmdr 0.1.0 yet",
                    "track the evaluation issue")
