"""``dmdr eval``: benchmark one model, or a student against its teacher, and write a report.

    dmdr eval --bench geneval --ckpt runs/sd3m --detector hf-m2f --detector-path DIR --clip-path DIR
    dmdr eval --bench geneval --images DIR --detector fixture          # score an existing folder
    dmdr eval --bench rewards --ckpt runs/sd3m --prompts drawbench --reward clip=DIR --reward hps-v2.1=FILE
    dmdr eval --bench fid --ckpt runs/sd3m --ref DIR|STATS.npz --inception-weights FILE
    dmdr eval --bench dpg --ckpt runs/sd3m --questions dpg_bench.csv --vqa blip-vqa --vqa-path DIR

Steps:
1. Build the models under test (``ImageGenerator``s): the run's student and, with ``--compare``, the teacher
   with its own steps and CFG, on the same prompts and seeds.
2. Generate each benchmark's images in its canonical layout under ``OUT/<model>/images`` (timed).
3. Score them (GenEval rule engine + detector backend, reward models on the saved PNGs, torch-fidelity,
   DPG-Bench VQA) into ``results.jsonl`` and ``summary.json`` per model.
4. Write ``OUT/eval.json`` (all numbers, config, backends, versions) and ``OUT/report.md`` with the
   side-by-side table (incl. seconds per image and speedup) and teacher-vs-student sample grids.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dmdr_cli.errors import InputError
from dmdr_cli.io import atomic_write_text

Progress = Callable[[int, int], None]


@dataclass
class EvalRequest:
    bench: str
    out_dir: Path
    images: Path | None = None
    metadata: str | None = None
    prompts: str | None = None
    detector: str = "fixture"
    detector_path: str = ""
    clip_path: str = ""
    options: dict = field(default_factory=dict)
    rewards: list = field(default_factory=list)          # [(name, path)]
    max_prompts: int = 0
    images_per_prompt: int = 4
    seed: int = 42
    batch_size: int = 4                  # images per generator call (eval.batch_size)
    timing_rounds: int = 3               # interleaved timing calls per model (eval.timing_rounds; 0 = generation medians)
    options_meta: dict = field(default_factory=dict)
    ref: str | None = None
    inception_weights: str | None = None
    feature_extractor: str = "inception-v3-compat"
    fid_metrics: tuple = ()
    device: str = "auto"
    questions: str | None = None
    vqa: str = "blip-vqa"
    vqa_path: str = ""
    dpg_fix: bool = False
    allow_missing: bool = False
    tile_resolution: int = 512            # dpg: size R of each tile of the 2x2 images


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _limit(items: list, n: int) -> list:
    return items[:n] if n and n > 0 else items


# -- GenEval -------------------------------------------------------------------------------------------------
def geneval_metadata(req: EvalRequest) -> list[dict]:
    """The prompt metadata: the pinned official file (sha256-checked), or an explicit ``--metadata`` file (a
    subset or another world in GenEval's schema), whose hash is recorded and which is never canonical."""
    from dmdr_cli.evaluation.benchfiles import bench_file_spec, load_geneval_metadata, resolve_bench_file, sha256_file

    path = resolve_bench_file("geneval", "evaluation_metadata.jsonl", req.metadata, verify=req.metadata is None)
    digest = sha256_file(path)
    req.options_meta = {"metadata_file": str(path), "metadata_sha256": digest,
                        "official_metadata": digest == bench_file_spec("geneval", "evaluation_metadata.jsonl").sha256}
    return _limit(load_geneval_metadata(path), req.max_prompts)


def line_seeds(metadata: list[dict], k: int, seed: int) -> list[list[int]]:
    """Seeds of the ``k`` images of every metadata line: ``seed + j`` for the first line of a prompt, and
    ``seed + r·k + j`` for its ``r``-th repeat. A file whose prompts are unique (GenEval's) gets ``seed + j``
    everywhere; a repeated prompt (the digits world's held-out split has only two single-digit prompts, so its 10
    single_object lines repeat them) gets new images instead of copies that would count the same samples
    several times."""
    seen: dict[str, int] = {}
    out = []
    for m in metadata:
        r = seen.get(m["prompt"], 0)
        seen[m["prompt"]] = r + 1
        out.append([seed + r * k + j for j in range(k)])
    return out


def generate_geneval(gen, metadata: list[dict], root: Path, req: EvalRequest, progress: Progress | None) -> None:
    """GenEval layout: ``root/<index:05d>/metadata.jsonl`` + ``samples/0000.png..``; seeds from :func:`line_seeds`.
    Images are generated ``req.batch_size`` at a time across prompts (per-image seeds: the batch size changes the images
    only by float rounding), which is also the batch at which seconds per image are measured."""
    from dmdr_cli.engine.images import to_pil
    from dmdr_cli.evaluation.geneval import write_prompt_folder

    k = req.images_per_prompt
    seeds = line_seeds(metadata, k, req.seed)
    jobs = [(idx, j) for idx in range(len(metadata)) for j in range(k)]
    done: dict[int, list] = {}
    for start in range(0, len(jobs), max(1, req.batch_size)):
        part = jobs[start:start + max(1, req.batch_size)]
        imgs = gen([metadata[idx]["prompt"] for idx, _ in part], [seeds[idx][j] for idx, j in part])
        for (idx, _), img in zip(part, imgs):
            done.setdefault(idx, []).append(to_pil(img))
            if len(done[idx]) == k:
                write_prompt_folder(root, idx, metadata[idx], done.pop(idx))
                if progress:
                    progress(idx + 1, len(metadata))


def score_geneval(root: Path, out: Path, req: EvalRequest, detector, progress: Progress | None) -> dict:
    from PIL import Image, ImageOps

    from dmdr_cli.evaluation.geneval import evaluate_detections, filter_detections, iter_image_folder, results_row, summarize

    opts = {"threshold": 0.3, "counting_threshold": 0.9, "max_objects": 16, "position_threshold": 0.1,
            "max_overlap": 1.0, **req.options}
    folders = list(iter_image_folder(root))
    if not folders:
        raise InputError(f"{root} holds no GenEval prompt folders (00000/metadata.jsonl + samples/*.png)",
                         "point --images at a folder in GenEval's layout")
    rows = []
    for n, (_idx, md, paths) in enumerate(folders):
        for path in paths:
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            dets, color_of = detector(path, image)
            ok, reason = evaluate_detections(md, dets, color_of=color_of, **opts)
            kept = filter_detections(dets, md["tag"], threshold=opts["threshold"],
                                     counting_threshold=opts["counting_threshold"], max_objects=opts["max_objects"],
                                     max_overlap=opts["max_overlap"])
            rows.append(results_row(str(path.relative_to(root)), md, ok, reason, kept, detector.id, detector.color_model))
        if progress:
            progress(n + 1, len(folders))
    summary = summarize(rows)
    official = req.options_meta.get("official_metadata", False) and not req.max_prompts
    summary.update({"bench": "geneval", "detector": detector.id, "color_model": detector.color_model,
                    "options": opts, **req.options_meta,
                    "canonical": detector.id.startswith("mmdet-m2f") and official and opts["max_overlap"] == 1.0})
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "results.jsonl", rows)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


