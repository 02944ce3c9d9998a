"""The generator EMA (engine.ema): the update rule against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from dmdr_cli.engine.ema import ema_copy, ema_decay_at, ema_update


def test_decay_warm_up_then_constant():
    assert ema_decay_at(0.98, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.98, 2) == pytest.approx(3 / 12)
    assert ema_decay_at(0.98, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.98, 440) == pytest.approx(441 / 450)  # 0.98 exactly at n = 440
    assert ema_decay_at(0.98, 10_000) == 0.98
    assert ema_decay_at(0.5, 1) == pytest.approx(2 / 11) and ema_decay_at(0.5, 8) == 0.5  # 9/18 = 0.5


def test_update_matches_hand_computed_values():
    theta = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([[4.0]])}
    ema = ema_copy(theta)
    assert ema["a"] is not theta["a"] and torch.equal(ema["a"], theta["a"])
    theta["a"] += 1.0  # [1, 3]
    theta["b"] -= 4.0  # [[0]]
    d1 = ema_update(ema, theta, 0.9, 1)
    assert d1 == pytest.approx(2 / 11)
    # ema = d*old + (1-d)*new:  a = [9/11, 2*2/11 + 3*9/11] = [0.818181.., 2.818181..], b = 4*2/11
    torch.testing.assert_close(ema["a"], torch.tensor([9 / 11, 31 / 11]))
    torch.testing.assert_close(ema["b"], torch.tensor([[8 / 11]]))
    theta["a"].zero_()
    d2 = ema_update(ema, theta, 0.9, 2)
    assert d2 == pytest.approx(0.25)
    torch.testing.assert_close(ema["a"], torch.tensor([9 / 44, 31 / 44]))
    torch.testing.assert_close(ema["b"], torch.tensor([[2 / 11]]))


def test_ema_is_fp32_for_low_precision_weights():
    theta = {"w": torch.full((3,), 1.0, dtype=torch.bfloat16)}
    ema = ema_copy(theta)
    assert ema["w"].dtype == torch.float32
    theta["w"] += 1.0
    for n in range(1, 200):
        ema_update(ema, theta, 0.999, n)
    assert ema["w"].dtype == torch.float32 and float(ema["w"][0]) > 1.9  # the warm-up lets it follow early
