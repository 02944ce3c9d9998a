"""Benchmark prompt files: where they are, whether they are the right ones, and how to read them.

Resolution (EVALUATION.md §7.1 steps 1-3 and 6; this module never downloads), first hit wins:

1. the explicit path from the CLI or config (``--metadata``, ``--prompts``, ...): the file itself or a folder
   holding it;
2. the environment variable ``DMDR_ASSET_<NAME>`` (asset name in upper snake case, e.g.
   ``DMDR_ASSET_GENEVAL_METADATA``), then ``$DMDR_HOME/assets/<asset name>/<file>``;
3. ``$DMDR_HOME/benchmarks/<bench>/<file>`` (``DMDR_HOME`` defaults to ``~/.cache/dmdr``), then
   ``<project root>/../shared/benchmarks/<bench>/<file>`` where the project root is the folder holding the
   ``dmdr_cli`` package (a checkout);
6. otherwise ``InputError`` naming the file, its upstream URL and the ways to supply it.

An explicit path or ``DMDR_ASSET_<NAME>`` that points at nothing is an error at once (no silent fallback). Files
with a pinned sha256 are verified on every resolution; a mismatch is an ``InputError`` naming both hashes.

Loaders: :func:`load_geneval_metadata` (schema-checked), :func:`load_object_names`, :func:`load_prompt_list`
(``.txt`` one prompt a line, or ``.jsonl`` with ``prompt`` and optional ``id``). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dmdr_cli.io import dmdr_home
from dmdr_cli.errors import InputError, did_you_mean
from dmdr_cli.evaluation.geneval import COLORS, RELATIONS, TASKS

__all__ = [
    "BENCH_FILES",
    "BenchFile",
    "Prompt",
    "PROJECT_ROOT",
    "SHARED_BENCHMARKS",
    "bench_file_spec",
    "dmdr_home",
    "load_geneval_metadata",
    "load_object_names",
    "load_prompt_list",
    "resolve_bench_file",
    "sha256_file",
    "validate_geneval_metadata",
]

#: The checkout root: the folder holding the ``dmdr_cli`` package.
PROJECT_ROOT: Path = Path(__file__).resolve().parents[2]
#: Read-only shared benchmark files beside a checkout (``../shared/benchmarks`` from the project root).
#: ``../shared/benchmarks`` beside the checkout, or ``$DMDR_SHARED_BENCHMARKS`` when the checkout lives elsewhere
#: (a CI clone in a temporary folder, say).
SHARED_BENCHMARKS: Path = Path(os.environ.get("DMDR_SHARED_BENCHMARKS") or PROJECT_ROOT.parent / "shared" / "benchmarks")


@dataclass(frozen=True)
class BenchFile:
    """One benchmark file: ``bench`` folder, ``filename``, the asset ``name`` (for ``DMDR_ASSET_<NAME>``), the
    pinned ``sha256`` (or ``None``), the ``upstream`` URL (or ``None`` when there is no pinned source), the CLI
    ``flag`` that supplies it (or ``None``) and a human ``description``."""

    bench: str
    filename: str
    name: str
    sha256: str | None
    upstream: str | None
    flag: str | None
    description: str

    @property
    def env_var(self) -> str:
        return "DMDR_ASSET_" + re.sub(r"[^A-Z0-9]+", "_", self.name.upper()).strip("_")


_SPECS = (
    BenchFile("geneval", "evaluation_metadata.jsonl", "geneval-metadata",
              "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13",
              "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl",
              "--metadata", "GenEval prompt metadata (553 lines)"),
    BenchFile("geneval", "object_names.txt", "geneval-object-names",
              "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd",
              "https://raw.githubusercontent.com/djghosh13/geneval/main/evaluation/object_names.txt",
              None, "GenEval class names (80 lines, COCO order)"),
    BenchFile("dpg_bench", "prompts.jsonl", "dpg-prompts",
              "dbacb0c4d651df5870605caa11dff211c4e164624f36681cbf06d76054cce52d",
              "https://github.com/TencentQQGYLab/ELLA/tree/main/dpg_bench/prompts (one .txt per prompt; rebuild as "
              "EVALUATION.md §2.1: sorted by id, stripped, json.dumps(ensure_ascii=False) per line)",
              "--prompts", "DPG-Bench prompts (1,065 lines)"),
    BenchFile("drawbench", "prompts.txt", "drawbench",
              "7c4d2518b7642eef86637001fea3f826a950d3c2fdfab70cd7cb45e6f10fdbea",
              None, "--prompts", "DrawBench prompts (200 lines)"),
)

#: bench name -> file name -> :class:`BenchFile`.
BENCH_FILES: dict[str, dict[str, BenchFile]] = {}
for _spec in _SPECS:
    BENCH_FILES.setdefault(_spec.bench, {})[_spec.filename] = _spec

_BENCH_ALIASES = {"dpg": "dpg_bench", "dpg-bench": "dpg_bench"}


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def bench_file_spec(bench: str, filename: str) -> BenchFile:
    """The :class:`BenchFile` of ``bench``/``filename`` (``dpg`` is accepted for ``dpg_bench``)."""
    bench = _BENCH_ALIASES.get(bench, bench)
    files = BENCH_FILES.get(bench)
    if files is None:
        raise InputError(f"unknown benchmark '{bench}'.{did_you_mean(bench, BENCH_FILES)}",
                         "known: " + ", ".join(BENCH_FILES))
    spec = files.get(filename)
    if spec is None:
        raise InputError(f"unknown file '{filename}' of benchmark '{bench}'.{did_you_mean(filename, files)}",
                         "known: " + ", ".join(files))
    return spec


def _in(candidate: Path, filename: str) -> Path | None:
    if candidate.is_file():
        return candidate
    if candidate.is_dir() and (candidate / filename).is_file():
        return candidate / filename
    return None


def _verify(path: Path, spec: BenchFile) -> Path:
    if spec.sha256:
        actual = sha256_file(path)
        if actual != spec.sha256:
            raise InputError(
                f"{path}: sha256 mismatch for {spec.bench}/{spec.filename}: expected {spec.sha256}, actual {actual}",
                "this is not the pinned benchmark file (edited or another version); "
                + (f"get the original from {spec.upstream}" if spec.upstream else "restore the original file"),
            )
    return path


def resolve_bench_file(bench: str, filename: str, explicit: str | os.PathLike[str] | None = None, *,
                       verify: bool = True) -> Path:
    """The path of benchmark file ``bench``/``filename`` (module docstring order), sha256-verified when pinned.

    ``explicit`` may be the file or a folder holding it. ``verify=False`` skips the hash check (for a deliberately
    different file; numbers from it are then not comparable). Raises ``InputError`` when the file is nowhere, when
    an explicit path or ``DMDR_ASSET_<NAME>`` points at nothing, or on a hash mismatch.
    """
    spec = bench_file_spec(bench, filename)

    def done(path: Path) -> Path:
        return _verify(path, spec) if verify else path

    for origin, value in (("explicit path", os.fspath(explicit) if explicit else ""),
                          (spec.env_var, os.environ.get(spec.env_var, ""))):
        if not value:
            continue
        candidate = Path(value).expanduser()
        found = _in(candidate, spec.filename)
        if found is None:
            what = "does not exist" if not candidate.exists() else f"holds no {spec.filename}"
            raise InputError(f"{spec.bench}/{spec.filename}: {origin} {candidate} {what}", _ways(spec))
        return done(found)

    home = dmdr_home()
    for candidate in (home / "assets" / spec.name / spec.filename,
                      home / "benchmarks" / spec.bench / spec.filename,
                      SHARED_BENCHMARKS / spec.bench / spec.filename):
        if candidate.is_file():
            return done(candidate)

    source = f"upstream: {spec.upstream}" if spec.upstream else "no pinned upstream URL: supply it from a path"
    raise InputError(
        f"{spec.description} not found: {spec.bench}/{spec.filename} ({source}; dmdr does not download it here)",
        _ways(spec),
    )


def _ways(spec: BenchFile) -> str:
    ways = []
    if spec.flag:
        ways.append(f"pass {spec.flag} PATH")
    ways += [f"set {spec.env_var}",
             f"put it at $DMDR_HOME/benchmarks/{spec.bench}/{spec.filename} "
             f"(here {dmdr_home() / 'benchmarks' / spec.bench / spec.filename})",
             f"or run from a checkout with ../shared/benchmarks/{spec.bench}/{spec.filename}"]
    return "; ".join(ways)


# --------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------

_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}


def _clause_error(clause: Any, i: int, kind: str, allowed: set[str], colors: Iterable[str] | None) -> str | None:
    where = f"{kind}[{i}]"
    if not isinstance(clause, Mapping):
        return f"{where} is not an object"
    unknown = set(clause) - allowed
    if unknown:
        return f"{where} has unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})"
    name = clause.get("class")
    if not isinstance(name, str) or not name:
        return f"{where}.class must be a non-empty string"
    count = clause.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return f"{where}.count must be an integer >= 1, got {count!r}"
    if "color" in clause:
        allowed_colors = tuple(colors) if colors is not None else COLORS
        if clause["color"] not in allowed_colors:
            return f"{where}.color must be one of {', '.join(allowed_colors)}, got {clause['color']!r}"
    if "position" in clause:
        pos = clause["position"]
        if not isinstance(pos, (list, tuple)) or len(pos) != 2:
            return f"{where}.position must be [relation, clause index], got {pos!r}"
        rel, target = pos
        if rel not in RELATIONS:
            return f"{where}.position relation must be one of {', '.join(RELATIONS)}, got {rel!r}"
        if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < i:
            return f"{where}.position index must refer to an earlier include clause (0..{i - 1}), got {target!r}"
    return None


def validate_geneval_metadata(obj: Any, *, classes: Iterable[str] | None = None,
                              colors: Iterable[str] | None = None) -> str | None:
    """``None`` when ``obj`` is a valid GenEval metadata object (§1.1), else what is wrong.

    ``tag`` one of the six tasks; ``prompt`` a string; ``include`` a non-empty list of clauses ``{class, count,
    color?, position?}``; ``exclude`` (optional) a list of ``{class, count}``; counts are integers >= 1, colours
    from ``colors`` (default GenEval's ten), positions ``[relation, index of an earlier include clause]``. With
    ``classes``, every class name must be one of them. Extra top-level keys are allowed; extra clause keys are not.
    """
    if not isinstance(obj, Mapping):
        return "not a JSON object"
    tag = obj.get("tag")
    if tag not in TASKS:
        return f"tag must be one of {', '.join(TASKS)}, got {tag!r}"
    if not isinstance(obj.get("prompt"), str):
        return "prompt must be a string"
    include = obj.get("include")
    if not isinstance(include, list) or not include:
        return "include must be a non-empty list of clauses"
    exclude = obj.get("exclude", [])
    if not isinstance(exclude, list):
        return "exclude must be a list of clauses"
    known = set(classes) if classes is not None else None
    color_list = list(colors) if colors is not None else None
    for kind, clauses, allowed in (("include", include, _INCLUDE_KEYS), ("exclude", exclude, _EXCLUDE_KEYS)):
        for i, clause in enumerate(clauses):
            err = _clause_error(clause, i, kind, allowed, color_list)
            if err:
                return err
            if known is not None and clause["class"] not in known:
                hint = did_you_mean(clause["class"], known)
                return f"{kind}[{i}].class {clause['class']!r} is not a known class.{hint}"
    return None


def _lines(path: str | os.PathLike[str]) -> list[str]:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise InputError(f"{p} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {p}: {err}") from err


def load_geneval_metadata(path: str | os.PathLike[str], *, classes: Iterable[str] | None = None,
                          colors: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Parse and validate a GenEval ``evaluation_metadata.jsonl`` (one object a line; list index = line number =
    prompt folder index). Blank lines are allowed only at the end. Raises ``InputError`` with the line number of
    the first bad line. ``classes``/``colors``: see :func:`validate_geneval_metadata`.
    """
    lines = _lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    known = list(classes) if classes is not None else None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"{path}:{n}: empty line", "one JSON object a line; the folder index is the line number")
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise InputError(f"{path}:{n}: not valid JSON ({err})") from err
        problem = validate_geneval_metadata(obj, classes=known, colors=colors)
        if problem:
            raise InputError(f"{path}:{n}: invalid GenEval metadata: {problem}")
        out.append(obj)
    if not out:
        raise InputError(f"{path}: no GenEval metadata lines")
    return out


