"""The typed configuration: layering, coercion, strict validation, the shipped presets (torch-free)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from dmdr_cli.config import presets
from dmdr_cli.config.loader import (
    all_keys,
    apply_set,
    coerce,
    config_hash,
    dump_yaml,
    from_dict,
    load_yaml,
    resolve,
    to_dict,
    validate,
)
from dmdr_cli.config.schema import CHOICES, DmdrConfig, RewardSpec
from dmdr_cli.errors import ConfigError

PRESETS = ("sd3-medium", "sd3.5-large", "sd3.5-medium", "sdxl-base", "tiny-sd3", "tiny-sd3-random", "tiny-sdxl")


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def with_set(*items: str) -> DmdrConfig:
    cfg = DmdrConfig()
    for item in items:
        apply_set(cfg, item)
    return cfg


# -- layering -------------------------------------------------------------------------------------------


def test_layering_precedence_schema_preset_file_set(tmp_path):
    # schema: lr 1e-6, adam_eps 1e-8, ttur 5, max_steps 2000; preset tiny-sd3-random: lr 1e-4, max_steps 20
    f1 = write(tmp_path, "a.yaml", "distill:\n  lr: 3.0e-5\n  ttur: 7\n  batch_size: 3\n")
    f2 = write(tmp_path, "b.yaml", "distill:\n  ttur: 8\n")
    cfg = resolve("tiny-sd3-random", [f1, f2], ["distill.batch_size=5", "distill.batch_size=6"])
    d = cfg.distill
    assert d.adam_eps == 1e-8          # schema default, untouched by every layer
    assert d.max_steps == 20           # preset beats the schema (2000)
    assert d.lr == 3e-5                # --config file beats the preset (1e-4)
    assert d.ttur == 8                 # the later --config file beats the earlier one
    assert d.batch_size == 6           # --set beats the files (3), and the later --set wins
    assert cfg.name == "tiny-sd3-random"

    no_layers = resolve("tiny-sd3-random")
    assert (no_layers.distill.lr, no_layers.distill.ttur, no_layers.distill.batch_size) == (1e-4, 5, 2)


def test_default_base_is_tiny_sd3():
    cfg = resolve(None)
    assert cfg.name == "tiny-sd3" and cfg.model.tiny == "digits" and cfg.model.resolution == 32


def test_set_beats_config_file_for_the_same_key(tmp_path):
    f = write(tmp_path, "c.yaml", "model:\n  shift: 4.0\n")
    assert resolve("sd3-medium", [f]).model.shift == 4.0
    assert resolve("sd3-medium", [f], ["model.shift=6"]).model.shift == 6.0


# -- coercion -------------------------------------------------------------------------------------------


def test_scientific_notation_string_becomes_float(tmp_path):
    cfg = with_set("distill.lr=1e-6")
    assert cfg.distill.lr == 1e-6 and type(cfg.distill.lr) is float
    # YAML 1.1 (PyYAML) reads `1e-6` without a dot as a *string*; the loader must still make it a float
    assert yaml.safe_load("lr: 1e-6")["lr"] == "1e-6"
    f = write(tmp_path, "lr.yaml", "distill:\n  lr: 1e-6\n  lr_guide: 2e-8\n")
    cfg = resolve("tiny-sd3-random", [f])
    assert cfg.distill.lr == 1e-6 and type(cfg.distill.lr) is float
    assert cfg.distill.lr_guide == 2e-8


@pytest.mark.parametrize("raw, expected", [("no", False), ("yes", True), ("off", False), ("on", True),
                                           ("true", True), ("False", False), ("1", True), ("0", False)])
def test_bool_words(raw, expected):
    cfg = with_set(f"distill.dynadg={raw}")
    assert cfg.distill.dynadg is expected


def test_bool_from_yaml_file_words_and_digits(tmp_path):
    f = write(tmp_path, "b.yaml", "distill:\n  dynadg: off\nlora:\n  full_generator: 1\nruntime:\n  gradient_checkpointing: 0\n")
    cfg = resolve("tiny-sd3-random", [f])
    assert cfg.distill.dynadg is False
    assert cfg.lora.full_generator is True
    assert cfg.runtime.gradient_checkpointing is False


@pytest.mark.parametrize("raw", ["maybe", "2", "1.5"])
def test_bool_rejects_other_values(raw):
    with pytest.raises(ConfigError, match=r"distill\.dynadg must be of type bool"):
        with_set(f"distill.dynadg={raw}")


def test_int_from_integral_strings_only():
    assert with_set("distill.ttur=3").distill.ttur == 3
    cfg = with_set("distill.ttur=3.0")
    assert cfg.distill.ttur == 3 and type(cfg.distill.ttur) is int
    with pytest.raises(ConfigError, match=r"distill\.ttur must be of type int, got '3\.5'"):
        with_set("distill.ttur=3.5")
    with pytest.raises(ConfigError, match="distill.ttur must be of type int"):
        with_set("distill.ttur=three")


def test_int_rejects_bool_from_yaml(tmp_path):
    f = write(tmp_path, "i.yaml", "distill:\n  ttur: true\n")
    with pytest.raises(ConfigError, match="distill.ttur must be of type int, got True"):
        resolve("tiny-sd3-random", [f])


def test_lists_parsed_as_yaml():
    cfg = with_set("student.steps=2", "student.grid=[1,0.5]")
    assert cfg.student.grid == [1, 0.5]
    validate(cfg)  # two values for two steps, all in (0, 1]
    assert with_set("lora.targets=[to_q, to_k]").lora.targets == ["to_q", "to_k"]
    assert with_set("lora.targets=to_q").lora.targets == ["to_q"]    # a scalar is a one-item list
    assert with_set("student.grid=").student.grid == []              # empty clears the list


def test_malformed_yaml_list_is_a_config_error():
    with pytest.raises(ConfigError, match=r"student\.grid"):
        with_set("student.grid=[1,2")


def test_optional_margin_null():
    spec_margin = {f.name: f for f in dataclasses.fields(RewardSpec)}
    assert spec_margin["margin"].default == 0.7
    cfg = with_set("finetune_rl.rewards=[{name: clip, margin: null}, {name: hps-v2.1, margin: 0.5}, {name: x, margin: none}]")
    margins = [r["margin"] for r in cfg.finetune_rl.rewards]
    assert margins == [None, 0.5, None]
    import typing
    tp = typing.get_type_hints(RewardSpec)["margin"]
    assert coerce("m", "null", tp) is None
    assert coerce("m", None, tp) is None
    assert coerce("m", "0.25", tp) == 0.25
    with pytest.raises(ConfigError, match="m must be of type float or null"):
        coerce("m", "wide", tp)


def test_reward_items_are_validated_and_filled():
    cfg = with_set("finetune_rl.rewards=[{name: clip, weight: '0.3'}]")
    (item,) = cfg.finetune_rl.rewards
    assert item == {"name": "clip", "weight": 0.3, "margin": 0.7, "prefix": "", "path": "", "options": {}}
    assert type(item["weight"]) is float


def test_reward_options_are_a_mapping_passed_to_the_builder():
    from dmdr_cli.recipes.finetune_rl import reward_terms

    cfg = with_set("finetune_rl.rewards=[{name: digit-cls, weight: 0.1, margin: null, "
                   "options: {color_weight: 0.5, ink_weight: 2}}]")
    assert cfg.finetune_rl.rewards[0]["options"] == {"color_weight": 0.5, "ink_weight": 2}
    ((reward, weight, margin, prefix),) = reward_terms(cfg, "cpu")
    assert (reward.color_weight, reward.ink_weight, reward.position_weight) == (0.5, 2.0, 4.0)  # the rest: defaults
    assert (weight, margin, prefix) == (0.1, None, "")
    with pytest.raises(ConfigError, match=r"finetune_rl\.rewards\[0\]\.options must be of type dict"):
        with_set("finetune_rl.rewards=[{name: digit-cls, options: [1, 2]}]")
    bad = with_set("finetune_rl.rewards=[{name: digit-cls, options: {colour_weight: 1}}]")
    with pytest.raises(ConfigError, match="reward 'digit-cls' has no option colour_weight") as err:
        reward_terms(bad, "cpu")
    assert "color_weight" in str(err.value)


def test_reward_item_unknown_key_is_an_error():
    with pytest.raises(ConfigError) as err:
        with_set("finetune_rl.rewards=[{name: clip, wieght: 0.3}]")
    msg = str(err.value)
    assert "finetune_rl.rewards[0].wieght" in msg
    assert "Did you mean 'weight'?" in msg


def test_reward_item_must_be_mapping_and_typed():
    with pytest.raises(ConfigError, match=r"finetune_rl\.rewards\[0\] must be a mapping"):
        with_set("finetune_rl.rewards=[clip]")
    with pytest.raises(ConfigError, match=r"finetune_rl\.rewards\[1\]\.weight must be of type float"):
        with_set("finetune_rl.rewards=[{name: a}, {name: b, weight: heavy}]")


def test_reward_items_from_config_file(tmp_path):
    f = write(tmp_path, "r.yaml", "finetune_rl:\n  rewards:\n    - {name: clip, weight: 1e-1, margin: ~}\n    - {name: hps, bogus: 1}\n")
    with pytest.raises(ConfigError, match=r"rewards\[1\]\.bogus"):
        resolve("tiny-sd3-random", [f])


# -- strictness: unknown keys, types, enums, ranges ------------------------------------------------------


def test_unknown_set_key_did_you_mean():
    with pytest.raises(ConfigError) as err:
        with_set("distill.lrr=1e-6")
    assert "unknown key 'distill.lrr'" in str(err.value)
    assert "Did you mean 'distill.lr'?" in str(err.value)


def test_unknown_file_key_did_you_mean(tmp_path):
    f = write(tmp_path, "u.yaml", "student:\n  stepz: 2\n")
    with pytest.raises(ConfigError) as err:
        resolve("tiny-sd3-random", [f])
    msg = str(err.value)
    assert f in msg and "unknown key 'student.stepz'" in msg and "Did you mean 'student.steps'?" in msg
    f2 = write(tmp_path, "s.yaml", "distil:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="unknown key 'distil'"):
        resolve("tiny-sd3-random", [f2])


def test_set_without_equals_and_section_as_leaf():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        with_set("distill.lr")
    with pytest.raises(ConfigError, match="unknown key 'distill'"):
        with_set("distill=3")


@pytest.mark.parametrize("item, key, typename", [
    ("distill.lr=abc", "distill.lr", "float"),
    ("distill.ttur=x", "distill.ttur", "int"),
    ("distill.dynadg=perhaps", "distill.dynadg", "bool"),
    ("model.resolution=[1, 2]", "model.resolution", "int"),
])
def test_wrong_type_message_names_key_and_type(item, key, typename):
    with pytest.raises(ConfigError) as err:
        with_set(item)
    assert f"{key} must be of type {typename}" in str(err.value)


def test_wrong_type_in_file(tmp_path):
    f = write(tmp_path, "t.yaml", "model:\n  path: [a, b]\n")
    with pytest.raises(ConfigError, match="model.path must be of type str"):
        resolve("tiny-sd3-random", [f])


def test_enum_check():
    with pytest.raises(ConfigError) as err:
        resolve("tiny-sd3-random", [], ["student.simulation=foo"])
    msg = str(err.value)
    assert "student.simulation must be one of 'ode', 'sde'" in msg and "'foo'" in msg
    with pytest.raises(ConfigError, match="Did you mean 'beta_anneal'"):
        resolve("tiny-sd3-random", [], ["distill.t_sampler=beta_anneel"])
    assert resolve("tiny-sd3-random", [], ["student.simulation=sde"]).student.simulation == "sde"


def test_every_enum_default_is_allowed():
    assert set(CHOICES) <= set(all_keys())  # every checked key exists in the schema
    validate(DmdrConfig())


@pytest.mark.parametrize("item, text", [
    ("student.steps=0", "student.steps must be >= 1"),
    ("teacher.steps=-3", "teacher.steps must be >= 1"),
    ("sample.n=0", "sample.n must be >= 1"),
    ("model.resolution=100", "model.resolution must be a multiple of 8"),
    ("model.resolution=0", "model.resolution must be >= 1"),
])
def test_range_checks(item, text):
    with pytest.raises(ConfigError, match=text):
        resolve("tiny-sd3-random", [], [item])


def test_student_grid_length_and_values():
    with pytest.raises(ConfigError, match="student.grid has 2 values but student.steps is 4"):
        resolve("tiny-sd3-random", [], ["student.grid=[1.0, 0.5]"])
    with pytest.raises(ConfigError, match=r"student.grid values must be numbers in \(0, 1\]"):
        resolve("tiny-sd3-random", [], ["student.steps=2", "student.grid=[1.0, 0.0]"])
    with pytest.raises(ConfigError, match=r"student.grid values must be numbers in \(0, 1\]"):
        resolve("tiny-sd3-random", [], ["student.steps=2", "student.grid=[1.5, 0.5]"])
    ok = resolve("tiny-sd3-random", [], ["student.steps=2", "student.grid=[1.0, 0.5]"])
    assert ok.student.grid == [1.0, 0.5]


# -- presets ------------------------------------------------------------------------------------------


def test_shipped_preset_names():
    assert presets.names() == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_validates_and_is_described(name):
    cfg = resolve(name)
    assert cfg.name == name
    assert cfg.description and cfg.description == presets.describe(name)
    assert cfg.model.family in ("sd3", "sdxl")
    assert bool(cfg.model.hub_id) != bool(cfg.model.tiny)  # exactly one source of weights
    # a preset holds only deltas: every key in it is a real schema key
    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"
    assert set(leaves(presets.load(name))) <= set(all_keys())


def test_unknown_preset_did_you_mean():
    with pytest.raises(ConfigError, match="Did you mean 'sd3-medium'"):
        resolve("sd3-medum")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        presets.path_of("nope")


def test_sd3_medium_numbers():
    c = resolve("sd3-medium")
    assert c.model.hub_id == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert (c.model.family, c.model.resolution, c.model.shift, c.model.dtype) == ("sd3", 512, 3.0, "bf16")
    assert (c.student.steps, c.student.grid_dtype, c.student.simulation) == (4, "bf16", "ode")
    d = c.distill
    assert (d.real_cfg, d.cfg_jitter, d.dynadg, d.dynadg_scale0, d.dynamic_steps) == (7.0, 0.5, True, 0.5, 2000)
    assert (d.lr, d.lr_guide, d.batch_size, d.max_steps, d.ttur, d.fake_scale) == (1e-6, 5e-7, 8, 2000, 5, 2.0)
    assert (d.t_sampler, d.beta_a0, d.beta_b0) == ("beta_anneal", 4.0, 1.5)
    assert (d.weight_decay_gen, d.weight_decay_guide, d.grad_clip) == (0.01, 0.0, 1.0)
    assert (d.checkpoint_every, d.sample_every) == (500, 100)
    assert (c.lora.gen_rank, c.lora.gen_alpha, c.lora.guide_rank, c.lora.guide_alpha) == (64, 128, 32, 32)
    assert c.runtime.seed == 30
    f = c.finetune_rl
    assert (f.max_steps, f.batch_size, f.lr, f.lr_guide) == (2000, 4, 5e-7, 2e-7)
    assert [(r["name"], r["weight"], r["margin"]) for r in f.rewards] == [("dfn5b-clip", 0.3, 0.7), ("hps-v2.1", 0.3, 0.7)]
    assert f.rewards[1]["prefix"] == "Realistic photo" and f.rewards[0]["prefix"] == ""


def test_sd35_large_numbers():
    c = resolve("sd3.5-large")
    assert c.model.hub_id == "stabilityai/stable-diffusion-3.5-large"
    assert (c.model.resolution, c.model.shift) == (1024, 5.0)
    assert (c.student.steps, c.student.grid_dtype) == (4, "bf16")
    d = c.distill
    assert (d.real_cfg, d.lr, d.lr_guide, d.batch_size, d.max_steps) == (4.0, 1e-6, 2e-8, 4, 2000)
    assert (d.dynadg, d.dynadg_scale0, d.dynamic_steps) == (True, 0.5, 2000)
    f = c.finetune_rl
    assert (f.max_steps, f.batch_size, f.lr, f.lr_guide, f.checkpoint_every) == (1000, 2, 1e-7, 5e-9, 250)
    assert [(r["weight"], r["margin"], r["prefix"]) for r in f.rewards] == [(0.1, 0.7, ""), (0.1, 0.7, "Realistic photo")]


def test_sdxl_base_numbers():
    c = resolve("sdxl-base")
    assert c.model.hub_id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (c.model.family, c.model.resolution, c.model.dtype, c.runtime.mixed_precision) == ("sdxl", 1024, "fp16", "fp16")
    assert c.student.steps == 1 and c.student.grid == [0.399]
    assert c.lora.full_generator is True
    d = c.distill
    assert d.dynadg is False and d.t_sampler == "uniform" and d.dynamic_steps == 0
    assert (d.real_cfg, d.lr, d.lr_guide, d.max_steps, d.batch_size) == (7.0, 1e-7, 1e-7, 3000, 8)
    f = c.finetune_rl
    assert (f.max_steps, f.batch_size, f.lr, f.lr_guide, f.checkpoint_every) == (1000, 4, 5e-8, 5e-8, 200)
    assert [(r["weight"], r["prefix"]) for r in f.rewards] == [(0.3, ""), (0.3, "Realistic photo")]


def test_sd35_medium_and_tiny_numbers():
    c = resolve("sd3.5-medium")
    assert (c.distill.real_cfg, c.teacher.guidance, c.model.shift, c.model.resolution) == (4.5, 4.5, 3.0, 512)
    t = resolve("tiny-sd3-random")
    assert (t.model.tiny, t.model.resolution, t.model.dtype, t.model.hub_id) == ("sd3", 64, "fp32", "")
    x = resolve("tiny-sdxl")
    assert (x.model.tiny, x.student.steps, x.student.grid, x.distill.dynadg) == ("sdxl", 1, [0.399], False)


def test_presets_copy_refuses_existing_without_force(tmp_path):
    dest = tmp_path / "my.yaml"
    out = presets.copy("sd3-medium", dest)
    assert out == dest and dest.read_text() == presets.path_of("sd3-medium").read_text()
    dest.write_text("# my edits\n")
    with pytest.raises(ConfigError, match="already exists"):
        presets.copy("sd3-medium", dest)
    assert dest.read_text() == "# my edits\n"  # untouched
    presets.copy("sd3-medium", dest, force=True)
    assert dest.read_text() == presets.path_of("sd3-medium").read_text()
    # a folder destination gets the preset's file name
    assert presets.copy("tiny-sdxl", tmp_path) == tmp_path / "tiny-sdxl.yaml"


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip(name):
    cfg = resolve(name, [], ["finetune_rl.rewards=[{name: a, margin: null}]"])
    assert from_dict(to_dict(cfg)) == cfg
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))  # what a run directory's config.yaml holds
    assert again == cfg
    assert again.finetune_rl.rewards[0]["margin"] is None


def test_config_hash_stable_and_sensitive():
    a, b = resolve("sd3-medium"), resolve("sd3-medium")
    h = config_hash(a)
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)
    assert config_hash(b) == h
    assert config_hash(from_dict(yaml.safe_load(dump_yaml(a)))) == h
    assert config_hash(resolve("sd3-medium", [], ["distill.lr=2e-6"])) != h
    assert config_hash(resolve("sd3-medium", [], ["sample.seed=1"])) != h
    assert config_hash(resolve("sd3.5-medium")) != h


# -- --base DIR / hub id, files -------------------------------------------------------------------------


def test_base_dir_detects_family_and_sets_path(tiny_sd3_dir):
    cfg = resolve(str(tiny_sd3_dir))
    assert cfg.model.family == "sd3"
    assert cfg.model.path == str(Path(tiny_sd3_dir).resolve())
    assert cfg.model.hub_id == "" and cfg.model.tiny == ""
    assert cfg.distill.real_cfg == 7.0  # the family's official preset's hyperparameters
    assert str(tiny_sd3_dir) in cfg.description


def test_base_dir_with_foreign_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError) as err:
        resolve(str(tmp_path))
    assert "FluxPipeline" in str(err.value) and "model.family" in str(err.value)


def test_base_dir_without_or_with_broken_model_index(tmp_path):
    with pytest.raises(ConfigError, match="no model_index.json"):
        resolve(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve(str(tmp_path))
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not supported"):
        resolve(str(tmp_path))


def test_base_hub_id_family_from_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "models--someorg--my-sdxl"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = resolve("someorg/my-sdxl")
    assert (cfg.model.family, cfg.model.hub_id, cfg.model.path) == ("sdxl", "someorg/my-sdxl", "")
    assert cfg.student.grid == [0.399] and cfg.distill.dynadg is False  # sdxl-base hyperparameters
    # not in the cache: no family yet, schema defaults
    other = resolve("someorg/absent")
    assert (other.model.family, other.model.hub_id) == ("", "someorg/absent")


def test_yaml_file_not_a_mapping(tmp_path):
    f = write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(f)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        resolve("tiny-sd3-random", [f])
    f2 = write(tmp_path, "sec.yaml", "distill: 3\n")
    with pytest.raises(ConfigError, match="'distill' must be a mapping"):
        resolve("tiny-sd3-random", [f2])


def test_invalid_yaml_and_missing_file(tmp_path):
    f = write(tmp_path, "bad.yaml", "distill:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+\)"):
        resolve("tiny-sd3-random", [f])
    with pytest.raises(ConfigError, match="config file not found"):
        resolve("tiny-sd3-random", [str(tmp_path / "missing.yaml")])


def test_empty_file_and_empty_section_are_no_ops(tmp_path):
    empty = write(tmp_path, "empty.yaml", "")
    commented = write(tmp_path, "commented.yaml", "distill:\n  # lr: 1.0e-3\nmodel:\n  shift: 4.0\n")
    assert resolve("tiny-sd3-random", [empty]) == resolve("tiny-sd3-random")
    cfg = resolve("tiny-sd3-random", [commented])
    assert cfg.model.shift == 4.0 and cfg.distill == resolve("tiny-sd3-random").distill


def test_copied_preset_validates_as_config_file(tmp_path):
    for name in PRESETS:
        out = presets.copy(name, tmp_path / f"{name}.yaml")
        assert resolve("tiny-sd3-random", [str(out)]).model.family == resolve(name).model.family
