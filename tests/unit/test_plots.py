"""PNG line charts (Pillow only): ticks cover the data, series are drawn, training curves come from metrics.jsonl."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dmdr_cli.evaluation.plots import _ticks, line_chart, training_curves


def test_ticks_are_round_and_cover_the_range():
    assert _ticks(0, 100) == [0, 25, 50, 75, 100]
    t = _ticks(0.17, 0.86)
    assert t[0] <= 0.17 and t[-1] >= 0.86 and np.allclose(np.diff(t), 0.2)
    assert _ticks(5, 5)[0] == 5 and len(_ticks(5, 5)) >= 2   # constant series still get an axis


def test_line_chart_draws_each_series_in_its_colour(tmp_path):
    path = line_chart({"a": [(0, 0), (10, 1)], "b": [(0, 1), (10, 0)], "skip": [(float("nan"), 1)]},
                      tmp_path / "c.png", title="t", xlabel="x", ylabel="y", size=(320, 200))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (200, 320, 3)
    colours = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in ("#1f77b4", "#d62728")}
    present = {tuple(p) for p in img.reshape(-1, 3)}
    assert colours <= present
    assert not list(tmp_path.glob(".*.tmp"))


def test_training_curves_from_metrics(tmp_path):
    rows = [{"step": k, "loss/dmd": 1.0 / k, "loss/fake": 0.5, "loss/rl": 0.0, "reward/digit-cls": -3 + k * 0.1}
            for k in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = training_curves(tmp_path)
    assert [p.name for p in written] == ["curves-losses.png", "curves-rewards.png"]
    assert training_curves(tmp_path / "missing") == []