# -- reward metrics ------------------------------------------------------------------------------------------
REWARD_SCALE = {"clip": 100.0, "hps-v2": 100.0, "hps-v2.1": 100.0, "dfn5b-clip": 100.0}


def reward_prompts(req: EvalRequest) -> list[str]:
    from dmdr_cli.evaluation.benchfiles import load_prompt_list, resolve_bench_file

    spec = req.prompts or "drawbench"
    if spec == "drawbench":
        path = resolve_bench_file("drawbench", "prompts.txt")
    elif spec == "geneval":
        return [m["prompt"] for m in geneval_metadata(req)]
    elif spec.startswith("builtin:"):
        from dmdr_cli.engine.prompts import load_source

        return _limit(load_source(spec), req.max_prompts)
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"--prompts {spec}: no such file", "pass drawbench, geneval, builtin:shapes or a .txt/.jsonl file")
    prompts = [p.prompt for p in load_prompt_list(path)]
    if not prompts:
        raise InputError(f"{path} has no prompts", "one prompt per line (.txt) or a 'prompt' field per line (.jsonl)")
    return _limit(prompts, req.max_prompts)


def generate_flat(gen, prompts: list[str], root: Path, req: EvalRequest, progress: Progress | None) -> list[Path]:
    """One image per prompt with the fixed per-prompt seed ``seed + i``: ``root/<i:05d>.png``."""
    from dmdr_cli.engine.images import save_png

    paths = []
    for start in range(0, len(prompts), req.batch_size):
        chunk = prompts[start:start + req.batch_size]
        imgs = gen(chunk, [req.seed + start + i for i in range(len(chunk))])
        for i, img in enumerate(imgs):
            paths.append(save_png(img, root / f"{start + i:05d}.png"))
        if progress:
            progress(len(paths), len(prompts))
    return paths


