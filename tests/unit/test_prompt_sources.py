"""Built-in prompt sets of the tiny presets and the spread of the periodic sample-grid prompts."""

from __future__ import annotations

import pytest

from dmdr_cli.digits.world import make_metadata, split_of
from dmdr_cli.engine.prompts import load_source
from dmdr_cli.errors import InputError
from dmdr_cli.recipes.distill import sample_prompts


def test_builtin_digits_is_the_balanced_train_split_and_never_a_held_out_composition():
    train = load_source("builtin:digits")
    test = load_source("builtin:digits-test")
    assert len(train) == 3000 and len(test) == 600
    lines = {m["prompt"]: m for m in make_metadata(3000, seed=1, split="train")}
    assert set(train) == set(lines) and all(split_of(lines[p]) == "train" for p in set(train))
    assert not set(train) & set(test)
    # 500 lines per GenEval task, in task order
    assert train[0] == "a photo of a " + train[0].split()[-1] and " and " in train[500]
    assert load_source("builtin:digits") == train  # deterministic


def test_unknown_builtin_set_names_the_choices():
    with pytest.raises(InputError, match="digits"):
        load_source("builtin:digit")


def test_sample_grid_prompts_are_spread_over_the_list():
    prompts = [f"p{i}" for i in range(3000)]
    assert sample_prompts(prompts) == ["p0", "p750", "p1500", "p2250"]
    assert sample_prompts(["a", "b"]) == ["a", "b"]
