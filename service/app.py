"""create_app(settings): routes, Socket.IO, and every resource opened and closed in cleanup_ctx."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from functools import partial
from typing import Any, AsyncIterator

from aiohttp import web

from . import api
from .db import Database
from .embedded_db import EmbeddedDbError, EmbeddedMongo
from .events import EventHub
from .health import Health
from .manager import JobManager
from .metrics import Metrics
from .runner import BatchSource
from .settings import (
    DB_KEY, EMBEDDED_KEY, EVENTS_KEY, HEALTH_KEY, MANAGER_KEY, METRICS_KEY, SETTINGS_KEY, SOURCE_KEY, Settings, SettingsError,
)

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
EMBEDDED_CONNECT_TIMEOUT_MS = 30_000
EMBEDDED_WATCH_SECONDS = 1.0  # how often the service looks whether its embedded server still runs
GENERATOR = Path(__file__).resolve().parent.parent / "scripts" / "generate_data.py"


class StartupError(RuntimeError):
    """The service could not start (its message is the one line python -m service prints)."""


def check_export_dir(settings: Settings) -> None:
    """Create EXPORT_DIR and prove it takes a file; a SettingsError otherwise."""
    path = Path(settings.export_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
        finally:  # created, then refused its byte on a full disk: not left behind
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise SettingsError(f"EXPORT_DIR {str(path)!r} is not writable: {exc.strerror or exc}") from None


async def _export_dir_ctx(app: web.Application) -> AsyncIterator[None]:
    check_export_dir(app[SETTINGS_KEY])
    yield


async def _database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    embedded: EmbeddedMongo | None = None
    url = settings.mongo_url
    if url is None:
        embedded = await asyncio.to_thread(EmbeddedMongo(settings.embedded_dir).start)
        url = embedded.url
        log.warning("no EXPORT_MONGO_URL: using the embedded database at %s (data in %s)", url, settings.embedded_dir)
    app[EMBEDDED_KEY] = embedded
    # The embedded server answers nothing while it builds a large query's first batch (seconds for
    # 100,000 documents); the driver's heartbeat, whose timeout is connectTimeoutMS, must outwait it.
    connect_timeout_ms = EMBEDDED_CONNECT_TIMEOUT_MS if embedded is not None else 5000
    try:
        app[DB_KEY] = Database.connect(url, settings.db_name, settings.driver, settings.jobs_collection, connect_timeout_ms,
                                       settings.query_max_time_ms)
        try:
            if settings.seed_demo_rows:
                await _seed_demo(url, settings)
            yield
        finally:
            await app[DB_KEY].close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _embedded_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """While the service runs, its embedded server (when it started one) is started again should it end."""
    embedded = app[EMBEDDED_KEY]
    watcher = asyncio.create_task(_keep_running(embedded), name="embedded-watch") if embedded is not None else None
    yield
    if watcher is not None:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def _keep_running(embedded: EmbeddedMongo) -> None:
    """Start the embedded server again when it ends (killed, out of memory): on its port, where the driver finds
    it by itself. Without this the service stays up but can do nothing until someone restarts it."""
    while True:
        await asyncio.sleep(EMBEDDED_WATCH_SECONDS)
        if embedded.running():
            continue
        log.error("the embedded database ended (exit code %s); starting it again", embedded.exit_code())
        try:
            await asyncio.to_thread(embedded.start)
        except EmbeddedDbError as exc:  # its port taken meanwhile, say: tried again at the next look
            log.error("the embedded database could not be started again: %s", exc)


async def _seed_demo(url: str, settings: Settings) -> None:
    """Fill the demo collection with generated tasks unless it already holds documents."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(GENERATOR), "--url", url, "--db", settings.db_name,
        "--count", str(settings.seed_demo_rows), "--collection", "tasks", "--if-empty",
    )
    if await proc.wait() != 0:
        raise StartupError(f"generating demo data failed with exit code {proc.returncode} (EXPORT_SEED_DEMO_ROWS)")


async def _manager_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    manager = JobManager(settings, app[DB_KEY], app[EVENTS_KEY], app[METRICS_KEY], app.get(SOURCE_KEY))
    app[MANAGER_KEY] = manager
    if settings.open_mode:
        log.warning("EXPORT_API_TOKENS is empty: the service runs OPEN, anyone who reaches it can export and download")
    await manager.start()
    health = Health(app[DB_KEY], manager.encoders.usable)
    app[HEALTH_KEY] = health
    health.start()
    yield
    await health.stop()
    await manager.stop()


async def _stop_jobs_and_sockets(app: web.Application) -> None:
    """At shutdown, before aiohttp waits (up to a minute) for the requests still open: running jobs go back to the
    queue while the process still has its grace period, and Socket.IO connections, requests that never end by
    themselves, are closed. Downloads under way are still waited for."""
    manager = app.get(MANAGER_KEY)
    if manager is not None:
        await manager.stop()
    await app[EVENTS_KEY].close()


async def _lookup_job(app: web.Application, user: str, job_id: str) -> dict[str, Any] | None:
    """A subscriber's first snapshot, from the manager the app starts (after the Socket.IO server exists)."""
    return await app[MANAGER_KEY].lookup(user, job_id)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _revalidate_static(request: web.Request, response: web.StreamResponse) -> None:
    # The page's scripts change with each release; browsers must ask again rather than run a stale copy.
    if request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-cache")


def create_app(settings: Settings, source: BatchSource | None = None) -> web.Application:
    """The service. source replaces the database as the origin of exported rows (the benchmark
    feeds pre-encoded batches this way); jobs are still kept in the database."""
    app = web.Application(middlewares=[api.errors_middleware, api.auth_middleware], client_max_size=1024**2)
    app[SETTINGS_KEY] = settings
    if source is not None:
        app[SOURCE_KEY] = source
    app[METRICS_KEY] = Metrics()
    events = EventHub(settings, partial(_lookup_job, app))
    app[EVENTS_KEY] = events
    events.attach(app)
    app.add_routes(api.routes)
    app.router.add_get("/", index)
    app.router.add_static("/static", STATIC_DIR, show_index=False, follow_symlinks=False, append_version=False)
    app.on_response_prepare.append(_revalidate_static)
    app.on_response_prepare.append(api.add_request_id)
    app.on_response_prepare.append(api.add_security_headers)
    app.cleanup_ctx.extend([_export_dir_ctx, _database_ctx, _embedded_watch_ctx, _manager_ctx])
    app.on_shutdown.append(_stop_jobs_and_sockets)
    return app
