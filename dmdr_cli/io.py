"""Small file helpers shared by every command: atomic writes, prompt files. Torch-free."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dmdr_cli.errors import InputError


_UMASK = os.umask(0)  # read once at import (single-threaded): os.umask can only be read by setting it
os.umask(_UMASK)


def _default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open()`` / ``mkdir()`` would give (mkstemp/mkdtemp create 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_UMASK


def dmdr_home() -> Path:
    """dmdr's data folder: ``$DMDR_HOME``, default ``~/.cache/dmdr`` (tiny models, assets, benchmarks, caches)."""
    return Path(os.environ.get("DMDR_HOME") or Path.home() / ".cache" / "dmdr").expanduser()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder + rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


class AtomicDir:
    """Build a directory under a temp name next to ``final`` and rename it into place on success.

    ``with AtomicDir(out) as tmp: write into tmp``; on an exception the temp folder is removed and
    ``final`` is untouched. With ``replace=True`` an existing ``final`` is swapped out only after the
    new content is complete.
    """

    def __init__(self, final: str | Path, replace: bool = False) -> None:
        self.final = Path(final)
        self.replace = replace
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.", suffix=".tmp"))
        os.chmod(self.tmp, _default_mode(directory=True))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.final.exists():
            if not self.replace:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise InputError(f"{self.final} already exists", "choose another path or pass --force")
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` (one per line, blank lines skipped) or ``.jsonl`` (field ``prompt``) file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompt file not found: {p}", "pass an existing .txt or .jsonl file")
    prompts: list[str] = []
    lines = p.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM (Windows editors) is not prompt text
    if p.suffix == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{p}:{n}: not valid JSON", "each line must be a JSON object with a 'prompt' field") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise InputError(f"{p}:{n}: no string 'prompt' field", "each line must look like {\"prompt\": \"a cat\"}")
            prompts.append(obj["prompt"])
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {p} has no prompts", "add one prompt per line (txt) or one JSON object per line (jsonl)")
    return prompts


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line and flush (metrics, sample metadata)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
        fh.flush()
