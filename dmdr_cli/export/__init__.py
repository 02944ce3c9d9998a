"""``dmdr export``: turn a run's student into files other tools load (ALGORITHM.md 12.5).

Modules:

- :mod:`.merge`   LoRA factors of the ``gen`` adapter, the merged stock state dict, the explicit
  ``W + scaling * B @ A`` check every merged export must pass;
- :mod:`.formats` writers of the four formats (merged ``.safetensors``, diffusers pipeline folder,
  diffusers LoRA, ComfyUI/kohya LoRA), their key conventions and the per-family diffusers scheduler;
- :mod:`.verify`  reloads an export the way a user would and compares it with dmdr's own student;
- :mod:`.card`    the model card (``README.md``) and the metadata written into every file.

Torch-free at import: the command layer reads :data:`FORMATS` / :data:`DTYPES` for its did-you-mean.
"""

from __future__ import annotations

from dmdr_cli.errors import DmdrError

FORMATS = ("safetensors", "diffusers", "lora", "comfyui")
DTYPES = ("fp16", "bf16", "fp32")
#: formats that carry only the ``gen`` adapter (impossible for a full-weight generator)
LORA_FORMATS = ("lora", "comfyui")


class VerificationError(DmdrError):
    """The export was written but does not reproduce the student; nothing is left on disk."""
