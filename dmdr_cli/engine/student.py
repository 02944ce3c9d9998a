"""Load the student of a dmdr run directory: the run's base model + its adapters from a checkpoint.

Shared by ``sample --ckpt RUN``, ``eval`` and ``export``.
"""

from __future__ import annotations

from pathlib import Path

from dmdr_cli.engine import checkpoint as ckpt_io
from dmdr_cli.engine.ema import EMA
from dmdr_cli.engine.networks import GEN


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def uses_ema(cfg, ckpt: Path) -> bool:
    """Whether the student of this checkpoint is its generator EMA (saved, and ``student.use_ema``)."""
    return bool(cfg.student.use_ema) and (Path(ckpt) / f"{EMA}.safetensors").is_file()


def load_student(cfg, ckpt: Path, device=None):
    """(bundle, roles) with the checkpoint's adapters loaded; the ``gen`` role is the student: the checkpoint's
    EMA weights when it has them and ``student.use_ema`` (the default), else its last iterate."""
    from dmdr_cli.families.loading import load_base
    from dmdr_cli.recipes.distill import build_roles, identity

    bundle = load_base(cfg, device=device)
    roles = build_roles(bundle, cfg)
    state = ckpt_io.read_state(ckpt)
    ckpt_io.check_identity(state, identity(cfg, bundle), ckpt)
    groups = ckpt_io.load_groups(ckpt)
    ema = groups.pop(EMA, None)
    if uses_ema(cfg, ckpt):  # one rule for which weights are the student (labels and metadata use it too)
        groups[GEN] = ema
    try:
        roles.load_adapter_state(groups)
    except KeyError as exc:
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt} does not fit its run's config: {exc}",
                                      "the run directory was modified; use the config.yaml it was trained with") from None
    return bundle, roles, state


def load_student_for_inference(cfg, ckpt: Path, device=None):
    """(bundle, network): the checkpoint's student merged into a plain network (``Roles.bake_generator``), for
    sampling and evaluation only; training and ``export`` keep the adapters (``load_student``)."""
    bundle, roles, _ = load_student(cfg, ckpt, device=device)
    return bundle, roles.bake_generator()
