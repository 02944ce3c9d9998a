"""The ``dmdr`` command line, in-process through Typer's CliRunner (plus subprocesses for import hygiene and
start-up time). Errors must be one line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from dmdr_cli.app import app
from dmdr_cli.config.loader import from_dict, resolve
from dmdr_cli.config.schema import DmdrConfig

REPO = Path(__file__).resolve().parents[2]
PRESETS = ("sd3-medium", "sd3.5-large", "sd3.5-medium", "sdxl-base", "tiny-sd3-random", "tiny-sdxl")
HUB_SD3M = "stabilityai/stable-diffusion-3-medium-diffusers"
# Wide terminal so Rich never folds a table cell or an error line in the captured output.
runner = CliRunner(env={"COLUMNS": "240"})


def dmdr(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a real crash: show it
    return result


def assert_user_error(result, *needles: str) -> None:
    """Exit code 2, one error line, no traceback, and the given texts in it."""
    assert result.exit_code == 2, result.output
    out = result.output
    assert "Traceback" not in out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    for needle in needles:
        assert needle in out, (needle, out)


def metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point huggingface_hub at an empty cache (it reads HF_HUB_CACHE into constants at import)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def clean_accelerate(monkeypatch):
    """`dmdr distill` builds an Accelerator (a process-wide singleton) before it loads the model: undo it."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # restored afterwards (the recipe setdefault()s it)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# -- (a) start-up ---------------------------------------------------------------------------------------


def _run_py(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "COLUMNS": "240", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return proc, time.perf_counter() - start


def test_import_app_does_not_import_torch():
    proc, _ = _run_py("-c", "import sys, dmdr_cli.app; "
                            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules]; "
                            "assert not heavy, heavy")
    assert proc.returncode == 0, proc.stderr


def test_help_is_fast_and_lists_every_command():
    # Budget: 2 s wall for `python -m dmdr_cli --help` (~0.6 s on an idle 2-core box). The test machine can be
    # shared with other jobs, so the best of two runs is taken; a torch import alone would take > 5 s.
    proc, seconds = _run_py("-m", "dmdr_cli", "--help")
    if seconds >= 2.0:
        proc, seconds = min((_run_py("-m", "dmdr_cli", "--help"), (proc, seconds)), key=lambda r: r[1])
    assert proc.returncode == 0, proc.stderr
    for command in ("distill", "finetune-rl", "sample", "eval", "export", "presets"):
        assert command in proc.stdout, command
    assert seconds < 2.0, f"dmdr --help took {seconds:.2f} s"


def test_help_and_version_in_process():
    from dmdr_cli import __version__

    result = dmdr("--help")
    assert result.exit_code == 0
    for command in ("distill", "finetune-rl", "sample", "eval", "export", "presets"):
        assert command in result.output
    assert dmdr("--version").output.strip() == f"dmdr {__version__}"


# -- (b) presets ------------------------------------------------------------------------------------------


def test_presets_list_shows_all_six():
    result = dmdr("presets", "list")
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert name in result.output
    assert HUB_SD3M in result.output


def test_presets_show_resolved_has_every_section():
    result = dmdr("presets", "show", "tiny-sd3-random", "--resolved")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    sections = [f for f in DmdrConfig.__dataclass_fields__]
    assert list(shown) == sections
    for section in ("model", "teacher", "student", "lora", "runtime", "distill", "finetune_rl", "sample", "eval", "export"):
        assert f"{section}:" in result.stdout
    assert from_dict(shown) == resolve("tiny-sd3-random")


def test_presets_show_deltas_is_the_preset_file():
    result = dmdr("presets", "show", "sdxl-base")
    assert result.exit_code == 0
    assert result.stdout == (REPO / "presets" / "sdxl-base.yaml").read_text()


def test_presets_show_unknown_name():
    assert_user_error(dmdr("presets", "show", "sdxl-bas"), "unknown preset 'sdxl-bas'", "Did you mean 'sdxl-base'?")


def test_presets_copy_then_validate(tmp_path):
    dest = tmp_path / "mine.yaml"
    result = dmdr("presets", "copy", "sd3-medium", dest)
    assert result.exit_code == 0, result.output
    assert dest.read_text() == (REPO / "presets" / "sd3-medium.yaml").read_text()
    result = dmdr("presets", "validate", dest)
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    assert_user_error(dmdr("presets", "copy", "sd3-medium", dest), "already exists", "--force")
    assert dmdr("presets", "copy", "tiny-sdxl", dest, "--force").exit_code == 0
    assert dest.read_text() == (REPO / "presets" / "tiny-sdxl.yaml").read_text()


def test_presets_validate_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  lr: 1.0e-6\n  max_step: 10\n")
    assert_user_error(dmdr("presets", "validate", bad), "distill.max_step", "Did you mean 'distill.max_steps'?")


def test_presets_validate_wrong_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  steps: four\n")
    assert_user_error(dmdr("presets", "validate", bad), "student.steps must be of type int")


# -- (c) sample ----------------------------------------------------------------------------------------------


