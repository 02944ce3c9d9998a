"""Live training dashboard: a Rich panel on a TTY (progress with ETA, phase, losses, rewards, schedule
values, learning rates, memory), plain periodic lines otherwise. Implements the engine's MetricsSink."""

from __future__ import annotations

import time

from dmdr_cli.ui.console import _console, info, is_tty

_GROUP_ORDER = ("loss", "reward", "dmd", "sched", "lr", "mem", "time")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Dashboard:
    def __init__(self, title: str, every: int = 1, live: bool | None = None) -> None:
        self.title = title
        self.every = max(1, every)
        self.live_mode = is_tty() if live is None else live
        self.latest: dict = {}
        self.events: list[str] = []
        self._live = None

    # MetricsSink -----------------------------------------------------------------------------------
    def start(self, total: int, initial: int, phase: str) -> None:
        self.total, self.initial, self.phase, self.t0 = total, initial, phase, time.perf_counter()
        self.step = initial
        if self.live_mode:
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            self.task = self.progress.add_task(phase, total=total, completed=initial)
            self._live = Live(self._render(), console=_console(), refresh_per_second=4, transient=False)
            self._live.start()
        else:
            info(f"[{self.title}] {phase}: generator steps {initial} -> {total}")

    def log(self, step: int, metrics: dict) -> None:
        self.step = step
        self.latest.update(metrics)
        if self._live is not None:
            self.progress.update(self.task, completed=step)
            self._live.update(self._render())
        elif step % self.every == 0 or step == self.total:
            done = step - self.initial
            rate = (time.perf_counter() - self.t0) / max(done, 1)
            keys = ["loss/dmd", "loss/fake", "loss/rl", "sched/lambda_r", "sched/beta_a", "sched/beta_b"]
            keys += sorted(k for k in metrics if k.startswith("reward/"))
            vals = "  ".join(f"{k.split('/', 1)[1]}={_fmt(metrics[k])}" for k in keys if k in metrics)
            info(f"[{self.title}] step {step}/{self.total}  eta {rate * (self.total - step):.0f}s  {vals}")

    def event(self, message: str) -> None:
        self.events = (self.events + [message])[-3:]
        if self._live is not None:
            self._live.update(self._render())
        else:
            info(f"[{self.title}] {message}")

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None

    # rendering -------------------------------------------------------------------------------------
    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        groups: dict[str, list[tuple[str, object]]] = {}
        for k, v in self.latest.items():
            g, _, name = k.partition("/")
            groups.setdefault(g, []).append((name or g, v))
        for g in sorted(groups, key=lambda x: (_GROUP_ORDER.index(x) if x in _GROUP_ORDER else 99, x)):
            table.add_row(f"[bold cyan]{g}[/]", "  ".join(f"{n}={_fmt(v)}" for n, v in sorted(groups[g])))
        parts = [self.progress, table] + [f"[dim]{e}[/]" for e in self.events]
        return Panel(Group(*parts), title=f"dmdr {self.title} - {self.phase}", border_style="blue")
