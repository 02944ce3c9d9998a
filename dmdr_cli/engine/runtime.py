"""Process-level runtime helpers: library noise, seeding."""

from __future__ import annotations

import os
import warnings


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and info logs; dmdr shows its own progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    warnings.filterwarnings("ignore", message=".*Expected types for.*")


def seed_generator(seed: int, device="cpu"):
    """A ``torch.Generator`` seeded with ``seed`` (every random draw in dmdr takes an explicit generator)."""
    import torch

    return torch.Generator(device=device).manual_seed(int(seed))
