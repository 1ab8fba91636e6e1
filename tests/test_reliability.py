"""Cancel, limits, auth, retention, download semantics and hostile input, through the real app."""
from __future__ import annotations

import asyncio
import logging
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import socketio
from pymongo import MongoClient
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from service.app import create_app
from service.db import DatabaseUnavailable
from service.settings import MANAGER_KEY

from conftest import DATA_DB, END_STATES, Gate, export_files, hold_queue, make_settings, release_queue, subscribe, until, wait_status


@pytest.fixture
async def slow_api(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> Any:
    # Small batches make a 3,000-row export take many round trips, so it is still running when cancelled.
    return await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, batch_size=10, max_concurrent=1)))


async def test_cancel_running_job_within_a_second_and_remove_its_partial_file(slow_api: Any) -> None:
    job = await (await slow_api.post("/api/exports", json={"collection": "tasks", "format": "xlsx"})).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(slow_api, job["id"], seen)
    snap = await wait_status(slow_api, job["id"], ("processing",) + END_STATES)
    assert snap["status"] == "processing", snap
    export_dir = Path(slow_api.server.app[MANAGER_KEY].settings.export_dir)
    manager = slow_api.server.app[MANAGER_KEY]
    part = f"{job['id']}.xlsx.{manager.instance_id}.part"
    assert export_files(export_dir) == [part, part + ".tmp"]
    assert list((export_dir / (part + ".tmp")).iterdir())  # xlsxwriter's sheet data, on the export volume

    asked = time.monotonic()
    resp = await slow_api.delete(f"/api/exports/{job['id']}")
    assert resp.status == 200
    cancelled_at = await until(lambda: next((t for t, name, _ in seen if name == "export-cancelled"), None), "the export-cancelled event", timeout=2)
    await sio.disconnect()
    assert cancelled_at - asked < 1.0
    assert (await resp.json())["status"] == "cancelled"
    assert (await wait_status(slow_api, job["id"]))["status"] == "cancelled"
    assert export_files(export_dir) == []  # the .part file and its scratch directory are gone
    assert (await slow_api.get(f"/api/exports/{job['id']}/download")).status == 409


async def test_cancel_queued_job_and_delete_finished_job(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate) -> None:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, max_concurrent=1), source=gate))
    manager = api.server.app[MANAGER_KEY]
    holders = await hold_queue(api, gate)
    queued = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv"})).json()
    assert queued["status"] == "queued"
    resp = await api.delete(f"/api/exports/{queued['id']}")
    assert (await resp.json())["status"] == "cancelled"
    await release_queue(api, gate, holders)
    done = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv", "limit": 50})).json()
    assert (await wait_status(api, done["id"]))["status"] == "completed"
    assert (await wait_status(api, queued["id"]))["status"] == "cancelled"  # it never ran
    path = Path(manager.settings.export_dir) / f"{done['id']}.csv"
    assert path.is_file()

    async def unavailable(job_id: str) -> None:
        raise DatabaseUnavailable("the database is not reachable")

    real_delete, manager.db.delete_job = manager.db.delete_job, unavailable
    resp = await api.delete(f"/api/exports/{done['id']}")
    manager.db.delete_job = real_delete
    assert resp.status == 503 and path.is_file()  # the job that still names its file still has it
    assert (await api.get((await wait_status(api, done["id"]))["download_url"])).status == 200
    resp = await api.delete(f"/api/exports/{done['id']}")
    answer = await resp.json()
    assert resp.status == 200 and answer["deleted"] is True and answer["download_url"] is None, answer
    assert not path.exists()
    assert (await api.get(f"/api/exports/{done['id']}")).status == 404


