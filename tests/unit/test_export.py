"""Export building blocks without a trained run: the merge and its check (ALGORITHM.md 12.5), LoRA key formats,
the diffusers schedulers that reproduce the student grids (ALGORITHM.md 5.2/5.3), layouts and the model card.

The merge tests use a toy module with real PEFT LoRA layers (Linear and Conv2d, two adapters) so that every
failure mode can be provoked directly; the end-to-end exports of tiny runs are in tests/cli/test_export_cli.py.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from dmdr_cli.export import VerificationError
from dmdr_cli.export import formats as fm
from dmdr_cli.export.card import ExportInfo, metadata, read_evals, render
from dmdr_cli.export.merge import (check_layer_forward, check_merged, expected_deltas, lora_factors,
                                   merged_state_dict, stock_state_dict)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Linear(5, 5)


def toy(adapters=(("gen", 2, 4),)) -> nn.Module:
    """Toy with LoRA adapters (name, r, alpha) on proj and conv; B randomised with a fixed seed; all active."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    model = Toy()
    for name, r, alpha in adapters:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns on the second adapter: stacking is the point here
            inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj", "conv"],
                                               init_lora_weights="gaussian"), model, adapter_name=name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_adapter([a[0] for a in adapters])
    return model.requires_grad_(False)


# -- merge ------------------------------------------------------------------------------------------
def test_merge_has_stock_keys_and_matches_the_explicit_formula():
    model = toy()
    factors = lora_factors(model, ["gen"])
    assert {f.module for f in factors} == {"proj", "conv"}
    assert all(f.scaling == 2.0 for f in factors)          # read from the module: alpha / r = 4 / 2
    merged = merged_state_dict(model, ["gen"])
    assert set(merged) == set(Toy().state_dict())          # no base_layer, no lora keys
    Toy().load_state_dict(merged, strict=True)
    base = stock_state_dict(model)
    report = check_merged(merged, base, factors)
    assert report["targeted"] == 2 and report["untouched"] == 4 and report["max_rel_err"] < 1e-6
    assert check_layer_forward(model, merged, factors) < 1e-5
    # the explicit formula, by hand, for the linear layer
    f = next(f for f in factors if f.module == "proj")
    assert torch.allclose(merged["proj.weight"], base["proj.weight"] + 2.0 * f.B @ f.A, atol=1e-6)


def test_a_broken_merge_fails_the_check():
    model = toy()
    factors = lora_factors(model, ["gen"])
    base = stock_state_dict(model)
    merged = merged_state_dict(model, ["gen"])
    with pytest.raises(VerificationError, match="merge is wrong"):      # weights left at base (strict=False bug)
        check_merged(dict(base), base, factors)
    proj = next(f for f in factors if f.module == "proj")
    unscaled = dict(merged)                                              # scaling forgotten (B @ A instead of 2 B @ A)
    unscaled["proj.weight"] = base["proj.weight"] + proj.B @ proj.A
    with pytest.raises(VerificationError, match="proj.weight"):
        check_merged(unscaled, base, factors)
    touched = dict(merged)
    touched["other.weight"] = touched["other.weight"] + 1e-3
    with pytest.raises(VerificationError, match="not LoRA-targeted"):
        check_merged(touched, base, factors)
    missing = {k: v for k, v in merged.items() if k != "conv.bias"}
    with pytest.raises(VerificationError, match="keys differ"):
        check_merged(missing, base, factors)
    with pytest.raises(VerificationError, match="disagree"):
        check_layer_forward(model, base, factors)                         # forward of the adapter != unmerged layer


def test_stacked_adapters_are_summed():
    model = toy((("gen", 2, 4), ("rl", 3, 3)))
    both = lora_factors(model, ["gen", "rl"])
    assert len(both) == 4
    merged = merged_state_dict(model, ["gen", "rl"])
    base = stock_state_dict(model)
    assert check_merged(merged, base, both)["max_rel_err"] < 1e-6
    assert check_layer_forward(model, merged, both) < 1e-5              # both adapters active in the forward
    with pytest.raises(VerificationError):
        check_merged(merged, base, lora_factors(model, ["gen"]))        # one stage missing from the check
    # the LoRA formats concatenate the stack along the rank
    a, b = fm.combined_factors(both)["proj"]
    assert a.shape[0] == 5
    assert torch.allclose(b @ a, expected_deltas(both)["proj.weight"], atol=1e-6)


