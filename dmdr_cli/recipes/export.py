"""``dmdr export``: a run's student as a merged safetensors file, a diffusers folder, a LoRA or a ComfyUI LoRA.

    dmdr export --ckpt runs/sd3m --format diffusers --out exports/sd3m-4step

Steps:
1. Plan: pick the checkpoint (latest or ``--step``), the output layout (file or folder), refuse an existing
   output without ``--force`` (and never replace a folder that is not a dmdr export), check free disk space
   against an estimate of the bytes to write. Nothing is loaded before these checks pass.
2. Load the student in fp32 (base + checkpoint adapters). Under the ``gen`` role: read the LoRA factors, merge
   them with PEFT's ``get_delta_weight`` into stock-keyed weights and check the merge against the explicit
   ``W + scaling * B @ A`` (ALGORITHM.md 12.5); draw the student's reference samples for verification.
3. Write everything into a temp path next to ``--out`` (weights with dmdr metadata, model card).
4. Release the student, reload the export the way a user would and verify it (``dmdr_cli.export.verify``).
5. Rename into place. Any failure removes the temp path: nothing half-written is ever left at ``--out``.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dmdr_cli.errors import InputError
from dmdr_cli.export import DTYPES, FORMATS, LORA_FORMATS, formats as fm

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_MARGIN = 1.05
_SLACK = 16 * 2**20


@dataclass
class ExportRequest:
    run_dir: Path
    fmt: str
    out: Path
    dtype: str = "fp16"
    step: int | None = None
    force: bool = False
    verify: bool = True


# -- planning ----------------------------------------------------------------------------------------
def check_targets(layout: fm.Layout, force: bool) -> None:
    """Refuse an existing output unless ``force``; even then, refuse to replace a folder that is not a dmdr export
    (``--out .`` with ``--force`` must never wipe a directory) or a folder where a file goes."""
    for path in layout.targets():
        if not (path.exists() or path.is_symlink()):
            continue
        if not force:
            raise InputError(f"{path} already exists", "choose another --out, or pass --force to replace it")
        if path.is_dir() and not layout.is_dir:
            raise InputError(f"{path} is a directory, the {layout.weights_name} export is a file", "choose another --out")
        if path.is_dir() and any(path.iterdir()) and not (path / fm.INFO_NAME).is_file():
            raise InputError(f"{path} exists and is not a dmdr export folder (no {fm.INFO_NAME}); not replacing it "
                             "even with --force", "choose another --out")
        if not path.is_dir() and layout.is_dir:
            raise InputError(f"{path} is a file, the export is a folder", "choose another --out")


def _weight_files(folder: Path) -> list[Path]:
    """The weight files diffusers would load from a component folder (variants like ``*.fp16.safetensors`` skipped)."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if "." not in f.name[: -len(".safetensors")]]
    if plain or files:
        return plain or files
    return sorted(folder.glob("*.bin"))


def _numel(path: Path) -> int | None:
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        total = 0
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= d
                total += n
        return total
    except Exception:
        return None


def _folder_bytes(folder: Path, per_param: int) -> int:
    total = 0
    for f in _weight_files(folder):
        n = _numel(f)
        total += n * per_param if n is not None else f.stat().st_size
    return total


def estimate_bytes(fmt: str, dtype: str, base_folder: Path, family: str, ckpt: Path) -> int:
    """Bytes the export will write (weights in ``dtype`` + small files), with a margin."""
    per = _BYTES[dtype]
    if fmt in LORA_FORMATS:
        n = _numel(Path(ckpt) / "gen.safetensors") or 0
        total = n * per
    elif fmt == "safetensors":
        total = _folder_bytes(base_folder / fm.NETWORK[family], per)
    else:
        total = 0
        for sub in sorted(p for p in base_folder.iterdir() if p.is_dir()):
            total += _folder_bytes(sub, per)
            total += sum(f.stat().st_size for f in sub.iterdir() if f.is_file() and f.suffix in (".json", ".txt", ".model"))
    return int(total * _MARGIN) + _SLACK


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_disk(layout: fm.Layout, need: int) -> None:
    where = _existing_ancestor(layout.path.parent)
    free = shutil.disk_usage(where).free
    if free < need:
        raise InputError(f"not enough disk space in {where}: the export needs about {_human(need)}, {_human(free)} free",
                         "free some space or choose another --out")


