"""``dmdr export``: ship a trained student in the formats people load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdr_cli.commands.common import ConfigOpt, SetOpt, guarded


@guarded
def export(
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="Run directory to export (written by `dmdr distill` / `dmdr finetune-rl`).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="safetensors (merged network) | diffusers (pipeline folder) | lora (diffusers LoRA) | comfyui (kohya-style LoRA). Default: export.format.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output path: a .safetensors file (safetensors, comfyui; lora optionally) or a folder (diffusers, lora).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Weight dtype of the export: fp16 | bf16 | fp32. Default: export.dtype.")] = None,
    step: Annotated[Optional[int], typer.Option("--step", help="Export the checkpoint of this generator step (default: the latest).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export at --out.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip reloading and checking the export against the student.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Export a trained student: merged safetensors, diffusers folder, LoRA or ComfyUI LoRA, with a model card.

    Default: reload the export the way a user would and check it against dmdr's student (merged weights =
    base + scaling * B @ A, fixed-seed samples equal). Output is written to a temp path and renamed, so an
    error never leaves a half-written export.
    """
    from dmdr_cli.errors import CheckpointError, ConfigError, InputError, did_you_mean
    from dmdr_cli.export import DTYPES, FORMATS

    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'.{did_you_mean(fmt, FORMATS)}", f"choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown export dtype '{dtype}'.{did_you_mean(dtype, DTYPES)}", f"choose one of {', '.join(DTYPES)}")
    if not ckpt:
        raise InputError("no run directory given", "pass --ckpt RUN_DIR (the --out of `dmdr distill`)")
    if out is None:
        raise InputError("no output path given", "pass --out PATH: a .safetensors file or a folder, see `dmdr export --help`")
    run_dir = Path(ckpt).expanduser()
    if not run_dir.exists():
        raise CheckpointError(f"--ckpt {run_dir} does not exist", "pass a run directory written by `dmdr distill --out`")
    if not ((run_dir / "config.yaml").is_file() and (run_dir / "checkpoints").is_dir()):
        raise CheckpointError(f"--ckpt {run_dir} is not a dmdr run directory (needs config.yaml and checkpoints/)",
                              "pass the --out folder of `dmdr distill` or `dmdr finetune-rl`")
    if step is not None and step < 0:
        raise InputError(f"--step must be >= 0, got {step}")

    from dmdr_cli.config.loader import config_hash, resolve_run

    train_hash = config_hash(resolve_run(run_dir))   # the run's config as trained, before export overrides
    extra = [f"export.format={fmt}"] if fmt else []
    extra += [f"export.dtype={dtype}"] if dtype else []
    extra += ["export.verify=false"] if no_verify else []
    cfg = resolve_run(run_dir, list(config or []), list(set_ or []) + extra)

    from dmdr_cli.recipes.export import ExportRequest, run
    from dmdr_cli.ui import console

    req = ExportRequest(run_dir=run_dir, fmt=cfg.export.format, out=out, dtype=cfg.export.dtype, step=step,
                        force=force, verify=cfg.export.verify)
    result = run(cfg, req, train_hash=train_hash, say=lambda m: console.info(f"[export] {m}"))
    size = result["bytes"] / 2**20
    checks = ""
    if result["verified"]:
        rel = result["verification"]["reload"]
        checks = f"; verified (sample max |diff| {rel['sample_max_diff']:.1e}"
        if "stock_vs_student_same_conventions" in rel:
            checks += f", stock diffusers call {rel['stock_vs_student_same_conventions']:.1e}"
        if "stock_vs_dmdr_sampler" in rel:
            checks += (f", stock diffusers call vs dmdr sampler {rel['stock_vs_dmdr_sampler']:.1e}"
                       + (" (SDE: different re-noising draws)" if rel.get("stock_renoises") else ""))
        checks += ")"
    else:
        checks = "; not verified (--no-verify)"
    console.success(f"wrote {result['format']} export ({result['dtype']}, {size:.1f} MiB) to {result['path']}{checks}; "
                    f"model card {result['card']}")
