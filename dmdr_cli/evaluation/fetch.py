"""``dmdr data fetch|list``: download benchmark files from upstream (or a mirror) and check what resolves locally.

This is the connected-machine counterpart of :mod:`dmdr_cli.evaluation.benchfiles` (EVALUATION.md §7.1 step 5):
files come from the URLs pinned there, are verified against the pinned sha256 **before** anything is written, and
are written atomically into ``--dest`` (default ``$DMDR_HOME/benchmarks/<bench>/``, which the resolver reads).
An existing file with the pinned hash is left alone (no download); a different existing file is an error unless
``force``. urllib only (http, https, file URLs); nothing here runs unless the user asks for it.

Where each benchmark comes from:

* ``geneval``: ``evaluation_metadata.jsonl`` and ``object_names.txt`` from raw.githubusercontent.com
  (djghosh13/geneval ``main``), or ``<base-url>/<file name>``.
* ``drawbench``: there is no pinned upstream URL (the list is the Imagen paper's); only ``<base-url>/prompts.txt``
  from a mirror works.
* ``dpg`` (``prompts.jsonl``) has three modes:

  - mirror: ``--base-url URL`` without ``--index`` downloads ``URL/prompts.jsonl`` as is;
  - per-file with an index: ``--index SRC`` (a local file or URL) lists the upstream prompt file names;
    each ``<folder>/<name>.txt`` is downloaded (``<folder>`` = ``--base-url`` or the upstream raw folder
    :data:`DPG_PROMPTS_RAW`) and ``prompts.jsonl`` is rebuilt as EVALUATION.md §2.1 says (:func:`rebuild_dpg_prompts`);
  - upstream (neither option): the index is the GitHub git-trees API listing :data:`DPG_TREE_API` (one
    unauthenticated API call; GitHub's *contents* API would stop at 1,000 of the 1,065 files), then per-file mode
    from :data:`DPG_PROMPTS_RAW` (1,065 small downloads).

  The index may be plain text (one file name or stem a line; ``#`` comments and blank lines skipped), a JSON list
  of names, a GitHub contents-API listing (``[{"name", "type"}]``) or a git-trees-API object (``{"tree": [{"path",
  "type"}], "truncated"}``; only ``dpg_bench/prompts/*.txt`` entries are kept when paths carry that folder).
  Whatever the mode, the result must match the pinned sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Any

from dmdr_cli import __version__
from dmdr_cli.errors import InputError, did_you_mean
from dmdr_cli.evaluation import benchfiles
from dmdr_cli.evaluation.benchfiles import BENCH_FILES, BenchFile, dmdr_home, resolve_bench_file, sha256_file
from dmdr_cli.io import atomic_write_bytes

__all__ = [
    "DPG_PROMPTS_RAW",
    "DPG_TREE_API",
    "FETCH_BENCHES",
    "FetchResult",
    "bench_file_status",
    "download",
    "fetch_bench",
    "parse_prompt_index",
    "rebuild_dpg_prompts",
]

#: Upstream ref for the DPG prompt files (EVALUATION.md reference commit 3c228f1; the pinned sha256 guards drift).
DPG_REF = "main"
#: Raw folder holding one ``<id>.txt`` per DPG-Bench prompt.
DPG_PROMPTS_RAW = f"https://raw.githubusercontent.com/TencentQQGYLab/ELLA/{DPG_REF}/dpg_bench/prompts"
#: GitHub git-trees API listing of the ELLA repository (recursive; about 1,100 entries, far below its limits).
DPG_TREE_API = f"https://api.github.com/repos/TencentQQGYLab/ELLA/git/trees/{DPG_REF}?recursive=1"
_DPG_FOLDER = "dpg_bench/prompts/"

#: CLI name -> benchmark folder (``BENCH_FILES`` key).
FETCH_BENCHES: dict[str, str] = {"geneval": "geneval", "dpg": "dpg_bench", "drawbench": "drawbench"}
_ALIASES = {"dpg_bench": "dpg", "dpg-bench": "dpg"}

MAX_BYTES = 64 << 20  # no benchmark file comes close; a bigger answer is not the file asked for


@dataclass(frozen=True)
class FetchResult:
    """One destination file: ``status`` is ``written`` (new), ``replaced`` (``force`` over a different file) or
    ``unchanged`` (already there with the pinned hash; nothing downloaded); ``source`` is the URL (or mode)."""

    path: Path
    sha256: str
    status: str
    source: str


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _normalise_base(base_url: str) -> str:
    """``base_url`` without a trailing slash; a local folder path becomes a ``file://`` URL."""
    base = base_url.strip()
    if "://" not in base:
        p = Path(base).expanduser()
        if not p.is_dir():
            raise InputError(f"--base-url {base_url!r} is neither a URL nor an existing folder",
                             "use http://, https:// or file:// (or a local folder path)")
        return p.resolve().as_uri()
    scheme = urllib.parse.urlsplit(base).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise InputError(f"--base-url {base_url!r}: unsupported scheme '{scheme}'", "use http, https or file")
    return base.rstrip("/")


