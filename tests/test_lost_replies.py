"""A database that drops replies, through a proxy in front of the real server: the service still stops within
its limits, and a job it could not put back in the queue is run again, whole, at the next start."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from service import db as db_module
from service import manager as manager_module
from service import runner as runner_module
from service.app import create_app
from service.db import DatabaseUnavailable
from service.jobs import JobStatus
from service.settings import DB_KEY, MANAGER_KEY

from conftest import make_settings, subscribe, until, wait_status
from wire_proxy import WireProxy

CLOSE_LIMIT = 1.0
SPEC = {"collection": "tasks", "format": "csv", "sort": {"seq": 1}, "fields": ["seq", "title"]}
LONG_SPEC = {**SPEC, "collection": "tasks_big"}  # with batches of 10, still running when the fault starts


async def timed_close(client: Any, limit: float) -> float:
    started = time.monotonic()
    await asyncio.wait_for(client.close(), limit)
    return time.monotonic() - started


async def test_a_lost_reply_while_closing_does_not_keep_the_service_from_stopping(
    aiohttp_client: Any, proxy: WireProxy, tmp_path: Path, driver: str, tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "CLOSE_TIMEOUT_SECONDS", CLOSE_LIMIT)
    client = await aiohttp_client(create_app(make_settings(proxy.url(), tmp_path, driver)))
    job = await (await client.post("/api/exports", json={**SPEC, "limit": 10})).json()
    assert (await wait_status(client, job["id"]))["status"] == "completed"

    proxy.lose_replies_to(["endSessions"])
    elapsed = await timed_close(client, 30)
    assert proxy.lost == ["endSessions"]  # the fault was met, and closing went past it
    assert elapsed < CLOSE_LIMIT + 5, elapsed


async def test_a_job_that_could_not_be_queued_again_on_stop_runs_again_at_the_next_start(
    aiohttp_client: Any, proxy: WireProxy, tmp_path: Path, driver: str, big_tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "STOP_TIMEOUT_SECONDS", CLOSE_LIMIT)
    monkeypatch.setattr(db_module, "CLOSE_TIMEOUT_SECONDS", CLOSE_LIMIT)
    # A short lease: the restarted service runs the job again once the lease the stopped one held runs out.
    settings = make_settings(proxy.url(), tmp_path, driver, batch_size=10, lease_seconds=2.0)
    client = await aiohttp_client(create_app(settings))
    job = await (await client.post("/api/exports", json=LONG_SPEC)).json()
    snap = await wait_status(client, job["id"], ("processing", "completed"), timeout=30)
    assert snap["status"] == "processing", snap

    proxy.lose_replies_to(["findAndModify"])  # the stop's "back to the queue", and any lease renewal
    elapsed = await timed_close(client, 30)
    assert "findAndModify" in proxy.lost
    assert elapsed < 2 * CLOSE_LIMIT + 5, elapsed

    proxy.lose_replies_to([])
    # A restart: the same jobs and export directory (full batches now, which the job does not depend on).
    restarted = make_settings(proxy.url(), tmp_path, driver, jobs_collection=settings.jobs_collection, lease_seconds=2.0)
    client = await aiohttp_client(create_app(restarted))
    final = await wait_status(client, job["id"], ("completed", "failed", "cancelled"), timeout=60)
    assert final["status"] == "completed" and final["processed"] == len(big_tasks), final
    rows = (await (await client.get(final["download_url"])).text()).splitlines()
    assert rows[0] == "seq,title" and [int(r.split(",", 1)[0]) for r in rows[1:]] == sorted(t["seq"] for t in big_tasks)


async def test_a_lost_reply_mid_export_fails_the_job_after_the_socket_timeout(
    aiohttp_client: Any, proxy: WireProxy, tmp_path: Path, driver: str, tasks: Any
) -> None:
    # The embedded server builds a query's whole result before its first batch (seconds for tasks_big), and
    # answers nothing else meanwhile: this timeout needs the smaller collection.
    settings = make_settings(proxy.url(socketTimeoutMS="2000"), tmp_path, driver, batch_size=10)
    client = await aiohttp_client(create_app(settings))
    job = await (await client.post("/api/exports", json=SPEC)).json()
    snap = await wait_status(client, job["id"], ("processing", "completed"), timeout=30)
    assert snap["status"] == "processing", snap

    proxy.lose_replies_to(["getMore"])
    snap = await wait_status(client, job["id"], timeout=30)
    assert proxy.lost[:1] == ["getMore"]
    assert snap["status"] == "failed" and snap["error"]["code"] == "database_unavailable", snap
    assert "timed out" in snap["error"]["message"], snap
    assert not list(Path(settings.export_dir).glob("*.part*"))

    proxy.lose_replies_to([])  # the same service goes on with the next export
    job = await (await client.post("/api/exports", json={**SPEC, "limit": 25})).json()
    snap = await wait_status(client, job["id"], timeout=30)
    assert snap["status"] == "completed" and snap["processed"] == 25, snap


async def test_the_wait_for_a_reply_outlasts_the_query_time_limit(aiohttp_client: Any, mongo_url: str, tmp_path: Path) -> None:
    # A $sort or $group may use the query's whole time limit before its first reply: the server's time-out, not a
    # lost-reply one, is what the user should see.
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, query_max_time_ms=15 * 60_000)))
    client = api.server.app[DB_KEY].client
    assert client.options.pool_options.socket_timeout == 16 * 60


async def test_a_completion_whose_reply_is_lost_in_an_outage_is_told_completed_once_the_database_is_back(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The completed write lands and its reply is lost as the database goes away: the run fails on it, and its
    failure cannot be recorded. Nothing is told or counted while the end is unknown; once the database is back,
    the failed write finds the job completed, and the room hears export-completed, counted once."""
    monkeypatch.setattr(runner_module, "RECORD_RETRY_SECONDS", 0.2)
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path)))
    manager = api.server.app[MANAGER_KEY]
    real, down, refused = runner_module.transition, [False], []

    async def lost_in_outage(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        if down[0]:
            refused.append(to)
            raise DatabaseUnavailable("connection refused")
        doc = await real(db, expected, to, **kwargs)
        if to == JobStatus.COMPLETED:
            down[0] = True
            raise DatabaseUnavailable("connection closed before the reply")
        return doc

    monkeypatch.setattr(runner_module, "transition", lost_in_outage)
    job = await (await api.post("/api/exports", json={**SPEC, "limit": 20})).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(api, job["id"], seen)
    try:
        # The run has failed, and its failed write was refused twice: at once, then by the retry.
        await until(lambda: refused.count(JobStatus.FAILED) >= 2 and job["id"] not in manager.running, "the refused writes")
        ends = [name for _, name, _ in seen if name in ("export-completed", "export-failed", "export-cancelled")]
        assert ends == [] and not manager.metrics.jobs_ended and not manager.metrics.jobs_completed, (ends, manager.metrics)
        down[0] = False
        await until(lambda: any(name == "export-completed" for _, name, _ in seen), "the export-completed event")
        await until(lambda: not manager.ctx.background, "the background record's end")
    finally:
        await sio.disconnect()
    ends = [name for _, name, _ in seen if name in ("export-completed", "export-failed", "export-cancelled")]
    assert ends == ["export-completed"], ends
    assert manager.metrics.jobs_completed == {"csv": 1} and not manager.metrics.jobs_ended, manager.metrics
    assert (await wait_status(api, job["id"]))["status"] == "completed"
    resp = await api.get(f"/api/exports/{job['id']}/download")
    assert resp.status == 200 and len((await resp.text()).splitlines()) == 21  # the header and 20 rows
