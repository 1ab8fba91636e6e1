"""How mexport shows a job's progress: a redrawn bar on a terminal, plain lines anywhere else.

Pure formatting and pacing over snapshots (dicts with status, processed, total, percent, rate,
eta_seconds and, while the service waits on the database, phase and waiting_seconds); no network here.
"""
from __future__ import annotations

import shutil
import sys
import time
from typing import Any, Callable, Mapping, Protocol, TextIO

FINAL_STATES = frozenset({"completed", "failed", "cancelled", "expired"})
PLAIN_INTERVAL = 1.0  # log files and CI consoles: one line a second is plenty
BAR_INTERVAL = 0.1
BAR_WIDTH = 30
Clock = Callable[[], float]
PHASE_WORDS = {"waiting_for_database": "waiting for the database"}


def duration(seconds: float | None) -> str:
    """3 s, 2:05, 1:02:05."""
    if seconds is None:
        return "?"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def rows_text(snap: Mapping[str, Any]) -> str:
    processed = int(snap.get("processed") or 0)
    total = snap.get("total")
    return f"{processed:,} of {total:,} rows" if total is not None else f"{processed:,} rows"


def pace(snap: Mapping[str, Any]) -> list[str]:
    """Rate and ETA, or what the service has been waiting for instead (the database, say)."""
    if snap.get("phase") and snap.get("waiting_seconds") is not None:
        phase = str(snap["phase"])
        return [f"{PHASE_WORDS.get(phase, phase.replace('_', ' '))} for {duration(snap['waiting_seconds'])}"]
    if snap.get("status") == "queued" and snap.get("queue_position"):
        return [f"number {snap['queue_position']} in the queue"]
    if not snap.get("rate"):
        return []
    parts = [f"{snap['rate']:,.0f} rows/s"]
    if snap.get("eta_seconds") is not None and snap.get("status") not in FINAL_STATES:
        parts.append(f"ETA {duration(snap['eta_seconds'])}")
    return parts


def percent_part(snap: Mapping[str, Any]) -> list[str]:
    return [f"{snap['percent']:.1f}%"] if snap.get("percent") is not None else []


def details(snap: Mapping[str, Any]) -> str:
    """Everything after the status in a plain line."""
    return ", ".join([rows_text(snap), *percent_part(snap), *pace(snap)])


def plain_line(snap: Mapping[str, Any]) -> str:
    return f"{snap.get('status', '?')}: {details(snap)}"


def compact_line(snap: Mapping[str, Any]) -> str:
    """What follows the bar on a terminal: short enough to fit 80 columns with it."""
    processed, total = int(snap.get("processed") or 0), snap.get("total")
    rows = f"{processed:,}/{total:,} rows" if total is not None else f"{processed:,} rows"
    return " ".join([str(snap.get("status", "?")), rows, *percent_part(snap), *pace(snap)])


def bar(snap: Mapping[str, Any], tick: int, width: int = BAR_WIDTH) -> str:
    """[#####-----] with a known total; a block sliding back and forth without one."""
    percent = snap.get("percent")
    if percent is not None:
        filled = int(width * min(100.0, float(percent)) / 100)
        return "[" + "#" * filled + "-" * (width - filled) + "]"
    block = 3
    span = width - block
    position = tick % (2 * span) if span else 0
    position = position if position <= span else 2 * span - position
    return "[" + " " * position + "=" * block + " " * (span - position) + "]"


class Progress(Protocol):
    def update(self, snap: Mapping[str, Any]) -> None: ...

    def finish(self, snap: Mapping[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...

    def warn(self, text: str) -> None: ...


class PlainProgress:
    """A line when something changed, at most one a second; the final state always gets its line."""

    def __init__(self, out: TextIO, clock: Clock = time.monotonic) -> None:
        self.out = out
        self.clock = clock
        self.last_at: float | None = None
        self.last_line: str | None = None

    def update(self, snap: Mapping[str, Any]) -> None:
        line = plain_line(snap)
        now = self.clock()
        if line == self.last_line or (self.last_at is not None and now - self.last_at < PLAIN_INTERVAL):
            return
        self._write(line, now)

    def finish(self, snap: Mapping[str, Any]) -> None:
        line = plain_line(snap)
        if line != self.last_line:
            self._write(line, self.clock())

    def note(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _write(self, line: str, now: float) -> None:
        print(line, file=self.out, flush=True)
        self.last_at, self.last_line = now, line


class BarProgress:
    """One line redrawn in place with a carriage return, at most ten times a second."""

    def __init__(self, out: TextIO, clock: Clock = time.monotonic) -> None:
        self.out = out
        self.clock = clock
        self.last_at: float | None = None
        self.tick = 0
        self.drawn = False

    def update(self, snap: Mapping[str, Any]) -> None:
        now = self.clock()
        if self.last_at is not None and now - self.last_at < BAR_INTERVAL:
            return
        self.last_at = now
        self.tick += 1
        self._draw(snap)

    def finish(self, snap: Mapping[str, Any]) -> None:
        self._draw(snap)
        self.out.write("\n")
        self.out.flush()
        self.drawn = False

    def note(self, text: str) -> None:
        self._end_line()
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        """To stderr, on a line of its own: stdout and stderr usually share the terminal."""
        self._end_line()
        print(text, file=sys.stderr, flush=True)

    def _end_line(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False

    def _draw(self, snap: Mapping[str, Any]) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)
        text = compact_line(snap)
        line = f"{bar(snap, self.tick, min(BAR_WIDTH, max(10, width - len(text) - 3)))} {text}"
        # Cut and pad to the terminal's width: a longer line wraps and \r then redraws only its tail.
        self.out.write("\r" + line[:width].ljust(width))
        self.out.flush()
        self.drawn = True


def progress_for(out: TextIO) -> Progress:
    return BarProgress(out) if out.isatty() else PlainProgress(out)
