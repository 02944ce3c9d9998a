"""The training dashboard: a Rich live panel on a terminal, plain lines otherwise (same MetricsSink calls)."""

from __future__ import annotations

import io

from rich.console import Console

from dmdr_cli.ui import dashboard as dash

METRICS = {"loss/dmd": 0.0123, "loss/fake": 2.1, "reward/color": -0.25, "sched/lambda_r": 0.4, "sched/beta_a": 3.5,
           "sched/beta_b": 1.4, "lr/gen": 1e-4, "mem/peak_mb": 512.0}


def _render_text(board) -> str:
    buf = io.StringIO()
    Console(file=buf, width=140, force_terminal=False).print(board._render())
    return buf.getvalue()


def test_live_panel_shows_progress_losses_rewards_schedule_and_memory(monkeypatch):
    monkeypatch.setattr(dash, "_console", lambda stderr=False: Console(file=io.StringIO(), force_terminal=True))
    board = dash.Dashboard("distill", live=True)
    board.start(total=10, initial=2, phase="distill")
    board.log(3, METRICS)
    board.event("checkpoint step-000003")
    text = _render_text(board)
    board.close()
    for needle in ("loss", "dmd=0.0123", "fake=2.1", "reward", "color=-0.25", "sched", "lambda_r=0.4", "beta_a=3.5",
                   "lr", "gen=0.0001", "mem", "peak_mb=512", "checkpoint step-000003", "3/10"):
        assert needle in text, needle
    assert board._live is None  # stopped


def test_plain_lines_when_not_a_terminal(monkeypatch):
    lines = []
    monkeypatch.setattr(dash, "info", lines.append)
    board = dash.Dashboard("finetune-rl", every=2, live=False)
    board.start(total=4, initial=0, phase="finetune_rl:refl")
    for k in range(1, 5):
        board.log(k, METRICS)
    board.close()
    steps = [line for line in lines if "step " in line]
    assert [s.split("step ")[1].split("/")[0] for s in steps] == ["2", "4"]  # every 2 steps, and the last
    assert "dmd=0.0123" in steps[-1] and "color=-0.25" in steps[-1] and "lambda_r=0.4" in steps[-1]
