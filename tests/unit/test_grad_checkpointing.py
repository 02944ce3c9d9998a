"""Activation checkpointing recomputes forward segments during backward under the *current* adapter
state (ALGORITHM.md 2.2, 12.8): the engine must keep each loss's role active through its backward pass.
A run with gradient checkpointing must therefore train exactly the same weights as one without."""

from __future__ import annotations

import torch

from dmdr_cli.config.loader import resolve
from dmdr_cli.engine.checkpoint import load_groups
from dmdr_cli.recipes.distill import run


def _train(tmp_path, name: str, checkpointing: bool):
    cfg = resolve("tiny-sd3-random", [], ["distill.max_steps=1", "distill.sample_every=0", "runtime.device=cpu",
                                   f"runtime.gradient_checkpointing={str(checkpointing).lower()}"])
    last = run(cfg, tmp_path / name)
    return load_groups(last)


def test_checkpointed_run_equals_plain_run(tmp_path, tiny_sd3_dir):
    plain = _train(tmp_path, "plain", False)
    ckpt = _train(tmp_path, "ckpt", True)
    for group in ("gen", "guide"):
        assert plain[group].keys() == ckpt[group].keys()
        moved = 0
        for name, tensor in plain[group].items():
            assert torch.equal(tensor, ckpt[group][name]), f"{group}:{name} differs with gradient checkpointing"
            moved += int("lora_B" in name and tensor.abs().sum() > 0)
        assert moved > 0, f"{group}: no LoRA B matrix moved, so the test would compare untrained adapters"
