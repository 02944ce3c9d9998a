"""End-to-end training through the CLI (``dmdr distill``, ``dmdr finetune-rl``, ``dmdr sample --ckpt``) on the
tiny models: run-directory layout, exact resume, refusals with exit code 2, divergence, Ctrl-C, stage 2 and a
real two-process ``accelerate launch``.

Runs are in-process (typer's CliRunner) except the distributed one; module fixtures share one 2-step tiny-sd3-random
run and one 2-step tiny-sdxl run, and tests that modify a run work on a copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dmdr_cli.app import app
from dmdr_cli.engine.checkpoint import checkpoint_dirs, load_extras, load_groups, read_state
from dmdr_cli.engine.metrics import read_metrics
from dmdr_cli.engine.regression import PAIRS_FILE

RUN_FILES = {"gen.safetensors", "guide.safetensors", "optimizer.pt", "rng.pt", "state.json"}
VOLATILE = {"time", "time/step_s", "mem/peak_mb"}


def dmdr(*args) -> "object":
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if "error:" in line]


def fails_cleanly(result, *needles: str) -> str:
    """Exit code 2, exactly one error line containing every needle, and no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tensors(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return load_groups(ckpt)


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() == {"gen", "guide"}
    for group in ta:
        assert ta[group].keys() == tb[group].keys() and len(ta[group]) == 30
        for n in ta[group]:
            assert torch.equal(ta[group][n], tb[group][n]), (group, n)


def metrics_by_step(run: Path) -> dict[int, dict]:
    return {int(m["step"]): {k: v for k, v in m.items() if k not in VOLATILE} for m in read_metrics(run / "metrics.jsonl")}


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sd3") / "run"
    ok(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 2, "--out", run))
    return run


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sdxl") / "run"
    ok(dmdr("distill", "--base", "tiny-sdxl", "--max-steps", 2, "--out", run, "--set", "distill.sample_every=0"))
    return run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# -- stage 1 run directory -------------------------------------------------------------------------

def test_distill_writes_a_complete_run_directory(sd3_run):
    run = sd3_run
    assert (run / "config.yaml").is_file()
    assert "tiny: sd3" in (run / "config.yaml").read_text() and "max_steps: 2" in (run / "config.yaml").read_text()
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in ("loss/dmd", "loss/fake", "sched/lambda_r", "sched/beta_a"):
            assert isinstance(m[key], float) and m[key] == m[key], key
        assert m["phase"] == "distill" and m["lr/gen"] == 1e-4 and m["dmd/skipped"] == 0.0
    assert metrics[0]["sched/lambda_r"] == 0.5 and metrics[0]["sched/beta_a"] == 4.0
    assert metrics[1]["sched/lambda_r"] < 0.5 and metrics[1]["sched/beta_a"] < 4.0  # DynaDG/DynaRS anneal with k
    assert [m["time/inner"] for m in metrics] == [6.0, 11.0]  # generator steps at j = 5 and j = 10
    sample = run / "samples" / "step-000000.png"
    assert sample.is_file() and sample.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = checkpoint_dirs(run)
    assert [c.name for c in ckpts] == ["step-000002"]
    assert {p.name for p in ckpts[0].iterdir()} == RUN_FILES
    state = read_state(ckpts[0])
    assert (state["k"], state["j"], state["world"], state["stage"]) == (2, 11, 1, "distill")
    assert state["family"] == "sd3" and state["base"] == "tiny-sd3" and state["mode"] == "ode"
    assert len(state["grid"]) == 4 and state["grid"][0] == 1.0
    assert state["prompt_stream"]["pos"] == 22
    optim, rng = load_extras(ckpts[0])
    assert set(optim) == {"gen", "guide"} and len(rng["train_gen"]) == 1
    # only the temp-free final checkpoint folder remains
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]


