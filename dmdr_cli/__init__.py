"""dmdr: Distribution Matching Distillation + RL for text-to-image diffusion models.

Importing this package must stay cheap: no torch, no diffusers (``dmdr --help`` relies on it).
"""

__version__ = "0.1.0"
