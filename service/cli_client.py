"""mexport's side of the service: its HTTP API, its Socket.IO events (polling when they are not available),
cancelling a job, and Ctrl-C handling. aiohttp's client, python-socketio's AsyncClient and the standard
library only: none of the service's server modules."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import socketio

from .cli_progress import FINAL_STATES, Progress

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EVENTS = ("export-fetching", "export-processing", "export-finalizing", "export-completed", "export-failed", "export-cancelled")
SILENCE_SECONDS = 5.0  # no event for this long (queued, or waiting on the database): ask for the snapshot
POLL_SECONDS = 1.0
CANCEL_WAIT_SECONDS = 60.0
CHUNK = 256 * 1024
# How long a service that stopped answering (restarting, or behind a gateway saying 502/503/504) is waited out
# while following a job and before its download: longer than a restart, short enough for a script to go on.
OUTAGE_SECONDS = 300.0
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.5, 10.0
RETRY_STATUSES = frozenset({502, 503, 504})
# A download whose connection drops goes on from the byte it reached, with a fresh link, this many times.
DOWNLOAD_TRIES = 5
ENDING_EVENTS = frozenset({"export-failed", "export-cancelled"})
T = TypeVar("T")


class CliError(Exception):
    """A message for stderr and the exit code that goes with it."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Unavailable(CliError):
    """No answer, or a 'not now' (502, 503, 504): worth asking again a little later."""


class Interrupted(Exception):
    pass


class LiveUnavailable(Exception):
    """Socket.IO could not connect or dropped: follow by polling instead."""


def error_message(error: dict[str, Any]) -> str:
    """The service's `{"code", "message", "field"}` as `field: message`."""
    return f"{error['field']}: {error['message']}" if error.get("field") else str(error["message"])


class ApiError(CliError):
    """An error answer of the service, with its code (None when the body is not the service's JSON error)."""

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.code = code


def service_error(body: str) -> dict[str, Any]:
    """The service's JSON error in an error body ({} when the body is something else)."""
    with suppress(ValueError, AttributeError):
        error = json.loads(body).get("error")
        if isinstance(error, dict):
            return error
    return {}


def error_text(status: int, body: str) -> str:
    """An HTTP error body in the service's words when it is the service's JSON error, else as is."""
    error = service_error(body)
    return error_message(error) if error.get("message") else f"HTTP {status}: {body.strip()[:500]}"


def answer_json(resp: aiohttp.ClientResponse, text: str) -> Any:
    """The body of a successful answer; one that is not JSON means --url points at something else (a web
    server, a proxy's login page), said in a line rather than a parser's traceback."""
    try:
        return json.loads(text)
    except ValueError:
        raise CliError(f"not the export service's answer: HTTP {resp.status}, {resp.content_type or 'no content type'}") from None