def test_exact_resume_is_bit_identical(sd3_run, tmp_path):
    straight = tmp_path / "straight"
    ok(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 4, "--out", straight,
            "--set", "distill.checkpoint_every=2"))
    resumed = copy_run(sd3_run, tmp_path / "resumed")   # the same config stopped after 2 steps
    res = dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 4, "--out", resumed, "--resume",
               "--set", "distill.checkpoint_every=2")
    ok(res)
    assert "resumed from step-000002 (k=2, j=11)" in res.output
    assert [c.name for c in checkpoint_dirs(straight)] == ["step-000002", "step-000004"]
    assert [c.name for c in checkpoint_dirs(resumed)] == ["step-000002", "step-000004"]
    assert_same_tensors(straight / "checkpoints/step-000002", resumed / "checkpoints/step-000002")
    assert_same_tensors(straight / "checkpoints/step-000004", resumed / "checkpoints/step-000004")
    a, b = metrics_by_step(straight), metrics_by_step(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step] == b[step], step
    sa, sb = read_state(straight / "checkpoints/step-000004"), read_state(resumed / "checkpoints/step-000004")
    assert sa["j"] == sb["j"] == 21 and sa["prompt_stream"] == sb["prompt_stream"]
    ra, rb = load_extras(straight / "checkpoints/step-000004")[1], load_extras(resumed / "checkpoints/step-000004")[1]
    assert torch.equal(ra["train_gen"][0], rb["train_gen"][0])


def test_regression_term_resumes_exactly_from_its_cached_pairs(tmp_path):
    """``distill.regression_weight``: the teacher pairs are made once, kept in the run directory and read back by
    ``--resume`` (a damaged cache is made again): both continue bit for bit like the uninterrupted run."""
    sets = ["--set", "distill.regression_weight=1", "--set", "distill.regression_pairs=6",
            "--set", "distill.checkpoint_every=2", "--set", "distill.sample_every=0"]
    base = ("distill", "--base", "tiny-sd3-random")
    straight = tmp_path / "straight"
    res = dmdr(*base, "--max-steps", 4, "--out", straight, *sets)
    ok(res)
    assert "teacher pairs: 6 ODE trajectories (" in res.output
    part = tmp_path / "part"
    ok(dmdr(*base, "--max-steps", 2, "--out", part, *sets))
    damaged = copy_run(part, tmp_path / "damaged")
    (damaged / PAIRS_FILE).write_bytes(b"not a safetensors file")
    res = dmdr(*base, "--max-steps", 4, "--out", part, "--resume", *sets)
    ok(res)
    assert f"teacher pairs: 6 ODE trajectories read from {PAIRS_FILE}" in res.output
    res_damaged = dmdr(*base, "--max-steps", 4, "--out", damaged, "--resume", *sets)
    ok(res_damaged)
    assert "made in" in res_damaged.output
    a = metrics_by_step(straight)
    assert all(a[s]["loss/reg"] > 0 for s in (1, 2, 3, 4))
    for run in (part, damaged):
        assert_same_tensors(straight / "checkpoints/step-000004", run / "checkpoints/step-000004")
        b = metrics_by_step(run)
        for step in (3, 4):
            assert a[step] == b[step], (run.name, step)


def test_run_directory_refusals(sd3_run, tmp_path):
    before = (sd3_run / "metrics.jsonl").read_text()
    fails_cleanly(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 2, "--out", sd3_run),
                  "already holds a run", "--resume")
    assert (sd3_run / "metrics.jsonl").read_text() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_cleanly(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 2, "--out", empty, "--resume"),
                  "no checkpoint to resume from")
    fails_cleanly(dmdr("distill", "--base", "tiny-sd3-random", "--out", tmp_path / "missing", "--resume"),
                  "no checkpoint to resume from")
    fails_cleanly(dmdr("finetune-rl", "--from", tmp_path / "nothing", "--rl", "none", "--out", tmp_path / "x"),
                  "not a dmdr run directory")


def test_checkpoint_every_zero_saves_only_at_the_end(tmp_path):
    run = tmp_path / "run"
    ok(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 1, "--out", run,
            "--set", "distill.checkpoint_every=0", "--set", "distill.sample_every=0"))
    assert [c.name for c in checkpoint_dirs(run)] == ["step-000001"]
    assert not (run / "samples").exists()


