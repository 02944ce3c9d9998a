"""``dmdr export`` end to end on tiny runs: every format of tiny-sd3-random and tiny-sdxl is written through the CLI and
loaded back with stock diffusers (strict state-dict loading, ``DiffusionPipeline.from_pretrained``,
``load_lora_weights``, diffusers' kohya converter), independently of the export's own verification; plus the
refusals (exit 2, one line, nothing written) and the checks that must catch a broken merge or a corrupt file.

One 1-step run per family is made once for the module (in-process distill recipe); its ``gen`` LoRA B matrices
are then replaced by fixed-seed Gaussians (scale 0.05) so that the student clearly differs from its base.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dmdr_cli.app import app

SD3_SIGMAS = [1.0, 0.75025, 0.5005, 0.25075]     # ALGORITHM.md 5.3: the unshifted 4-step grid of shift 3
PROMPTS = ["a red circle on a white background", "two blue squares"]
SEEDS = [0, 1]
PRESET = {"sd3": "tiny-sd3-random", "sdxl": "tiny-sdxl"}  # random tiny models with every text encoder


def dmdr(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def fails_cleanly(result, *needles: str) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if "error:" in line]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_leftovers(folder: Path) -> None:
    """No temp files or folders of an interrupted/failed export."""
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], list(folder.iterdir())


def header(path: Path) -> dict:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n))


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _perturb(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    for ckpt in sorted((run / "checkpoints").iterdir()):
        path = ckpt / "gen.safetensors"
        sd = load_file(str(path))
        gen = torch.Generator().manual_seed(0)
        for key in sorted(sd):
            if ".lora_B." in key:
                sd[key] = torch.randn(sd[key].shape, generator=gen) * 0.05
        save_file(sd, str(path), metadata={"format": "dmdr", "group": "gen"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sd3_dir, tiny_sdxl_dir):
    """{family: run dir}: 1-step distill runs (CPU, batch 1), B matrices perturbed deterministically."""
    from accelerate.state import AcceleratorState, GradientState

    from dmdr_cli.config.loader import resolve
    from dmdr_cli.recipes import distill

    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_CPU", "true")
        for family in ("sd3", "sdxl"):
            cfg = resolve(PRESET[family], [], ["runtime.device=cpu", "distill.max_steps=1", "distill.checkpoint_every=1",
                                                  "distill.batch_size=1", "distill.ttur=1"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                distill.run(cfg, root / family)
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            _perturb(root / family)
            out[family] = root / family
    return out


@pytest.fixture(scope="module")
def students(runs):
    """Per family: the student's samples (dmdr's sampler) and, per LoRA layer, (base weight, scaling * B @ A) read
    straight from the PEFT modules (independent of dmdr_cli.export)."""
    from peft.tuners.lora import LoraLayer

    from dmdr_cli.config.loader import resolve_run
    from dmdr_cli.engine.checkpoint import latest
    from dmdr_cli.engine.sampler import generate, student_spec
    from dmdr_cli.engine.student import load_student

    out = {}
    for family, run in runs.items():
        cfg = resolve_run(run, [], ["runtime.device=cpu"])
        bundle, roles, _ = load_student(cfg, latest(run))
        spec = student_spec(bundle.family, cfg.student)
        layers = {}
        with torch.no_grad(), roles.role("gen") as net:
            images = generate(bundle, net, spec, PROMPTS, SEEDS, cfg.model.resolution)
            for name, m in net.named_modules():
                if isinstance(m, LoraLayer):
                    a, b = m.lora_A["gen"].weight.double(), m.lora_B["gen"].weight.double()
                    delta = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:]) * m.scaling["gen"]
                    layers[name] = (m.base_layer.weight.detach().float().clone(), delta.float())
        out[family] = {"cfg": cfg, "spec": spec, "images": images.float(), "layers": layers, "family": bundle.family}
    return out


def _dmdr_sample(students, family, pipe) -> torch.Tensor:
    """dmdr's own sampler on the networks of a stock-loaded pipeline."""
    from dmdr_cli.engine.sampler import generate
    from dmdr_cli.families.base import Bundle

    st = students[family]
    fam = st["family"]
    bundle = Bundle(fam, pipe, "export", "", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return generate(bundle, fam.network_of(pipe), st["spec"], PROMPTS, SEEDS, st["cfg"].model.resolution).float()


def _stock_call(pipe, family: str) -> torch.Tensor:
    kwargs = ({"sigmas": SD3_SIGMAS, "max_sequence_length": 128} if family == "sd3" else {"timesteps": [399]})
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.no_grad():
        return pipe(PROMPTS, guidance_scale=0.0, height=64, width=64, generator=gens, output_type="pt", **kwargs).images


def _base_pipeline(family: str):
    from diffusers import DiffusionPipeline

    from dmdr_cli.families.tiny import ensure_tiny

    pipe = DiffusionPipeline.from_pretrained(str(ensure_tiny(family)), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_merged(sd: dict, students, family: str, dtype: torch.dtype) -> None:
    """Every LoRA-targeted weight of ``sd`` = base + scaling * B @ A (fp32: rel. error < 1e-3; fp16: up to its rounding)."""
    layers = students[family]["layers"]
    assert layers
    for name, (base, delta) in layers.items():
        w = sd[f"{name}.weight"]
        assert w.dtype == dtype, name
        if dtype == torch.float32:
            rel = float((w - base - delta).norm() / delta.norm())
            assert rel < 1e-3, (name, rel)
        else:
            want = base + delta
            assert torch.allclose(w.float(), want, rtol=2e-3, atol=1e-6), name
            assert not torch.equal(w, base.to(dtype)), name   # the adapter is really in there


# -- round trips ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,dtype", [("sd3", "fp16"), ("sdxl", "fp32")])
def test_safetensors_loads_strictly_into_a_stock_network(runs, students, tmp_path, family, dtype):
    import diffusers
    from safetensors.torch import load_file

    from dmdr_cli.config.loader import config_hash, resolve_run
    from dmdr_cli.families.tiny import ensure_tiny

    r = dmdr("export", "--ckpt", runs[family], "--format", "safetensors", "--dtype", dtype, "--out", tmp_path / "student")
    ok(r)
    path = tmp_path / "student.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.README.md", "student.safetensors"]
    meta = header(path)["__metadata__"]
    assert meta["family"] == family and meta["base_model"] == f"tiny-{family}" and meta["steps"] == str(students[family]["spec"].steps)
    assert json.loads(meta["grid"]) == pytest.approx(list(students[family]["spec"].grid))
    assert meta["config_hash"] == config_hash(resolve_run(runs[family])) and meta["dmdr_version"]
    assert {"shift", "x0_end"} <= set(meta) if family == "sd3" else meta["timesteps"] == "[399]"
    sd = load_file(str(path))
    assert not [k for k in sd if "lora" in k or "base_layer" in k]
    cls = getattr(diffusers, {"sd3": "SD3Transformer2DModel", "sdxl": "UNet2DConditionModel"}[family])
    net = cls.from_config(cls.load_config(str(ensure_tiny(family)), subfolder={"sd3": "transformer", "sdxl": "unet"}[family]))
    assert set(sd) == set(net.state_dict())
    net.load_state_dict(sd, strict=True)
    _assert_merged(sd, students, family, {"fp16": torch.float16, "fp32": torch.float32}[dtype])
    card = (tmp_path / "student.README.md").read_text()
    assert "strict=True" in card and "## Verification" in card and "DMDR" in card


@pytest.mark.parametrize("family,dtype", [("sd3", "fp32"), ("sdxl", "fp16")])
def test_diffusers_folder_runs_the_student_grid_in_a_stock_pipeline(runs, students, tmp_path, family, dtype):
    from diffusers import DiffusionPipeline

    from dmdr_cli.config.presets import detect_family

    out = tmp_path / "pipe"
    ok(dmdr("export", "--ckpt", runs[family], "--format", "diffusers", "--dtype", dtype, "--out", out))
    assert detect_family(out) == family
    assert {"README.md", "dmdr_export.json", "model_index.json", "scheduler", "vae", "text_encoder"} <= {p.name for p in out.iterdir()}
    pipe = DiffusionPipeline.from_pretrained(str(out), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    card = (out / "README.md").read_text()
    st = students[family]
    if family == "sd3":
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.shift == 3.0
        assert "sigmas=[1.0, 0.75025, 0.5005, 0.25075]" in card and "max_sequence_length=128" in card
        # dmdr's sampler on the reloaded fp32 pipeline is the student
        assert float((_dmdr_sample(students, family, pipe) - st["images"]).abs().max()) < 1e-3
        # the stock call runs the training grid; it differs from dmdr's sampler only by diffusers' conventions
        # (network time 1000*sigma unrounded, last step to 0 instead of x0_end): a few 1e-3 on this model
        stock = _stock_call(pipe, family)
        assert pipe.scheduler.sigmas[:4].tolist() == pytest.approx(list(st["spec"].grid), abs=1e-5)
        assert float((stock - st["images"]).abs().max()) < 1e-2
        _assert_merged(pipe.transformer.state_dict(), students, family, torch.float32)
    else:
        assert type(pipe.scheduler).__name__ == "LCMScheduler"
        assert "timesteps=[399]" in card
        stock = _stock_call(pipe, family)
        assert pipe.scheduler.timesteps.tolist() == [399]
        assert float((stock - st["images"]).abs().max()) < 2e-2           # fp16 weights, computed in fp32
        # the plain call is wrong (LCM picks 999), which is why the card says timesteps=[399]
        with torch.no_grad():
            plain = pipe(PROMPTS[:1], num_inference_steps=1, guidance_scale=0.0, height=64, width=64,
                         generator=[torch.Generator().manual_seed(0)], output_type="pt").images
        assert float((plain - st["images"][:1]).abs().max()) > 0.1


def test_an_sde_sd3_student_exports_a_stochastic_scheduler(runs, students, tmp_path):
    """An SD3 student that samples with re-noising (student.simulation=sde) gets FlowMatchEulerDiscreteScheduler
    with stochastic_sampling=True (the export's own check compares the stock call with the same loop seeded the same
    way); the stock call then re-noises (from the global RNG: diffusers' SD3 pipeline does not pass generator=)."""
    import yaml
    from diffusers import DiffusionPipeline

    run = tmp_path / "sde-run"
    shutil.copytree(runs["sd3"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["student"]["simulation"] = "sde"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "pipe"
    ok(dmdr("export", "--ckpt", run, "--format", "diffusers", "--dtype", "fp32", "--out", out))
    pipe = DiffusionPipeline.from_pretrained(str(out), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.stochastic_sampling is True
    card = (out / "README.md").read_text()
    assert "stochastic_sampling=True" in card and "re-noising (SDE)" in card
    assert "an SDE student: the pipeline re-noises with draws from the global RNG" in card
    report = json.loads((out / "dmdr_export.json").read_text())
    assert "stock_vs_student_same_conventions" in json.dumps(report) and '"stock_renoises": true' in json.dumps(report)
    runs_ = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs_.append(_stock_call(pipe, "sd3"))
    assert torch.equal(runs_[0], runs_[1])                                 # reproducible with torch.manual_seed
    assert float((runs_[0] - runs_[2]).abs().max()) > 1e-3                 # the re-noising is live
    assert float((runs_[0] - students["sd3"]["images"]).abs().max()) > 2e-2  # not the ODE student's sampler


@pytest.mark.parametrize("family,dtype", [("sd3", "fp32"), ("sdxl", "fp16")])
def test_lora_loads_with_load_lora_weights(runs, students, tmp_path, family, dtype):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    ok(dmdr("export", "--ckpt", runs[family], "--format", "lora", "--dtype", dtype, "--out", out))
    weights = out / "pytorch_lora_weights.safetensors"
    sd = load_file(str(weights))
    prefix = {"sd3": "transformer.", "sdxl": "unet."}[family]
    assert all(k.startswith(prefix) and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")) for k in sd)
    assert len(sd) == 2 * len(students[family]["layers"])
    pipe = _base_pipeline(family)
    pipe.load_lora_weights(str(out))                                       # the folder, as the card says
    tol = 1e-3 if dtype == "fp32" else 2e-2
    assert float((_dmdr_sample(students, family, pipe) - students[family]["images"]).abs().max()) < tol
    if family == "sdxl":                                                   # and the stock call of the card
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        assert float((_stock_call(pipe, family) - students[family]["images"]).abs().max()) < tol


@pytest.mark.parametrize("family,dtype", [("sd3", "fp16"), ("sdxl", "fp32")])
def test_comfyui_keys_round_trip(runs, students, tmp_path, family, dtype):
    from safetensors.torch import load_file

    ok(dmdr("export", "--ckpt", runs[family], "--format", "comfyui", "--dtype", dtype, "--out", tmp_path / "comfy"))
    path = tmp_path / "comfy.safetensors"
    assert (tmp_path / "comfy.README.md").is_file()
    sd = load_file(str(path))
    prefix = {"sd3": "lora_transformer_", "sdxl": "lora_unet_"}[family]
    layers = students[family]["layers"]
    names = {k.split(".", 1)[0] for k in sd}
    assert names == {prefix + m.replace(".", "_") for m in layers}
    assert set(sd) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    if family == "sdxl":          # diffusers' own kohya converter (lora_conversion_utils) reads the file
        pipe = _base_pipeline(family)
        pipe.load_lora_weights(str(path))
        assert float((_dmdr_sample(students, family, pipe) - students[family]["images"]).abs().max()) < 1e-3
    else:                         # ComfyUI's SD3 rule: lora_transformer_ + diffusers key with dots as underscores
        for module, (_, delta) in layers.items():
            name = prefix + module.replace(".", "_")
            up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
            scale = float(sd[f"{name}.alpha"]) / down.shape[0]
            got = (up.flatten(1) @ down.flatten(1)).reshape(delta.shape) * scale
            assert float((got - delta).norm() / delta.norm()) < 2e-3, module   # fp16 factors


# -- failures the verification must catch -------------------------------------------------------------------
def test_a_broken_merge_fails_and_writes_nothing(runs, tmp_path, monkeypatch):
    from dmdr_cli.export import merge

    monkeypatch.setattr(merge, "merged_state_dict", lambda net, adapters: merge.stock_state_dict(net))  # weights left at base
    fails_cleanly(dmdr("export", "--ckpt", runs["sd3"], "--format", "safetensors", "--out", tmp_path / "x.safetensors"),
                  "merge is wrong")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_file_fails_verification_and_writes_nothing(runs, tmp_path, monkeypatch):
    from dmdr_cli.export import formats

    real = formats.save_safetensors

    def corrupt(tensors, path, metadata):
        key = next(k for k in sorted(tensors) if k.endswith("to_q.weight"))
        real({**tensors, key: tensors[key] * 0}, path, metadata)

    monkeypatch.setattr(formats, "save_safetensors", corrupt)
    out = tmp_path / "out"
    out.mkdir()
    fails_cleanly(dmdr("export", "--ckpt", runs["sd3"], "--format", "safetensors", "--dtype", "fp32", "--out", out / "m"),
                  "not the merged weight")
    assert list(out.iterdir()) == []


# -- refusals ------------------------------------------------------------------------------------------------
def test_exists_force_and_no_verify(runs, tmp_path):
    out = tmp_path / "lora"
    ok(dmdr("export", "--ckpt", runs["sdxl"], "--format", "lora", "--out", out, "--no-verify"))
    card = (out / "README.md").read_text()
    assert "--no-verify" in card and "fp32 merge" not in card
    assert json.loads((out / "dmdr_export.json").read_text())["verification"]["reload"] is None
    before = (out / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    fails_cleanly(dmdr("export", "--ckpt", runs["sdxl"], "--format", "lora", "--out", out, "--no-verify"),
                  "already exists", "--force")
    ok(dmdr("export", "--ckpt", runs["sdxl"], "--format", "lora", "--out", out, "--no-verify", "--force", "--dtype", "fp32"))
    assert (out / "pytorch_lora_weights.safetensors").stat().st_mtime_ns != before
    assert json.loads((out / "dmdr_export.json").read_text())["export"]["dtype"] == "fp32"
    no_leftovers(tmp_path)
    # --force never replaces a folder that is not an export, nor a folder where a file goes
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    fails_cleanly(dmdr("export", "--ckpt", runs["sdxl"], "--format", "lora", "--out", tmp_path / "mine", "--force"),
                  "not a dmdr export")
    (tmp_path / "m.safetensors").mkdir()
    fails_cleanly(dmdr("export", "--ckpt", runs["sdxl"], "--format", "comfyui", "--out", tmp_path / "m.safetensors", "--force"),
                  "is a directory")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_unknown_format_and_dtype(runs, tmp_path):
    fails_cleanly(dmdr("export", "--ckpt", runs["sd3"], "--format", "lroa", "--out", tmp_path / "x"),
                  "unknown export format 'lroa'", "Did you mean 'lora'?")
    fails_cleanly(dmdr("export", "--ckpt", runs["sd3"], "--format", "lora", "--dtype", "fp8", "--out", tmp_path / "x"),
                  "unknown export dtype 'fp8'")
    assert list(tmp_path.iterdir()) == []


def test_bad_run_directories(runs, tmp_path):
    fails_cleanly(dmdr("export", "--ckpt", tmp_path / "nope", "--out", tmp_path / "x"), "does not exist")
    (tmp_path / "plain").mkdir()
    fails_cleanly(dmdr("export", "--ckpt", tmp_path / "plain", "--out", tmp_path / "x"), "not a dmdr run directory")
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(runs["sd3"] / "config.yaml", empty / "config.yaml")
    fails_cleanly(dmdr("export", "--ckpt", empty, "--out", tmp_path / "x"), "no finished checkpoint")
    fails_cleanly(dmdr("export", "--ckpt", runs["sd3"], "--step", 7, "--out", tmp_path / "x"), "no checkpoint at step 7")
    fails_cleanly(dmdr("export", "--ckpt", runs["sd3"]), "no output path")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()


def test_not_enough_disk_is_refused_before_loading(runs, tmp_path, monkeypatch):
    import collections

    from dmdr_cli.engine import student

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded when the disk is full")

    monkeypatch.setattr(student, "load_student", no_load)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    fails_cleanly(dmdr("export", "--ckpt", runs["sdxl"], "--format", "diffusers", "--out", tmp_path / "pipe"),
                  "not enough disk space", "needs about")
    assert list(tmp_path.iterdir()) == []


def test_full_generator_has_no_lora(runs, tmp_path):
    import yaml

    run = tmp_path / "full"
    shutil.copytree(runs["sdxl"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["lora"]["full_generator"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    fails_cleanly(dmdr("export", "--ckpt", run, "--format", "comfyui", "--out", tmp_path / "c"),
                  "full-weight generator", "--format safetensors")
