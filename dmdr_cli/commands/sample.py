"""``dmdr sample``: images from the teacher, a few-step sampler, or a trained student."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdr_cli.commands.common import BaseOpt, ConfigOpt, SetOpt, guarded, resolve_config


@guarded
def sample(
    prompt: Annotated[Optional[list[str]], typer.Argument(help="Prompt(s) to render.", show_default=False)] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", "-p", help="Prompt file: .txt (one per line) or .jsonl ('prompt' field).")] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="A diffusers pipeline folder, or a dmdr run directory (samples its student).")] = None,
    base: BaseOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Few-step sampler with N steps on the training grid; omit for the teacher's own sampler.")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", "-g", help="CFG scale (default: teacher.guidance for the teacher, none for few-step).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of image 0; image j of each prompt uses seed + j.")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Images per prompt.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("samples"),
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png.")] = False,
    step: Annotated[Optional[int], typer.Option("--step", help="With a run directory: the checkpoint's generator step (default: latest).")] = None,
) -> None:
    """Generate images: the teacher (N steps + CFG) by default, a training-consistent few-step sampler with --steps."""
    from dmdr_cli.errors import InputError
    from dmdr_cli.io import read_prompts
    from dmdr_cli.ui import console

    texts = list(prompt or [])
    if prompts is not None:
        texts += read_prompts(prompts)
    if not texts:
        raise InputError("no prompt given", 'pass a prompt ("a cat") or --prompts FILE')
    if any(not t.strip() for t in texts):
        raise InputError("empty prompt", "give a non-empty prompt text")
    student_ckpt = None
    if ckpt and _is_run(ckpt):
        from dmdr_cli.config.loader import resolve_run
        from dmdr_cli.engine.checkpoint import latest

        cfg = resolve_run(ckpt, list(config or []), list(set_ or []))
        student_ckpt = latest(ckpt, step)
    else:
        cfg = resolve_config(base, config, set_, _ckpt_overrides(ckpt) if ckpt else [])
    if steps is not None and steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    if n is not None and n < 1:
        raise InputError(f"--n must be >= 1, got {n}")
    from dmdr_cli.recipes.sample import SampleRequest, run

    req = SampleRequest(texts, out, n=cfg.sample.n if n is None else n, seed=cfg.sample.seed if seed is None else seed,
                        steps=steps, guidance=guidance, grid=grid or cfg.sample.grid, batch_size=cfg.sample.batch_size,
                        student_ckpt=student_ckpt)
    total = len(texts) * req.n
    with console.progress("sampling", total) as update:
        result = run(cfg, req, on_progress=update)
    console.success(f"wrote {result['images']} images ({result['sampler']}, {result['steps']} steps, "
                    f"guidance {result['guidance']:g}, {result['seconds_per_image']:.2f} s/image) to {result['out_dir']}")


def _is_run(ckpt: str) -> bool:
    p = Path(ckpt).expanduser()
    return (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def _ckpt_overrides(ckpt: str) -> list[str]:
    """--ckpt as config overrides: a diffusers folder becomes model.path (family read from model_index.json)."""
    from dmdr_cli.config.presets import detect_family
    from dmdr_cli.errors import CheckpointError

    folder = Path(ckpt).expanduser()
    if not folder.exists():
        raise CheckpointError(f"--ckpt {folder} does not exist", "pass a diffusers folder or a dmdr run directory")
    if (folder / "model_index.json").is_file():
        return [f"model.path={folder.resolve()}", f"model.family={detect_family(folder)}", "model.tiny="]
    raise CheckpointError(f"--ckpt {folder} is neither a diffusers pipeline folder (model_index.json) nor a dmdr run directory",
                          "pass the folder written by `dmdr export --format diffusers` or by `dmdr distill --out`")