# -- broken and foreign checkpoints ------------------------------------------------------------------

def test_corrupt_checkpoint_is_one_clean_error(sd3_run, tmp_path):
    run = copy_run(sd3_run, tmp_path / "run")
    gen = run / "checkpoints/step-000002/gen.safetensors"
    gen.write_bytes(gen.read_bytes()[:100])
    line = fails_cleanly(dmdr("sample", "a red circle", "--ckpt", run, "--out", tmp_path / "s"), "gen.safetensors", "corrupt")
    assert str(gen) in line
    assert not (tmp_path / "s" / "00000.png").exists()
    fails_cleanly(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 4, "--out", run, "--resume"),
                  "gen.safetensors", "corrupt")
    fails_cleanly(dmdr("finetune-rl", "--from", run, "--rl", "none", "--out", tmp_path / "rl"), "gen.safetensors")
    assert [c.name for c in checkpoint_dirs(run)] == ["step-000002"]  # nothing was overwritten

    (run / "checkpoints/step-000002/state.json").write_text("{not json")
    fails_cleanly(dmdr("sample", "a red circle", "--ckpt", run, "--out", tmp_path / "s2"), "state.json", "not valid JSON")
    (run / "checkpoints/step-000002/state.json").unlink()
    fails_cleanly(dmdr("distill", "--base", "tiny-sd3-random", "--out", run, "--resume"), "no state.json")

    opt = copy_run(sd3_run, tmp_path / "opt")
    (opt / "checkpoints/step-000002/optimizer.pt").write_bytes(b"garbage")
    fails_cleanly(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 4, "--out", opt, "--resume"),
                  "optimizer/rng state", "corrupt")


def test_foreign_family_checkpoint_is_refused(sd3_run, sdxl_run, tmp_path):
    run = copy_run(sd3_run, tmp_path / "run")
    shutil.copytree(sdxl_run / "checkpoints/step-000002", run / "checkpoints/step-000099")
    fails_cleanly(dmdr("finetune-rl", "--from", run, "--rl", "none", "--max-steps", 1, "--out", tmp_path / "rl"),
                  "trained with family 'sdxl'", "'sd3'")
    assert checkpoint_dirs(tmp_path / "rl") == []
    fails_cleanly(dmdr("sample", "a red circle", "--ckpt", run, "--out", tmp_path / "s"), "trained with family")
    fails_cleanly(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 200, "--out", run, "--resume"),
                  "trained with family")
    # an adapter layout that does not match (other LoRA rank) is refused the same way
    fails_cleanly(dmdr("sample", "a red circle", "--ckpt", run, "--step", 2, "--out", tmp_path / "s3",
                       "--set", "lora.gen_rank=4"), "trained with lora")


# -- divergence and interruption -----------------------------------------------------------------------

def test_nan_stops_with_exit_2_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 3, "--out", run, "--set", "distill.lr=1e30",
                   "--set", "distill.checkpoint_every=1", "--set", "distill.sample_every=0")
    line = fails_cleanly(res, "generator step 1", "checkpoints/step-000001")
    # the message is built without a torch warning (which would print source lines around the error line)
    assert not [w for w in caught if "requires_grad" in str(w.message)]
    assert "became nan" in line or "became inf" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]  # no half-written folder
    ckpt = run / "checkpoints/step-000001"
    assert {p.name for p in ckpt.iterdir()} == RUN_FILES
    state = read_state(ckpt)
    assert state["k"] == 1 and state["j"] == 6
    groups = load_groups(ckpt)
    assert all(torch.isfinite(t).all() for g in groups.values() for t in g.values())
    load_extras(ckpt)
    from dmdr_cli.config.loader import resolve_run
    from dmdr_cli.engine.student import load_student

    _, roles, st = load_student(resolve_run(run), ckpt)  # loads into a fresh model without complaint
    assert st["k"] == 1
    assert all(torch.equal(p.detach(), groups["gen"][n]) for n, p in roles.gen_parameters().items())
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1]


