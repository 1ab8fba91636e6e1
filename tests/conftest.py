"""Shared fixtures: one wire-protocol server per session (the embedded one, or EXPORT_MONGO_URL),
seeded tasks, and the real app built with create_app(settings) for each driver."""
from __future__ import annotations

import asyncio
import os
import secrets
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

SEED = 20240101
TASKS = 3000  # three batches and then some
DATA_DB = "export_tests"
END_STATES = ("completed", "failed", "cancelled", "expired")


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


@pytest.fixture(scope="session")
def tasks(sync_db: Any) -> list[dict[str, Any]]:
    """The generator's tasks, TASKS of them, inserted once; returned in insertion order."""
    docs = list(make_documents(TASKS, SEED))
    sync_db.drop_collection("tasks")
    for start in range(0, len(docs), 1000):
        sync_db.tasks.insert_many(docs[start:start + 1000])
    return docs


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


async def wait_status(api: Any, job_id: str, states: tuple[str, ...] = END_STATES, timeout: float = 30, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll the job through the app until it reaches one of states; the last snapshot either way."""
    deadline = time.monotonic() + timeout
    while True:
        snap = await (await api.get(f"/api/exports/{job_id}", headers=headers)).json()
        if snap["status"] in states or time.monotonic() > deadline:
            return snap
        await asyncio.sleep(0.05)
