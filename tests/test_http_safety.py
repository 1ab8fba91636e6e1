"""Requests a browser can be tricked into sending, and failures nobody planned for, through the real app:
job creation only from JSON bodies, Socket.IO only from allowed origins, and unexpected exceptions answered
as the JSON error shape with a request id."""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import socketio
from aiohttp import FormData, web

from service import api as api_module
from service.app import create_app

from conftest import make_settings, wait_status

BODY = '{"collection": "tasks", "format": "csv"}'


@pytest.fixture
async def api(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> Any:
    return await aiohttp_client(create_app(make_settings(mongo_url, tmp_path)))


async def listed(api: Any) -> list[dict[str, Any]]:
    return (await (await api.get("/api/exports")).json())["exports"]


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "text/plain"}, {"Content-Type": "text/plain;charset=UTF-8"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}],
    ids=["text/plain", "text/plain with charset", "urlencoded form", "no content type"],
)
async def test_a_body_not_declared_json_answers_415_and_creates_nothing(api: Any, headers: dict[str, str]) -> None:
    # The body is a valid request: only its declared type is wrong, as in a cross-site form post.
    resp = await api.post("/api/exports", data=BODY.encode(), headers=headers, skip_auto_headers=["Content-Type"])
    assert resp.status == 415, await resp.text()
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert (error["code"], error["field"]) == ("unsupported_media_type", "Content-Type")
    assert error["message"]
    assert await listed(api) == []


async def test_a_multipart_form_post_answers_415(api: Any) -> None:
    form = FormData()
    form.add_field("collection", "tasks")
    form.add_field("format", "csv")
    form.add_field("file", b"x", filename="x.bin")  # multipart, as a form with a file input sends it
    resp = await api.post("/api/exports", data=form)
    assert resp.status == 415
    assert (await resp.json())["error"]["code"] == "unsupported_media_type"
    assert await listed(api) == []


async def raw_post(api: Any, headers: bytes, body: bytes) -> tuple[bytes, dict[str, Any]]:
    """A POST written on a socket as given (a test client would not send it so): the status line and the error."""
    reader, writer = await asyncio.open_connection(api.host, api.port)
    writer.write(b"POST /api/exports HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + headers + b"\r\n" + body)
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
        return head.split(b"\r\n")[0], json.loads(await reader.readexactly(length))["error"]
    finally:
        writer.close()


async def test_a_body_that_is_not_what_its_encoding_says_answers_400(api: Any) -> None:
    status, error = await raw_post(api, b"Content-Encoding: gzip\r\nContent-Length: 15\r\n", b"not gzip at all")
    assert status == b"HTTP/1.1 400 Bad Request" and (error["code"], error["field"]) == ("invalid_body", "body"), (status, error)
    assert await listed(api) == []


async def test_a_body_in_an_encoding_not_read_answers_415(api: Any) -> None:
    for encoding in ("foo", "gzip, gzip"):
        status, error = await raw_post(api, b"Content-Encoding: " + encoding.encode() + b"\r\nContent-Length: 40\r\n", BODY.encode())
        assert status == b"HTTP/1.1 415 Unsupported Media Type" and (error["code"], error["field"]) == ("unsupported_media_type", "Content-Encoding")
    assert await listed(api) == []


async def test_a_body_that_never_arrives_answers_408(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_module, "BODY_SECONDS", 0.5)
    status, error = await raw_post(api, b"Content-Length: 100\r\n", b'{"coll')  # the other 94 bytes never come
    assert status == b"HTTP/1.1 408 Request Timeout" and error["code"] == "request_timeout", (status, error)
    assert await listed(api) == []


async def test_json_with_a_charset_parameter_is_accepted(api: Any) -> None:
    resp = await api.post("/api/exports", data=BODY.encode(), headers={"Content-Type": "application/json; charset=utf-8"})
    assert resp.status == 202, await resp.text()
    assert [job["id"] for job in await listed(api)] == [(await resp.json())["id"]]


# --- Socket.IO origins -------------------------------------------------------------------------------
async def websocket_accepts(api: Any, origin: str | None) -> bool:
    """Whether a real Socket.IO client over WebSocket, sending origin, connects and gets an answer."""
    sio = socketio.AsyncClient(reconnection=False)
    try:
        await sio.connect(str(api.make_url("/")), transports=["websocket"], headers={"Origin": origin} if origin else {}, wait_timeout=10)
    except socketio.exceptions.ConnectionError:
        return False
    try:
        ack = await sio.call("subscribe", {"id": "0123456789abcdef01234567"}, timeout=10)
        assert ack["ok"] is False and ack["error"]["code"] == "not_found"  # connected and answered
        return True
    finally:
        await sio.disconnect()


async def polling_accepts(api: Any, origin: str) -> bool:
    """Whether Engine.IO's long-polling handshake, as a browser's XHR sends it with origin, opens a session.
    (A polling client takes a whole poll interval to disconnect, so the handshake is made directly.)"""
    resp = await api.get("/socket.io/", params={"EIO": "4", "transport": "polling"}, headers={"Origin": origin})
    text = await resp.text()
    if resp.status == 200:
        assert text.startswith('0{"sid":'), text  # the open packet
        return True
    assert resp.status == 400 and "not an accepted origin" in text, (resp.status, text)
    return False


async def test_socketio_accepts_only_its_own_origin_by_default(api: Any) -> None:
    own = f"http://{api.host}:{api.port}"
    assert await websocket_accepts(api, own) and await polling_accepts(api, own)
    assert await websocket_accepts(api, None)  # not a browser: no Origin to check
    for foreign in ("http://evil.example", f"http://{api.host}:{api.port + 1}", f"https://{api.host}:{api.port}"):
        assert not await websocket_accepts(api, foreign), foreign
        assert not await polling_accepts(api, foreign), foreign


async def test_socketio_accepts_configured_origins_besides_its_own(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    from service.settings import settings_from_env

    origins = settings_from_env({"EXPORT_ALLOWED_ORIGINS": "https://App.example:8443, http://intranet.example"}).allowed_origins
    assert origins == ("https://app.example:8443", "http://intranet.example")
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, allowed_origins=origins)))
    for origin in ("https://app.example:8443", "http://intranet.example", f"http://{api.host}:{api.port}"):
        assert await websocket_accepts(api, origin), origin
        assert await polling_accepts(api, origin), origin
    for foreign in ("https://app.example", "http://evil.example", "https://intranet.example"):
        assert not await websocket_accepts(api, foreign), foreign
        assert not await polling_accepts(api, foreign), foreign


