"""A service that stays responsive while the database is slow: liveness apart from readiness, progress that is
never quiet for long, and bounded queries (server-side time limits, a count that may give up, a job deadline)."""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any, AsyncGenerator

import bson
import pytest
from pymongo import monitoring
from bson.raw_bson import RawBSONDocument
from pymongo.errors import DocumentTooLarge, ExecutionTimeout, OperationFailure

from scripts.generate_data import make_documents
from service.app import create_app
from service.db import Database, DatabaseError, FindSpec, QueryTimeout, driver_errors, make_client, translate
from service.settings import MANAGER_KEY, SETTINGS_KEY

from conftest import DATA_DB, END_STATES, export_files, make_settings, new_jobs_collection, subscribe, until, wait_status
from playwright.async_api import expect
from test_browser import COLLECTION, job_item, open_page, start_export
from wire_proxy import WireProxy

ROWS = 2500  # three batches
BATCH_SIZE = 1000
QUIET_LIMIT = 1.0  # the longest the room may hear nothing while a job runs


class SlowSource:
    """A BatchSource whose database takes its time: the count takes count_delay (or raises count_error),
    the first batch first_delay, every later one batch_delay."""

    def __init__(self, first_delay: float = 0.0, batch_delay: float = 0.0, count_delay: float = 0.0, count_error: Exception | None = None,
                 rows: int = ROWS) -> None:
        self.first_delay, self.batch_delay = first_delay, batch_delay
        self.count_delay, self.count_error = count_delay, count_error
        self.docs = [bson.encode(doc) for doc in make_documents(rows, 99)]
        self.count_done_at: float | None = None

    async def count(self, spec: FindSpec) -> int:
        await asyncio.sleep(self.count_delay)
        self.count_done_at = time.monotonic()
        if self.count_error is not None:
            raise self.count_error
        return len(self.docs)

    async def raw_batches(self, spec: FindSpec) -> AsyncGenerator[bytes, None]:
        await asyncio.sleep(self.first_delay)
        for start in range(0, len(self.docs), BATCH_SIZE):
            if start:
                await asyncio.sleep(self.batch_delay)
            yield b"".join(self.docs[start:start + BATCH_SIZE])


async def run_watched(aiohttp_client: Any, tmp_path: Path, mongo_url: str, source: SlowSource, **settings: Any) -> tuple[dict[str, Any], list[tuple[float, str, dict[str, Any]]], float]:
    """Create a csv export over source, watched over Socket.IO from before it starts; (final snapshot, events,
    the time of subscription)."""
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, **settings), source=source))
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv", "fields": ["seq", "title"]})).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(api, job["id"], seen)
    subscribed = time.monotonic()
    try:
        final = await wait_status(api, job["id"], END_STATES, timeout=60)
        # The end event may trail the state written before it.
        await until(lambda: seen and seen[-1][1] in ("export-completed", "export-failed", "export-cancelled"), "the job's end event", timeout=5)
    finally:
        await sio.disconnect()
    return final, seen, subscribed


