"""HTTP handlers. Domain errors become JSON errors here: {"error": {"code", "message", "field"}}."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from dataclasses import replace
import re
import secrets
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlsplit

import orjson
from aiohttp import hdrs, web

from . import catalog
from .db import DatabaseError, DatabaseUnavailable
from .jobs import JobStatus
from .manager import JobConflict, JobNotFound, TooManyJobs
from .query import MAX_BODY_BYTES, ExportSpec, ValidationError, parse_body, plain_int, validate_request
from .settings import DB_KEY, HEALTH_KEY, MANAGER_KEY, METRICS_KEY, SETTINGS_KEY, Settings, bearer_token
from .signing import SignatureError

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
USER_KEY = web.RequestKey("user", str)
DOWNLOAD_PATH = "/api/exports/{id}/download"
METRICS_COUNT_SECONDS = 1.0
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # asked by orchestrators under any name
SERVED_RANGE = re.compile(r"bytes=(\d+)-(\d*)|bytes=-(\d+)", re.ASCII | re.IGNORECASE)  # as aiohttp reads one
BODY_SECONDS = 30.0  # for a request's body to arrive: aiohttp itself waits without limit
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "parquet": "application/vnd.apache.parquet",
}
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 50, 500


class UnsupportedMediaType(ValidationError):
    """Answered 415: a body that is not declared JSON. Browsers send a cross-site form or text/plain POST
    without asking first (no CORS preflight); they never send application/json that way."""


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message, "field": field}}, status, headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_KEY = web.RequestKey("request_id", str)
# An id a load balancer or proxy already gave the request is kept when it is this plain (it goes into logs).
_FORWARDED_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(request: web.Request) -> str:
    """The request's id: the one it came with (X-Request-Id) when plain, else a new one; set once."""
    if REQUEST_ID_KEY not in request:
        given = request.headers.get("X-Request-Id", "")
        request[REQUEST_ID_KEY] = given if _FORWARDED_ID.fullmatch(given) else secrets.token_hex(8)
    return request[REQUEST_ID_KEY]


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, error or not, names its request."""
    response.headers["X-Request-Id"] = request_id_of(request)


SECURITY_HEADERS = {
    # The page loads only its own scripts, styles and sockets, and no other site may frame it (a framed page at
    # low opacity turns a visitor's click into one on its Remove button).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: on every answer, the page's and the downloads' alike."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id_of(request)
    try:
        return await _domain_errors(request, handler)
    except web.HTTPException:
        raise
    except Exception:  # the last resort: logged with its traceback, answered as JSON
        request_id = request_id_of(request)
        log.exception("unexpected error on %s %s (request %s)", request.method, request.path, request_id)
        body = {"error": {"code": "internal_error", "message": f"internal error; request id {request_id}", "field": None, "request_id": request_id}}
        return json_response(body, 500)


async def _domain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors as JSON error responses; anything else goes on to errors_middleware."""
    try:
        return await handler(request)
    except UnsupportedMediaType as exc:
        return error_response(415, exc.code, exc.message, exc.field)
    except ValidationError as exc:
        return error_response(400, exc.code, exc.message, exc.field)
    except JobNotFound as exc:
        return error_response(404, "not_found", f"no export {exc}", "id")
    except JobConflict as exc:
        status = 410 if exc.status == JobStatus.EXPIRED.value and exc.code is None else 409
        return error_response(status, exc.code or ("expired" if status == 410 else "not_ready"), str(exc), "id")
    except SignatureError as exc:
        return error_response(403, exc.code, exc.message, exc.field)
    except TooManyJobs as exc:
        return error_response(429, "too_many_active_exports", str(exc), None, {"Retry-After": "10"})
    except DatabaseUnavailable as exc:
        return error_response(503, exc.code, str(exc), None, {"Retry-After": "5"})
    except DatabaseError as exc:
        log.warning("database error on %s %s (request %s): %s", request.method, request.path, request_id_of(request), exc)
        return error_response(500, exc.code, str(exc))
    except web.HTTPException as exc:
        if request.path.startswith("/api/") and exc.status >= 400:
            # Its own headers (Allow on a 405) but not its text body's type: the answer is JSON.
            kept = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
            return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, None, kept)
        raise


def host_name(header: str) -> str | None:
    """The host a Host header names, without its port and a final dot (localhost. is localhost), lower-cased;
    None when there is none."""
    try:
        name = urlsplit(f"//{header}").hostname
    except ValueError:
        name = header.lower()
    return name.removesuffix(".") or None if name else None


