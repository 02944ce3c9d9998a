"""``dmdr export``: ship a trained student in the formats people load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdr_cli.commands.common import ConfigOpt, SetOpt, guarded, resolve_config


@guarded
def export(
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="Run directory to export.")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="safetensors | diffusers | lora | comfyui.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp16 | bf16 | fp32.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output path.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Export a trained student (merged safetensors, diffusers folder, LoRA, ComfyUI LoRA)."""
    from dmdr_cli.errors import DmdrError

    extra = [f"export.format={fmt}"] if fmt else []
    extra += [f"export.dtype={dtype}"] if dtype else []
    cfg = resolve_config(None, config, set_, extra)
    raise DmdrError(f"`dmdr export --format {cfg.export.format}`: export is not part of dmdr 0.1.0 yet",
                    "track the export issue")