async def test_the_rate_leaves_out_the_wait_for_the_first_batch(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    """Rows come 10,000 a second once they flow, after a 3 s wait for the first batch (a sort, say): the rate, and
    so the time left, is of the flow. Counted from the start it said 4,000 and a time left two and a half times
    too long."""
    source = SlowSource(first_delay=3.0, batch_delay=0.1, rows=20_000)
    final, seen, _ = await run_watched(aiohttp_client, tmp_path, mongo_url, source)
    assert final["status"] == "completed", final
    rates = [data["rate"] for _, name, data in seen if name == "export-processing" and data["processed"] >= 13_000]
    assert rates and min(rates) > 6000, rates  # the flow's pace, less what encoding and the loop take


def longest_quiet(seen: list[tuple[float, str, dict[str, Any]]], since: float) -> float:
    times = [since] + [t for t, _, _ in seen]
    return max(b - a for a, b in zip(times, times[1:]))


async def test_a_slow_first_batch_and_slow_batches_keep_the_room_informed(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    source = SlowSource(first_delay=3.0, batch_delay=2.0)
    final, seen, subscribed = await run_watched(aiohttp_client, tmp_path, mongo_url, source)
    assert final["status"] == "completed" and final["processed"] == ROWS, final
    assert longest_quiet(seen, subscribed) <= QUIET_LIMIT, [(round(t - subscribed, 2), n) for t, n, _ in seen]
    waiting = [data for _, _, data in seen if data.get("phase") == "waiting_for_database"]
    # Honest waits: the time grows through the 3 s wait for the first batch, then starts again for each slow one.
    waits = [d["waiting_seconds"] for d in waiting]
    first = waits[: next((i for i in range(1, len(waits)) if waits[i] < waits[i - 1]), len(waits))]
    assert first == sorted(first) and 2.5 <= first[-1] < 3.5, waits
    assert len(first) < len(waits) and max(waits[len(first):]) >= 1.0, waits
    assert seen[-1][1] == "export-completed" and seen[-1][2]["phase"] == "done"


async def test_the_first_rows_do_not_wait_for_the_count(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    source = SlowSource(count_delay=2.5, batch_delay=1.5)
    final, seen, _ = await run_watched(aiohttp_client, tmp_path, mongo_url, source)
    assert final["status"] == "completed" and final["total"] == ROWS
    assert source.count_done_at is not None
    early = [data for t, name, data in seen if name == "export-processing" and t < source.count_done_at]
    assert early and early[0]["processed"] > 0 and early[0]["total"] is None and early[0]["percent"] is None, early
    # Once counted, the total is given with the rows (not only at the end).
    assert any(data["total"] == ROWS and data["processed"] < ROWS for _, _, data in seen), seen


async def test_a_count_past_its_time_limit_leaves_the_total_unknown_and_the_export_goes_on(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    source = SlowSource(count_error=QueryTimeout("the query ran past its time limit"), batch_delay=0.2)
    final, seen, _ = await run_watched(aiohttp_client, tmp_path, mongo_url, source)
    assert final["status"] == "completed" and final["processed"] == final["total"] == ROWS
    running = [data for _, name, data in seen if name == "export-processing"]
    assert running and all(data["total"] is None and data["percent"] is None for data in running[:-1]), running


async def test_a_job_past_its_deadline_fails_with_timeout_and_leaves_no_file(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    final, seen, _ = await run_watched(aiohttp_client, tmp_path, mongo_url, SlowSource(batch_delay=3.0), job_timeout_seconds=2)
    assert final["status"] == "failed" and final["error"]["code"] == "timeout", final
    assert "EXPORT_JOB_TIMEOUT_SECONDS" in final["error"]["message"]
    assert seen[-1][1] == "export-failed" and seen[-1][2]["error"]["code"] == "timeout"
    assert export_files(tmp_path / "exports") == []


class CommandLog(monitoring.CommandListener):
    def __init__(self) -> None:
        self.commands: list[dict[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:  # type: ignore[override]
        self.commands.append({"name": event.command_name, **event.command})

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Only the requests matter here."""

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Only the requests matter here."""


async def test_every_user_query_carries_a_server_side_time_limit(mongo_url: str, driver: str, tasks: Any) -> None:
    listener = CommandLog()
    client = make_client(mongo_url, driver)
    # make_client's own options, plus a listener: the same calls the service makes, seen on the wire.
    watched = type(client)(mongo_url, event_listeners=[listener], tz_aware=True)
    db = Database(watched, DATA_DB)
    try:
        spec = FindSpec("tasks", {"status": "open"}, None, (("seq", 1),), 0, batch_size=BATCH_SIZE, max_time_ms=600_000, count_max_time_ms=30_000)
        total = await db.count(spec)
        rows = 0
        async for raw in db.raw_batches(spec):
            rows += len(bson.decode_all(raw))
        assert rows == total == sum(1 for doc in tasks if doc.get("status") == "open")
        sent = {entry["name"]: entry for entry in listener.commands}
        assert sent["aggregate"]["maxTimeMS"] == 30_000
        assert sent["find"]["maxTimeMS"] == 600_000 and sent["find"]["batchSize"] == BATCH_SIZE
    finally:
        await Database(client, DATA_DB).close()
        await db.close()


def test_the_servers_time_limit_error_becomes_a_timeout() -> None:
    error = translate(ExecutionTimeout("operation exceeded time limit", 50))
    assert isinstance(error, QueryTimeout) and error.code == "timeout"


def test_a_server_error_is_told_without_the_raw_reply() -> None:
    reply = RawBSONDocument(bson.encode({"ok": 0, "errmsg": "unknown operator: $bogus", "code": 2}))
    error = translate(OperationFailure("unknown operator: $bogus", 2, reply))
    assert "full error" in str(OperationFailure("unknown operator: $bogus", 2, reply))  # what PyMongo appends
    assert str(error) == "database error: unknown operator: $bogus", str(error)


async def test_a_document_the_driver_cannot_send_is_a_database_error() -> None:
    with pytest.raises(DatabaseError) as caught:  # not an unexpected exception, which a job ends as internal_error
        async with driver_errors():
            raise DocumentTooLarge("BSON document too large (16793600 bytes)")
    assert str(caught.value) == "database error: BSON document too large (16793600 bytes)"


async def test_liveness_answers_at_once_while_the_database_answers_nothing(aiohttp_client: Any, proxy: WireProxy, tmp_path: Path, driver: str, tasks: Any) -> None:
    url = proxy.url(heartbeatFrequencyMS="500", connectTimeoutMS="2000")
    api = await aiohttp_client(create_app(make_settings(url, tmp_path, driver)))
    assert (await api.get("/readyz")).status == 200
    proxy.lose_replies_to(["hello", "ismaster", "isMaster", "ping", "find", "aggregate", "findAndModify", "update", "insert"])
    deadline = time.monotonic() + 20
    ready = None
    slowest = 0.0
    while time.monotonic() < deadline:
        started = time.monotonic()
        health = await api.get("/healthz")
        slowest = max(slowest, time.monotonic() - started)
        assert health.status == 200 and (await health.json())["event_loop"] == "ok"
        ready = await api.get("/readyz")
        if ready.status == 503:
            break
        await asyncio.sleep(0.1)
    assert ready is not None and ready.status == 503, "readiness never noticed the silent database"
    body = await ready.json()
    assert body["status"] == "unavailable" and body["database"] == "unavailable" and body["error"]
    # Nothing waited for the database: not the old 2 s ping, not a 5 s server selection.
    assert slowest < 0.5, slowest
    # A scrape answers without the queued count it could not get in time.
    started = time.monotonic()
    scrape = await api.get("/metrics")
    assert scrape.status == 200 and time.monotonic() - started < 3, time.monotonic() - started
    text = await scrape.text()
    assert "export_jobs_running" in text and "export_jobs_queued" not in text


async def test_liveness_fails_once_no_encoder_can_be_started(aiohttp_client: Any, mongo_url: str, tmp_path: Path) -> None:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path)))
    health = await api.get("/healthz")
    assert health.status == 200 and (await health.json())["encoders"] == "ok"
    api.server.app[MANAGER_KEY].encoders.close()  # as at a stop: no export can start from here on
    health = await api.get("/healthz")
    assert health.status == 503 and health.headers["Cache-Control"] == "no-store"
    body = await health.json()
    assert (body["status"], body["encoders"], body["event_loop"]) == ("unavailable", "unusable", "ok"), body


@pytest.mark.browser
async def test_the_page_says_it_waits_for_the_database_instead_of_freezing(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: Any, browser: Any
) -> None:
    settings = make_settings(mongo_url, tmp_path, "pymongo", collections=(COLLECTION,))
    client = await aiohttp_client(create_app(settings, source=SlowSource(first_delay=4.0, batch_delay=0.2, count_delay=6.0)))
    page, errors = await open_page(browser, str(client.make_url("/")))
    job_id = await start_export(page, "csv")
    text = job_item(page, job_id).locator(".progress-text")
    await expect(text).to_contain_text(re.compile(r"waiting for the database [23] s"), timeout=10_000)
    # Rows flowing before the count is in: the bar moves without a value, not an empty bar at 0%.
    await page.wait_for_function(
        """(id) => { const li = document.querySelector(`li.job[data-job-id="${id}"]`);
                    return li && li.dataset.status === "processing" && li.querySelector(".progress").dataset.indeterminate === "true"; }""",
        arg=job_id, timeout=10_000,
    )
    # Without motion the unknown total is the whole bar, not a part of it that reads as a share done.
    await page.emulate_media(reduced_motion="reduce")
    share = await job_item(page, job_id).locator(".progress").evaluate(
        "bar => bar.querySelector('.progress-fill').getBoundingClientRect().width / bar.getBoundingClientRect().width")
    assert share > 0.95, share
    await expect(job_item(page, job_id)).to_have_attribute("data-status", "completed", timeout=30_000)
    await expect(text).not_to_contain_text("waiting for the database")
    errors.check()
    await page.context.close()


@pytest.mark.browser
async def test_a_failed_cancel_stays_on_screen_while_the_job_runs_on(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: Any, browser: Any
) -> None:
    settings = make_settings(mongo_url, tmp_path, "pymongo", collections=(COLLECTION,))
    client = await aiohttp_client(create_app(settings, source=SlowSource(first_delay=8.0)))
    page, _ = await open_page(browser, str(client.make_url("/")))  # the refused DELETE is a console error, by design
    job_id = await start_export(page, "csv")
    item = job_item(page, job_id)
    text = item.locator(".progress-text")
    await expect(text).to_contain_text("waiting for the database", timeout=10_000)

    async def refuse_deletes(route: Any) -> None:
        if route.request.method != "DELETE":
            await route.continue_()
            return
        body = '{"error": {"code": "database_unavailable", "message": "the database is unavailable", "field": null}}'
        await route.fulfill(status=503, content_type="application/json", body=body)

    await page.route("**/api/exports/*", refuse_deletes)
    await item.get_by_role("button", name=re.compile("^Cancel export")).click()
    error = item.locator(".job-error")
    await expect(error).to_contain_text("Cancelling failed: the database is unavailable")
    # A message that must stay is watched for a while: three heartbeats (one every 0.6 s) redraw the row meanwhile.
    await page.wait_for_timeout(2000)
    await expect(item).to_have_attribute("data-status", "fetching")
    await expect(error).to_be_visible()
    await page.context.close()


class FastSource:
    """Batches of 1,000 generated rows as fast as the loop takes them: far more than ten batches a second."""

    def __init__(self, batches: int) -> None:
        docs = list(make_documents(1000, 7))
        self.batches = [b"".join(bson.encode({**doc, "_id": n * 1000 + i}) for i, doc in enumerate(docs)) for n in range(batches)]

    async def count(self, spec: FindSpec) -> int:
        return 1000 * len(self.batches)

    async def raw_batches(self, spec: FindSpec) -> AsyncGenerator[bytes, None]:
        for raw in self.batches:
            yield raw


async def test_progress_events_come_at_most_ten_a_second_checkpoints_included(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    # A checkpoint after every batch: each is recorded, but the room is told at most every 0.1 s.
    settings = make_settings(mongo_url, tmp_path, checkpoint_batches=1)
    api = await aiohttp_client(create_app(settings, source=FastSource(60)))
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "ndjson"})).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(api, job["id"], seen)
    try:
        final = await wait_status(api, job["id"], END_STATES, timeout=120)
        await until(lambda: seen and seen[-1][1] == "export-completed", "the end event")
    finally:
        await sio.disconnect()
    assert final["status"] == "completed" and final["processed"] == 60_000, final
    stamps = [data["ts"] for _, name, data in seen if name == "export-processing"]
    assert stamps and [data["processed"] for _, name, data in seen if name == "export-processing"][-1] == 60_000
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert not gaps or min(gaps) >= 0.099, sorted(gaps)[:5]


async def test_a_cancel_through_another_instance_stops_the_run_within_seconds(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    # A waits 30 s for its first batch; renewing a 60 s lease every third of it, A would run on for up to 20 s.
    jobs = new_jobs_collection()
    a = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, jobs_collection=jobs, lease_seconds=60), source=SlowSource(first_delay=30)))
    job = await (await a.post("/api/exports", json={"collection": "tasks", "format": "csv", "fields": ["seq"]})).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(a, job["id"], seen)  # at A, which runs the job: without Redis, A's events only
    try:
        await until(lambda: any(name == "export-fetching" for _, name, _ in seen), "the run's start at A")
        b = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, jobs_collection=jobs, lease_seconds=60)))
        assert (await (await b.delete(f"/api/exports/{job['id']}")).json())["status"] == "cancelled"
        await until(lambda: seen[-1][1] == "export-cancelled", "A stopping its run and saying so", timeout=8)
    finally:
        await sio.disconnect()
    assert not list(Path(a.server.app[SETTINGS_KEY].export_dir).glob("*.part"))