def test_sample_few_step_writes_everything_and_is_reproducible(tmp_path, tiny_sd3_dir):
    args = ["sample", "a red circle", "--base", "tiny-sd3-random", "--steps", "4", "--n", "2", "--grid"]
    out = tmp_path / "a"
    result = dmdr(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "config.yaml", "grid.png", "metadata.jsonl"]
    for name in ("00000.png", "00001.png"):
        with Image.open(out / name) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    with Image.open(out / "grid.png") as im:
        assert im.size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # 2 images side by side, 2 px padding
    records = metadata(out)
    assert [(r["file"], r["prompt"], r["seed"]) for r in records] == [("00000.png", "a red circle", 0),
                                                                      ("00001.png", "a red circle", 1)]
    for r in records:
        assert r["steps"] == 4 and r["guidance"] == 1.0 and r["model"] == "tiny-sd3" and r["family"] == "sd3"
        assert r["mode"] == "ode" and r["grid"] == pytest.approx([1.0, 0.90012, 0.750375, 0.500999], abs=1e-6)
    assert from_dict(yaml.safe_load((out / "config.yaml").read_text())) == resolve("tiny-sd3-random")
    assert (out / "00000.png").read_bytes() != (out / "00001.png").read_bytes()  # seeds 0 and 1 differ

    out2 = tmp_path / "b"
    assert dmdr(*args, "--out", out2).exit_code == 0
    for name in ("00000.png", "00001.png", "grid.png"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes(), name


def test_sample_teacher_tiny_sdxl(tmp_path, tiny_sdxl_dir):
    out = tmp_path / "t"
    result = dmdr("sample", "a blue square", "--base", "tiny-sdxl", "--set", "teacher.steps=3", "--seed", "5", "--out", out)
    assert result.exit_code == 0, result.output
    (r,) = metadata(out)
    assert (r["sampler"], r["steps"], r["guidance"], r["seed"], r["family"]) == ("teacher", 3, 4.0, 5, "sdxl")
    assert r["grid"] == [0.999, 0.666, 0.332]
    assert from_dict(yaml.safe_load((out / "config.yaml").read_text())).teacher.steps == 3


def test_sample_prompts_jsonl(tmp_path, tiny_sd3_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a green triangle", "id": 7}\n')
    out = tmp_path / "j"
    result = dmdr("sample", "--prompts", prompts, "--base", "tiny-sd3-random", "--set", "teacher.steps=2", "--out", out)
    assert result.exit_code == 0, result.output
    records = metadata(out)
    assert [(r["file"], r["prompt"], r["seed"], r["steps"]) for r in records] == [
        ("00000.png", "a red circle", 0, 2), ("00001.png", "a green triangle", 0, 2)]
    assert all(r["sampler"] == "teacher" and r["guidance"] == 4.0 for r in records)


def test_sample_empty_prompt_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_user_error(dmdr("sample", "--prompts", empty, "--out", tmp_path / "o"), "has no prompts")
    assert not (tmp_path / "o").exists()


def test_sample_bad_counts(tmp_path):
    assert_user_error(dmdr("sample", "x", "--steps", "0", "--out", tmp_path / "o"), "--steps must be >= 1")
    assert_user_error(dmdr("sample", "x", "--n", "0", "--out", tmp_path / "o"), "--n must be >= 1")
    assert_user_error(dmdr("sample", "x", "--n", "-1", "--grid", "--out", tmp_path / "o"), "--n must be >= 1")
    assert_user_error(dmdr("sample", "--out", tmp_path / "o"), "no prompt given")
    assert_user_error(dmdr("sample", "  ", "--out", tmp_path / "o"), "empty prompt")
    assert not (tmp_path / "o").exists()


def test_sample_ckpt_diffusers_folder(tmp_path, tiny_sd3_dir):
    out = tmp_path / "c"
    result = dmdr("sample", "a red circle", "--ckpt", tiny_sd3_dir, "--steps", "4", "--out", out)
    assert result.exit_code == 0, result.output
    (r,) = metadata(out)
    assert r["model"] == str(Path(tiny_sd3_dir).resolve()) and r["family"] == "sd3" and r["steps"] == 4
    saved = from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert saved.model.path == str(Path(tiny_sd3_dir).resolve()) and saved.model.tiny == ""


def test_sample_ckpt_missing(tmp_path):
    missing = tmp_path / "nope"
    assert_user_error(dmdr("sample", "x", "--ckpt", missing, "--out", tmp_path / "o"), str(missing), "does not exist")
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    assert_user_error(dmdr("sample", "x", "--ckpt", folder, "--out", tmp_path / "o"), "model_index.json")


# -- (d) errors ---------------------------------------------------------------------------------------------


def test_distill_missing_base_model_names_hub_id(tmp_path, empty_hf_cache, clean_accelerate):
    result = dmdr("distill", "--base", "sd3-medium", "--out", tmp_path / "run")
    assert_user_error(result, HUB_SD3M, "model.path", str(empty_hf_cache))
    assert list(empty_hf_cache.iterdir()) == []


def test_sample_missing_hub_model(tmp_path, empty_hf_cache):
    result = dmdr("sample", "x", "--base", "sdxl-base", "--set", "teacher.steps=1", "--out", tmp_path / "o")
    assert_user_error(result, "stabilityai/stable-diffusion-xl-base-1.0", "model.path")


def test_distill_wrong_type():
    assert_user_error(dmdr("distill", "--base", "tiny-sd3-random", "--set", "distill.lr=abc"), "distill.lr", "float")


def test_unknown_set_key_and_bad_list():
    assert_user_error(dmdr("distill", "--set", "distill.lrr=1"), "unknown key 'distill.lrr'", "Did you mean 'distill.lr'?")
    assert_user_error(dmdr("distill", "--set", "student.grid=[1,2"), "student.grid")
    assert_user_error(dmdr("distill", "--set", "student.simulation=foo"), "student.simulation must be one of")


def test_sample_misspelt_preset(tmp_path):
    assert_user_error(dmdr("sample", "--base", "sd3-medum", "x", "--out", tmp_path / "o"), "Did you mean 'sd3-medium'")


def test_missing_config_file(tmp_path):
    assert_user_error(dmdr("sample", "x", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "o"),
                      "config file not found")
