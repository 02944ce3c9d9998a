"""The digits world (dmdr_cli.digits.world, EVALUATION.md §7.4): GenEval-schema metadata, captions, prompt split,
glyph split and the oracle renderer. No classifier here (see test_digits_models.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dmdr_cli.digits import world
from dmdr_cli.digits.world import (
    CLASSES,
    PALETTE,
    TASKS,
    caption,
    composition_key,
    dataset,
    glyphs,
    make_metadata,
    prompt_space,
    render,
    segment,
    train_test_split,
)
from dmdr_cli.evaluation.benchfiles import validate_geneval_metadata
from dmdr_cli.evaluation.geneval import RELATIONS, iter_image_folder, relation


def test_metadata_is_exact_geneval_schema():
    lines = make_metadata(300, 0)
    assert len(lines) == 300
    assert [line["tag"] for line in lines] == [t for t in TASKS for _ in range(50)]  # grouped, as upstream
    for line in lines:
        assert validate_geneval_metadata(line, classes=CLASSES, colors=PALETTE) is None, line
        keys = ["tag", "include", "exclude", "prompt"] if "exclude" in line else ["tag", "include", "prompt"]
        assert list(line) == keys
        assert line["prompt"] == caption(line)
        inc, tag = line["include"], line["tag"]
        if tag == "single_object":
            assert inc == [{"class": inc[0]["class"], "count": 1}]
        elif tag == "two_object":
            assert len(inc) == 2 and inc[0]["class"] != inc[1]["class"]
            assert all(c == {"class": c["class"], "count": 1} for c in inc)
        elif tag == "counting":
            assert len(inc) == 1 and 2 <= inc[0]["count"] <= 4
            assert line["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
        elif tag == "colors":
            assert len(inc) == 1 and inc[0]["count"] == 1 and inc[0]["color"] in PALETTE
        elif tag == "position":
            assert inc[0] == {"class": inc[0]["class"], "count": 1}
            assert inc[1]["position"][0] in RELATIONS and inc[1]["position"][1] == 0
            assert inc[0]["class"] != inc[1]["class"]
        elif tag == "color_attr":
            assert inc[0]["color"] != inc[1]["color"] and inc[0]["class"] != inc[1]["class"]
        if tag != "counting":
            assert "exclude" not in line
    # the 50 lines of a task repeat only once its pool is used up (10 single-object and 30 counting prompts)
    for tag, pool in (("single_object", 10), ("two_object", 90), ("position", 360), ("color_attr", 2700)):
        prompts = [line["prompt"] for line in lines if line["tag"] == tag]
        assert len(set(prompts)) == min(50, pool)


def test_metadata_is_deterministic_from_the_seed():
    a = make_metadata(120, 3)
    assert a == make_metadata(120, 3)
    assert json.loads(json.dumps(a)) == a
    assert a != make_metadata(120, 4)
    assert make_metadata(12, 0, tags=("counting",)) == [x for x in make_metadata(72, 0) if x["tag"] == "counting"][:12]
    with pytest.raises(ValueError):
        make_metadata(5, 0, tags=("nope",))


def test_captions_in_geneval_style():
    def line(tag, include, exclude=None):
        return world._line(tag, include, exclude)

    assert line("single_object", [{"class": "three", "count": 1}])["prompt"] == "a photo of a 3"
    assert line("single_object", [{"class": "eight", "count": 1}])["prompt"] == "a photo of an 8"
    assert line("counting", [{"class": "five", "count": 2}], [{"class": "five", "count": 3}])["prompt"] == \
        "a photo of two 5s"
    assert line("colors", [{"class": "eight", "count": 1, "color": "red"}])["prompt"] == "a photo of a red 8"
    assert line("color_attr", [{"class": "three", "count": 1, "color": "red"},
                               {"class": "seven", "count": 1, "color": "blue"}])["prompt"] == \
        "a photo of a red 3 and a blue 7"
    pos = line("position", [{"class": "eight", "count": 1},
                            {"class": "two", "count": 1, "position": ["left of", 0]}])
    assert pos["prompt"] == "a photo of a 2 left of an 8"  # clause 0 is the reference, as upstream
    assert {t: len(prompt_space(t)) for t in TASKS} == {"single_object": 10, "two_object": 90, "counting": 30,
                                                       "colors": 60, "position": 360, "color_attr": 2700}
    for t in TASKS:
        prompts = [x["prompt"] for x in prompt_space(t)]
        assert len(set(prompts)) == len(prompts)


def test_train_and_held_out_prompts_are_disjoint():
    space = [line for t in TASKS for line in prompt_space(t)]
    train, test = train_test_split(space)
    assert len(train) + len(test) == len(space) and 0.1 < len(test) / len(space) < 0.3
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in test}
    assert not {composition_key(x) for x in train} & {composition_key(x) for x in test}
    assert {x["tag"] for x in train} == {x["tag"] for x in test} == set(TASKS)
    # reworded prompts ("A left of B" / "B right of A", "A and B" / "B and A") share a split
    mirror = world._line("position", [{"class": "two", "count": 1},
                                      {"class": "eight", "count": 1, "position": ["right of", 0]}])
    orig = world._line("position", [{"class": "eight", "count": 1},
                                    {"class": "two", "count": 1, "position": ["left of", 0]}])
    assert composition_key(mirror) == composition_key(orig)
    # make_metadata draws each split from its own side
    test_prompts = {x["prompt"] for x in test}
    assert all(x["prompt"] not in test_prompts for x in make_metadata(600, 1, split="train"))
    assert all(x["prompt"] in test_prompts for x in make_metadata(120, 1, split="test"))


def test_glyph_splits():
    xtr, ytr = glyphs("train")
    xte, yte = glyphs("test")
    assert xtr.shape == (4000, 28, 28) and xte.shape == (1000, 28, 28) and xtr.dtype == np.uint8
    assert np.bincount(ytr).tolist() == [400] * 10 and np.bincount(yte).tolist() == [100] * 10
    assert not {r.tobytes() for r in xtr} & {r.tobytes() for r in xte}
    xt, _ = glyphs("test", typical_only=True)
    assert 0.85 * len(xte) < len(xt) < len(xte)


def test_render_is_an_oracle():
    lines = make_metadata(60, 5, split="test")
    for i, line in enumerate(lines):
        arr, layout = render(line, seed=i, size=32, split="test", as_array=True)
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
        want = sorted((c["class"], c.get("color", "white")) for c in line["include"] for _ in range(c["count"]))
        assert sorted((o["class"], o["color"]) for o in layout) == want
        _, masks = segment(arr)  # one component per digit, with the layout's boxes
        assert sorted(world.mask_box(m) for m in masks) == sorted(tuple(o["box"]) for o in layout)
        for o in layout:  # the tint: hue of the ink is the palette colour (white = grey)
            x0, y0, x1, y1 = o["box"]
            ink = arr[y0:y1, x0:x1].reshape(-1, 3).astype(float)
            ink = ink[ink.max(axis=1) > 64]
            rgb = np.array(world.palette_rgb(o["color"]))
            assert np.allclose(ink / ink.max(axis=1, keepdims=True), rgb / rgb.max(), atol=0.02)
        for c in line["include"]:
            if "position" in c:
                a = next(o for o in layout if o["clause"] == 1)
                b = next(o for o in layout if o["clause"] == 0)
                assert c["position"][0] in relation(a["box"], b["box"], 0.1)


def test_render_deterministic_sizes_and_errors():
    line = make_metadata(1, 0, tags=("color_attr",))[0]
    a, la = render(line, seed=3, as_array=True)
    b, lb = render(line, seed=3, as_array=True)
    assert np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, render(line, seed=4, as_array=True)[0])
    assert not np.array_equal(a, render(line, seed=3, split="test", as_array=True)[0])
    img, _ = render(line, seed=3, size=64)
    assert img.size == (64, 64) and img.mode == "RGB"
    with pytest.raises(ValueError):
        render({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"})
    with pytest.raises(ValueError):
        render({"tag": "colors", "include": [{"class": "one", "count": 1, "color": "orange"}], "prompt": "x"})
    with pytest.raises(ValueError):
        render({"tag": "counting", "include": [{"class": "one", "count": 5}], "prompt": "x"})


def test_dataset_and_geneval_folder(tmp_path):
    items = list(dataset(12, seed=2, split="train"))
    assert len(items) == 12
    assert [m["prompt"] for _, _, m in items] == [p for _, p, _ in items]
    assert {m["tag"] for _, _, m in items} == set(TASKS)
    assert [p for _, p, _ in items] == [p for _, p, _ in dataset(12, seed=2, split="train")]
    lines = make_metadata(6, 0)
    world.write_geneval_folder(tmp_path / "imgs", lines, images_per_prompt=2)
    world.write_metadata(tmp_path / "meta.jsonl", lines)
    back = [json.loads(x) for x in (tmp_path / "meta.jsonl").read_text().splitlines()]
    assert back == lines
    found = list(iter_image_folder(tmp_path / "imgs"))
    assert [m for _, m, _ in found] == lines and all(len(p) == 2 for _, _, p in found)
