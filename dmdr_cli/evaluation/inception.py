"""Inception-v3 weights for FID/KID/IS (torch-fidelity's ``inception-v3-compat``), found offline only.

dmdr never lets torch-fidelity download: the file is resolved here first (EVALUATION.md 7.1) and checked to be
a plain Inception state dict before torch-fidelity unpickles it.
"""

from __future__ import annotations

import os
from pathlib import Path

from dmdr_cli.errors import CheckpointError, ModelNotFoundError
from dmdr_cli.io import dmdr_home

#: torch-fidelity's name of the TF-compatible Inception-v3 extractor (the canonical one for FID/KID/IS).
INCEPTION_EXTRACTOR = "inception-v3-compat"
#: The weights file torch-fidelity 0.4.0 expects (``feature_extractor_inceptionv3.URL_INCEPTION_V3``).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
#: The asset name of EVALUATION.md §7.1 (``DMDR_ASSET_INCEPTION_FID``, ``$DMDR_HOME/assets/inception-fid/``).
#: Also accepted in folders: pytorch-fid's copy of the same converted TF graph (same key layout, same sha256
#: prefix in its name, fetched by pytorch-fid into the same torch.hub checkpoints folder).
INCEPTION_WEIGHTS_ALIASES = (INCEPTION_WEIGHTS_FILE, "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_ASSET = "inception-fid"
INCEPTION_ENV = "DMDR_ASSET_INCEPTION_FID"
#: torch.hub convention: the 8 hex digits before the extension are the start of the file's sha256.
INCEPTION_SHA256_PREFIX = "6726825d"


def _torch_hub_checkpoints() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (torch-fidelity's downloader) keeps files:
    ``torch.hub.get_dir()/checkpoints`` = ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _as_weights_file(candidate: Path) -> Path | None:
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        for name in INCEPTION_WEIGHTS_ALIASES:
            if (candidate / name).is_file():
                return candidate / name
    return None


def resolve_inception_weights(weights_path: str | os.PathLike[str] | None = None) -> Path:
    """The Inception weights file for ``inception-v3-compat``, found offline (EVALUATION.md §7.1). First hit wins:

    1. ``weights_path`` (``--inception-weights``): the file, or a folder holding ``INCEPTION_WEIGHTS_FILE``;
    2. ``$DMDR_ASSET_INCEPTION_FID`` (file or folder);
    3. ``$DMDR_HOME/assets/inception-fid/weights-inception-2015-12-05-6726825d.pth``;
    4. torch-fidelity's own download location, ``$TORCH_HOME/hub/checkpoints/<same name>``, if already there.

    In folders (1-4) pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is accepted as a second choice; the
    result's ``weights_official`` (sha256 prefix) says whether the bytes are the official ones.

    An explicit path or variable that points at nothing is an error at once (no silent fallback). Nothing found
    raises ``ModelNotFoundError`` naming the file, the upstream URL and the ways to supply it. Never downloads.
    """
    for origin, value in (("--inception-weights", weights_path), (INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if not value:
            continue
        candidate = Path(value).expanduser()
        found = _as_weights_file(candidate)
        if found is None:
            what = "does not exist" if not candidate.exists() else f"holds no {INCEPTION_WEIGHTS_FILE}"
            raise ModelNotFoundError(f"Inception weights: {origin} {candidate} {what}",
                                     f"expected {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}")
        return found
    home = dmdr_home() / "assets" / INCEPTION_ASSET
    for folder in (home, _torch_hub_checkpoints()):
        found = _as_weights_file(folder) if folder.is_dir() else None
        if found is not None:
            return found
    raise ModelNotFoundError(
        f"Inception weights not found: {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL} (dmdr never downloads)",
        f"pass --inception-weights PATH; or set {INCEPTION_ENV}; or put it in {home}/; "
        f"or use --feature-extractor dmdr-digits-cnn for dmdr-only offline numbers",
    )


def check_inception_state_dict(path: Path) -> None:
    """Load ``path`` with ``weights_only=True`` (torch-fidelity itself uses ``weights_only=False``, i.e. full
    unpickling) and check it is an Inception state dict, so a wrong or hostile file fails here, clearly."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"Inception weights {path} cannot be loaded as a plain state dict "
                              f"({type(exc).__name__})", f"expected {INCEPTION_WEIGHTS_FILE} from "
                              f"{INCEPTION_WEIGHTS_URL}") from exc
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise CheckpointError(f"Inception weights {path} are not torch-fidelity's Inception-v3 state dict",
                              f"expected {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}")