def score_rewards(paths: list[Path], prompts: list[str], rewards: list, out: Path) -> dict:
    """Mean of each reward on the saved PNGs (EVALUATION.md 3: scores come from the files people keep)."""
    import numpy as np
    import torch
    from PIL import Image

    rows = [{"id": i, "prompt": p, "file": path.name} for i, (p, path) in enumerate(zip(prompts, paths))]
    means = {}
    for name, reward in rewards:
        scores = []
        for start in range(0, len(paths), 8):
            batch = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths[start:start + 8]]
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            with torch.no_grad():
                scores += [float(s) for s in reward(x, prompts[start:start + 8])]
        for row, s in zip(rows, scores):
            row[name] = s
        scale = REWARD_SCALE.get(name, 1.0)
        means[name] = {"mean": float(np.mean(scores)) * scale, "scale": scale, "model": reward.name}
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "results.jsonl", rows)
    summary = {"bench": "rewards", "n_images": len(paths), "metrics": means, "preprocess": "torch", "canonical": False}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


# -- the digits world suite -----------------------------------------------------------------------------------
DIGITS_PROMPTS = 120


def digits_metadata(req: EvalRequest) -> list[dict]:
    """Held-out digits-world prompts in GenEval's schema (``--metadata`` FILE overrides): ``max_prompts`` lines
    (default 120) of the ``test`` split, shared round-robin over the six tasks, deterministic."""
    if req.metadata:
        return geneval_metadata(req)
    from dmdr_cli.digits import world

    n = req.max_prompts or DIGITS_PROMPTS
    lines = world.make_metadata(n, seed=0, split="test")
    req.options_meta = {"metadata_file": f"digits-world held-out split ({n} prompts, seed 0)",
                        "official_metadata": False}
    return lines


def digits_reference(metadata: list[dict], root: Path, req: EvalRequest, size: int) -> Path:
    """Real held-out canvases for digits-FID: oracle renders of the same prompt lines with held-out glyphs
    (``images_per_prompt`` per line), written once per request into ``root`` and reused."""
    from dmdr_cli.digits import world

    stamp = root / "reference.json"
    key = {"n": len(metadata), "k": req.images_per_prompt, "seed": req.seed, "size": size,
           "prompts": [m["prompt"] for m in metadata]}
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return root
    root.mkdir(parents=True, exist_ok=True)
    for i, md in enumerate(metadata):
        for j in range(req.images_per_prompt):
            img, _ = world.render(md, seed=req.seed + 1000 * i + j, size=size, split="test")
            img.save(root / f"{i:05d}-{j}.png")
    atomic_write_text(stamp, json.dumps(key))
    return root


def score_digits(root: Path, out: Path, req: EvalRequest, detector, reward, ref: Path,
                 progress: Progress | None) -> dict:
    """GenEval-digits (rule engine + ``digits`` detector), digits-FID against ``ref`` and the mean ``digit-cls``
    reward of every image of a GenEval-layout folder."""
    import numpy as np
    import torch
    from PIL import Image

    from dmdr_cli.evaluation.fidelity import compute_fidelity
    from dmdr_cli.evaluation.geneval import iter_image_folder

    ge = score_geneval(root, out, req, detector, progress)
    fid = compute_fidelity(root, ref, metrics=("fid",), feature_extractor="dmdr-digits-cnn",
                           device=_device(req.device), samples_find_deep=True)
    scores = []
    for _idx, md, paths in iter_image_folder(root):
        x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
                                       for p in paths])).permute(0, 3, 1, 2)
        with torch.no_grad():
            scores += [float(v) for v in reward(x, [md["prompt"]] * len(paths))]
    summary = {"bench": "digits", "geneval": ge, "fid": fid["fid"], "fid_n": [fid["n1"], fid["n2"]],
               "reward": float(np.mean(scores)), "reward_model": reward.name, "n_images": len(scores),
               "canonical": False}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


