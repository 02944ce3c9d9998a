"""The engine reports through a metrics sink and nothing else (no printing, no rich).

A sink gets ``start`` (total generator steps, where it starts, the phase), ``log`` (one dict of floats
per generator step; keys are grouped by the prefix before ``/``), ``event`` (a line of text) and
``close``. ``JsonlSink`` appends to ``metrics.jsonl``; the UI supplies the live dashboard.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol


class MetricsSink(Protocol):
    def start(self, total: int, initial: int, phase: str) -> None: ...
    def log(self, step: int, metrics: dict) -> None: ...
    def event(self, message: str) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """One JSON line per logged step: ``{"step": k, "time": ..., **metrics}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def start(self, total: int, initial: int, phase: str) -> None:
        self._fh = open(self.path, "a", encoding="utf-8")
        self.phase = phase

    def log(self, step: int, metrics: dict) -> None:
        rec = {"step": step, "phase": self.phase, "time": round(time.time(), 3)}
        rec.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()

    def event(self, message: str) -> None:
        pass

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None


class NullSink:
    def start(self, total: int, initial: int, phase: str) -> None: ...
    def log(self, step: int, metrics: dict) -> None: ...
    def event(self, message: str) -> None: ...
    def close(self) -> None: ...


class FanOut:
    def __init__(self, *sinks) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def start(self, total: int, initial: int, phase: str) -> None:
        for s in self.sinks:
            s.start(total, initial, phase)

    def log(self, step: int, metrics: dict) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def event(self, message: str) -> None:
        for s in self.sinks:
            s.event(message)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
