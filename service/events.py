"""Socket.IO: connect auth, subscribe/unsubscribe, and the export-* events (one room per job)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Mapping

import socketio
from aiohttp import web

from .db import DatabaseError
from .settings import Settings, bearer_token

log = logging.getLogger(__name__)

SnapshotLookup = Callable[[str, str], Awaitable["dict[str, Any] | None"]]
EVENT_FIELDS = ("id", "status", "run", "processed", "total", "percent")
CLOSE_SECONDS = 2.0  # at shutdown, for clients to take their close packet


def room(job_id: str) -> str:
    return f"export:{job_id}"


OriginCheck = Callable[[str, Mapping[str, Any]], bool]


def same_origins(environ: Mapping[str, Any]) -> set[str]:
    """The page's own origin as the request names it, directly and through a proxy's X-Forwarded-* headers
    (what python-engineio allows when no origins are configured)."""
    scheme, host = environ.get("wsgi.url_scheme", "http"), environ.get("HTTP_HOST")
    if not host:
        return set()
    forwarded_scheme = environ.get("HTTP_X_FORWARDED_PROTO", scheme).split(",")[0].strip()
    forwarded_host = environ.get("HTTP_X_FORWARDED_HOST", host).split(",")[0].strip()
    return {f"{scheme}://{host}".lower(), f"{forwarded_scheme}://{forwarded_host}".lower()}


def cors_allowed_origins(configured: tuple[str, ...]) -> OriginCheck | str | None:
    """python-engineio's cors_allowed_origins: None lets only the same origin connect ([] would turn the
    check off altogether); configured origins are allowed besides it, "*" allows any."""
    if not configured:
        return None
    if "*" in configured:
        return "*"
    allowed = frozenset(configured)

    def check(origin: str, environ: Mapping[str, Any]) -> bool:
        origin = (origin or "").lower()
        return origin in allowed or origin in same_origins(environ)

    return check


class EventHub:
    """Owns the Socket.IO server of one application."""

    def __init__(self, settings: Settings, lookup: SnapshotLookup) -> None:
        """lookup(user, job_id) gives the snapshot a subscriber gets first, or None when that user has no such job."""
        manager = None
        if settings.redis_url:
            manager = socketio.AsyncRedisManager(settings.redis_url)
        self.settings = settings
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp",
            cors_allowed_origins=cors_allowed_origins(settings.allowed_origins),
            client_manager=manager,
            logger=False,
            engineio_logger=False,
        )
        self.lookup = lookup
        self.sio.on("connect", self._connect)
        self.sio.on("subscribe", self._subscribe)
        self.sio.on("unsubscribe", self._unsubscribe)

    def attach(self, app: web.Application) -> None:
        self.sio.attach(app, socketio_path="socket.io")

    def user_for_token(self, token: Any) -> str | None:
        if self.settings.open_mode:
            return "anonymous"
        return self.settings.api_tokens.get(token) if isinstance(token, str) else None

    async def _connect(self, sid: str, environ: Mapping[str, Any], auth: Any = None) -> bool:
        token = auth.get("token") if isinstance(auth, dict) else None
        if token is None:
            # Clients that cannot send auth may send the bearer header instead.
            request = environ.get("aiohttp.request")
            header = request.headers.get("Authorization", "") if request is not None else ""
            token = bearer_token(header)
        user = self.user_for_token(token)
        if user is None:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized: a valid token is required")
        await self.sio.save_session(sid, {"user": user})
        return True

    @staticmethod
    def _job_id(data: Any) -> str | None:
        job_id = data.get("id") if isinstance(data, dict) else None
        return job_id if isinstance(job_id, str) and job_id else None

    # data defaults, and more arguments are taken: python-socketio calls a handler with what the client sent, and a
    # TypeError there leaves the client without an answer.
    async def _subscribe(self, sid: str, data: Any = None, *_: Any) -> dict[str, Any]:
        job_id = self._job_id(data)
        if job_id is None:
            return {"ok": False, "error": {"code": "invalid_request", "message": "subscribe needs {\"id\": ...}", "field": "id"}}
        session = await self.sio.get_session(sid)
        try:
            if await self.lookup(session["user"], job_id) is None:  # only its owner may enter the job's room
                return {"ok": False, "error": {"code": "not_found", "message": f"no export {job_id}", "field": "id"}}
            # In the room first, then the snapshot: no event can fall between the two unseen.
            await self.sio.enter_room(sid, room(job_id))
            snap = await self.lookup(session["user"], job_id)
        except DatabaseError as exc:  # the client gets its answer now, not at its own time-out
            await self.sio.leave_room(sid, room(job_id))
            return {"ok": False, "error": {"code": exc.code, "message": f"cannot look up export {job_id}: {exc}"}}
        if snap is None:  # deleted in between
            await self.sio.leave_room(sid, room(job_id))
            return {"ok": False, "error": {"code": "not_found", "message": f"no export {job_id}", "field": "id"}}
        return {"ok": True, "job": snap}

    async def _unsubscribe(self, sid: str, data: Any = None, *_: Any) -> dict[str, Any]:
        job_id = self._job_id(data)
        if job_id is not None:
            await self.sio.leave_room(sid, room(job_id))
        return {"ok": True}

    async def close(self) -> None:
        """Close every client's connection (pages reconnect, to this instance once it is back or to another).
        A WebSocket closes at once; a long-polling client that no longer polls would never take its close
        packet, so the wait for that is bounded."""
        eio = self.sio.eio
        clients = list(eio.sockets.values())
        closing = [asyncio.create_task(client.close(reason=eio.reason.SERVER_DISCONNECT)) for client in clients]
        if closing:
            _, late = await asyncio.wait(closing, timeout=CLOSE_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*closing, return_exceptions=True)
        for client in clients:
            # A browser's WebSocket ignores the close packet, and python-engineio's writer waits for another packet
            # until the ping timeout (45 s), holding the request, and so the stop, that long: None ends the writer,
            # which closes the WebSocket. (It is how python-engineio ends the writer itself.)
            client.queue.put_nowait(None)

    async def emit(self, event: str, snap: Mapping[str, Any], **extra: Any) -> None:
        payload = {key: snap.get(key) for key in EVENT_FIELDS}
        payload["rate"] = snap.get("rate")
        payload["eta_seconds"] = snap.get("eta_seconds")
        payload.update(extra)
        payload["ts"] = time.time()
        await self.sio.emit(event, payload, room=room(str(snap["id"])))
