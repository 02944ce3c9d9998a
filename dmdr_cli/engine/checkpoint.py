"""Run-directory checkpoints: written atomically (temp dir + rename), the last K kept.

Layout of ``RUN/checkpoints/step-00000K/``:

    gen.safetensors      generator adapter (or full generator) tensors, keyed by parameter name
    gen_ema.safetensors  their exponential moving average (only with distill/finetune_rl.ema_decay > 0)
    guide.safetensors    guide (fake score) adapter tensors
    pending.safetensors  only in a checkpoint taken inside a simulation group (a second Ctrl-C): the simulated
                         generator inputs of the group's remaining inner steps, so the resume is exact
    optimizer.pt         AdamW states {"gen": ..., "guide": ...}
    rng.pt               the training generator state (and torch/python/numpy global states)
    state.json           counters (k, j), stage, schedule positions, prompt-stream position, identity
                         of the model (family, base source, preset, LoRA shapes), dmdr version
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from dmdr_cli import __version__
from dmdr_cli.errors import CheckpointError
from dmdr_cli.io import AtomicDir

CKPT_RE = re.compile(r"^step-(\d{6,})$")
FORMAT = 1


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path, step: int | None = None) -> Path:
    """The newest finished checkpoint of a run (or the one of generator step ``step``)."""
    dirs = checkpoint_dirs(run_dir)
    if step is not None:
        dirs = [d for d in dirs if int(CKPT_RE.match(d.name).group(1)) == step]
        if not dirs:
            raise CheckpointError(f"{run_dir} has no checkpoint at step {step}",
                                  f"available: {', '.join(d.name for d in checkpoint_dirs(run_dir)) or 'none'}")
    if not dirs:
        raise CheckpointError(f"{run_dir} has no finished checkpoint", "run `dmdr distill --out RUN` first")
    return dirs[-1]


def save(run_dir: str | Path, k: int, tensors: dict[str, dict[str, torch.Tensor]], optim: dict, train_gen: torch.Generator,
         state: dict, keep_last: int) -> Path:
    """Write checkpoint ``step-{k}`` atomically and prune to the last ``keep_last``."""
    from safetensors.torch import save_file

    final = Path(run_dir) / "checkpoints" / f"step-{k:06d}"
    with AtomicDir(final, replace=True) as tmp:
        for group, params in tensors.items():
            save_file({n: t.contiguous() for n, t in params.items()}, str(tmp / f"{group}.safetensors"),
                      metadata={"format": "dmdr", "group": group})
        torch.save(optim, tmp / "optimizer.pt")
        torch.save({"train_gen": train_gen.get_state(), "torch": torch.get_rng_state(),
                    "python": random.getstate(), "numpy": np.random.get_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "k": k, "format": FORMAT, "dmdr_version": __version__},
                                                   indent=2, default=float))
    for old in checkpoint_dirs(run_dir)[:-max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is not a dmdr checkpoint (no state.json)", "pass a run directory written by dmdr") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is corrupt (not valid JSON)", "delete this checkpoint to fall back to an older one") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} has checkpoint format {state.get('format')!r}, expected {FORMAT}",
                              "it was written by another dmdr version")
    return state


def load_tensors(ckpt: Path, group: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(ckpt) / f"{group}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {group}.safetensors", "the checkpoint is incomplete; delete it to fall back to an older one")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__})", "delete this checkpoint to fall back to an older one") from None


PENDING = "pending"


def load_groups(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor group saved in a checkpoint: ``gen``, ``guide``, after DPO ``gen_ref``, with an EMA
    ``gen_ema``, mid-group ``pending`` (the trainer's simulated inputs, not an adapter)."""
    groups = {g: load_tensors(ckpt, g) for g in ("gen", "guide")}
    for optional in ("gen_ref", "gen_ema", PENDING):
        if (Path(ckpt) / f"{optional}.safetensors").is_file():
            groups[optional] = load_tensors(ckpt, optional)
    return groups


def load_extras(ckpt: Path) -> tuple[dict, dict]:
    """(optimizer states, rng states) of a checkpoint."""
    try:
        optim = torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=False)
        rng = torch.load(Path(ckpt) / "rng.pt", map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{ckpt}: optimizer/rng state is missing or corrupt ({type(exc).__name__})",
                              "delete this checkpoint to fall back to an older one") from None
    return optim, rng


def restore_global_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def check_identity(state: dict, identity: dict, ckpt: Path) -> None:
    """Refuse a checkpoint from another family, base model or adapter layout."""
    for key in ("family", "base", "lora"):
        if key in identity and state.get(key) != identity[key]:
            raise CheckpointError(
                f"checkpoint {ckpt} was trained with {key} {state.get(key)!r}, this run uses {identity[key]!r}",
                "resume with the same --base / preset, or start a new run directory",
            )