def host_allowed(name: str, settings: Settings) -> bool:
    """Whether an open service answers to this name. A page on another site can reach a service on this machine
    under its own name, once its DNS points that name here (rebinding), and the browser then treats the service as
    that site's own: only names an attacker cannot point here are taken."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return True
    return name == "localhost" or name.endswith(".localhost") or name == settings.host.lower() or name in settings.allowed_hosts


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS_KEY]
    if settings.open_mode:
        name = host_name(request.headers.get(hdrs.HOST, ""))
        if request.path not in PROBE_PATHS and name is not None and not host_allowed(name, settings):
            return error_response(421, "host_not_allowed", f"this service does not answer to the host name {name!r}: an "
                                  "open service answers to localhost, IP addresses and EXPORT_ALLOWED_HOSTS", "Host")
        request[USER_KEY] = "anonymous"
        return await handler(request)
    if not request.path.startswith("/api/") and request.path != "/metrics":
        return await handler(request)  # the page, static files, health and Socket.IO (which checks its own auth)
    resource = request.match_info.route.resource
    if "sig" in request.query and resource is not None and resource.canonical == DOWNLOAD_PATH:
        return await handler(request)  # a signed download link: the handler checks the signature
    # Only the header: a token in a query string ends up in logs, histories and Referer headers.
    token = bearer_token(request.headers.get("Authorization", ""))
    user = settings.api_tokens.get(token) if token else None
    if user is None:
        return error_response(401, "unauthorized", "a valid bearer token is required", "Authorization", {"WWW-Authenticate": "Bearer"})
    request[USER_KEY] = user
    return await handler(request)


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The body, or its first limit bytes: enough to tell that it is too large without reading it all."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_SECONDS):
            while size < limit:
                chunk = await request.content.read(limit - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None  # answered as JSON, code request_timeout
    except web.RequestPayloadError:
        raise ValidationError("body", "the body is not what its Content-Encoding or chunking says", "invalid_body") from None
    return b"".join(chunks)


@routes.post("/api/exports")
async def create_export(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    if request.content_type != "application/json":
        given = request.headers.get("Content-Type") or "none"
        raise UnsupportedMediaType("Content-Type", f"the body must be sent as application/json, not {given}", "unsupported_media_type")
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):  # another would be read as if it were none
        raise UnsupportedMediaType("Content-Encoding", f"the body may be sent as gzip or deflate, not {encoding}", "unsupported_media_type")
    body = parse_body(await read_limited(request, MAX_BODY_BYTES + 1))
    spec = replace(validate_request(body, settings.jobs_collection, settings.collections), xlsx_rows_per_sheet=settings.xlsx_max_rows_per_sheet)
    if spec.collection not in await request.app[DB_KEY].collection_names():
        raise ValidationError("collection", f"collection {spec.collection!r} does not exist", "collection_not_found")
    snap = await request.app[MANAGER_KEY].create(spec, request[USER_KEY])
    return json_response(snap, 202, {"Location": f"/api/exports/{snap['id']}"})


@routes.get("/api/exports")
async def list_exports(request: web.Request) -> web.Response:
    status = request.query.get("status") or None
    if status is not None and status not in {s.value for s in JobStatus}:
        raise ValidationError("status", f"status must be one of {', '.join(s.value for s in JobStatus)}", "invalid_status")
    raw_limit = request.query.get("limit", str(LIST_LIMIT_DEFAULT))
    limit = plain_int(raw_limit, 6)
    if limit is None or not 1 <= limit <= LIST_LIMIT_MAX:
        raise ValidationError("limit", f"limit must be an integer from 1 to {LIST_LIMIT_MAX}", "invalid_limit")
    jobs = await request.app[MANAGER_KEY].list(request[USER_KEY], status, limit)
    return json_response({"exports": jobs})


@routes.get("/api/exports/{id}")
async def get_export(request: web.Request) -> web.Response:
    return json_response(await request.app[MANAGER_KEY].get(request[USER_KEY], request.match_info["id"]))


@routes.delete("/api/exports/{id}")
async def delete_export(request: web.Request) -> web.Response:
    condition = request.query.get("if")
    if condition not in (None, "active"):
        raise ValidationError("if", 'if may only be "active": cancel, and never delete a job that has ended', "invalid_condition")
    manager = request.app[MANAGER_KEY]
    return json_response(await manager.cancel_or_delete(request[USER_KEY], request.match_info["id"], cancel_only=condition == "active"))


def content_disposition(file_name: str) -> str:
    """RFC 6266: an ASCII fallback plus filename* for names that are not plain ASCII."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%' else "_" for c in file_name)
    value = f'attachment; filename="{fallback}"'
    if fallback != file_name:
        value += f"; filename*=UTF-8''{quote(file_name, safe='')}"
    return value