async def test_queue_is_fifo_with_positions_and_per_user_limit_answers_429(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate) -> None:
    # The holder of the one worker is an active job too: it and three queued ones make the limit of four.
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, max_concurrent=1, max_active_per_user=4), source=gate))
    holders = await hold_queue(api, gate)
    jobs = [await (await api.post("/api/exports", json={"collection": "tasks", "format": "ndjson", "limit": 300})).json() for _ in range(3)]
    assert [j["queue_position"] for j in jobs] == [1, 2, 3]
    resp = await api.post("/api/exports", json={"collection": "tasks", "format": "csv"})
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) > 0
    assert (await resp.json())["error"]["code"] == "too_many_active_exports"
    # The holder goes and the gate stays shut: the worker takes the oldest job, and the others move up.
    assert (await api.delete(f"/api/exports/{holders[0]['id']}")).status == 200
    await wait_status(api, jobs[0]["id"], ("fetching",))
    await until(lambda: gate.held == 1, "the oldest job to wait at the gate")
    snaps = [await (await api.get(f"/api/exports/{j['id']}")).json() for j in jobs]
    assert [(s["status"], s.get("queue_position")) for s in snaps] == [("fetching", None), ("queued", 1), ("queued", 2)], snaps
    gate.open()
    finals = [await wait_status(api, j["id"]) for j in jobs]
    assert all(f["status"] == "completed" for f in finals)
    started = [f["started_at"] for f in finals]
    assert started == sorted(started)  # one worker, oldest first
    assert (await api.post("/api/exports", json={"collection": "tasks", "format": "csv", "limit": 1})).status == 202


async def test_creates_at_once_never_pass_the_per_user_limit(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate) -> None:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, max_concurrent=1, max_active_per_user=5), source=gate))
    body = {"collection": "tasks", "format": "csv", "limit": 1}
    answers = await asyncio.gather(*(api.post("/api/exports", json=body) for _ in range(20)))
    assert sorted(resp.status for resp in answers) == [202] * 5 + [429] * 15
    listed = (await (await api.get("/api/exports")).json())["exports"]
    assert len(listed) == 5 and all(job["status"] in ("queued", "fetching") for job in listed), listed


TOKENS = "tok-alice:alice,tok-bob:bob"


