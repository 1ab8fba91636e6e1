"""Socket.IO rooms: after unsubscribe a client hears nothing more of that job, and still hears the jobs it keeps."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import socketio

from service.app import create_app
from service.db import DatabaseUnavailable
from service.manager import JobManager

from conftest import END_STATES, Gate, hold_queue, make_settings, release_queue, subscribe, until, wait_status

BODY = {"collection": "tasks", "format": "csv", "limit": 2500}  # three batches: several events each


async def test_after_unsubscribe_no_more_events_of_that_job(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate) -> None:
    # One worker: the first job ends before the second starts, so the second's events come after all of the first's.
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, max_concurrent=1), source=gate))
    holders = await hold_queue(api, gate)
    first, second = [await (await api.post("/api/exports", json=BODY)).json() for _ in range(2)]
    leaving: list[tuple[float, str, dict[str, Any]]] = []
    staying: list[tuple[float, str, dict[str, Any]]] = []
    leaver = await subscribe(api, first["id"], leaving)
    stayer = await subscribe(api, first["id"], staying)
    try:
        assert (await leaver.call("subscribe", {"id": second["id"]}))["ok"]
        assert await leaver.call("unsubscribe", {"id": first["id"]}) == {"ok": True}
        await release_queue(api, gate, holders)
        for job in (first, second):
            assert (await wait_status(api, job["id"], END_STATES))["status"] == "completed"
        await until(lambda: any(data["id"] == second["id"] and name == "export-completed" for _, name, data in leaving), "the second job's end at the client that left the first")
        await until(lambda: any(name == "export-completed" for _, name, _ in staying), "the first job's end at the client that stayed")
    finally:
        await leaver.disconnect()
        await stayer.disconnect()
    # The first job did talk: the client that stayed heard it from start to end.
    heard = [name for _, name, _ in staying]
    assert (heard[0], heard[-1]) == ("export-fetching", "export-completed") and "export-processing" in heard, heard
    # The client that left heard nothing of it, and all of the job it kept.
    assert {data["id"] for _, _, data in leaving} == {second["id"]}, [(name, data["id"]) for _, name, data in leaving]
    heard = [name for _, name, _ in leaving]
    assert (heard[0], heard[-1]) == ("export-fetching", "export-completed"), heard


async def test_a_subscribe_the_database_cannot_answer_gets_an_error_answer(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, monkeypatch: Any
) -> None:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path), source=gate))
    job = await (await api.post("/api/exports", json=BODY)).json()

    async def unavailable(self: JobManager, user: str, job_id: str) -> None:
        raise DatabaseUnavailable("the database is not reachable")

    monkeypatch.setattr(JobManager, "lookup", unavailable)
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(str(api.make_url("/")), transports=["websocket"])
    try:
        ack = await sio.call("subscribe", {"id": job["id"]}, timeout=5)
    finally:
        await sio.disconnect()
    assert ack["ok"] is False and ack["error"]["code"] == "database_unavailable", ack


async def test_every_subscribe_gets_an_answer_whatever_it_carries(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate) -> None:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path), source=gate))
    job = await (await api.post("/api/exports", json=BODY)).json()
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(str(api.make_url("/")), transports=["websocket"])
    try:
        refused = [await sio.call("subscribe", data, timeout=5) for data in (None, "x", [job["id"]], {"id": 5}, {"id": ""})]
        # Two arguments: python-socketio passes the tuple's items as arguments.
        taken = await sio.call("subscribe", ({"id": job["id"]}, 2), timeout=5)
        left = [await sio.call("unsubscribe", data, timeout=5) for data in (None, ({"id": job["id"]}, 2))]
    finally:
        await sio.disconnect()
    assert all(ack["ok"] is False and ack["error"]["code"] == "invalid_request" for ack in refused), refused
    assert taken["ok"] is True and taken["job"]["id"] == job["id"], taken
    assert left == [{"ok": True}, {"ok": True}]