@routes.get(DOWNLOAD_PATH, allow_head=True)
async def download_export(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER_KEY]
    job_id = request.match_info["id"]
    if USER_KEY in request and "sig" not in request.query:
        doc = await manager.get_doc(request[USER_KEY], job_id)
    else:
        doc = await manager.get_signed_doc(job_id, request.query.get("exp", ""), request.query.get("sig", ""))
    status = doc["status"]
    if status != JobStatus.COMPLETED.value:
        if status == JobStatus.EXPIRED.value:
            raise JobConflict("the export expired and its file was removed", status)
        # not_ready: waiting helps; not_completed: the export ended without a file, and waiting does not.
        raise JobConflict(f"the export is {status}, not completed", status, None if JobStatus(status).active else "not_completed")
    path = manager.path_of(doc)  # built from the job id and format only, never from request input
    if not path.is_file():
        raise JobConflict("the export file is gone", JobStatus.EXPIRED.value)
    spec = ExportSpec.from_doc(doc["spec"])
    content_type = "application/gzip" if spec.compress == "gzip" else CONTENT_TYPES[spec.format]
    # Never the query string: a signed link works for anyone who reads it until it runs out.
    through = "a signed link" if "sig" in request.query else "open mode" if request.app[SETTINGS_KEY].open_mode else "a token"
    log.info("job %s: its file asked for (%s) through %s; the job is %s's", doc["_id"], request.method, through, doc["user"])
    return ExportFile(
        path,
        chunk_size=256 * 1024,
        headers={
            "Content-Disposition": content_disposition(doc["file_name"]),
            "Content-Type": content_type,
            "Cache-Control": "private, no-transform",
        },
    )


class ExportFile(web.FileResponse):
    """aiohttp's FileResponse, answering 200 with the whole file to a Range it does not serve, as RFC 9110 lets a
    server do (an unknown unit must be ignored): aiohttp answers an empty 416 to a unit other than bytes, to
    several ranges and to a malformed one, and the whole file as a 206 to a suffix of 0 bytes."""

    async def prepare(self, request: web.BaseRequest) -> Any:
        asked = request.headers.get(hdrs.RANGE)
        if asked is not None and not self.served(asked):
            # From the raw bytes: clone() encodes the headers as UTF-8 again, which a header holding another
            # encoding's bytes (a Latin-1 cookie) would fail, leaving the download without an answer.
            kept = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers if k.lower() != b"range"]
            request = request.clone(headers=kept)
        return await super().prepare(request)

    @staticmethod
    def served(asked: str) -> bool:
        """One range of bytes, first to last or a suffix of at least one byte."""
        found = SERVED_RANGE.fullmatch(asked)
        if found is None:
            return False
        first, last, suffix = found.groups()
        return int(suffix) > 0 if suffix is not None else not last or int(first) <= int(last)


@routes.get("/api/collections")
async def list_collections(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    # The embedded server runs the paths $project over the whole collection: there, paths are found here.
    paths_on_server = not await request.app[DB_KEY].is_embedded_server()
    collections = await catalog.list_collections(request.app[DB_KEY], settings.jobs_collection, settings.collections, paths_on_server)
    return json_response({"collections": collections})


def _probe(ok: bool, body: dict[str, Any], request: web.Request) -> web.Response:
    body = {"status": "ok" if ok else "unavailable", "instance": request.app[MANAGER_KEY].instance_id, **body}
    return json_response(body, 200 if ok else 503, {"Cache-Control": "no-store"})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the service's own state only, never the database (a busy database is not a dead service)."""
    return _probe(*request.app[HEALTH_KEY].liveness(), request)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Readiness: whether the driver's server monitoring knows a server that takes writes; never waits for a ping."""
    return _probe(*request.app[HEALTH_KEY].readiness(), request)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    try:
        # A scrape must not wait on a database in trouble (Prometheus gives up after 10 s): without the count in
        # time, the queued gauge is left out.
        queued: int | None = await asyncio.wait_for(request.app[DB_KEY].count_jobs({"status": JobStatus.QUEUED.value}),
                                                    METRICS_COUNT_SECONDS)
    except (DatabaseError, asyncio.TimeoutError):
        queued = None
    text = request.app[METRICS_KEY].render(queued)
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})