def _distill_interrupted_at_8th_inner_step(monkeypatch, out: Path, max_steps: int, action) -> tuple:
    """``distill`` on tiny-sd3-random with ``action(trainer)`` run before the 8th inner step (j = 7, inside the
    simulation group j = 6..10, two inner steps after the first generator update); returns (result, calls)."""
    from dmdr_cli.engine.trainer import Trainer

    original = Trainer.inner_step
    calls = {"n": 0}

    def patched(self):
        calls["n"] += 1
        if calls["n"] == 8:
            action(self)
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "inner_step", patched)
        res = dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", max_steps, "--out", out)
    return res, calls["n"]


def test_ctrl_c_writes_a_checkpoint_and_resumes_exactly(sd3_run, tmp_path, monkeypatch):
    def stop_at_once(trainer):  # a second Ctrl-C
        raise KeyboardInterrupt

    run = tmp_path / "run"
    res, _ = _distill_interrupted_at_8th_inner_step(monkeypatch, run, 2, stop_at_once)
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.output and "Traceback" not in res.output
    assert [c.name for c in checkpoint_dirs(run)] == ["step-000001"]
    state = read_state(run / "checkpoints/step-000001")
    # the second group (j = 6..10) was simulated at j = 6: the stream is past its 5 batches, and the 4 inner
    # steps not yet run keep their simulated inputs in the checkpoint
    assert (state["k"], state["j"]) == (1, 7) and state["prompt_stream"]["pos"] == 22
    assert len(state["pending_prompts"]) == 4 and all(len(b) == 2 for b in state["pending_prompts"])
    assert {p.name for p in (run / "checkpoints/step-000001").iterdir()} == RUN_FILES | {"pending.safetensors"}

    # resuming mid-cycle reproduces the uninterrupted run bit for bit
    res = dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 2, "--out", run, "--resume")
    ok(res)
    assert "resumed from step-000001 (k=1, j=7)" in res.output
    assert read_state(run / "checkpoints/step-000002")["j"] == 11
    assert_same_tensors(run / "checkpoints/step-000002", sd3_run / "checkpoints/step-000002")
    assert metrics_by_step(run)[2] == metrics_by_step(sd3_run)[2]


def test_first_ctrl_c_waits_for_the_simulation_group(sd3_run, tmp_path, monkeypatch):
    """A first Ctrl-C (the flag) inside a simulation group finishes the group, so the checkpoint sits on a
    generator update, holds no pending samples and equals the uninterrupted run's."""
    def flag(trainer):  # what the SIGINT handler does on a first Ctrl-C
        trainer._interrupted = True

    run = tmp_path / "run"
    res, calls = _distill_interrupted_at_8th_inner_step(monkeypatch, run, 3, flag)
    assert res.exit_code == 130, res.output
    assert calls == 11 and [c.name for c in checkpoint_dirs(run)] == ["step-000002"]
    assert read_state(run / "checkpoints/step-000002")["j"] == 11
    assert {p.name for p in (run / "checkpoints/step-000002").iterdir()} == RUN_FILES
    assert_same_tensors(run / "checkpoints/step-000002", sd3_run / "checkpoints/step-000002")


# -- tiny-sdxl: 1-step student -------------------------------------------------------------------------

def test_sdxl_one_step_distill_and_sample(sdxl_run, tmp_path):
    run = sdxl_run
    ckpt = run / "checkpoints/step-000002"
    state = read_state(ckpt)
    assert state["family"] == "sdxl" and state["grid"] == [0.399] and state["mode"] == "sde" and state["k"] == 2
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["sched/lambda_r"] == 0.0 and m["sched/beta_a"] == 1.0  # DynaDG off, uniform t
        assert m["loss/dmd"] == m["loss/dmd"] and m["loss/fake"] == m["loss/fake"]
    assert not (run / "samples").exists()
    out = tmp_path / "samples"
    res = dmdr("sample", "a red circle", "a blue star", "--ckpt", run, "--out", out)
    ok(res)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["00000.png", "00001.png"]
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert meta[0]["sampler"] == "student@step-000002" and meta[0]["steps"] == 1 and meta[0]["family"] == "sdxl"
    assert meta[0]["grid"] == [0.399] and meta[0]["mode"] == "sde"
    from PIL import Image

    with Image.open(out / "00000.png") as im:
        assert im.size == (64, 64)