def download(url: str, *, timeout: float = 60.0, hint: str = "", accept: str | None = None) -> bytes:
    """The bytes at ``url`` (http/https/file). Any failure is a one-line ``InputError`` naming the URL; ``hint``
    says how to supply the file by hand."""
    headers = {"User-Agent": f"dmdr/{__version__} (benchmark fetch)"}
    if accept:
        headers["Accept"] = accept
    try:
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - schemes checked by callers
            data = resp.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        reason = str(err.reason)
    except (OSError, HTTPException, ValueError) as err:
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    else:
        if len(data) > MAX_BYTES:
            raise InputError(_one_line(f"{url} is larger than {MAX_BYTES >> 20} MiB: not a benchmark file"),
                             _one_line(hint))
        return data
    raise InputError(_one_line(f"cannot download {url}: {reason}"), _one_line(hint))


def _manual_hint(spec: BenchFile, mirror: bool = True) -> str:
    return ("supply it by hand: " + benchfiles._ways(spec)  # noqa: SLF001 - the resolver's own wording
            + ("; or pass --base-url URL of a mirror holding it" if mirror else ""))


def _bench_folder(bench: str) -> tuple[str, str]:
    name = _ALIASES.get(bench, bench)
    if name not in FETCH_BENCHES:
        raise InputError(f"unknown benchmark '{bench}'.{did_you_mean(bench, FETCH_BENCHES)}",
                         "known: " + ", ".join(FETCH_BENCHES))
    return name, FETCH_BENCHES[name]


# --------------------------------------------------------------------------------------------------------------
# DPG-Bench prompts
# --------------------------------------------------------------------------------------------------------------

def rebuild_dpg_prompts(files: Iterable[tuple[str, str | bytes]]) -> bytes:
    """``prompts.jsonl`` from ``(file stem, file text)`` pairs exactly as EVALUATION.md §2.1: sorted by id as
    strings, prompt text stripped, ``json.dumps({"id", "prompt"}, ensure_ascii=False)`` per line, final newline."""
    rows = []
    seen: set[str] = set()
    for stem, text in files:
        if stem in seen:
            raise InputError(f"DPG prompt id {stem!r} appears twice")
        seen.add(stem)
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"DPG prompt file {stem}.txt is not UTF-8 ({err})") from None
        rows.append((stem, text.strip()))
    rows.sort(key=lambda r: r[0])
    return "".join(json.dumps({"id": stem, "prompt": text}, ensure_ascii=False) + "\n"
                   for stem, text in rows).encode("utf-8")


def _txt_name(raw: str) -> str | None:
    name = raw.strip()
    if not name or name.startswith("#"):
        return None
    name = PurePosixPath(name).name
    return name if name.endswith(".txt") else name + ".txt"