# -- the workflow ----------------------------------------------------------------------------------------------
def run(cfg, req: EvalRequest, generators: dict, progress_factory: Callable[[str, int], object]) -> dict:
    """Evaluate every generator (``{"student": g, "teacher": g}``) or just ``req.images``; returns eval.json's dict."""
    from dmdr_cli.evaluation import report
    from dmdr_cli.evaluation.timing import interleaved_seconds

    out = req.out_dir
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    samples: dict = {}
    if req.bench == "geneval":
        from dmdr_cli.evaluation.detectors import build_detector

        detector = build_detector(req.detector, path=req.detector_path, clip_path=req.clip_path)
        if req.images is not None:
            with progress_factory("scoring", 0) as up:
                results["images"] = score_geneval(req.images, out / "images", req, detector, up)
        else:
            metadata = geneval_metadata(req)
            for name, gen in generators.items():
                root = out / name / "images"
                with progress_factory(f"generating ({name})", len(metadata)) as up:
                    generate_geneval(gen, metadata, root, req, up)
                with progress_factory(f"scoring ({name})", len(metadata)) as up:
                    results[name] = score_geneval(root, out / name, req, detector, up)
                _add_samples(samples, name, root, metadata, 8)
    elif req.bench == "rewards":
        from dmdr_cli.rewards.registry import build_reward

        if not req.rewards:
            raise InputError("--bench rewards needs at least one --reward NAME[=PATH]", "e.g. --reward clip=/models/clip-vit-large-patch14")
        rewards = [(name, build_reward(name, path=path)) for name, path in req.rewards]
        prompts = reward_prompts(req)
        for name, gen in generators.items():
            with progress_factory(f"generating ({name})", len(prompts)) as up:
                paths = generate_flat(gen, prompts, out / name / "images", req, up)
            results[name] = score_rewards(paths, prompts, rewards, out / name)
            samples[name] = paths[:8]
            samples.setdefault("_prompts", prompts[:8])
    elif req.bench in ("fid", "kid"):
        from dmdr_cli.evaluation.fidelity import compute_fidelity

        if not req.ref:
            raise InputError(f"--bench {req.bench} needs --ref DIR|STATS.npz", "a folder of reference images or precomputed statistics")
        if req.feature_extractor == "dmdr-digits-cnn":
            from dmdr_cli.digits import register_all

            register_all()
        if req.feature_extractor.startswith("inception"):
            from dmdr_cli.evaluation.fidelity import resolve_inception_weights

            resolve_inception_weights(req.inception_weights)  # fail before spending time on generation
        metrics = ("fid",) if req.bench == "fid" else ("kid",)
        metrics = tuple(dict.fromkeys(metrics + tuple(req.fid_metrics)))
        targets = {"images": req.images} if req.images is not None else {}
        prompts = reward_prompts(req) if req.images is None else []
        for name, gen in generators.items():
            with progress_factory(f"generating ({name})", len(prompts)) as up:
                paths = generate_flat(gen, prompts, out / name / "images", req, up)
            targets[name] = out / name / "images"
            samples[name] = paths[:8]
            samples.setdefault("_prompts", prompts[:8])
        for name, folder in targets.items():
            res = compute_fidelity(folder, req.ref, metrics=metrics, feature_extractor=req.feature_extractor,
                                   weights_path=req.inception_weights, device=_device(req.device))
            res["bench"] = req.bench
            (out / name).mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / name / "summary.json", json.dumps(res, indent=2, default=str))
            results[name] = res
    elif req.bench == "digits":
        from dmdr_cli.digits import register_all
        from dmdr_cli.evaluation.detectors import build_detector
        from dmdr_cli.rewards.registry import build_reward

        register_all()
        detector = build_detector("digits")
        reward = build_reward("digit-cls")
        metadata = digits_metadata(req)
        size = cfg.model.resolution if cfg is not None else 32
        with progress_factory("rendering reference canvases", 0) as up:
            ref = digits_reference(metadata, out / "reference", req, size)
        if req.images is not None:
            with progress_factory("scoring", 0) as up:
                results["images"] = score_digits(req.images, out / "images", req, detector, reward, ref, up)
        for name, gen in generators.items():
            root = out / name / "images"
            with progress_factory(f"generating ({name})", len(metadata)) as up:
                generate_geneval(gen, metadata, root, req, up)
            with progress_factory(f"scoring ({name})", len(metadata)) as up:
                results[name] = score_digits(root, out / name, req, detector, reward, ref, up)
            _add_samples(samples, name, root, metadata, 12)
    elif req.bench == "dpg":
        results, samples = _run_dpg(req, generators, progress_factory)
    else:
        raise InputError(f"unknown bench '{req.bench}'", "choose geneval, rewards, fid, kid, dpg or digits")
    timing = {name: {"seconds_per_image": g.seconds_per_image, **g.describe()} for name, g in generators.items()}
    inter = interleaved_seconds(generators, req.timing_rounds)
    if inter is not None:
        for name, t in timing.items():
            t["seconds_per_image_generation"] = t["seconds_per_image"]
            t["seconds_per_image"] = inter["seconds_per_image"][name]
        how = {"mode": "interleaved", "rounds": inter["rounds"], "images": inter["images"], "samples": inter["samples"]}
    else:
        how = {"mode": "generation", "images": req.batch_size}
    data = {"bench": req.bench, "results": results, "models": timing, "timing": how, "config": _config_dict(cfg),
            "versions": _versions(), "request": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(req).items()
                                                 if k != "rewards"} | {"rewards": [n for n, _ in req.rewards]}}
    if "teacher" in timing:
        data["speedups"] = {name: timing["teacher"]["seconds_per_image"] / t["seconds_per_image"]
                            for name, t in timing.items() if name != "teacher"}
        if "student" in data["speedups"]:
            data["speedup"] = data["speedups"]["student"]
    atomic_write_text(out / "eval.json", json.dumps(data, indent=2, default=str))
    report.write(out, data, samples)
    return data


