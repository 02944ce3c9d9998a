"""Offline resolution of reward-model weights (EVALUATION.md §7.1). Never downloads. Torch-free.

Order, first hit wins:

1. the explicit ``path`` of the reward spec (a file, or a folder holding the expected file/snapshot);
2. the environment variable ``DMDR_ASSET_<NAME>`` (asset name in upper snake case, e.g. ``DMDR_ASSET_HPS_V2_1``);
3. ``$DMDR_HOME/assets/<name>/`` (``DMDR_HOME`` defaults to ``~/.cache/dmdr``);
4. the Hugging Face cache, through ``hf_hub_download`` / ``snapshot_download`` with ``local_files_only=True``;
5. otherwise ``ModelNotFoundError`` naming the upstream id, the files and the ways to supply them.

An explicit path or environment variable that points at nothing usable is an error at once (no silent fallback).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dmdr_cli.errors import ModelNotFoundError
from dmdr_cli.io import dmdr_home

__all__ = [
    "ASSETS",
    "Asset",
    "CLIP_FOLDER",
    "TOKENIZER_FOLDER",
    "find_asset",
    "resolve_asset",
    "weights_fingerprint",
]

#: A transformers model snapshot: config plus (possibly sharded) weights.
CLIP_FOLDER: tuple[tuple[str, ...], ...] = (
    ("config.json", "model.safetensors"),
    ("config.json", "pytorch_model.bin"),
    ("config.json", "model.safetensors.index.json"),
    ("config.json", "pytorch_model.bin.index.json"),
)
#: A CLIP BPE tokenizer (slow files or the fast ``tokenizer.json``).
TOKENIZER_FOLDER: tuple[tuple[str, ...], ...] = (("vocab.json", "merges.txt"), ("tokenizer.json",))

_SNAPSHOT = "a transformers snapshot folder (config.json + model.safetensors or pytorch_model.bin)"
_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Asset:
    """An external file set. ``files``: a single-file asset (accepted names, the first canonical);
    ``folder``: a folder asset valid when it holds every file of one of these alternatives."""

    name: str
    upstream: str
    files: tuple[str, ...] = ()
    folder: tuple[tuple[str, ...], ...] = ()
    hf_repo: str = ""
    label: str = ""

    @property
    def env_var(self) -> str:
        return "DMDR_ASSET_" + re.sub(r"[^A-Z0-9]+", "_", self.name.upper()).strip("_")

    @property
    def home_dir(self) -> Path:
        return dmdr_home() / "assets" / self.name

    def describe(self) -> str:
        """What to supply, e.g. ``HPS_v2.1_compressed.pt`` or ``a transformers snapshot folder (…)``."""
        if self.label:
            return self.label
        if self.files:
            return " or ".join(self.files)
        return "a folder with " + " or ".join(" + ".join(alt) for alt in self.folder)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("clip-vit-l-14", "openai/clip-vit-large-patch14", folder=CLIP_FOLDER,
              hf_repo="openai/clip-vit-large-patch14", label=_SNAPSHOT),
        Asset("pickscore", "yuvalkirstain/PickScore_v1", folder=CLIP_FOLDER, hf_repo="yuvalkirstain/PickScore_v1",
              label=_SNAPSHOT),
        Asset("pickscore-processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", folder=TOKENIZER_FOLDER,
              hf_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
              label="CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json)"),
        Asset("hps-v2", "xswu/HPSv2", files=("HPS_v2_compressed.pt",), hf_repo="xswu/HPSv2"),
        Asset("hps-v2.1", "xswu/HPSv2", files=("HPS_v2.1_compressed.pt",), hf_repo="xswu/HPSv2"),
        Asset("dfn5b-h14", "apple/DFN5B-CLIP-ViT-H-14",
              files=("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "Apple_CLIP-H-14-224.bin"),
              hf_repo="apple/DFN5B-CLIP-ViT-H-14"),
        Asset("aesthetic-v2",
              "https://github.com/christophschuhmann/improved-aesthetic-predictor (Apache-2.0)",
              files=("sac+logos+ava1-l14-linearMSE.pth",)),
        Asset("imagereward", "THUDM/ImageReward", folder=(("ImageReward.pt", "med_config.json"),),
              hf_repo="THUDM/ImageReward"),
    )
}


def _valid_folder(folder: Path, asset: Asset) -> bool:
    return folder.is_dir() and any(all((folder / f).is_file() for f in alt) for alt in asset.folder)


def _match(candidate: Path, asset: Asset) -> Path | None:
    """The usable file/folder at ``candidate`` for ``asset``, or ``None``."""
    if asset.files:
        if candidate.is_file():
            return candidate
        for name in asset.files:
            if (candidate / name).is_file():
                return candidate / name
        return None
    return candidate if _valid_folder(candidate, asset) else None


def _from_hf_cache(asset: Asset) -> Path | None:
    """The asset from the local Hugging Face cache only (``local_files_only=True``), or ``None``."""
    if not asset.hf_repo:
        return None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # pragma: no cover - a core dependency
        return None
    if asset.files:
        for name in asset.files:
            try:
                return Path(hf_hub_download(asset.hf_repo, name, local_files_only=True))
            except Exception:  # noqa: BLE001 - any miss (not cached, offline) means "not here"
                continue
        return None
    try:
        folder = Path(snapshot_download(asset.hf_repo, local_files_only=True))
    except Exception:  # noqa: BLE001
        return None
    return folder if _valid_folder(folder, asset) else None


def find_asset(asset: Asset, path: str | os.PathLike[str] = "") -> Path | None:
    """Resolve ``asset`` (module docstring order) or return ``None`` when it is nowhere.

    Raises ``ModelNotFoundError`` when an explicit ``path`` or ``DMDR_ASSET_<NAME>`` is set but unusable.
    """
    for origin, value in (("path", str(path or "")), (asset.env_var, os.environ.get(asset.env_var, ""))):
        if not value:
            continue
        candidate = Path(value).expanduser()
        found = _match(candidate, asset) if candidate.exists() else None
        if found is None:
            what = "does not exist" if not candidate.exists() else f"holds no {asset.describe()}"
            raise ModelNotFoundError(
                f"{asset.name}: {origin} {candidate} {what}",
                f"expected {asset.describe()} from {asset.upstream}",
            )
        return found
    return _match(asset.home_dir, asset) or _from_hf_cache(asset)


def resolve_asset(
    asset: Asset,
    path: str | os.PathLike[str] = "",
    *,
    reward: str = "",
    example: str = "",
) -> Path:
    """Like :func:`find_asset` but raise ``ModelNotFoundError`` when the asset is nowhere.

    The message names ``reward``, the upstream id and files; the hint lists the ways to supply them, starting with
    the reward spec's ``path`` (``example`` as its value) when ``example`` is given.
    """
    found = find_asset(asset, path)
    if found is not None:
        return found
    ways = []
    if example:
        ways.append(f"pass path in the reward spec, e.g. --set 'finetune_rl.rewards=[{{name: {reward}, "
                    f"path: {example}}}]'")
    ways += [f"set {asset.env_var}", f"put it in {asset.home_dir}/"]
    if asset.hf_repo:
        ways.append(f"pre-populate the Hugging Face cache on a connected machine (hf download {asset.hf_repo}"
                    + (f" {asset.files[0]}" if asset.files else "") + ")")
    who = (f"reward '{reward}': " if reward else "") + (f"{asset.name} " if asset.name != reward else "")
    raise ModelNotFoundError(
        f"{who}weights not found: {asset.describe()} from {asset.upstream} (dmdr never downloads)",
        "; or ".join(ways),
    )


def weights_fingerprint(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """8 hex digits identifying a weights file or snapshot folder, cheap enough for multi-GB files.

    ``sha256(size ‖ first 1 MiB ‖ last 1 MiB)`` per weights file (for a folder: its ``model.safetensors`` /
    ``pytorch_model.bin`` / index files, else every file), combined in name order. A fingerprint, not the full-file
    hash ``dmdr assets check`` would verify.
    """
    p = Path(path)
    if p.is_dir():
        files = [p / n for n in _WEIGHT_NAMES if (p / n).is_file()] or sorted(f for f in p.iterdir() if f.is_file())
    else:
        files = [p]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            if size > chunk:
                fh.seek(max(chunk, size - chunk))
                h.update(fh.read(chunk))
    return h.hexdigest()[:8]