def parse_prompt_index(data: bytes | str) -> list[str]:
    """The DPG prompt file names (``<stem>.txt``, sorted, unique) listed by an index (module docstring formats)."""
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    stripped = text.lstrip()
    names: list[str | None]
    if stripped[:1] in ("[", "{"):
        try:
            obj = json.loads(text)
        except ValueError as err:
            raise InputError(f"DPG prompt index is not valid JSON ({err})") from None
        if isinstance(obj, dict):
            if obj.get("truncated"):
                raise InputError("the GitHub tree listing of the DPG prompts is truncated",
                                 "pass --index with a complete list of the prompt file names")
            obj = obj.get("tree")
            if not isinstance(obj, list):
                raise InputError("DPG prompt index: expected a list of names or a GitHub tree object with 'tree'")
        entries: list[str] = []
        for e in obj:
            if isinstance(e, str):
                entries.append(e)
            elif isinstance(e, dict) and e.get("type", "blob") in ("blob", "file"):
                path = e.get("path") or e.get("name")
                if isinstance(path, str):
                    entries.append(path)
        if any(_DPG_FOLDER in e for e in entries):
            entries = [e for e in entries if e.startswith(_DPG_FOLDER) or f"/{_DPG_FOLDER}" in e]
        names = [_txt_name(e) for e in entries if e.endswith(".txt") or "." not in PurePosixPath(e).name]
    else:
        names = [_txt_name(line) for line in text.splitlines()]
    out = sorted({n for n in names if n})
    bad = [n for n in out if n in (".txt",) or n.startswith(".")]
    if bad:
        raise InputError(f"DPG prompt index lists invalid file name(s) {bad[:3]}")
    if not out:
        raise InputError("DPG prompt index lists no prompt files",
                         "expected one <id>.txt name a line, a JSON list, or a GitHub tree listing")
    return out


def _read_source(src: str, *, timeout: float, hint: str, accept: str | None = None) -> bytes:
    if "://" in src:
        return download(src, timeout=timeout, hint=hint, accept=accept)
    p = Path(src).expanduser()
    try:
        return p.read_bytes()
    except OSError as err:
        raise InputError(_one_line(f"cannot read the DPG prompt index {p}: {err.strerror or err}"), hint) from None


