"""Terminal output: the only module family that imports rich.

Errors are one red line on stderr. Progress is a Rich bar with ETA on a TTY and plain periodic lines
otherwise (CI logs, pipes), so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One red line on stderr."""
    _console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, highlight=False)


def info(message: str) -> None:
    _console().print(message, markup=False)


def success(message: str) -> None:
    _console().print(f"[green]{message}[/]")


def is_tty() -> bool:
    return sys.stdout.isatty()


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """Yields ``update(done, total)``: a Rich bar with ETA on a TTY, else a line every ~10 % / 5 s."""
    if is_tty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=_console()) as bar:
            task = bar.add_task(description, total=total)
            yield lambda done, tot: bar.update(task, completed=done, total=tot)
        return
    state = {"last": 0.0, "shown": -1}
    start = time.perf_counter()

    def update(done: int, tot: int) -> None:
        now = time.perf_counter()
        step = max(1, tot // 10)
        if done == tot or done - state["shown"] >= step or now - state["last"] > 5:
            rate = (now - start) / max(done, 1)
            info(f"{description}: {done}/{tot}  elapsed {now - start:.1f}s  eta {rate * (tot - done):.1f}s")
            state["last"], state["shown"] = now, done

    yield update


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*r)
    _console().print(t)


def syntax_yaml(text: str) -> None:
    if is_tty():
        from rich.syntax import Syntax

        _console().print(Syntax(text, "yaml", background_color="default"))
    else:
        sys.stdout.write(text)