async def test_tokens_guard_http_and_socketio_and_hide_other_users_jobs(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    from service.settings import settings_from_env

    settings = make_settings(mongo_url, tmp_path, api_tokens=settings_from_env({"EXPORT_API_TOKENS": TOKENS}).api_tokens)
    api = await aiohttp_client(create_app(settings))
    alice = {"Authorization": "Bearer tok-alice"}
    bob = {"Authorization": "Bearer tok-bob"}
    body = {"collection": "tasks", "format": "csv", "limit": 20}

    assert (await api.post("/api/exports", json=body)).status == 401
    resp = await api.post("/api/exports", json=body, headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    assert (await api.get("/api/collections")).status == 401
    for path in ("/metrics", "/api/nowhere"):
        resp = await api.get(path, headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized", path
    assert (await api.get("/metrics", headers=bob)).status == 200
    for path in ("/healthz", "/readyz"):
        assert (await api.get(path)).status == 200, path  # probes stay open for load balancers

    job = await (await api.post("/api/exports", json=body, headers=alice)).json()
    assert (await wait_status(api, job["id"], headers=alice))["status"] == "completed"
    for method, path in (("GET", ""), ("GET", "/download"), ("DELETE", "")):
        resp = await api.request(method, f"/api/exports/{job['id']}{path}", headers=bob)
        assert resp.status == 404, (method, path)
    assert (await (await api.get("/api/exports", headers=bob)).json())["exports"] == []
    assert (await api.get(f"/api/exports/{job['id']}/download", headers=alice)).status == 200

    refused = socketio.AsyncClient(reconnection=False)
    for auth in (None, {"token": "wrong"}):
        with pytest.raises(socketio.exceptions.ConnectionError):
            await refused.connect(str(api.make_url("/")), transports=["websocket"], auth=auth)
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(str(api.make_url("/")), transports=["websocket"], auth={"token": "tok-bob"})
    ack = await sio.call("subscribe", {"id": job["id"]})
    assert ack["ok"] is False and ack["error"]["code"] == "not_found"
    await sio.disconnect()


async def test_retention_sweeper_expires_files_and_download_answers_410(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    settings = make_settings(mongo_url, tmp_path, ttl_hours=1 / 3600, sweep_interval_seconds=0.2)  # one second
    api = await aiohttp_client(create_app(settings))
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv", "limit": 5})).json()
    snap = await wait_status(api, job["id"])
    assert snap["status"] == "completed" and snap["expires_at"] > snap["finished_at"]
    path = Path(settings.export_dir) / f"{job['id']}.csv"
    assert path.is_file()
    snap = await wait_status(api, job["id"], ("expired",), timeout=10)
    assert snap["status"] == "expired"
    assert not path.exists()
    resp = await api.get(f"/api/exports/{job['id']}/download")
    assert resp.status == 410 and (await resp.json())["error"]["code"] == "expired"


async def test_retention_goes_on_after_the_export_directory_failed_once(
        aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(mongo_url, tmp_path, ttl_hours=1 / 3600, sweep_interval_seconds=0.2)  # one second
    api = await aiohttp_client(create_app(settings))
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv", "limit": 5})).json()
    assert (await wait_status(api, job["id"]))["status"] == "completed"
    export_dir, away = Path(settings.export_dir), tmp_path / "away"
    export_dir.rename(away)  # as a network mount that went stale for a moment
    met = lambda: any(r.name == "service.manager" and r.levelname == "ERROR" for r in caplog.records)  # noqa: E731
    await until(met, "a maintenance round to meet the missing directory")
    away.rename(export_dir)
    snap = await wait_status(api, job["id"], ("expired",), timeout=10)
    assert snap["status"] == "expired" and not (export_dir / f"{job['id']}.csv").exists()


async def test_download_range_etag_head(client: Any) -> None:
    job = await (await client.post("/api/exports", json={"collection": "tasks", "format": "ndjson", "limit": 200})).json()
    assert (await wait_status(client, job["id"]))["status"] == "completed"
    url = f"/api/exports/{job['id']}/download"
    full = await (await client.get(url)).read()
    resp = await client.get(url, headers={"Range": "bytes=10-99"})
    assert resp.status == 206
    assert await resp.read() == full[10:100]
    assert resp.headers["Content-Range"] == f"bytes 10-99/{len(full)}"
    resp = await client.get(url, headers={"Range": "bytes=-50"})
    assert resp.status == 206 and await resp.read() == full[-50:]
    # A Range it does not serve is ignored, as RFC 9110 allows: the whole file.
    for ignored in ("items=0-1", "bytes=abc", "bytes=0-1,5-6", "bytes=-0", "bytes=9-3", "bytes= 1-2"):
        resp = await client.get(url, headers={"Range": ignored})
        assert (resp.status, await resp.read()) == (200, full), ignored
    # Whatever other bytes the request's headers hold (a Latin-1 cookie, say): written on a socket, as no client
    # library sends them.
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: items=0-1\r\nCookie: name=Ren".encode() + b"\xe9\r\n\r\n")
    try:
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200 "), "no answer"
    finally:
        writer.close()
    resp = await client.get(url, headers={"Range": f"bytes={len(full)}-"})  # past the end: unsatisfiable
    assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(full)}"
    etag = (await client.get(url)).headers["ETag"]
    resp = await client.get(url, headers={"If-None-Match": etag})
    assert resp.status == 304
    head = await client.head(url)
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(full)
    assert await head.read() == b""
    for evil in ("/static/../service/settings.py", "/static/%2e%2e/settings.py", f"/api/exports/{job['id']}/download/../../../../etc/passwd"):
        resp = await client.get(evil)
        assert resp.status in (403, 404), evil


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
OPERATORS = st.sampled_from(["$where", "$function", "$accumulator", "$gt", "$in", "$date", "$oid", "$numberLong", "$expr", "$regex"])
BODIES = st.one_of(
    JSON_VALUES,
    st.dictionaries(st.sampled_from(["collection", "format", "filter", "fields", "sort", "limit", "options", "filename", "x"]), JSON_VALUES, max_size=8),
    st.builds(lambda op, v, fmt: {"collection": "tasks", "format": fmt, "filter": {"a": {op: v}}}, OPERATORS, JSON_VALUES, st.sampled_from(["csv", "json", "x"])),
    st.builds(lambda fields, sort, limit: {"collection": "tasks", "format": "csv", "fields": fields, "sort": sort, "limit": limit}, JSON_VALUES, JSON_VALUES, JSON_VALUES),
)


EDGE_BODIES = [
    b"{" * 100_000, b"[" * 5000 + b"]" * 5000, b'{"collection": "tasks", "format": "csv", "filter": ' + b'{"a":' * 2000 + b"1" + b"}" * 2001,
    b"x" * 300_000, b"\xff\xfe", b"",
]


async def post_never_5xx(api: Any, raw: bytes) -> None:
    resp = await api.post("/api/exports", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status < 500, (raw[:200], resp.status, await resp.text())
    if resp.status >= 400:
        error = (await resp.json())["error"]
        assert error["code"] and error["message"]


@hyp_settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None, derandomize=True)
@given(body=BODIES)
async def test_hostile_bodies_never_cause_a_5xx(idle_client: Any, body: Any) -> None:
    await post_never_5xx(idle_client, json.dumps(body).encode())  # the stdlib writes ints of any size


@pytest.mark.parametrize("raw", EDGE_BODIES, ids=["deep-object", "deep-array", "deep-filter", "too-large", "not-utf8", "empty"])
async def test_malformed_bodies_never_cause_a_5xx(idle_client: Any, raw: bytes) -> None:
    await post_never_5xx(idle_client, raw)
    assert (await idle_client.get("/healthz")).status == 200


class SlowSource:
    """Rows from memory, slowly, remembering whether the cursor was closed."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        import bson

        self.batch = b"".join(bson.encode(d) for d in docs)
        self.rows = len(docs)
        self.closed = asyncio.Event()

    async def count(self, spec: Any) -> int:
        return self.rows * 1000

    async def raw_batches(self, spec: Any) -> Any:
        try:
            for _ in range(1000):
                await asyncio.sleep(0.02)
                yield self.batch
        finally:
            self.closed.set()


class DriverLikeSource(SlowSource):
    """As the driver can: a cancel that lands inside it comes out as an error about the connection it closed."""

    async def raw_batches(self, spec: Any) -> Any:
        try:
            async for batch in super().raw_batches(spec):
                yield batch
        except asyncio.CancelledError:
            raise DatabaseUnavailable("AutoReconnect: connection is already closed") from None


async def test_a_stop_puts_a_running_job_back_when_the_driver_turns_the_cancel_into_an_error(
        aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: list[dict[str, Any]]) -> None:
    settings = make_settings(mongo_url, tmp_path)
    api = await aiohttp_client(create_app(settings, source=DriverLikeSource(tasks[:100])))
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv"})).json()
    assert (await wait_status(api, job["id"], ("processing",)))["status"] == "processing"
    await api.close()  # the service stops while the export runs
    with MongoClient(mongo_url) as client:
        doc = client[settings.db_name][settings.jobs_collection].find_one({"_id": job["id"]})
    assert doc["status"] == "queued" and doc["error"] is None, doc  # to be run again, not failed


async def test_a_cancel_the_driver_turns_into_an_error_is_still_a_cancel(
        aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: list[dict[str, Any]]) -> None:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path), source=DriverLikeSource(tasks[:100])))
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv"})).json()
    assert (await wait_status(api, job["id"], ("processing",)))["status"] == "processing"
    assert (await (await api.delete(f"/api/exports/{job['id']}")).json())["status"] == "cancelled"
    assert (await wait_status(api, job["id"]))["status"] == "cancelled"


class GappySource(SlowSource):
    """Sends an empty batch before each of a few full ones."""

    async def raw_batches(self, spec: Any) -> Any:
        for _ in range(3):
            yield b""
            yield self.batch


async def test_empty_batches_from_a_source_are_skipped(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: list[dict[str, Any]]) -> None:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path), source=GappySource(tasks[:10])))
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "ndjson"})).json()
    final = await wait_status(api, job["id"])
    assert final["status"] == "completed" and final["processed"] == 30, final
    assert len((await (await api.get(final["download_url"])).read()).splitlines()) == 30


async def test_a_cancel_only_delete_never_deletes_an_ended_job(client: Any) -> None:
    job = await (await client.post("/api/exports", json={"collection": "tasks", "format": "csv", "limit": 5})).json()
    assert (await wait_status(client, job["id"]))["status"] == "completed"
    resp = await client.delete(f"/api/exports/{job['id']}?if=active")  # a cancel that comes as the job completes
    body = await resp.json()
    assert resp.status == 409 and body["error"]["code"] == "not_active" and body["error"]["field"] == "id", body
    assert (await client.get(f"/api/exports/{job['id']}/download")).status == 200  # the file is still there
    resp = await client.delete(f"/api/exports/{job['id']}?if=ended")
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "if"
    assert (await (await client.delete(f"/api/exports/{job['id']}")).json())["deleted"] is True


async def test_cancel_closes_the_cursor(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: list[dict[str, Any]]) -> None:
    source = SlowSource(tasks[:100])
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path), source=source))
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv"})).json()
    assert (await wait_status(api, job["id"], ("processing",)))["status"] == "processing"
    assert not source.closed.is_set()
    await api.delete(f"/api/exports/{job['id']}")
    await asyncio.wait_for(source.closed.wait(), 1.0)
    assert (await wait_status(api, job["id"]))["status"] == "cancelled"


async def test_a_queued_job_of_a_collection_no_longer_exportable_fails_when_it_would_run(
        aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    with MongoClient(mongo_url) as client:
        client[DATA_DB]["tasks_then"].replace_one({"_id": 1}, {"_id": 1, "seq": 1}, upsert=True)
        try:
            await _no_longer_exportable(aiohttp_client, mongo_url, tmp_path)
        finally:
            client[DATA_DB].drop_collection("tasks_then")


async def _no_longer_exportable(aiohttp_client: Any, mongo_url: str, tmp_path: Path) -> None:
    before = make_settings(mongo_url, tmp_path, collections=("tasks", "tasks_then"))
    gate = Gate(mongo_url)
    api = await aiohttp_client(create_app(before, source=gate))
    await hold_queue(api, gate)
    pipeline = [{"$lookup": {"from": "tasks_then", "localField": "seq", "foreignField": "seq", "as": "then"}}]
    queued = [await (await api.post("/api/exports", json=body)).json() for body in (
        {"collection": "tasks_then", "format": "csv"}, {"collection": "tasks", "format": "json", "pipeline": pipeline})]
    assert [job.get("status") for job in queued] == ["queued", "queued"], queued
    await api.close()  # the settings change: tasks_then is exportable no more
    after = await aiohttp_client(create_app(replace(before, collections=("tasks",))))
    for job, where in zip(queued, ("collection", "$lookup from")):
        final = await wait_status(after, job["id"])
        assert final["status"] == "failed" and final["error"]["code"] == "collection_not_exportable", final
        assert "tasks_then" in final["error"]["message"] and final["error"]["message"].startswith(where), final
        assert final.get("download_url") is None


async def test_the_log_tells_who_created_downloaded_cancelled_and_deleted_what(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(mongo_url, tmp_path, api_tokens={"tok-alice": "alice"})
    api = await aiohttp_client(create_app(settings, source=gate))
    alice = {"Authorization": "Bearer tok-alice"}
    caplog.set_level(logging.INFO, logger="service")
    done = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv", "limit": 5}, headers=alice)).json()
    gate.open()
    snap = await wait_status(api, done["id"], headers=alice)
    assert (await api.get(snap["download_url"])).status == 200
    gate.shut()
    held = await (await api.post("/api/exports", json={"collection": "tasks", "format": "ndjson"}, headers=alice)).json()
    assert (await api.delete(f"/api/exports/{held['id']}", headers=alice)).status == 200
    assert (await api.delete(f"/api/exports/{done['id']}", headers=alice)).status == 200
    lines = [record.getMessage() for record in caplog.records]
    for expected in (f"job {done['id']} created by alice: csv of tasks", f"job {done['id']} completed: 5 rows, {snap['bytes']} bytes in ",
                     f"job {done['id']}: its file asked for (GET) through a signed link; the job is alice's",
                     f"job {held['id']}: cancel asked by alice", f"job {done['id']} deleted by alice, with its file"):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    assert not any("sig=" in line for line in lines)  # a signed link works for whoever reads it