# -- stage 2 -------------------------------------------------------------------------------------------------

def test_finetune_rl_none_continues_from_stage_1(sd3_run, tmp_path):
    out = tmp_path / "rl"
    res = dmdr("finetune-rl", "--from", sd3_run, "--rl", "none", "--max-steps", 2, "--out", out,
               "--set", "finetune_rl.sample_every=0")
    ok(res)
    assert "resumed from step-000002 (k=2, j=11); lr/gen=5e-05, lr/guide=5e-05" in res.output
    parent = (out / "parent.txt").read_text().splitlines()
    assert parent == [str(sd3_run.resolve()), "step-000002"]
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [3, 4]  # k continues from the stage-1 value
    for m in metrics:
        assert m["lr/gen"] == 5e-5 and m["lr/guide"] == 5e-5  # stage-2 LRs, not the restored 1e-4
        assert m["phase"] == "finetune_rl:none" and m["loss/rl"] == 0.0
        # schedules keep counting the global k (K = 20 of the tiny preset)
        assert m["sched/lambda_r"] == pytest.approx(0.25 * (1 + math.cos(math.pi * (m["step"] - 1) / 20)))
    assert [c.name for c in checkpoint_dirs(out)] == ["step-000004"]
    state = read_state(out / "checkpoints/step-000004")
    assert state["stage"] == "finetune_rl:none" and state["stage_start"] == 2 and state["k"] == 4
    optim, _ = load_extras(out / "checkpoints/step-000004")
    assert all(g["lr"] == 5e-5 for g in optim["gen"]["param_groups"])
    # stage 2 trained on from the stage-1 weights
    s1, s2 = tensors(sd3_run / "checkpoints/step-000002"), tensors(out / "checkpoints/step-000004")
    assert any(not torch.equal(s1["gen"][n], s2["gen"][n]) for n in s1["gen"])
    # the stage-1 run is untouched
    assert [c.name for c in checkpoint_dirs(sd3_run)] == ["step-000002"]


def test_finetune_rl_dmd_weight_zero_is_degenerate_but_valid(sd3_run, tmp_path):
    out = tmp_path / "rl0"
    res = dmdr("finetune-rl", "--from", sd3_run, "--rl", "none", "--max-steps", 1, "--out", out,
               "--set", "finetune_rl.dmd_weight=0", "--set", "finetune_rl.sample_every=0")
    ok(res)
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [3]
    assert metrics[0]["grad/gen_norm"] == 0.0 and metrics[0]["loss/dmd"] > 0  # logged, but carries no weight
    assert metrics[0]["grad/guide_norm"] > 0  # the critic still trains
    assert read_state(out / "checkpoints/step-000003")["k"] == 3


# -- two processes ----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path, dmdr_home, tiny_sd3_dir):
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.is_file():
        pytest.skip("accelerate launcher not installed")
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DMDR_HOME": dmdr_home, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "dmdr_cli", "distill", "--base", "tiny-sd3-random", "--out", str(run), "--max-steps", "2",
           "--set", "runtime.device=cpu", "--set", "distill.sample_every=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    ckpt = run / "checkpoints/step-000002"
    state = read_state(ckpt)
    assert state["world"] == 2 and state["k"] == 2 and state["j"] == 11
    _, rng = load_extras(ckpt)
    gens = rng["train_gen"]
    assert len(gens) == 2 and not torch.equal(gens[0], gens[1])  # seed + rank
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2]  # only rank 0 writes
    assert {p.name for p in ckpt.iterdir()} == RUN_FILES
    # the ranks saw different prompts (the stream is sharded), so the run differs from a single process
    assert state["prompt_stream"]["pos"] == 22


