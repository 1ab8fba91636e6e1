"""What mexport shows: progress pacing and wording (with a fake clock), and how a cancel ended."""
from __future__ import annotations

import io
from typing import Any

from service.cli_client import cancel_outcome
from service.cli_progress import BarProgress, PlainProgress, bar, compact_line, duration, plain_line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def snap(processed: int, total: int | None = 1000, status: str = "processing", **extra: Any) -> dict[str, Any]:
    percent = None if total is None else round(100 * processed / total, 1)
    return {"status": status, "processed": processed, "total": total, "percent": percent, **extra}


def test_plain_lines_come_at_most_once_a_second_and_the_end_always_gets_one() -> None:
    out, clock = io.StringIO(), Clock()
    progress = PlainProgress(out, clock)
    for step in range(30):  # ten updates a second for three seconds
        progress.update(snap(step * 10, rate=100.0, eta_seconds=(1000 - step * 10) / 100))
        clock.now += 0.1
    progress.finish(snap(1000, status="completed", rate=100.0))
    lines = out.getvalue().splitlines()
    assert lines[0] == "processing: 0 of 1,000 rows, 0.0%, 100 rows/s, ETA 10 s"
    assert [line.split(":")[0] for line in lines] == ["processing"] * 3 + ["completed"]
    assert lines[-1] == "completed: 1,000 of 1,000 rows, 100.0%, 100 rows/s"  # no ETA once ended


def test_an_unchanged_state_is_not_repeated() -> None:
    out, clock = io.StringIO(), Clock()
    progress = PlainProgress(out, clock)
    for _ in range(5):
        progress.update(snap(0, status="queued", queue_position=2))
        clock.now += 2
    assert out.getvalue() == "queued: 0 of 1,000 rows, 0.0%, number 2 in the queue\n"


def test_without_a_total_the_bar_slides_and_no_percent_is_claimed() -> None:
    drawn = [bar(snap(5, total=None), tick, 10) for tick in range(20)]
    assert {len(text) for text in drawn} == {12}
    assert {text.index("===") - 1 for text in drawn} == set(range(10 - 3 + 1))  # back and forth over the whole width
    assert plain_line(snap(1234, total=None, rate=50.0)) == "processing: 1,234 rows, 50 rows/s"
    assert bar(snap(250), 0, 8) == "[##------]"


def test_waiting_on_the_database_replaces_rate_and_eta() -> None:
    waiting = snap(300, rate=80.0, eta_seconds=9, phase="waiting_for_database", waiting_seconds=75)
    assert plain_line(waiting) == "processing: 300 of 1,000 rows, 30.0%, waiting for the database for 1:15"
    assert compact_line(waiting) == "processing 300/1,000 rows 30.0% waiting for the database for 1:15"
    writing = snap(300, rate=80.0, eta_seconds=9, phase="writing", waiting_seconds=None)
    assert plain_line(writing) == "processing: 300 of 1,000 rows, 30.0%, 80 rows/s, ETA 9 s"


def test_the_bar_redraws_in_place_at_most_ten_times_a_second() -> None:
    out, clock = io.StringIO(), Clock()
    progress = BarProgress(out, clock)
    for step in range(50):
        progress.update(snap(step * 20, rate=200.0, eta_seconds=3725))
        clock.now += 1 / 32  # thirty-two a second, exact in binary: every fourth is drawn (0.125 s apart)
    progress.finish(snap(1000, status="completed"))
    text = out.getvalue()
    assert text.count("\r") == len(range(0, 50, 4)) + 1 and text.endswith("\n") and "\n" not in text[:-1]
    assert "ETA 1:02:05" in text


def test_durations() -> None:
    assert [duration(s) for s in (None, 0.4, 59, 60, 3599, 3600)] == ["?", "0 s", "59 s", "1:00", "59:59", "1:00:00"]


def test_what_a_cancel_ended_in_is_said_plainly() -> None:
    assert cancel_outcome({"id": "j1", "status": "cancelled"}) == "export j1 cancelled"
    assert cancel_outcome({"id": "j1", "status": "failed"}) == "export j1 failed"
    assert "completed before the cancel took effect" in cancel_outcome({"id": "j1", "status": "completed"})
