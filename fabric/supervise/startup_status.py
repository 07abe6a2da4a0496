"""StartupStatus: what a start-up (or a stop) is doing, for the person watching it.

``fabric launch`` and ``wait_ready`` report through it: one ``[prefix]`` line per step, and for
each bounded wait what it waits for, the seconds waited and the bound; one live line rewritten
in place on a terminal, plain lines (on each change and every ``LOG_EVERY_S``) in a log or a
pipe, so a log shows progress, not noise.

Invariant: a live line is cleared before any other line is written and when its wait ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

LIVE_S = 0.25
"""How often a live status line is rewritten at most."""
LOG_EVERY_S = 10.0
"""How often a wait that is not on a terminal repeats its line while nothing changes."""


class StartupStatus:
    """What a start-up (or a stop) is doing, for the person watching it.

    ``line`` (a ``Progress``) prints one line with ``prefix``; ``waiting`` reports a bounded
    wait (what is awaited, seconds waited, the bound) and ``done`` ends it. On a terminal the
    wait is one status line rewritten in place (at most every ``LIVE_S``) and cleared before any
    other line and when the wait ends; elsewhere it is a plain line when what is awaited
    changes and every ``LOG_EVERY_S`` while it does not, so a log shows progress, not noise.

    Args:
        live: rewrite a status line in place; default: whether ``stream`` is a terminal.
    """

    def __init__(
        self,
        prefix: str,
        stream: TextIO | None = None,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix = prefix
        self._stream = stream if stream is not None else sys.stdout
        self._live = self._stream.isatty() if live is None else live
        self._clock = clock
        self._shown = False  # a live line is on the screen
        self._what: str | None = None
        self._written_at = 0.0

    def line(self, message: str) -> None:
        self._clear()
        self._stream.write(f"{self._prefix} {message}\n")
        self._stream.flush()

    def waiting(self, what: str, waited_s: float, bound_s: float) -> None:
        now = self._clock()
        changed = what != self._what
        every = LIVE_S if self._live else LOG_EVERY_S
        if not changed and now - self._written_at < every:
            return
        self._what, self._written_at = what, now
        text = f"waiting: {what} ({waited_s:.0f} s of {bound_s:.0f} s)"
        if not self._live:
            self.line(text)
            return
        self._stream.write(f"\r{self._prefix} {text}\x1b[K")
        self._stream.flush()
        self._shown = True

    def done(self) -> None:
        """The wait ended: clear its live line."""
        self._clear()
        self._what = None

    def _clear(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False