def test_rank_sync_guard_detects_diverging_ranks():
    """What the distributed run relies on: at every checkpoint the ranks compare a weight checksum."""
    from types import SimpleNamespace

    from dmdr_cli.engine.trainer import Trainer
    from dmdr_cli.errors import DmdrError

    roles = SimpleNamespace(trainable=lambda: [torch.ones(3), torch.full((2,), 0.5)])
    same = SimpleNamespace(world=2, roles=roles, _gather=lambda obj: [obj[0], obj[0]])
    Trainer._check_ranks_in_sync(same)
    seen = []
    differ = SimpleNamespace(world=2, roles=roles, _gather=lambda obj: seen.append(obj[0]) or [obj[0], obj[0] + 0.01])
    with pytest.raises(DmdrError, match="ranks hold different weights"):
        Trainer._check_ranks_in_sync(differ)
    assert seen == [4.0]
    single = SimpleNamespace(world=1, roles=None, _gather=None)
    Trainer._check_ranks_in_sync(single)  # one process: nothing to compare


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """A step that leaves NaN in the adapters (with a finite loss) must not overwrite the last good checkpoint."""
    import dmdr_cli.engine.trainer as trainer_mod

    real = trainer_mod.Trainer.inner_step

    def poisoned(self):
        stats = real(self)
        if stats is not None and self.k == 2:
            with torch.no_grad():
                next(iter(self.roles.gen_parameters().values())).fill_(float("nan"))
        return stats

    monkeypatch.setattr(trainer_mod.Trainer, "inner_step", poisoned)
    run = tmp_path / "run"
    res = dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", "3", "--out", str(run),
               "--set", "distill.checkpoint_every=1", "--set", "distill.sample_every=0")
    assert res.exit_code == 2, res.output
    assert "non-finite" in res.output and "Traceback" not in res.output
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000001"]
    for tensor in load_groups(checkpoint_dirs(run)[-1])["gen"].values():
        assert torch.isfinite(tensor).all()


# -- generator EMA ------------------------------------------------------------------------------------------

EMA_SETS = ("--set", "distill.ema_decay=0.5", "--set", "distill.checkpoint_every=1", "--set", "distill.keep_last=10",
            "--set", "distill.sample_every=0")


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ema") / "run"
    ok(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 3, "--out", run, *EMA_SETS))
    return run


def test_ema_is_saved_and_follows_the_update_rule(ema_run):
    from dmdr_cli.engine.ema import ema_decay_at

    ckpts = checkpoint_dirs(ema_run)
    assert [c.name for c in ckpts] == ["step-000001", "step-000002", "step-000003"]
    groups = [tensors(c) for c in ckpts]
    assert all(set(g) == {"gen", "guide", "gen_ema"} for g in groups)
    assert [read_state(c)["ema_updates"] for c in ckpts] == [1, 2, 3]
    assert read_state(ckpts[-1])["ema_decay"] == 0.5
    for k in (2, 3):  # ema_k = d_k * ema_{k-1} + (1 - d_k) * theta_k, recomputed from the saved tensors
        d = ema_decay_at(0.5, k)
        prev, cur = groups[k - 2], groups[k - 1]
        for n, v in cur["gen_ema"].items():
            torch.testing.assert_close(v, d * prev["gen_ema"][n] + (1 - d) * cur["gen"][n], rtol=1e-6, atol=1e-7)
    last = groups[-1]
    assert any(not torch.equal(last["gen_ema"][n], last["gen"][n]) for n in last["gen"])
    assert [m["ema/decay"] for m in read_metrics(ema_run / "metrics.jsonl")] == pytest.approx(
        [ema_decay_at(0.5, k) for k in (1, 2, 3)])