def _run_dpg(req: EvalRequest, generators: dict, progress_factory):
    from dmdr_cli.engine.images import save_png, to_pil
    from dmdr_cli.evaluation import dpg
    from dmdr_cli.evaluation.benchfiles import bench_file_spec, load_prompt_list, resolve_bench_file, sha256_file

    questions = dpg.load_questions(req.questions)
    vqa = dpg.build_vqa(req.vqa, req.vqa_path)
    targets = {"images": req.images} if req.images is not None else {}
    prompt_file = resolve_bench_file("dpg_bench", "prompts.jsonl", req.prompts, verify=req.prompts is None)
    official = sha256_file(prompt_file) == bench_file_spec("dpg_bench", "prompts.jsonl").sha256 and not req.max_prompts
    prompts = _limit(load_prompt_list(prompt_file), req.max_prompts)
    samples: dict = {}
    for name, gen in generators.items():
        root = req.out_dir / name / "images"
        with progress_factory(f"generating ({name})", len(prompts)) as up:
            for i, p in enumerate(prompts):
                imgs = gen([p.prompt] * 4, [req.seed + j for j in range(4)])
                save_png(dpg.tile_2x2([to_pil(x) for x in imgs]), root / f"{p.id}.png")
                up(i + 1, len(prompts))
        targets[name] = root
        samples[name] = [root / f"{p.id}.png" for p in prompts[:8]]
        samples.setdefault("_prompts", [p.prompt for p in prompts[:8]])
    results = {}
    for name, root in targets.items():
        res = dpg.score_folder(root, questions, vqa, req.tile_resolution, compat=not req.dpg_fix,
                               allow_missing=req.allow_missing)
        rows = res.pop("rows", [])
        out = req.out_dir / name
        out.mkdir(parents=True, exist_ok=True)
        _write_jsonl(out / "results.jsonl", rows)
        res.update({"bench": "dpg", "vqa_backend": vqa.label, "csv_sha256": sha256_file(req.questions),
                    "prompts_file": str(prompt_file), "official_prompts": official,
                    "canonical": bool(vqa.canonical and not req.dpg_fix and official)})
        atomic_write_text(out / "summary.json", json.dumps(res, indent=2, default=str))
        results[name] = res
    return results, samples


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _config_dict(cfg) -> dict:
    from dmdr_cli.config.loader import to_dict

    return to_dict(cfg) if cfg is not None else {}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("dmdr", "torch", "diffusers", "transformers", "peft", "torch-fidelity"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def spread_by_tag(metadata: list[dict], k: int) -> list[int]:
    """Indices of up to ``k`` prompts taken round-robin over the GenEval tags (in order of first appearance), so a
    report's sample grid shows every task instead of the first few prompts of one."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(metadata):
        groups.setdefault(str(m.get("tag", "")), []).append(i)
    picked: list[int] = []
    for rank in range(max((len(g) for g in groups.values()), default=0)):
        picked += [g[rank] for g in groups.values() if rank < len(g)]
    return sorted(picked[:k])


def _add_samples(samples: dict, name: str, root: Path, metadata: list[dict], k: int) -> None:
    """Image 0 of prompts spread over the tags, for the side-by-side grid (same rows for every model)."""
    idx = spread_by_tag(metadata, k)
    samples[name] = [root / f"{i:05d}" / "samples" / "0000.png" for i in idx]
    samples.setdefault("_prompts", [metadata[i]["prompt"] for i in idx])
