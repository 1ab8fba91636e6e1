"""Shared fixtures: one wire-protocol server per session (the embedded one, or EXPORT_MONGO_URL),
seeded tasks, and the real app built with create_app(settings) for each driver."""
from __future__ import annotations

import asyncio
import gc
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import socketio
from pymongo import MongoClient

from scripts.generate_data import make_documents
from service.app import create_app
from service.embedded_db import EmbeddedMongo
from service.settings import Settings, settings_from_env
from wire_proxy import WireProxy

SEED = 20240101
TASKS = 3000  # three batches and then some
DATA_DB = "export_tests"
END_STATES = ("completed", "failed", "cancelled", "expired")
EVENTS = ("export-fetching", "export-processing", "export-finalizing", "export-completed", "export-failed", "export-cancelled")
BIG_ROWS = 20_000
HANG_REPORT_SECONDS = 240  # before pytest-timeout's 300 s, whose report shows threads but not coroutines


def _await_chain(awaitable: Any) -> Iterator[str]:
    """file:line and function of each coroutine down the chain a task is suspended in (a task's own stack
    shows only the outermost)."""
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is not None:
            yield f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None) or getattr(awaitable, "gi_yieldfrom", None)


def _report_pending_tasks(nodeid: str) -> None:
    # From a watchdog thread: the loop is stuck awaiting something, and its tasks' await chains say what.
    lines = [f"{nodeid} still running after {HANG_REPORT_SECONDS} s; pending asyncio tasks:"]
    for task in [obj for obj in gc.get_objects() if isinstance(obj, asyncio.Task) and not obj.done()]:
        lines += [f"--- {task.get_name()}", *_await_chain(task.get_coro())]
    print("\n".join(lines), file=sys.stderr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    watchdog = threading.Timer(HANG_REPORT_SECONDS, _report_pending_tasks, args=(item.nodeid,))
    watchdog.daemon = True
    watchdog.start()
    try:
        return (yield)
    finally:
        watchdog.cancel()


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("EXPORT_MONGO_URL")
    if url:
        yield url
        return
    with EmbeddedMongo(tmp_path_factory.mktemp("embedded-db")) as server:
        yield server.url


@pytest.fixture(scope="session")
def sync_db(mongo_url: str) -> Iterator[Any]:
    client = MongoClient(mongo_url, tz_aware=True)
    yield client[DATA_DB]
    client.close()


def export_files(export_dir: Path) -> list[str]:
    """The names in an export directory but the service's own hidden files (the signing key)."""
    return sorted(p.name for p in Path(export_dir).iterdir() if not p.name.startswith("."))


def replace_collection(db: Any, name: str, docs: list[dict[str, Any]]) -> None:
    """db[name] holding exactly docs, inserted a batch at a time."""
    db.drop_collection(name)
    for start in range(0, len(docs), 1000):
        db[name].insert_many(docs[start:start + 1000])


@pytest.fixture(scope="session")
def tasks(sync_db: Any) -> list[dict[str, Any]]:
    """The generator's tasks, TASKS of them, inserted once; returned in insertion order."""
    docs = list(make_documents(TASKS, SEED))
    replace_collection(sync_db, "tasks", docs)
    return docs


@pytest.fixture(scope="session")
def big_tasks(sync_db: Any) -> list[dict[str, Any]]:
    """BIG_ROWS generated tasks in tasks_big, inserted once: an export of them is surely still running a
    few seconds in, even on a fast machine."""
    docs = list(make_documents(BIG_ROWS, 20240607))
    replace_collection(sync_db, "tasks_big", docs)
    return docs


@pytest.fixture
def proxy(mongo_url: str) -> Iterator[WireProxy]:
    """A wire proxy in front of the server that can lose chosen replies (and records the commands it sees)."""
    if mongo_url.startswith("mongodb+srv:"):
        pytest.skip("a proxy stands in for one host and port, which an SRV connection string does not name")
    wire = WireProxy(mongo_url).start()
    yield wire
    wire.close()


@pytest.fixture(params=["pymongo", "motor"])
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


def make_settings(mongo_url: str, tmp_path: Path, driver: str = os.environ.get("EXPORT_MONGO_DRIVER", "pymongo"), **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        mongo_url=mongo_url,
        db_name=DATA_DB,
        driver=driver,
        export_dir=tmp_path / "exports",
        jobs_collection=f"jobs_{secrets.token_hex(4)}",  # each test sees only its own jobs
        max_active_per_user=50,
        max_concurrent=2,
    )
    values.update(overrides)
    return settings_from_env({}, **values)


@pytest.fixture
def settings(mongo_url: str, tmp_path: Path, driver: str, tasks: list[dict[str, Any]]) -> Settings:
    return make_settings(mongo_url, tmp_path, driver)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> Any:
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def sio_client(client: Any) -> AsyncIterator[socketio.AsyncClient]:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(str(client.make_url("/")), transports=["websocket"], socketio_path="socket.io")
    yield sio
    await sio.disconnect()


async def wait_status(
    api: Any,
    job_id: str,
    states: tuple[str, ...] = END_STATES,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
    base: str = "",
) -> dict[str, Any]:
    """Poll the job until it reaches one of states; the last snapshot either way. api is the test client,
    or an aiohttp session with base the URL of a service process."""
    deadline = time.monotonic() + timeout
    while True:
        snap = await (await api.get(f"{base}/api/exports/{job_id}", headers=headers)).json()
        if snap["status"] in states or time.monotonic() > deadline:
            return snap
        await asyncio.sleep(0.05)


async def subscribe(api: Any, job_id: str, seen: list[tuple[float, str, dict[str, Any]]], token: str | None = None) -> socketio.AsyncClient:
    """A Socket.IO client subscribed to the job, appending (time, event, payload) for every export event."""
    sio = socketio.AsyncClient(reconnection=False)
    for name in EVENTS:
        sio.on(name, lambda data, _n=name: seen.append((time.monotonic(), _n, data)))
    await sio.connect(str(api.make_url("/")), transports=["websocket"], auth={"token": token} if token else None)
    ack = await sio.call("subscribe", {"id": job_id})
    assert ack["ok"], ack
    return sio