def test_ema_resume_is_bit_identical(ema_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(ema_run, resumed)
    for c in checkpoint_dirs(resumed)[1:]:  # stopped after step 1
        shutil.rmtree(c)
    ok(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 3, "--out", resumed, "--resume", *EMA_SETS))
    a, b = tensors(ema_run / "checkpoints/step-000003"), tensors(resumed / "checkpoints/step-000003")
    assert a.keys() == b.keys() == {"gen", "guide", "gen_ema"}
    for group in a:
        for n in a[group]:
            assert torch.equal(a[group][n], b[group][n]), (group, n)
    assert read_state(resumed / "checkpoints/step-000003")["ema_updates"] == 3


def test_the_student_is_the_ema_unless_asked_otherwise(ema_run):
    from dmdr_cli.config.loader import resolve_run
    from dmdr_cli.engine.student import load_student

    saved = tensors(ema_run / "checkpoints/step-000003")
    for sets, group in (([], "gen_ema"), (["student.use_ema=false"], "gen")):
        _, roles, _ = load_student(resolve_run(ema_run, sets=sets), ema_run / "checkpoints/step-000003")
        for n, p in roles.gen_parameters().items():
            assert torch.equal(p.detach(), saved[group][n]), (group, n)


def test_stage_2_starts_from_the_stage_1_ema(ema_run, tmp_path):
    out = tmp_path / "rl"  # learning rate 0: AdamW leaves the weights exactly where stage 2 started them
    res = dmdr("finetune-rl", "--from", ema_run, "--rl", "none", "--max-steps", 1, "--out", out,
               "--set", "finetune_rl.lr=0", "--set", "finetune_rl.sample_every=0", "--set", "finetune_rl.ema_decay=0.9")
    ok(res)
    assert "generator from its EMA weights" in res.output
    s1, s2 = tensors(ema_run / "checkpoints/step-000003"), tensors(out / "checkpoints/step-000004")
    assert set(s2) == {"gen", "guide", "gen_ema"} and read_state(out / "checkpoints/step-000004")["ema_updates"] == 1
    for n in s1["gen"]:
        assert torch.equal(s2["gen"][n], s1["gen_ema"][n]) and torch.equal(s2["gen_ema"][n], s1["gen_ema"][n]), n


def test_ema_decay_out_of_range_is_refused(tmp_path):
    fails_cleanly(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 1, "--out", tmp_path / "r",
                       "--set", "distill.ema_decay=1"), "distill.ema_decay must be in [0, 1)")
    assert not (tmp_path / "r").exists()


def test_sample_grids_show_the_ema_and_leave_training_untouched(ema_run, tmp_path):
    run = tmp_path / "with-samples"  # the same run, sampling a grid at every step (with the EMA swapped in)
    ok(dmdr("distill", "--base", "tiny-sd3-random", "--max-steps", 2, "--out", run, *EMA_SETS,
            "--set", "distill.sample_every=1"))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000000.png", "step-000001.png",
                                                                  "step-000002.png"]
    a, b = tensors(ema_run / "checkpoints/step-000002"), tensors(run / "checkpoints/step-000002")
    for group in a:
        for n in a[group]:
            assert torch.equal(a[group][n], b[group][n]), (group, n)


def test_sample_and_eval_name_the_ema_student(ema_run, tmp_path):
    out = tmp_path / "s"
    ok(dmdr("sample", "a red circle", "--ckpt", ema_run, "--out", out))
    meta = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    assert meta["sampler"] == "student@step-000003:ema"
    ok(dmdr("sample", "a red circle", "--ckpt", ema_run, "--out", tmp_path / "raw", "--set", "student.use_ema=false"))
    raw = json.loads((tmp_path / "raw" / "metadata.jsonl").read_text().splitlines()[0])
    assert raw["sampler"] == "student@step-000003"
    from PIL import Image
    import numpy as np

    with Image.open(out / "00000.png") as a, Image.open(tmp_path / "raw" / "00000.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # the EMA and the last iterate are other students

    from dmdr_cli.config.loader import resolve_run
    from dmdr_cli.engine.generators import student_of_run

    assert student_of_run(resolve_run(ema_run), ema_run).label.endswith("@step-000003, EMA)")