def test_a_zero_adapter_must_leave_the_weight_untouched():
    model = toy()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    factors = lora_factors(model, ["gen"])
    base = stock_state_dict(model)
    merged = merged_state_dict(model, ["gen"])
    assert check_merged(merged, base, factors)["max_rel_err"] == 0.0
    merged["conv.weight"] = merged["conv.weight"] + 1e-4
    with pytest.raises(VerificationError, match="zero adapter"):
        check_merged(merged, base, factors)


# -- LoRA key formats ---------------------------------------------------------------------------------
def test_lora_and_kohya_keys_fold_the_scaling():
    model = toy()
    factors = lora_factors(model, ["gen"])
    deltas = expected_deltas(factors)
    sd = fm.lora_state_dict(factors, "sd3", torch.float32)
    assert set(sd) == {f"transformer.{m}.lora_{x}.weight" for m in ("proj", "conv") for x in "AB"}
    b, a = sd["transformer.conv.lora_B.weight"], sd["transformer.conv.lora_A.weight"]
    assert torch.allclose((b.flatten(1) @ a.flatten(1)).reshape(deltas["conv.weight"].shape), deltas["conv.weight"], atol=1e-6)
    kohya = fm.kohya_state_dict(factors, "sdxl", torch.float16)
    assert set(kohya) == {f"lora_unet_{m}.{s}" for m in ("proj", "conv") for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert float(kohya["lora_unet_proj.alpha"]) == 2.0 and kohya["lora_unet_proj.lora_up.weight"].dtype == torch.float16
    key_map = fm.kohya_key_map(Toy().state_dict().keys(), "sdxl")
    back = fm.kohya_to_diffusers(fm.kohya_state_dict(factors, "sdxl", torch.float32), key_map, "sdxl")
    assert set(back) == {k.replace("transformer.", "unet.", 1) for k in sd}
    assert torch.equal(back["unet.proj.lora_B.weight"], sd["transformer.proj.lora_B.weight"])
    assert fm.kohya_name("transformer_blocks.0.attn.to_out.0", "sd3") == "lora_transformer_transformer_blocks_0_attn_to_out_0"


def test_kohya_name_collisions_are_refused():
    from dmdr_cli.export.merge import LoraFactor

    f = LoraFactor("a.b_c", "gen", torch.ones(1, 2), torch.ones(2, 1), 1.0)
    g = LoraFactor("a_b.c", "gen", torch.ones(1, 2), torch.ones(2, 1), 1.0)
    with pytest.raises(VerificationError, match="both map"):
        fm.kohya_state_dict([f, g], "sd3", torch.float32)


# -- the diffusers schedulers reproduce the student grids ----------------------------------------------
@pytest.mark.parametrize("shift,expected", [(3.0, [1.0, 0.90012, 0.75037, 0.50100]), (5.0, [1.0, 0.93758, 0.83361, 0.62594])])
def test_sd3_scheduler_runs_the_training_grid_from_unshifted_sigmas(shift, expected):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dmdr_cli.engine.sampler import SamplerSpec
    from dmdr_cli.schedules.grids import flow_student_grid

    grid = flow_student_grid(4, shift)
    spec = SamplerSpec(tuple(grid), 0.001)
    kwargs = fm.stock_call_kwargs("sd3", spec, shift, 512, 128)
    assert kwargs["sigmas"] == [1.0, 0.75025, 0.5005, 0.25075]           # ALGORITHM.md 5.3
    assert kwargs["guidance_scale"] == 0.0 and kwargs["max_sequence_length"] == 128
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)                   # SD3-M / SD3.5-L ship with 3.0
    sched = fm.export_scheduler("sd3", base.config, shift)
    assert sched.shift == shift
    sched.set_timesteps(sigmas=kwargs["sigmas"])
    assert sched.sigmas[:4].tolist() == pytest.approx(expected, abs=1e-5)
    assert float(sched.sigmas[-1]) == 0.0
    sched.set_timesteps(4)                                               # pitfall 2: the default grid is not it
    assert abs(float(sched.sigmas[3]) - expected[3]) > 0.4
    shifted_twice = fm.export_scheduler("sd3", base.config, shift)
    shifted_twice.set_timesteps(sigmas=grid)                             # pitfall 3: shifted grid passed again
    assert abs(float(shifted_twice.sigmas[3]) - expected[3]) > 0.05


def test_sd3_bf16_grid_is_reproduced_too():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dmdr_cli.engine.sampler import SamplerSpec
    from dmdr_cli.schedules.grids import flow_student_grid

    grid = flow_student_grid(4, 3.0, dtype="bf16")                       # 1.0, 0.8984375, 0.75, 0.5
    kwargs = fm.stock_call_kwargs("sd3", SamplerSpec(tuple(grid), 0.001), 3.0, 512, 128)
    sched = fm.export_scheduler("sd3", FlowMatchEulerDiscreteScheduler(shift=3.0).config, 3.0)
    sched.set_timesteps(sigmas=kwargs["sigmas"])
    assert sched.sigmas[:4].tolist() == pytest.approx(grid, abs=1e-5)


