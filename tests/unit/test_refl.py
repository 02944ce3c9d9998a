"""Unit tests for dmdr_cli.losses.refl (ALGORITHM.md §6.2, EVALUATION.md §4.5)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dmdr_cli.errors import ConfigError
from dmdr_cli.losses.refl import refl_loss, with_prefix
from dmdr_cli.rewards.offline import BrightnessReward


class StubReward:
    """Returns fixed scores (with a gradient path through the images) and records the prompts it saw."""

    def __init__(self, scores: list[float], name: str = "stub", differentiable: bool = True) -> None:
        self.scores = torch.tensor(scores)
        self.name = name
        self.differentiable = differentiable
        self.seen: list[list[str]] = []

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        self.seen.append(list(prompts))
        return self.scores + 0.0 * images.sum(dim=(1, 2, 3))


IMAGES = torch.zeros(2, 3, 4, 4)
PROMPTS = ["a cat", "a dog"]


def test_hinge_matches_hand_computation() -> None:
    loss, stats = refl_loss([(StubReward([0.2, 0.9]), 0.3, 0.7, "")], IMAGES, PROMPTS)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.3 * (0.5 + 0.0) / 2)  # 0.3 · mean(relu(0.5), relu(−0.2)) = 0.075
    assert stats == {"reward/stub": pytest.approx(0.55)} and isinstance(stats["reward/stub"], float)


def test_no_margin_is_negative_mean_and_terms_add_up() -> None:
    terms = [(StubReward([0.2, 0.9], "a"), 0.3, None, ""), (StubReward([0.1, 0.3], "b"), 2.0, 0.7, "")]
    loss, stats = refl_loss(terms, IMAGES, PROMPTS)
    assert loss.item() == pytest.approx(0.3 * -0.55 + 2.0 * (0.6 + 0.4) / 2)
    assert stats == {"reward/a": pytest.approx(0.55), "reward/b": pytest.approx(0.2)}


def test_prefix_reaches_the_reward_only() -> None:
    hps, clip = StubReward([0.3, 0.3], "hps-v2.1@abcd1234"), StubReward([0.3, 0.3], "clip")
    _, stats = refl_loss([(clip, 0.3, 0.7, ""), (hps, 0.3, 0.7, "Realistic photo")], IMAGES, PROMPTS)
    assert hps.seen == [["Realistic photo a cat", "Realistic photo a dog"]]
    assert clip.seen == [PROMPTS]
    assert set(stats) == {"reward/clip", "reward/hps-v2.1"}  # the weights hash stays out of metric names
    assert with_prefix("", PROMPTS) == PROMPTS


def test_gradient_flows_to_images() -> None:
    images = torch.rand(2, 3, 4, 4).requires_grad_()
    loss, stats = refl_loss([(BrightnessReward(), 1.0, None, "")], images, PROMPTS)
    loss.backward()  # L = −mean_b mean_chw x  →  ∂L/∂x = −1 / (B·C·H·W)
    torch.testing.assert_close(images.grad, torch.full_like(images, -1 / images.numel()))
    assert stats["reward/brightness"] == pytest.approx(images.detach().mean().item())


def test_inactive_hinge_gives_no_gradient() -> None:
    images = torch.full((2, 3, 4, 4), 0.9, requires_grad=True)
    loss, _ = refl_loss([(BrightnessReward(), 1.0, 0.5, "")], images, PROMPTS)
    loss.backward()
    assert loss.item() == 0.0 and images.grad.abs().sum() == 0


def test_duplicate_names_get_distinct_keys() -> None:
    terms = [(StubReward([0.1, 0.1], "x"), 1.0, None, ""), (StubReward([0.5, 0.5], "x"), 1.0, None, "")]
    _, stats = refl_loss(terms, IMAGES, PROMPTS)
    assert stats == {"reward/x": pytest.approx(0.1), "reward/x#2": pytest.approx(0.5)}


def test_non_differentiable_reward_is_a_config_error() -> None:
    ocr = StubReward([1.0, 1.0], "ocr", differentiable=False)
    with pytest.raises(ConfigError, match=r"differentiable reward; use --rl grpo or dpo for ocr"):
        refl_loss([(StubReward([0.2, 0.2]), 1.0, 0.7, ""), (ocr, 1.0, 0.7, "")], IMAGES, PROMPTS)
    assert ocr.seen == []  # checked before any reward runs
    with pytest.raises(ConfigError, match="at least one reward"):
        refl_loss([], IMAGES, PROMPTS)


def test_wrong_score_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        refl_loss([(StubReward([[0.1], [0.2]]), 1.0, 0.7, "")], IMAGES, PROMPTS)