def _fetch_dpg(spec: BenchFile, base: str | None, index: str | None, *, timeout: float,
               workers: int) -> tuple[bytes, str]:
    manual = _manual_hint(spec)
    if base and not index:
        url = f"{base}/{spec.filename}"
        return download(url, timeout=timeout, hint=manual), url
    folder = base or DPG_PROMPTS_RAW
    if index:
        listing = _read_source(index, timeout=timeout, hint="pass --index with a readable file or URL")
        source = index
    else:
        listing = download(DPG_TREE_API, timeout=timeout, accept="application/vnd.github+json",
                           hint="the file list comes from the GitHub API; pass --index FILE listing the "
                                "dpg_bench/prompts/*.txt names, or --base-url URL of a mirror serving "
                                f"prompts.jsonl; or {manual}")
        source = DPG_TREE_API
    names = parse_prompt_index(listing)

    def get(name: str) -> tuple[str, bytes]:
        return name[:-4], download(f"{folder}/{urllib.parse.quote(name)}", timeout=timeout, hint=manual)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(get, n) for n in names]
        try:
            files = [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # first failure: do not start the remaining downloads
            raise
    return rebuild_dpg_prompts(files), f"{len(names)} files from {folder}/ (index {source}), rebuilt"


# --------------------------------------------------------------------------------------------------------------
# fetch / list
# --------------------------------------------------------------------------------------------------------------

def fetch_bench(bench: str, dest: str | os.PathLike[str] | None = None, *, base_url: str | None = None,
                index: str | None = None, force: bool = False, timeout: float = 60.0,
                workers: int = 8) -> list[FetchResult]:
    """Download the files of ``bench`` (``geneval``, ``dpg``, ``drawbench``) into ``dest`` (default
    ``$DMDR_HOME/benchmarks/<bench folder>/``) and return one :class:`FetchResult` per file.

    Every file is checked against its pinned sha256 before anything is written; on any failure nothing is
    written. ``base_url``: a mirror folder (URL or local path) holding the files under their own names; for
    ``dpg`` together with ``index`` it is the folder of the per-prompt ``.txt`` files instead. ``index``: DPG only.
    """
    name, folder = _bench_folder(bench)
    if index and name != "dpg":
        raise InputError("--index only applies to dpg (the list of per-prompt .txt files)")
    specs = list(BENCH_FILES[folder].values())
    target_dir = Path(dest).expanduser() if dest else dmdr_home() / "benchmarks" / folder
    base = _normalise_base(base_url) if base_url else None

    results: dict[str, FetchResult] = {}
    todo: list[tuple[BenchFile, Path, bool]] = []
    for spec in specs:
        target = target_dir / spec.filename
        if target.exists() or target.is_symlink():
            if not target.is_file():
                raise InputError(f"{target} exists and is not a file", "remove it or choose another --dest")
            have = sha256_file(target)
            if have == spec.sha256:
                results[spec.filename] = FetchResult(target, have, "unchanged", "already present")
                continue
            if not force:
                raise InputError(
                    f"{target} exists with a different sha256 ({have[:12]}…, pinned {str(spec.sha256)[:12]}…)",
                    "pass --force to replace it with the pinned file, or choose another --dest")
            todo.append((spec, target, True))
        else:
            todo.append((spec, target, False))

    fetched: list[tuple[BenchFile, Path, bool, bytes, str]] = []
    for spec, target, exists in todo:
        manual = _manual_hint(spec)
        if name == "dpg":
            data, source = _fetch_dpg(spec, base, index, timeout=timeout, workers=workers)
        elif base:
            source = f"{base}/{spec.filename}"
            data = download(source, timeout=timeout, hint=manual)
        elif spec.upstream and spec.upstream.startswith(("http://", "https://")) and " " not in spec.upstream:
            source = spec.upstream
            data = download(source, timeout=timeout, hint=manual)
        else:
            raise InputError(f"{spec.description} ({spec.bench}/{spec.filename}) has no pinned upstream URL",
                             f"pass --base-url URL of a mirror serving {spec.filename}, or "
                             + _manual_hint(spec, mirror=False))
        actual = hashlib.sha256(data).hexdigest()
        if spec.sha256 and actual != spec.sha256:
            raise InputError(
                _one_line(f"{spec.bench}/{spec.filename} from {source}: sha256 mismatch: expected {spec.sha256}, "
                          f"got {actual}; nothing was written"),
                "the source serves another version or altered bytes; check the URL or " + manual)
        fetched.append((spec, target, exists, data, source))

    for spec, target, exists, data, source in fetched:  # all verified: now write, each atomically
        atomic_write_bytes(target, data)
        results[spec.filename] = FetchResult(target, hashlib.sha256(data).hexdigest(),
                                             "replaced" if exists else "written", source)
    return [results[spec.filename] for spec in specs]


def _origin(path: Path, spec: BenchFile) -> str:
    home = dmdr_home()
    if os.environ.get(spec.env_var):
        return spec.env_var
    for label, candidate in (("$DMDR_HOME/assets", home / "assets" / spec.name / spec.filename),
                             ("$DMDR_HOME/benchmarks", home / "benchmarks" / spec.bench / spec.filename),
                             ("../shared/benchmarks", benchfiles.SHARED_BENCHMARKS / spec.bench / spec.filename)):
        if path == candidate:
            return label
    return "?"


def bench_file_status() -> list[dict[str, Any]]:
    """One row per known benchmark file: ``bench``, ``file``, ``found``, ``path``, ``origin`` (which resolver step
    found it), ``hash`` (``ok`` / ``mismatch`` / ``unpinned`` / ``-``), ``upstream`` and ``error`` (why it does
    not resolve)."""
    rows = []
    for folder, files in BENCH_FILES.items():
        for spec in files.values():
            row: dict[str, Any] = {"bench": folder, "file": spec.filename, "found": False, "path": None,
                                   "origin": None, "hash": "-", "upstream": spec.upstream, "error": None}
            try:
                path = resolve_bench_file(folder, spec.filename, verify=False)
            except InputError as err:
                row["error"] = err.message
            else:
                row.update(found=True, path=str(path), origin=_origin(path, spec))
                if spec.sha256:
                    row["hash"] = "ok" if sha256_file(path) == spec.sha256 else "mismatch"
                else:
                    row["hash"] = "unpinned"
            rows.append(row)
    return rows

