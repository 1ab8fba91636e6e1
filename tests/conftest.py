"""Shared fixtures: one wire-protocol server per session (the embedded one, or EXPORT_MONGO_URL),
seeded tasks, and the real app built with create_app(settings) for each driver."""
from __future__ import annotations

import asyncio
import gc
import inspect
import os
import secrets
import sys
import threading
import time
import warnings
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Iterator

import pytest
import socketio
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from scripts.generate_data import make_documents
from service.app import create_app
from service.db import Database, FindSpec
from service.embedded_db import EmbeddedMongo
from service.settings import SETTINGS_KEY, Settings, settings_from_env
from wire_proxy import WireProxy

SEED = 20240101
TASKS = 3000  # three batches and then some
# One database per pytest-xdist worker: against a shared MongoDB, workers would replace each other's collections.
DATA_DB = "export_tests" + (f"_{os.environ['PYTEST_XDIST_WORKER']}" if os.environ.get("PYTEST_XDIST_WORKER") else "")
END_STATES = ("completed", "failed", "cancelled", "expired")
EVENTS = ("export-fetching", "export-processing", "export-finalizing", "export-completed", "export-failed", "export-cancelled")
BIG_ROWS = 20_000
DEFAULT_DRIVER = os.environ.get("EXPORT_MONGO_DRIVER", "pymongo")
_job_collections: list[str] = []  # named by the running test
_undropped: list[str] = []  # refused by the server when their test ended
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
    left = [name for name in _undropped if not drop_collection(client[DATA_DB], name, seconds=2)]
    client.close()
    # Only the embedded server refuses (a killed service's cursor can hold its table past the session's end),
    # and its data directory is the session's own, thrown away with what it holds.
    if left and os.environ.get("EXPORT_MONGO_URL"):
        warnings.warn(f"the server refused to drop {len(left)} jobs collection(s): {', '.join(left)}", stacklevel=1)


async def assert_refused(api: Any, resp: Any, case: str, code: str, field: str) -> None:
    """resp is a 400 with the error code and field expected, and nothing was created."""
    assert resp.status == 400, (case, await resp.text())
    error = (await resp.json())["error"]
    assert (error["code"], error["field"]) == (code, field), error
    assert error["message"]
    assert (await (await api.get("/api/exports")).json())["exports"] == []


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


def new_jobs_collection() -> str:
    """A jobs collection of the test's own (each test sees only its own jobs), dropped after the test."""
    name = f"jobs_{secrets.token_hex(4)}"
    _job_collections.append(name)
    return name


@pytest.fixture(autouse=True)
def drop_job_collections(request: pytest.FixtureRequest) -> Iterator[None]:
    # The database is asked for only by tests that use it; unit tests never start the embedded server.
    db = request.getfixturevalue("sync_db") if "mongo_url" in request.fixturenames else None
    yield
    names = list(dict.fromkeys(_job_collections))
    _job_collections.clear()
    for name in names if db is not None else ():
        if not drop_collection(db, name):
            _undropped.append(name)  # tried again at the end of the session