@pytest.mark.parametrize("raw", ["app.example", "https://app.example/path", "ftp://app.example", "https://"])
def test_a_bad_allowed_origin_stops_start_up_naming_the_setting(raw: str) -> None:
    from service.settings import SettingsError, settings_from_env

    with pytest.raises(SettingsError, match="EXPORT_ALLOWED_ORIGINS"):
        settings_from_env({"EXPORT_ALLOWED_ORIGINS": raw})


# --- unexpected exceptions -----------------------------------------------------------------------------
async def test_an_unexpected_exception_answers_500_json_with_the_logged_request_id(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(mongo_url, tmp_path))

    async def broken(request: web.Request) -> web.Response:
        raise KeyError("a defect")

    # Routes of the test's own, on the app it built: one under /api/ behind the auth check, one outside it.
    app.router.add_get("/api/broken", broken)
    app.router.add_post("/broken", broken)
    api = await aiohttp_client(app)
    seen_ids = set()
    for method, path in (("GET", "/api/broken"), ("POST", "/broken")):
        with caplog.at_level(logging.ERROR, logger="service.api"):
            resp = await api.request(method, path)
        assert resp.status == 500
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
        request_id = resp.headers["X-Request-Id"]
        assert error["code"] == "internal_error" and error["request_id"] == request_id and error["field"] is None
        assert request_id in error["message"] and "a defect" not in error["message"]  # no internals to the client
        records = [r for r in caplog.records if request_id in r.getMessage()]
        assert len(records) == 1 and records[0].exc_info is not None and records[0].exc_info[0] is KeyError
        seen_ids.add(request_id)
        caplog.clear()
    assert len(seen_ids) == 2  # one id per request

    # The service goes on, every answer names its request, and an id given by a proxy is kept.
    ok = await api.get("/healthz", headers={"X-Request-Id": "lb-7f3a.12"})
    assert ok.status == 200 and ok.headers["X-Request-Id"] == "lb-7f3a.12"
    odd = await api.get("/api/exports", headers={"X-Request-Id": "no spaces\tor tabs"})
    assert odd.status == 200 and odd.headers["X-Request-Id"] not in ("", "no spaces\tor tabs")
    assert (await api.get("/nope")).headers["X-Request-Id"]


async def test_every_answer_forbids_framing_sniffing_and_foreign_content(api: Any) -> None:
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv", "limit": 3})).json()
    done = await wait_status(api, job["id"])
    for path in ("/", "/static/app.js", "/api/exports", "/api/nowhere", done["download_url"], "/healthz"):
        resp = await api.get(path)
        assert resp.headers.get("X-Frame-Options") == "DENY", path
        assert resp.headers.get("X-Content-Type-Options") == "nosniff", path
        assert resp.headers.get("Referrer-Policy") == "no-referrer", path
        policy = dict(part.strip().split(" ", 1) for part in resp.headers["Content-Security-Policy"].split(";"))
        assert (policy["default-src"], policy["frame-ancestors"]) == ("'self'", "'none'"), (path, policy)


async def test_an_open_service_answers_only_to_names_no_other_site_can_point_at_it(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    """DNS rebinding: a site that points its own name at this address would be the page's own origin to the browser."""
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, allowed_hosts=("exports.intranet",))))
    rebound = {"Host": "rebind.attacker.example:8080", "Origin": "http://rebind.attacker.example:8080"}
    for method, path in (("GET", "/"), ("GET", "/api/exports"), ("POST", "/api/exports"), ("GET", "/socket.io/?EIO=4&transport=polling")):
        resp = await api.request(method, path, headers=rebound, json={"collection": "tasks", "format": "csv"} if method == "POST" else None)
        assert resp.status == 421, (method, path, resp.status)
        error = (await resp.json())["error"]
        assert (error["code"], error["field"]) == ("host_not_allowed", "Host"), error
    assert await listed(api) == []  # the POST created nothing
    for path in ("/healthz", "/readyz", "/metrics"):  # probes come under any name
        assert (await api.get(path, headers=rebound)).status == 200, path
    for host in ("localhost:8080", "localhost.", "app.localhost", "[::1]:8080", "10.0.0.7", "Exports.Intranet.:443"):
        assert (await api.get("/api/exports", headers={"Host": host})).status == 200, host

    guarded = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path / "guarded", api_tokens={"tok": "alice"})))
    resp = await guarded.get("/api/exports", headers={"Host": "rebind.attacker.example", "Authorization": "Bearer tok"})
    assert resp.status == 200  # a token is what guards it; no page on another site has it