class Api:
    """The service's HTTP API, with the bearer token in a header (never in a URL)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str | None) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.token = token

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    def headers(self) -> dict[str, str]:
        # identity: the session does not decompress (a file's bytes are written as they come), so nothing on the
        # way may compress them.
        return {"Accept-Encoding": "identity", **({"Authorization": f"Bearer {self.token}"} if self.token else {})}

    async def call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        try:
            # json= sends Content-Type: application/json, which POST /api/exports requires.
            async with self.session.request(method, self.url(path), json=body, params=params, headers=self.headers()) as resp:
                text = await resp.text()
                if resp.status in RETRY_STATUSES:
                    raise Unavailable(f"the service is unavailable: {error_text(resp.status, text)}")
                if resp.status >= 400:
                    code = service_error(text).get("code")
                    raise ApiError(error_text(resp.status, text), code if isinstance(code, str) else None)
                return answer_json(resp, text)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise Unavailable(f"cannot reach the service at {self.base_url}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise CliError(f"cannot reach the service at {self.base_url}: {exc}") from exc

    async def snapshot(self, job_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/api/exports/{job_id}")

    async def download(self, url: str, dest: Path, relink: Callable[[], Coroutine[Any, Any, str]], warn: Callable[[str], None]) -> int:
        """Stream url into a temporary file next to dest, renamed to dest only once whole. A connection that drops
        is asked again from the byte it reached, through a fresh link from relink (links are short-lived)."""
        try:
            fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        except OSError as exc:
            raise CliError(f"cannot write {dest}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                written, expected = await self._copy_all(url, out, relink, warn)
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and written != expected:
                raise CliError(f"the download ended after {written} of {expected} bytes")
            os.chmod(tmp_name, 0o666 & ~current_umask())  # mkstemp's 0600 is for the partial file only
            os.replace(tmp_name, dest)
            return written
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    async def _copy_all(self, url: str, out: Any, relink: Callable[[], Coroutine[Any, Any, str]],
                        warn: Callable[[str], None]) -> tuple[int, int | None]:
        part = Part(out)
        for attempt in range(1, DOWNLOAD_TRIES + 1):
            try:
                await self._copy(url, part)
                return part.written, part.size
            except Dropped as exc:
                if attempt == DOWNLOAD_TRIES:
                    raise CliError(f"the download failed after {part.written} bytes, {DOWNLOAD_TRIES} times: {exc}") from None
                warn(f"mexport: the download stopped after {part.written} bytes ({exc}); going on from there")
                await asyncio.sleep(RETRY_FIRST_SECONDS * attempt)
                url = await relink()
        raise AssertionError("unreachable")

    async def _copy(self, url: str, part: "Part") -> None:
        headers = {**self.headers(), **({"Range": f"bytes={part.written}-"} if part.written else {})}
        try:
            async with self.session.get(self.url(url), headers=headers) as resp:
                if resp.status in RETRY_STATUSES:  # a gateway while the service restarts: asked again, as a drop is
                    raise Dropped(f"HTTP {resp.status}")
                if resp.status >= 400:
                    raise CliError(error_text(resp.status, await resp.text()))
                part.start(resp)
                async for chunk in resp.content.iter_chunked(CHUNK):
                    part.write(chunk)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise Dropped(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise CliError(f"the download failed after {part.written} bytes: {exc}") from exc


class Dropped(Exception):
    """The download's connection ended before its last byte."""


