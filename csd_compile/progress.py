"""Progress while a step compiles: what is being compiled and for how long, on stderr.

A compile of the decode step takes from seconds (warm caches) to minutes (cold), with nothing to
see meanwhile. :class:`CompileProgress` is a context manager that prints a status line with the
elapsed seconds while its block runs: rewritten in place every second on a terminal, one line every
``interval`` seconds otherwise (logs, CI). The ``"csd"`` backend reports what it is doing through
:func:`note` (which graph, how many linears it quantizes, Inductor's turn); outside a
``CompileProgress`` block :func:`note` does nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["CompileProgress", "note"]

_active: list["CompileProgress"] = []
_lock = threading.Lock()


def note(stage: str, *, new_graph: bool = False) -> None:
    """Tell the innermost active :class:`CompileProgress` (if any) what is being done now;
    ``new_graph``: a new graph reached the backend (the stages are then numbered by graph)."""
    with _lock:
        if _active:
            _active[-1]._set(stage, new_graph)


class CompileProgress:
    """``with CompileProgress("decode step"): ...`` prints ``[csd-compile] compiling decode step: <stage>
    (12 s)`` while the block runs, and a final ``compiled decode step in 41.2 s`` line.

    Args:
        what: what is being compiled, for the status line.
        file: where to print (default ``sys.stderr``).
        interval: seconds between lines when ``file`` is not a terminal.
    """

    def __init__(self, what: str, *, file: TextIO | None = None, interval: float = 15.0):
        self.what = what
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.stage = "tracing with Dynamo"
        self.graphs = 0
        self.seconds = 0.0
        self._tty = bool(getattr(self.file, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._width = 0

    def _set(self, stage: str, new_graph: bool) -> None:
        self.graphs += int(new_graph)
        self.stage = f"graph {self.graphs}: {stage}" if self.graphs else stage
        if not self._tty:  # a log gets each new stage once, as it happens
            self._line()

    def _line(self) -> None:
        text = f"[csd-compile] compiling {self.what}: {self.stage} ({time.perf_counter() - self._t0:.0f} s)"
        if self._tty:
            pad = " " * max(self._width - len(text), 0)
            self._width = len(text)
            print(f"\r{text}{pad}", end="", file=self.file, flush=True)
        else:
            print(text, file=self.file, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(1.0 if self._tty else self.interval):
            self._line()

    def __enter__(self) -> "CompileProgress":
        self._t0 = time.perf_counter()
        with _lock:
            _active.append(self)
        self._line()
        self._thread = threading.Thread(target=self._tick, name="csd-compile-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _lock:
            if self in _active:
                _active.remove(self)
        self.seconds = time.perf_counter() - self._t0
        end = "\r" + " " * self._width + "\r" if self._tty else ""
        verdict = "compiled" if exc_type is None else "stopped compiling"
        graphs = f", {self.graphs} graph{'s' if self.graphs != 1 else ''}" if self.graphs else ""
        print(f"{end}[csd-compile] {verdict} {self.what} in {self.seconds:.1f} s{graphs}", file=self.file, flush=True)