def load_object_names(path: str | os.PathLike[str], *, expected: int | None = 80) -> list[str]:
    """The class names of ``object_names.txt``, one a line, in file order (COCO order for GenEval's file).

    Blank lines are skipped. Raises ``InputError`` on duplicates or when the count is not ``expected``
    (``None`` accepts any count).
    """
    names = [line.strip() for line in _lines(path) if line.strip()]
    if expected is not None and len(names) != expected:
        raise InputError(f"{path}: expected {expected} class names, found {len(names)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{path}: duplicate class names {dupes}")
    return names


class Prompt(NamedTuple):
    """One prompt of a prompt list: ``id`` (a string) and the text."""

    id: str
    prompt: str


def load_prompt_list(path: str | os.PathLike[str]) -> list[Prompt]:
    """Read a prompt list (EVALUATION.md §3): ``.jsonl`` objects with ``prompt`` and optional ``id`` (DPG-Bench
    ``prompts.jsonl``), otherwise text with one prompt a line (DrawBench ``prompts.txt``).

    Blank lines are skipped; prompts are stripped; a missing ``id`` is the 0-based line number in the file. Ids are
    strings and must be unique. Raises ``InputError`` (with the line number) on bad lines or an empty list.
    """
    p = Path(path)
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for i, line in enumerate(_lines(p)):
        if not line.strip():
            continue
        if p.suffix.lower() == ".jsonl":
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise InputError(f"{p}:{i + 1}: not valid JSON ({err})") from err
            if not isinstance(obj, Mapping) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise InputError(f"{p}:{i + 1}: expected an object with a non-empty string 'prompt'")
            pid = obj.get("id", i)
            if not isinstance(pid, (str, int)) or isinstance(pid, bool):
                raise InputError(f"{p}:{i + 1}: 'id' must be a string or an integer, got {pid!r}")
            item = Prompt(str(pid), obj["prompt"].strip())
        else:
            item = Prompt(str(i), line.strip())
        if item.id in seen:
            raise InputError(f"{p}:{i + 1}: duplicate id {item.id!r} (first on line {seen[item.id]})")
        seen[item.id] = i + 1
        out.append(item)
    if not out:
        raise InputError(f"{p}: no prompts")
    return out