class Part:
    """The bytes downloaded so far. A range answer (206) goes on from them; a whole answer (200), or a file that
    is not the one begun (another ETag or size), starts them again."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.written = 0
        self.size: int | None = None
        self.etag: str | None = None

    def start(self, resp: aiohttp.ClientResponse) -> None:
        etag = resp.headers.get("ETag")
        if resp.status == 206:
            first, _, size = resp.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
            same = etag == self.etag and size.isdigit() and int(size) == self.size
            if same and first.split("-")[0] == str(self.written):
                return
            self._restart(None, None)  # the next request asks for the whole file
            raise Dropped("the service answered with another file or range")
        self._restart(resp.content_length, etag)

    def _restart(self, size: int | None, etag: str | None) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.written, self.size, self.etag = 0, size, etag

    def write(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.written += len(chunk)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Interrupts:
    """Counts SIGINTs; a coroutine run through guard() is cancelled by the next one."""

    def __init__(self) -> None:
        self.count = 0
        self._pressed = asyncio.Event()

    def install(self) -> None:
        with suppress(NotImplementedError, RuntimeError):  # no loop signal handlers: KeyboardInterrupt then
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._press)

    def _press(self) -> None:
        self.count += 1
        self._pressed.set()

    async def guard(self, coro: Coroutine[Any, Any, T], since: int | None = None) -> T:
        """coro's result, or Interrupted once SIGINT came after `since` (default: now), coro then cancelled."""
        seen = self.count if since is None else since
        task = asyncio.ensure_future(coro)
        while not task.done() and self.count == seen:
            self._pressed.clear()
            waiter = asyncio.ensure_future(self._pressed.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        raise Interrupted()


# --- following a job ------------------------------------------------------------------------


async def lasting_snapshot(api: Api, job_id: str, warn: Callable[[str], None]) -> dict[str, Any]:
    """The job's snapshot, asked again with backoff while the service does not answer, for OUTAGE_SECONDS:
    a restart is no reason to report an export that goes on as failed."""
    deadline: float | None = None
    delay = RETRY_FIRST_SECONDS
    while True:
        try:
            snap = await api.snapshot(job_id)
        except Unavailable as exc:
            if deadline is None:
                deadline = time.monotonic() + OUTAGE_SECONDS
                warn(f"mexport: {exc}; retrying for up to {OUTAGE_SECONDS:g} s")
            left = deadline - time.monotonic()
            if left <= 0:
                raise CliError(f"{exc}; gave up after {OUTAGE_SECONDS:g} s: export {job_id} may still be running "
                               f"(mexport status {job_id} shows it)") from None
            await asyncio.sleep(min(delay, left))
            delay = min(2 * delay, RETRY_MAX_SECONDS)
            continue
        if deadline is not None:
            warn("mexport: the service answers again")
        return snap


async def follow(api: Api, snap: dict[str, Any], progress: Progress, poll_only: bool) -> dict[str, Any]:
    """The job's final snapshot, showing progress on the way."""
    if not poll_only:
        try:
            return await follow_live(api, snap["id"], progress)
        except LiveUnavailable as exc:
            progress.warn(f"mexport: live progress unavailable ({exc}); polling every second")
    return await follow_polling(api, snap["id"], progress)


async def follow_polling(api: Api, job_id: str, progress: Progress) -> dict[str, Any]:
    while True:
        state = await lasting_snapshot(api, job_id, progress.warn)
        if state["status"] in FINAL_STATES:
            return state
        progress.update(state)
        await asyncio.sleep(POLL_SECONDS)


async def follow_live(api: Api, job_id: str, progress: Progress) -> dict[str, Any]:
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    # handle_sigint=False: Ctrl-C is ours to turn into a cancel, not the client's to swallow.
    sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
    for name in EVENTS:
        sio.on(name, lambda data, _name=name: queue.put_nowait((_name, data)))
    sio.on("disconnect", lambda *_: queue.put_nowait(("disconnect", None)))
    try:
        await sio.connect(api.base_url, headers=api.headers(), auth={"token": api.token} if api.token else None, wait_timeout=10)
    except socketio.exceptions.ConnectionError as exc:
        raise LiveUnavailable(str(exc) or "could not connect") from exc
    try:
        ack = await sio.call("subscribe", {"id": job_id}, timeout=10)
        if not isinstance(ack, dict) or not ack.get("ok"):
            error = ack.get("error") if isinstance(ack, dict) else None
            raise CliError(error_message(error) if isinstance(error, dict) and error.get("message") else f"subscribe refused: {ack!r}")
        return await pump(api, job_id, queue, ack["job"], progress)
    except socketio.exceptions.TimeoutError as exc:
        raise LiveUnavailable("no answer to subscribe") from exc
    finally:
        await sio.disconnect()


async def pump(
    api: Api, job_id: str, queue: asyncio.Queue[tuple[str, Any]], state: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """Merge each event into the subscription's snapshot until a final state."""
    while state["status"] not in FINAL_STATES:
        progress.update(state)
        try:
            name, payload = await asyncio.wait_for(queue.get(), SILENCE_SECONDS)
        except asyncio.TimeoutError:
            # Queued jobs and database waits may send nothing for a while; the snapshot still moves.
            state = await lasting_snapshot(api, job_id, progress.warn)
            continue
        if name == "disconnect":
            raise LiveUnavailable("the connection dropped")
        if isinstance(payload, dict) and payload.get("id") == job_id:
            state = {**state, **payload}
            if name in ENDING_EVENTS:
                # A stopping instance may announce an end for a job that is in fact queued again and finishes
                # later: the job's record decides.
                state = await lasting_snapshot(api, job_id, progress.warn)
    return state


async def cancel_job(api: Api, job_id: str) -> dict[str, Any]:
    """Cancel the job, then wait until its end is recorded (another instance may be running it). ?if=active: a
    job that ended meanwhile is left as it is, never deleted with its file."""
    try:
        snap = await api.call("DELETE", f"/api/exports/{job_id}", params={"if": "active"})
    except ApiError as exc:
        if exc.code != "not_active":
            raise
        snap = await api.snapshot(job_id)
    deadline = time.monotonic() + CANCEL_WAIT_SECONDS
    while snap["status"] not in FINAL_STATES:
        if time.monotonic() > deadline:
            raise CliError(f"export {job_id} is still {snap['status']} {CANCEL_WAIT_SECONDS:.0f} s after the cancel")
        await asyncio.sleep(0.2)
        snap = await api.snapshot(job_id)
    return snap


def cancel_outcome(snap: dict[str, Any]) -> str:
    if snap["status"] == "completed":  # the cancel reached it while it was finishing
        return f"export {snap['id']} completed before the cancel took effect; mexport download {snap['id']} fetches it"
    return f"export {snap['id']} {snap['status']}"


def failure_text(snap: dict[str, Any]) -> str:
    error = snap.get("error") or {}
    reason = f"{error.get('message')} ({error.get('code')})" if error else "no reason given"
    if snap["status"] == "failed":
        return f"export {snap['id']} failed: {reason}"
    return f"export {snap['id']} ended {snap['status']}"