# -- staging -----------------------------------------------------------------------------------------
@contextmanager
def staged(layout: fm.Layout, force: bool) -> Iterator[Path]:
    """A temp folder next to the output; on success its content replaces the output, on failure it is removed.

    Folder exports: the temp folder *is* the export (renamed into place). File exports: the weights file and its
    card are written into the temp folder and renamed next to each other, weights last.
    """
    from dmdr_cli.io import AtomicDir

    if layout.is_dir:
        with AtomicDir(layout.path, replace=force) as tmp:
            yield tmp
        return
    parent = layout.path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{layout.path.name}.", suffix=".tmp"))
    try:
        yield tmp
        check_targets(layout, force)  # still true after the (long) export?
        os.replace(tmp / layout.card_name, layout.card)
        os.replace(tmp / layout.weights_name, layout.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_permissions(root: Path) -> None:
    """safetensors writes its files 0600 (and temp folders are 0700): give the export what a plain write gives."""
    from dmdr_cli.io import _default_mode

    for p in [root, *root.rglob("*")]:
        os.chmod(p, _default_mode(directory=p.is_dir()))


# -- the workflow ------------------------------------------------------------------------------------
def run(cfg, req: ExportRequest, *, train_hash: str, say: Callable[[str], None] = lambda _: None) -> dict:
    """Export the student of ``req.run_dir`` (config ``cfg``); returns a summary dict."""
    import copy

    import torch

    from dmdr_cli import __version__
    from dmdr_cli.engine import checkpoint as ckpt_io
    from dmdr_cli.engine.networks import GEN
    from dmdr_cli.engine.sampler import student_spec
    from dmdr_cli.engine.student import load_student
    from dmdr_cli.export import card as cards, merge, verify as vf
    from dmdr_cli.families.loading import pick_device, resolve_model_folder

    if req.fmt not in FORMATS or req.dtype not in DTYPES:  # the command checks first; keep the recipe safe alone
        raise InputError(f"unknown export format/dtype {req.fmt!r}/{req.dtype!r}")
    t0 = time.perf_counter()
    ckpt = ckpt_io.latest(req.run_dir, req.step)
    state = ckpt_io.read_state(ckpt)
    layout = fm.layout_for(req.fmt, req.out)
    check_targets(layout, req.force)
    if req.fmt in LORA_FORMATS and cfg.lora.full_generator:
        raise InputError(f"{req.run_dir} trained a full-weight generator: it has no LoRA to export as {req.fmt}",
                         "use --format safetensors or --format diffusers")
    base_folder, _ = resolve_model_folder(cfg.model)
    family_name = cfg.model.family or state.get("family", "")
    if family_name not in fm.NETWORK:
        from dmdr_cli.config.presets import detect_family

        family_name = detect_family(base_folder)
    need = estimate_bytes(req.fmt, req.dtype, Path(base_folder), family_name, ckpt)
    check_disk(layout, need)

    # 2. the student, in fp32
    say(f"loading the student ({ckpt.name}) in fp32")
    cfg32 = copy.deepcopy(cfg)
    cfg32.model.dtype = "fp32"
    cfg32.model.decode_dtype = ""  # the export check compares fp32 decodes
    device = pick_device(cfg.runtime.device)
    bundle, roles, state = load_student(cfg32, ckpt, device=device)
    family = bundle.family
    spec = student_spec(family, cfg.student)
    dtype = fm.torch_dtype(req.dtype)
    stock_kwargs = fm.stock_call_kwargs(family.name, spec, cfg.model.shift, cfg.model.resolution,
                                        cfg.model.max_sequence_length)
    full = roles.generator is not None
    report: dict = {}
    export_sd = lora_sd = base_targeted = None
    factors: list = []
    with vf.exact_fp32(), torch.no_grad(), roles.role("gen") as gen_net:
        network_config = gen_net.config
        if not full:
            factors = merge.lora_factors(roles.base, [GEN])
            if not factors:
                raise InputError(f"{ckpt} has no '{GEN}' adapter on the network", "is this a dmdr run directory?")
        if req.fmt in LORA_FORMATS:
            lora_sd = (fm.lora_state_dict if req.fmt == "lora" else fm.kohya_state_dict)(factors, family.name, dtype)
        else:
            if full:
                merged = {k: v.detach().float().cpu() for k, v in roles.generator.state_dict().items()}
            else:
                merged = merge.merged_state_dict(roles.base, [GEN])
                base_sd = merge.stock_state_dict(roles.base)
                report["merge"] = merge.check_merged(merged, base_sd, factors, what="fp32 merge")
                report["merge"]["forward_max_rel_err"] = merge.check_layer_forward(roles.base, merged, factors)
                if req.verify and req.dtype == "fp32":
                    base_targeted = {f.key: base_sd[f.key].clone() for f in factors}
                del base_sd
            export_sd = fm.cast_state_dict(merged, dtype)
            del merged
            fm.fresh_network(family.name, network_config, export_sd)  # stock keys, strict=True, before writing
        ref = None
        if req.verify:
            say("sampling the student for verification")
            ref = vf.student_reference(bundle, gen_net, spec, stock_kwargs, cfg.model.shift, cfg.model.resolution)
    info = cards.ExportInfo(
        fmt=req.fmt, dtype=req.dtype, family=family.name, base_model=cfg.model.hub_id or bundle.source,
        base_ref=cfg.model.hub_id or str(base_folder),
        run=Path(req.run_dir).resolve().name, checkpoint=ckpt.name, step=int(state.get("k", 0)),
        stage=str(state.get("stage", "")), steps=spec.steps, grid=[float(t) for t in spec.grid], t_end=spec.t_end,
        mode=spec.mode, shift=float(cfg.model.shift), x0_end=float(cfg.model.x0_end), resolution=cfg.model.resolution,
        max_sequence_length=cfg.model.max_sequence_length, use_t5=bool(bundle.info.get("t5", True)),
        config_hash=train_hash, dmdr_version=__version__, preset=cfg.name, description=cfg.description,
        lora_rank=cfg.lora.gen_rank, lora_alpha=cfg.lora.gen_alpha, full_generator=full, stock_kwargs=stock_kwargs,
        stock_exact=fm.stock_call_exact(family.name, spec), weights_name=layout.weights_name, is_dir=layout.is_dir)
    if factors:  # what the layers actually carry (PEFT scaling = alpha / r)
        info.lora_rank = factors[0].rank
        info.lora_alpha = int(round(factors[0].scaling * factors[0].rank))
    meta = cards.metadata(info)

    # 3. write into the staging path; 4. verify; 5. rename into place
    ctx = vf.Context(fmt=req.fmt, family=family, base_folder=str(base_folder), source=bundle.source, device=device,
                     dtype=req.dtype, spec=spec, resolution=cfg.model.resolution, shift=float(cfg.model.shift),
                     stock_kwargs=stock_kwargs, network_config=network_config, use_t5=info.use_t5, ref=ref,
                     export_sd=export_sd, base_targeted=base_targeted, factors=factors)
    with staged(layout, req.force) as tmp:
        say(f"writing the {req.fmt} export")
        weights = tmp / layout.weights_name if layout.weights_name else tmp
        if req.fmt == "diffusers":
            scheduler = fm.export_scheduler(family.name, bundle.pipe.scheduler.config, cfg.model.shift,
                                            fm.stochastic_export(family.name, spec))
            network = fm.fresh_network(family.name, network_config, export_sd)
            fm.save_diffusers(tmp, bundle.pipe, family.name, network, scheduler, dtype)
            del network
        elif req.fmt == "safetensors":
            fm.save_safetensors(export_sd, weights, meta)
        else:
            fm.save_safetensors(lora_sd, weights, meta)
        del bundle, roles, gen_net
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if req.verify:
            say("verifying: reloading the export")
        verification = {**report, "sample_tol": vf.SAMPLE_TOL[req.dtype],
                        "reload": vf.verify(ctx, weights) if req.verify else None}
        name = str(req.out if layout.is_dir else layout.path)
        (tmp / layout.card_name).write_text(cards.render(info, name, verification,
                                                         cards.read_evals(req.run_dir)), encoding="utf-8")
        if layout.is_dir:
            (tmp / fm.INFO_NAME).write_text(cards.info_json(info, verification), encoding="utf-8")
        _default_permissions(tmp)
    size = sum(p.stat().st_size for p in layout.path.rglob("*") if p.is_file()) if layout.is_dir else layout.path.stat().st_size
    return {"format": req.fmt, "dtype": req.dtype, "path": str(layout.path), "card": str(layout.card),
            "checkpoint": str(ckpt), "bytes": size, "estimated_bytes": need, "verified": req.verify,
            "verification": verification, "seconds": time.perf_counter() - t0}
