"""``dmdr eval``: benchmarks on generated or existing images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdr_cli.commands.common import BaseOpt, ConfigOpt, SetOpt, guarded, resolve_config


@guarded
def evaluate(
    bench: Annotated[Optional[str], typer.Option("--bench", help="geneval | rewards | fid | kid | dpg | digits (default eval.bench).")] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="A dmdr run directory (its student) or a diffusers folder.")] = None,
    base: BaseOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    step: Annotated[Optional[int], typer.Option("--step", help="Run checkpoint step (default: latest).")] = None,
    compare: Annotated[Optional[list[str]], typer.Option("--compare", help="Also evaluate on the same prompts and seeds (repeatable): 'teacher' (the run's base model, its own steps + CFG), a preset / diffusers folder (as teacher), or another dmdr run directory (its student, e.g. before RL).")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Score an existing image folder instead of generating.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: RUN/eval/BENCH or eval/BENCH).")] = None,
    metadata: Annotated[Optional[str], typer.Option("--metadata", help="GenEval evaluation_metadata.jsonl (default: resolved locally, sha256-checked).")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="rewards/fid: drawbench | geneval | FILE; dpg: prompts.jsonl.")] = None,
    max_prompts: Annotated[Optional[int], typer.Option("--max-prompts", help="Only the first N prompts (0 = all).")] = None,
    detector: Annotated[str, typer.Option("--detector", help="GenEval detector backend: hf-m2f | fixture | (digits).")] = "hf-m2f",
    detector_path: Annotated[str, typer.Option("--detector-path", help="Local folder of the detector weights.")] = "",
    clip_path: Annotated[str, typer.Option("--clip-path", help="Local CLIP folder for GenEval colour classification.")] = "",
    option: Annotated[Optional[list[str]], typer.Option("--option", help="GenEval option key=value (threshold, counting_threshold, max_objects, max_overlap, position_threshold).")] = None,
    reward: Annotated[Optional[list[str]], typer.Option("--reward", help="rewards bench: NAME[=PATH] (repeatable, or comma-separated).")] = None,
    ref: Annotated[Optional[str], typer.Option("--ref", help="fid/kid: reference image folder or statistics .npz.")] = None,
    inception_weights: Annotated[Optional[str], typer.Option("--inception-weights", help="fid/kid: local Inception weights file.")] = None,
    feature_extractor: Annotated[str, typer.Option("--feature-extractor", help="fid/kid: torch-fidelity feature extractor.")] = "inception-v3-compat",
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="fid/kid: extra torch-fidelity metrics, comma-separated: fid,kid,isc,prc.")] = None,
    questions: Annotated[Optional[str], typer.Option("--questions", help="dpg: the user-supplied dpg_bench.csv.")] = None,
    vqa: Annotated[str, typer.Option("--vqa", help="dpg: VQA backend (blip-vqa | modelscope-mplug | scripted).")] = "blip-vqa",
    vqa_path: Annotated[str, typer.Option("--vqa-path", help="dpg: local VQA model folder.")] = "",
    dpg_fix: Annotated[bool, typer.Option("--dpg-fix", help="dpg: correct the upstream scoring quirks.")] = False,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="dpg: tolerate images that cannot be scored.")] = False,
    dpg_resolution: Annotated[Optional[int], typer.Option("--dpg-resolution", help="dpg: tile size R of the 2Rx2R images (default model.resolution).")] = None,
) -> None:
    """Evaluate a student (optionally against its teacher) or an image folder; writes eval.json and report.md."""
    from dmdr_cli.config.loader import coerce
    from dmdr_cli.errors import InputError
    from dmdr_cli.ui import console

    is_run = bool(ckpt) and (Path(ckpt) / "config.yaml").is_file() and (Path(ckpt) / "checkpoints").is_dir()
    if is_run:
        from dmdr_cli.config.loader import resolve_run

        extra = [f"eval.bench={bench}"] if bench else []
        cfg = resolve_run(ckpt, list(config or []), list(set_ or []) + extra)
    else:
        from dmdr_cli.commands.sample import _ckpt_overrides

        extra = (_ckpt_overrides(ckpt) if ckpt else []) + ([f"eval.bench={bench}"] if bench else [])
        cfg = resolve_config(base, config, set_, extra)
    bench_name = cfg.eval.bench
    options = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--option expects key=value, got {item!r}")
        options[key] = coerce(f"--option {key}", value, int if key == "max_objects" else float)
    rewards = []
    for item in reward or []:
        for part in item.split(","):
            name, _, path = part.partition("=")
            rewards.append((name.strip(), path.strip()))
    out_dir = out or ((Path(ckpt) / "eval" / bench_name) if is_run else Path("eval") / bench_name)

    from dmdr_cli.recipes.evaluate import EvalRequest, run

    req = EvalRequest(bench=bench_name, out_dir=out_dir, images=images, metadata=metadata, prompts=prompts,
                      detector=detector, detector_path=detector_path, clip_path=clip_path, options=options,
                      rewards=rewards, max_prompts=cfg.eval.max_prompts if max_prompts is None else max_prompts,
                      images_per_prompt=cfg.eval.images_per_prompt, seed=cfg.eval.seed, ref=ref,
                      batch_size=cfg.eval.batch_size, timing_rounds=cfg.eval.timing_rounds,
                      inception_weights=inception_weights, feature_extractor=feature_extractor,
                      fid_metrics=tuple(m.strip() for m in (metrics or "").split(",") if m.strip()),
                      device=cfg.runtime.device,
                      questions=questions, vqa=vqa, vqa_path=vqa_path, dpg_fix=dpg_fix, allow_missing=allow_missing,
                      tile_resolution=dpg_resolution or cfg.model.resolution)
    generators = {} if images is not None else _generators(cfg, ckpt, is_run, step, compare)
    data = run(cfg, req, generators, console.progress)
    _print_summary(data)
    console.success(f"report: {out_dir / 'report.md'}")


def _generators(cfg, ckpt, is_run: bool, step, compare) -> dict:
    """Models under test in report order: the teacher, other runs' students (``--compare RUN``), the student."""
    from dmdr_cli.engine import generators as g
    from dmdr_cli.errors import InputError

    out = {}
    # every model decodes as the evaluated one does, so images and seconds per image compare like with like
    same = [f"model.decode_dtype={cfg.model.decode_dtype}"]
    for spec in compare or []:
        folder = Path(spec)
        if spec == "teacher":
            key, gen = "teacher", lambda: g.teacher_of(cfg)
        elif (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
            from dmdr_cli.config.loader import resolve_run

            key = folder.resolve().name
            gen = lambda folder=folder: g.student_of_run(resolve_run(folder, [], same), folder, None)  # noqa: E731
        else:
            from dmdr_cli.config.loader import resolve

            key = "teacher"
            gen = lambda spec=spec, folder=folder: g.teacher_of(  # noqa: E731
                resolve(None, [], [f"model.path={folder.resolve()}", "model.tiny=", *same]) if folder.is_dir()
                else resolve(spec, [], same))
        if key in out or key == "student":
            raise InputError(f"--compare {spec}: a model named '{key}' is already being evaluated",
                             "give each --compare a different model")
        out[key] = gen()
    if is_run:
        out["student"] = g.student_of_run(cfg, Path(ckpt), step)
    elif ckpt:
        out["student"] = g.few_step_of(cfg, cfg.student.steps)
    elif not compare:
        out["teacher"] = g.teacher_of(cfg)
    return out


_HEADLINE = ("GenEval overall", "GenEval-digits", "% correct images", "digits-FID", "digit-cls reward", "detector")


def _print_summary(data: dict) -> None:
    from dmdr_cli.evaluation.report import metric_rows, fmt
    from dmdr_cli.ui import console

    cols, values = metric_rows(data["bench"], data["results"])
    if len(cols) > 5:  # per-task columns live in report.md; the terminal gets the headline numbers
        cols = [c for c in cols if c in _HEADLINE] or cols[:5]
    rows = []
    for name, v in values.items():
        m = data.get("models", {}).get(name, {})
        rows.append([m.get("label", name)] + [fmt(v.get(c)) for c in cols] + [fmt(m.get("seconds_per_image"), 3)])
    console.table(f"dmdr eval: {data['bench']}", ["model"] + cols + ["s / image"], rows)
    for name, x in data.get("speedups", {}).items():
        console.info(f"speed-up {name} vs teacher: {x:.1f}x")