def drop_collection(db: Any, name: str, seconds: float = 0.6) -> bool:
    """Drop db[name]; False if the server refused for seconds. The embedded server (SQLite underneath) refuses to
    drop a table while any statement is open, as one of a stopped service's cursors may still be for a while."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            db.drop_collection(name)
            return True
        except OperationFailure as exc:
            if "locked" not in str(exc):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


async def until(condition: Callable[[], Any], what: str, timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Wait until condition() (a plain or an async function) returns something true, and return that; an
    AssertionError naming what was awaited if it does not within timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}, in vain")
        await asyncio.sleep(interval)


class Gate:
    """A BatchSource reading the test database whose exports all wait at their first batch until open().
    Given to create_app(settings, source=...), it holds the workers: with every worker held, jobs created
    meanwhile stay queued (hold_queue)."""

    def __init__(self, mongo_url: str, driver: str = DEFAULT_DRIVER) -> None:
        self.db = Database.connect(mongo_url, DATA_DB, driver)
        self.opened = asyncio.Event()
        self.held = 0  # exports waiting at the gate now

    async def count(self, spec: FindSpec) -> int:
        return await self.db.count(spec)

    async def raw_batches(self, spec: FindSpec) -> AsyncGenerator[bytes, None]:
        self.held += 1
        try:
            await self.opened.wait()
        finally:
            self.held -= 1
        async with aclosing(self.db.raw_batches(spec)) as batches:  # the cursor closes with this generator
            async for batch in batches:
                yield batch

    def open(self) -> None:
        self.opened.set()

    def shut(self) -> None:
        """Hold exports that ask for their first batch from now on (those past the gate go on)."""
        self.opened.clear()


class HoldAfterTwoBatches(Gate):
    """Gives each export two batches, then holds it until open() (a stop cancels it there): the job shows
    progress short of its end for as long as the test needs (the encoder reports a batch's rows at the next one)."""

    async def raw_batches(self, spec: FindSpec) -> AsyncGenerator[bytes, None]:
        async with aclosing(self.db.raw_batches(spec)) as batches:
            given = 0
            async for batch in batches:
                if given == 2:
                    self.held += 1
                    try:
                        await self.opened.wait()
                    finally:
                        self.held -= 1
                given += 1
                yield batch


@pytest.fixture
async def gate(mongo_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Gate]:
    # Rows go through the driver the test runs with, where it runs with one.
    gate = Gate(mongo_url, request.getfixturevalue("driver") if "driver" in request.fixturenames else DEFAULT_DRIVER)
    yield gate
    await gate.db.close()


@pytest.fixture
async def gated_client(aiohttp_client: Any, settings: Settings, gate: Gate) -> Any:
    """The client fixture's app, reading rows through the gate (the jobs' state stays in the database)."""
    return await aiohttp_client(create_app(settings, source=gate))


@pytest.fixture
async def idle_client(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate) -> Any:
    """An app whose exports never get past the (closed) gate: accepted requests cost no export, for tests where
    what matters is the answer."""
    return await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, max_active_per_user=10_000), source=gate))


HOLDER = {"collection": "tasks", "format": "ndjson", "limit": 1, "filename": "holder"}


async def hold_queue(api: Any, gate: Gate, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Occupy every worker of the app with a one-row job held at the gate: jobs created from now on stay
    queued until release_queue() (or gate.open(), and then the holders complete first). The holders' snapshots."""
    workers = api.server.app[SETTINGS_KEY].max_concurrent
    gate.shut()
    holders = [await (await api.post("/api/exports", json=HOLDER, headers=headers)).json() for _ in range(workers)]
    await until(lambda: gate.held == workers, f"{workers} job(s) held at the gate")
    return holders


async def release_queue(api: Any, gate: Gate, holders: list[dict[str, Any]], headers: dict[str, str] | None = None) -> None:
    """Cancel the holders (they leave no file) and open the gate: the queued jobs run."""
    for holder in holders:
        resp = await api.delete(f"/api/exports/{holder['id']}", headers=headers)
        assert resp.status == 200 and (await resp.json())["status"] == "cancelled", await resp.text()
    gate.open()


@pytest.fixture(params=["pymongo", "motor"])
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


def make_settings(mongo_url: str, tmp_path: Path, driver: str = DEFAULT_DRIVER, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        mongo_url=mongo_url,
        db_name=DATA_DB,
        driver=driver,
        export_dir=tmp_path / "exports",
        jobs_collection=new_jobs_collection(),
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


# --- the headless browser the page's tests drive -------------------------------------------------------------
CHROMIUM = os.environ.get("EXPORT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright  # only the browser tests need Playwright loaded

    if not Path(CHROMIUM).exists():  # a failure, not a skip: `make test` installs it
        pytest.fail(f"no Chromium at {CHROMIUM}; `make test` installs Debian's chromium package")
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            await instance.close()