def test_sdxl_lcm_at_399_is_the_one_step_student():
    from diffusers import EulerDiscreteScheduler

    from dmdr_cli.engine.sampler import SamplerSpec

    kwargs = fm.stock_call_kwargs("sdxl", SamplerSpec((0.399,), 0.0, "sde", 1.0, True), 3.0, 1024, 128)
    assert kwargs == {"guidance_scale": 0.0, "height": 1024, "width": 1024, "timesteps": [399]}
    base = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched = fm.export_scheduler("sdxl", base.config, 3.0)
    assert type(sched).__name__ == "LCMScheduler"
    sched.set_timesteps(timesteps=[399])
    assert sched.timesteps.tolist() == [399]
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(399)
    assert c_skip < 1e-7 and abs(c_out - 1) < 1e-7                     # ALGORITHM.md 5.2
    abar = sched.alphas_cumprod[399]
    assert float(abar.sqrt()) == pytest.approx(0.65275, abs=1e-5)


# -- layout, metadata, card --------------------------------------------------------------------------
def test_layouts(tmp_path):
    s = fm.layout_for("safetensors", tmp_path / "student")
    assert not s.is_dir and s.path.name == "student.safetensors" and s.card.name == "student.README.md"
    d = fm.layout_for("diffusers", tmp_path / "pipe")
    assert d.is_dir and d.card == tmp_path / "pipe" / "README.md"
    lo = fm.layout_for("lora", tmp_path / "lora")
    assert lo.is_dir and lo.weights_name == "pytorch_lora_weights.safetensors"
    lf = fm.layout_for("lora", tmp_path / "x.safetensors")
    assert not lf.is_dir and lf.targets() == [tmp_path / "x.safetensors", tmp_path / "x.README.md"]
    assert fm.layout_for("comfyui", tmp_path / "c").path.name == "c.safetensors"


def _info(**kw) -> ExportInfo:
    base = dict(fmt="lora", dtype="fp16", family="sd3", base_model="stabilityai/sd3", base_ref="stabilityai/sd3",
                run="run", checkpoint="step-000002", step=2, stage="distill", steps=4, grid=[1.0, 0.9, 0.75, 0.5],
                t_end=0.001, mode="ode", shift=3.0, x0_end=0.001, resolution=512, max_sequence_length=128, use_t5=False,
                config_hash="abc", dmdr_version="0.1.0", lora_rank=8, lora_alpha=16,
                stock_kwargs={"guidance_scale": 0.0, "sigmas": [1.0, 0.75025, 0.5005, 0.25075]})
    base.update(kw)
    return ExportInfo(**base)


def test_metadata_and_card(tmp_path):
    (tmp_path / "eval" / "geneval" / "student").mkdir(parents=True)
    (tmp_path / "eval" / "geneval" / "student" / "summary.json").write_text(
        json.dumps({"overall": 0.6123, "per_task": {"colors": 0.8}, "canonical": False, "rows": [1, 2]}))
    (tmp_path / "eval" / "rewards").mkdir(parents=True)
    (tmp_path / "eval" / "rewards" / "summary.json").write_text("{not json")
    evals = read_evals(tmp_path)
    assert evals == [("geneval/student", {"overall": 0.6123, "per_task.colors": 0.8, "canonical": False})]
    info = _info()
    meta = metadata(info)
    for key in ("base_model", "family", "steps", "grid", "shift", "x0_end", "dmdr_version", "config_hash"):
        assert isinstance(meta[key], str) and meta[key]
    assert json.loads(meta["grid"]) == [1.0, 0.9, 0.75, 0.5]
    text = render(info, "out/lora", {"merge": None, "sample_tol": 0.02, "reload": None}, evals)
    assert "| overall | 0.6123 |" in text and "sigmas=[1.0, 0.75025, 0.5005, 0.25075]" in text
    assert 'pipe.load_lora_weights("out/lora")' in text and "text_encoder_3=None" in text
    assert "shift=3.0" in text and "--no-verify" in text
    sdxl = render(_info(family="sdxl", fmt="diffusers", steps=1, grid=[0.399],
                        stock_kwargs={"guidance_scale": 0.0, "timesteps": [399]}), "pipe", None, [])
    assert "timesteps=[399]" in sdxl and "LCMScheduler" in sdxl and "Not verified" in sdxl
