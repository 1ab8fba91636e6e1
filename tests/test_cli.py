"""mexport driven as a subprocess against the service run as a process on the embedded server."""
from __future__ import annotations

import asyncio
import csv
import gzip
import http.server
import io
import json
import os
import pty
import queue
import re
import secrets
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest
import socketio
from aiohttp import ClientSession, web
from bson import json_util
from bson.json_util import JSONOptions

from conftest import DATA_DB, new_jobs_collection
from expected import csv_text, lookup
from service import cli_client
from service.embedded_db import free_port
from service_process import ROOT, ServiceProcess

TOKEN, OTHER_TOKEN = "tok-alice", "tok-bob"
CLI = [sys.executable, "-m", "service.cli"]
PROGRESS_LINE = re.compile(r"^(queued|fetching|processing|finalizing|completed|failed|cancelled): [\d,]+( of [\d,]+)? rows")
JSON_OPTIONS = JSONOptions(tz_aware=True)


@pytest.fixture(scope="module")
def service(mongo_url: str, tmp_path_factory: pytest.TempPathFactory, tasks: Any, big_tasks: Any) -> Iterator[ServiceProcess]:
    env = {
        "EXPORT_MONGO_URL": mongo_url,
        "EXPORT_DB": DATA_DB,
        "EXPORT_DIR": str(tmp_path_factory.mktemp("cli-exports")),
        "EXPORT_JOBS_COLLECTION": f"jobs_{secrets.token_hex(4)}",
        "EXPORT_BATCH_SIZE": "10",  # 2,000 round trips: the 20,000-row export is still running seconds in
        "EXPORT_MAX_CONCURRENT": "2",
        "EXPORT_API_TOKENS": f"{TOKEN}:alice,{OTHER_TOKEN}:bob",
    }
    proc = asyncio.run(ServiceProcess(env).start())
    yield proc
    proc.stop()


def cli_env(service: ServiceProcess | None, token: str | None = TOKEN, url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEXPORT_")}
    env.update(MEXPORT_URL=url or (service.url if service else ""), PYTHONPATH=str(ROOT))
    if token is not None:
        env["MEXPORT_TOKEN"] = token
    return env


def mexport(service: ServiceProcess, *args: str, cwd: Path, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, env=cli_env(service, token), capture_output=True, text=True, timeout=180)


def api(service: ServiceProcess, method: str, path: str, token: str = TOKEN, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}", **({"Content-Type": "application/json"} if body is not None else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(service.url + path, method=method, headers=headers, data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def job_id_of(stdout: str) -> str:
    match = re.search(r"^export ([0-9a-f]{24}):", stdout, re.M)
    assert match, stdout
    return match.group(1)


def assert_plain(stdout: str) -> None:
    assert "\r" not in stdout and "\x1b" not in stdout
    lines = stdout.splitlines()
    assert lines[0].startswith("export ")
    assert any(PROGRESS_LINE.match(line) for line in lines), stdout


def test_imports_only_the_client_side() -> None:
    code = "import sys, service.cli; print(sorted(sys.modules))"
    modules = json.loads(subprocess.run([sys.executable, "-c", code.replace("print(", "import json; print(json.dumps(")
                                         + ")"], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    ours = [m for m in modules if m.startswith("service")]
    assert ours == ["service", "service.cli", "service.cli_client", "service.cli_progress"]
    assert not [m for m in modules if m.split(".")[0] in ("pymongo", "motor", "bson", "orjson", "xlsxwriter")]
    assert "aiohttp.web" not in modules


def test_create_csv_with_query_fields_and_sort_matches_the_source(service: ServiceProcess, tasks: list[dict[str, Any]], tmp_path: Path) -> None:
    fields = ["seq", "title", "status", "assignee.name", "createdAt"]
    done = mexport(service, "create", "tasks", "--type", "csv", "-q", '{"status": "open", "seq": {"$lt": 1500}}',
                   "-f", ",".join(fields), "--sort", '{"seq": -1}', "-o", "open.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "open.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    source = sorted((d for d in tasks if d.get("status") == "open" and d["seq"] < 1500), key=lambda d: -d["seq"])
    assert rows[0] == fields
    assert rows[1:] == [[csv_text(lookup(d, f)) for f in fields] for d in source]
    assert_plain(done.stdout)
    assert done.stdout.splitlines()[-1] == f"wrote open.csv ({len(source):,} rows, {(tmp_path / 'open.csv').stat().st_size:,} bytes)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["open.csv"]  # no temporary file left behind


def test_json_array_and_lines_like_mongoexport(service: ServiceProcess, tasks: list[dict[str, Any]], tmp_path: Path) -> None:
    source = sorted(tasks, key=lambda d: d["seq"])[:120]
    common = ["create", "tasks", "--type", "json", "--sort", '{"seq": 1}', "--limit", "120"]
    array = mexport(service, *common, "--jsonArray", "-o", "array.json", cwd=tmp_path)
    assert array.returncode == 0, array.stderr
    docs = json_util.loads((tmp_path / "array.json").read_text(encoding="utf-8"), json_options=JSON_OPTIONS)
    assert isinstance(docs, list) and docs == source
    lines = mexport(service, *common, cwd=tmp_path)  # no -o: the service's file name, here
    assert lines.returncode == 0, lines.stderr
    snap = api(service, "GET", f"/api/exports/{job_id_of(lines.stdout)}")[1]
    assert snap["format"] == "ndjson" and snap["file_name"].endswith(".ndjson")
    text = (tmp_path / snap["file_name"]).read_text(encoding="utf-8")
    assert [json_util.loads(line, json_options=JSON_OPTIONS) for line in text.splitlines()] == source


def test_format_options(service: ServiceProcess, tasks: list[dict[str, Any]], tmp_path: Path) -> None:
    source = sorted(tasks, key=lambda d: d["seq"])[:5]
    packed = mexport(service, "create", "tasks", "--type", "csv", "--gzip", "--noHeaderLine", "-f", "seq,title",
                     "--sort", '{"seq": 1}', "--limit", "5", "-o", "five.csv.gz", cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr
    text = gzip.decompress((tmp_path / "five.csv.gz").read_bytes()).decode("utf-8")
    assert list(csv.reader(io.StringIO(text, newline=""))) == [[str(d["seq"]), d["title"]] for d in source]
    canonical = mexport(service, "create", "tasks", "--jsonFormat", "canonical", "-f", "seq", "--sort", '{"seq": 1}',
                        "--limit", "5", "-o", "five.ndjson", cwd=tmp_path)
    assert canonical.returncode == 0, canonical.stderr
    lines = [json.loads(line) for line in (tmp_path / "five.ndjson").read_text().splitlines()]
    assert [line["seq"] for line in lines] == [{"$numberInt": str(d["seq"])} for d in source]
    parquet = mexport(service, "create", "tasks", "--type", "parquet", "-f", "seq,title", "--sort", '{"seq": 1}',
                      "--limit", "5", "-o", "five.parquet", cwd=tmp_path)
    assert parquet.returncode == 0, parquet.stderr
    table = pq.read_table(tmp_path / "five.parquet")
    assert table.column_names == ["seq", "title"]
    assert table.to_pylist() == [{"seq": d["seq"], "title": d["title"]} for d in source]
    refused = mexport(service, "create", "tasks", "--type", "parquet", "--gzip", cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.startswith("mexport: options.compress"), refused.stderr


def test_url_option_wins_over_the_environment(service: ServiceProcess, tmp_path: Path) -> None:
    dead = "http://127.0.0.1:9"
    env = cli_env(service, url=dead)
    unreachable = subprocess.run([*CLI, "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1 and unreachable.stderr.startswith(f"mexport: cannot reach the service at {dead}")
    for args in (["--url", service.url, "list"], ["list", "--url", service.url]):
        done = subprocess.run([*CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("ID "), done.stderr


def test_bad_input_exits_non_zero_with_the_services_message(service: ServiceProcess, tmp_path: Path) -> None:
    where = mexport(service, "create", "tasks", "-q", '{"$where": "this.seq > 1"}', cwd=tmp_path)
    assert where.returncode == 1 and where.stderr.startswith("mexport: filter"), where.stderr
    assert "$where" in where.stderr and "Traceback" not in where.stderr
    field = mexport(service, "create", "tasks", "--type", "csv", "-f", "title,$bad", cwd=tmp_path)
    assert field.returncode == 1 and field.stderr.startswith("mexport: fields"), field.stderr
    missing = mexport(service, "create", "no_such_collection", cwd=tmp_path)
    assert missing.returncode == 1 and "collection: collection 'no_such_collection' does not exist" in missing.stderr
    not_json = mexport(service, "create", "tasks", "-q", "{status: open}", cwd=tmp_path)
    assert not_json.returncode == 2 and "--query: not valid JSON" in not_json.stderr
    assert not list(tmp_path.iterdir())


def test_a_wrong_or_missing_token_fails_cleanly(service: ServiceProcess, tmp_path: Path) -> None:
    for token in ("wrong-token", None):
        done = mexport(service, "create", "tasks", "-o", "x.json", cwd=tmp_path, token=token)
        assert done.returncode == 1
        assert done.stderr.strip() == "mexport: Authorization: a valid bearer token is required"
    listing = mexport(service, "list", "--token", "wrong-token", cwd=tmp_path, token=TOKEN)  # --token wins over the env
    assert listing.returncode == 1 and "Authorization" in listing.stderr
    assert not list(tmp_path.iterdir())


def test_list_status_download_and_delete(service: ServiceProcess, tmp_path: Path) -> None:
    created = mexport(service, "create", "tasks", "--type", "csv", "--limit", "10", "-o", "a.csv", cwd=tmp_path, token=OTHER_TOKEN)
    assert created.returncode == 0, created.stderr
    job_id = job_id_of(created.stdout)
    listing = mexport(service, "list", "--status", "completed", cwd=tmp_path, token=OTHER_TOKEN)
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "COLLECTION", "FORMAT", "ROWS", "CREATED", "FILE"]
    assert [row.split()[:5] for row in rows] == [[job_id, "completed", "tasks", "csv", "10"]]
    assert job_id not in mexport(service, "list", cwd=tmp_path).stdout  # alice does not see bob's exports
    nowhere = mexport(service, "download", job_id, "-o", "missing/again.csv", cwd=tmp_path, token=OTHER_TOKEN)
    assert nowhere.returncode == 1 and nowhere.stderr.startswith("mexport: cannot write missing/again.csv:"), nowhere.stderr
    downloaded = mexport(service, "download", job_id, "-o", "again.csv", cwd=tmp_path, token=OTHER_TOKEN)
    assert downloaded.returncode == 0, downloaded.stderr
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()
    status = mexport(service, "status", job_id, "--json", cwd=tmp_path, token=OTHER_TOKEN)
    assert json.loads(status.stdout)["processed"] == 10
    plain = mexport(service, "status", job_id, cwd=tmp_path, token=OTHER_TOKEN).stdout
    fields = dict(line.split(":", 1) for line in plain.splitlines())
    assert {k: fields[k].strip() for k in ("id", "status", "processed", "limit")} == {"id": job_id, "status": "completed", "processed": "10", "limit": "10"}
    refused = mexport(service, "cancel", job_id, cwd=tmp_path, token=OTHER_TOKEN)
    assert refused.returncode == 1 and "is completed; nothing to cancel" in refused.stderr
    assert mexport(service, "delete", job_id, cwd=tmp_path, token=OTHER_TOKEN).stdout.strip() == f"export {job_id} deleted"
    gone = mexport(service, "download", job_id, cwd=tmp_path, token=OTHER_TOKEN)
    assert gone.returncode == 1 and gone.stderr.strip() == f"mexport: id: no export {job_id}"


def test_cancel_a_running_export(service: ServiceProcess, big_tasks: Any, tmp_path: Path) -> None:
    job_id = api(service, "POST", "/api/exports", body={"collection": "tasks_big", "format": "csv"})[1]["id"]
    done = mexport(service, "cancel", job_id, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"export {job_id} cancelled"
    assert api(service, "GET", f"/api/exports/{job_id}")[1]["status"] == "cancelled"


def test_delete_cancels_a_running_export_and_keeps_it_then_deletes_it(service: ServiceProcess, big_tasks: Any, tmp_path: Path) -> None:
    # What `mexport --help` and the README say delete does to an export that has not ended.
    job_id = api(service, "POST", "/api/exports", body={"collection": "tasks_big", "format": "csv"})[1]["id"]
    first = mexport(service, "delete", job_id, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"export {job_id} cancelled"
    status, kept = api(service, "GET", f"/api/exports/{job_id}")
    assert status == 200 and kept["status"] == "cancelled"
    second = mexport(service, "delete", job_id, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == f"export {job_id} deleted"
    assert api(service, "GET", f"/api/exports/{job_id}")[0] == 404


async def test_a_cancel_that_comes_as_the_job_completes_leaves_its_file(service: ServiceProcess, tmp_path: Path) -> None:
    # What mexport cancel (and Ctrl-C while following) sends once the job's record said it was running.
    done = mexport(service, "create", "tasks", "--type", "csv", "--limit", "5", "-o", str(tmp_path / "five.csv"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job_id = job_id_of(done.stdout)
    async with ClientSession() as session:
        ended = await cli_client.cancel_job(cli_client.Api(session, service.url, TOKEN), job_id)
    assert ended["status"] == "completed" and not ended.get("deleted"), ended
    assert cli_client.cancel_outcome(ended).startswith(f"export {job_id} completed before the cancel took effect")
    assert api(service, "GET", f"/api/exports/{job_id}")[1]["status"] == "completed"


def read_lines_until(proc: subprocess.Popen[str], pattern: re.Pattern[str], timeout: float) -> list[tuple[float, str]]:
    """(arrival time, line) of stdout up to and including the first line matching pattern."""
    assert proc.stdout is not None
    seen: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"stdout ended before {pattern.pattern}: {seen}"
        seen.append((time.monotonic(), line.rstrip("\n")))
        if pattern.search(line):
            return seen
    raise AssertionError(f"no {pattern.pattern} within {timeout} s: {seen}")


def test_ctrl_c_cancels_the_export_and_exits_130(service: ServiceProcess, big_tasks: Any, tmp_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "create", "tasks_big", "--type", "csv", "-o", "big.csv"], cwd=tmp_path,
                            env=cli_env(service), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = read_lines_until(proc, re.compile(r"^processing: [1-9]"), 120)  # rows are flowing
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    job_id = job_id_of(lines[0][1])
    assert rest.splitlines()[-2:] == [f"interrupted: cancelling export {job_id}", f"export {job_id} cancelled"]
    snap = api(service, "GET", f"/api/exports/{job_id}")[1]
    assert snap["status"] == "cancelled" and 0 < snap["processed"] < 20_000, snap
    assert_plain("\n".join(line for _, line in lines) + rest)
    assert not list(tmp_path.iterdir())


def test_plain_lines_come_at_most_once_a_second(service: ServiceProcess, big_tasks: Any, tmp_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "create", "tasks_big", "--type", "csv", "-f", "seq", "-o", "seq.csv"], cwd=tmp_path,
                            env=cli_env(service), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = read_lines_until(proc, re.compile(r"^wrote "), 180)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert_plain("\n".join(line for _, line in lines))
    # The final state always gets its line; the ones before it are paced.
    paced = [at for at, line in lines if PROGRESS_LINE.match(line) and not line.startswith("completed")]
    assert len(paced) >= 3, lines
    assert all(b - a > 0.8 for a, b in zip(paced, paced[1:])), lines
    assert lines[-2][1].startswith("completed: 20,000 of 20,000 rows")


def test_polling_instead_of_socketio(service: ServiceProcess, tasks: list[dict[str, Any]], tmp_path: Path) -> None:
    with ApiOnlyProxy(service.url) as proxy:
        done = subprocess.run([*CLI, "create", "-c", "tasks", "--type", "ndjson", "--poll", "-q", '{"priority": "urgent"}', "-f", "seq",
                               "-o", "u.ndjson"], cwd=tmp_path, env=cli_env(service, url=proxy.url), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    # Asked to poll, it never tried Socket.IO (nor said it was unavailable), and asked for the job's state instead.
    assert not [path for path in proxy.paths if not path.startswith("/api/")] and "unavailable" not in done.stderr, proxy.paths
    assert any(re.fullmatch(r"/api/exports/[0-9a-f]{24}", path) for path in proxy.paths), proxy.paths
    got = [json.loads(line) for line in (tmp_path / "u.ndjson").read_text().splitlines()]
    assert sorted(d["seq"] for d in got) == sorted(d["seq"] for d in tasks if d.get("priority") == "urgent")


def test_a_terminal_gets_a_bar_redrawn_in_place(service: ServiceProcess, tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([*CLI, "create", "tasks", "--type", "csv", "-o", "t.csv"], cwd=tmp_path,
                            env=cli_env(service), stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 120)
            assert ready, output
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(controller)
        proc.kill()
    text = output.decode()
    assert "\r[" in text and "] completed 3,000/3,000 rows 100.0%" in text
    assert max(len(line) for line in re.split(r"[\r\n]", text)) < 80  # fits the 80 columns a bare terminal has
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as handle:
        assert len(list(csv.reader(handle))) == 3001


def test_a_failed_export_exits_non_zero_with_the_services_reason(service: ServiceProcess, tmp_path: Path) -> None:
    # Valid as far as the service checks, refused by the database once the query runs.
    done = mexport(service, "create", "tasks", "-q", '{"seq": {"$noSuchOperator": 1}}', "-o", "x.json", cwd=tmp_path)
    assert done.returncode == 1, done.stdout
    job_id = job_id_of(done.stdout)
    snap = api(service, "GET", f"/api/exports/{job_id}")[1]
    assert snap["status"] == "failed" and snap["error"]["message"], snap
    assert done.stderr.strip() == f"mexport: export {job_id} failed: {snap['error']['message']} ({snap['error']['code']})"
    assert done.stdout.splitlines()[-1].startswith("failed: ")
    assert not list(tmp_path.iterdir())


class ThreadedSite:
    """An aiohttp application of the test's own, served from a thread of its own on a free port while the
    test drives mexport (which blocks) from the main thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def make_app(self) -> web.Application:
        raise NotImplementedError

    async def _start(self) -> None:
        self.runner = web.AppRunner(self.make_app())
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> Any:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class ApiOnlyProxy(ThreadedSite):
    """Forwards /api/* to the service and answers everything else, Socket.IO included, with 404: a proxy
    that does not pass WebSockets or long polling."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.paths: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        if not request.path.startswith("/api/"):
            return web.Response(status=404, text="not here")
        headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type")}
        async with ClientSession() as http:
            async with http.request(request.method, self.target + request.path_qs, headers=headers, data=await request.read()) as resp:
                passed = {k: v for k, v in resp.headers.items() if k in ("Content-Type", "Content-Disposition")}
                return web.Response(status=resp.status, body=await resp.read(), headers=passed)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def test_without_socketio_it_falls_back_to_polling(service: ServiceProcess, tasks: list[dict[str, Any]], tmp_path: Path) -> None:
    with ApiOnlyProxy(service.url) as proxy:
        done = subprocess.run([*CLI, "create", "tasks", "--type", "csv", "-f", "seq", "-o", "p.csv"], cwd=tmp_path,
                              env=cli_env(service, url=proxy.url), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "live progress unavailable" in done.stderr and "polling every second" in done.stderr
    job_id = job_id_of(done.stdout)
    assert proxy.paths[1].startswith("/socket.io")
    assert proxy.paths.count(f"/api/exports/{job_id}") >= 2  # polled until completed, then once more for the download link
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as handle:
        # Without a sort, an export reads in _id order.
        assert [row[0] for row in csv.reader(handle)][1:] == [str(d["seq"]) for d in sorted(tasks, key=lambda d: d["_id"])]


class CuttingProxy(ThreadedSite):
    """Forwards /api/* to the service, Range included, and drops the connection of the first `cuts` downloads
    after CUT_BYTES of their body: a link that breaks mid-file."""

    CUT_BYTES = 20_000

    def __init__(self, target: str, cuts: int, unavailable: int = 0) -> None:
        super().__init__()
        self.target, self.cuts, self.unavailable = target, cuts, unavailable  # the first `unavailable` downloads: 503
        self.ranges: list[str | None] = []  # each download's Range header
        self.encodings: set[str | None] = set()  # the Accept-Encoding of every request

    async def handle(self, request: web.Request) -> web.StreamResponse:
        download = request.path.endswith("/download")
        self.encodings.add(request.headers.get("Accept-Encoding"))
        if download:
            self.ranges.append(request.headers.get("Range"))
            if len(self.ranges) <= self.unavailable:
                return web.Response(status=503, text="<html>503 Service Unavailable</html>", content_type="text/html")
        headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type", "Range")}
        async with ClientSession() as http:
            async with http.request(request.method, self.target + request.path_qs, headers=headers, data=await request.read()) as resp:
                passed = ("Content-Type", "Content-Disposition", "Content-Length", "Content-Range", "ETag")
                out = web.StreamResponse(status=resp.status, headers={k: v for k, v in resp.headers.items() if k in passed})
                await out.prepare(request)
                body = await resp.read()
                if download and len(self.ranges) <= self.cuts:
                    await out.write(body[: self.CUT_BYTES])
                    assert request.transport is not None
                    request.transport.close()  # mid-body: the client sees fewer bytes than Content-Length said
                    return out
                await out.write(body)
                await out.write_eof()
                return out

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/{tail:.*}", self.handle)
        return app


def test_a_download_whose_connection_drops_goes_on_from_the_byte_it_reached(service: ServiceProcess, tmp_path: Path) -> None:
    created = mexport(service, "create", "tasks", "--type", "csv", "-o", "direct.csv", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    job_id, whole = job_id_of(created.stdout), (tmp_path / "direct.csv").read_bytes()
    assert len(whole) > 3 * CuttingProxy.CUT_BYTES
    with CuttingProxy(service.url, cuts=2) as proxy:
        done = subprocess.run([*CLI, "download", job_id, "-o", "cut.csv"], cwd=tmp_path, env=cli_env(service, url=proxy.url),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cut.csv").read_bytes() == whole
    cut = CuttingProxy.CUT_BYTES
    assert proxy.ranges == [None, f"bytes={cut}-", f"bytes={2 * cut}-"]
    assert done.stderr.count("going on from there") == 2, done.stderr
    assert proxy.encodings == {"identity"}  # nothing on the way may compress the bytes mexport writes as they come
    with CuttingProxy(service.url, cuts=0, unavailable=1) as proxy:  # a gateway's 503 while the service restarts
        again = subprocess.run([*CLI, "download", job_id, "-o", "after503.csv"], cwd=tmp_path, env=cli_env(service, url=proxy.url),
                               capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "HTTP 503" in again.stderr, again.stderr
    assert (tmp_path / "after503.csv").read_bytes() == whole and proxy.ranges == [None, None]
    (tmp_path / "after503.csv").unlink()
    with CuttingProxy(service.url, cuts=cli_client.DOWNLOAD_TRIES) as proxy:
        failed = subprocess.run([*CLI, "download", job_id, "-o", "never.csv"], cwd=tmp_path, env=cli_env(service, url=proxy.url),
                                capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and f"{cli_client.DOWNLOAD_TRIES} times" in failed.stderr, failed.stderr
    assert len(proxy.ranges) == cli_client.DOWNLOAD_TRIES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.csv", "cut.csv"][::-1]  # no never.csv, no partial file


def test_a_range_answer_that_is_not_the_rest_of_the_file_begun_starts_it_again() -> None:
    def answer(status: int, etag: str, content_range: str = "") -> Any:
        return SimpleNamespace(status=status, headers={"ETag": etag, "Content-Range": content_range}, content_length=10)

    out = io.BytesIO()
    part = cli_client.Part(out)
    part.start(answer(200, "one"))
    part.write(b"01234")
    part.start(answer(206, "one", "bytes 5-9/10"))  # the rest of the same file: goes on
    assert part.written == 5
    for other in (answer(206, "two", "bytes 5-9/10"), answer(206, "one", "bytes 4-9/10"), answer(206, "one", "bytes 5-9/11")):
        part.start(answer(200, "one"))
        part.write(b"01234")
        with pytest.raises(cli_client.Dropped):
            part.start(other)
        assert part.written == 0 and out.getvalue() == b""  # the next request asks for the whole file


def test_create_with_a_pipeline_counts_first_and_matches_python(service: ServiceProcess, tasks: list[dict[str, Any]], tmp_path: Path) -> None:
    pipeline = '[{"$match": {"seq": {"$lt": 1200}}}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}]'
    done = mexport(service, "create", "tasks", "--type", "csv", "--pipeline", pipeline, "--count", "-o", "groups.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "groups.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    counts: dict[Any, int] = {}
    for doc in tasks:
        if doc["seq"] < 1200:
            counts[doc.get("status")] = counts.get(doc.get("status"), 0) + 1
    assert rows[0] == ["_id", "n"]
    assert sorted((row[0], int(row[1])) for row in rows[1:]) == sorted((csv_text(k), n) for k, n in counts.items())
    # Beside --query, the service says what conflicts; a pipeline that is not a list is refused before asking.
    refused = mexport(service, "create", "tasks", "--pipeline", pipeline, "-q", "{}", cwd=tmp_path)
    assert refused.returncode == 1 and "pipeline" in refused.stderr, refused.stderr
    bad = mexport(service, "create", "tasks", "--pipeline", '{"$match": {}}', cwd=tmp_path)
    assert bad.returncode == 2 and "--pipeline: must be a JSON array of stages" in bad.stderr, bad.stderr


def test_out_that_is_not_a_regular_file_is_refused_and_left_alone(service: ServiceProcess, tmp_path: Path) -> None:
    created = mexport(service, "create", "tasks", "--type", "csv", "--limit", "3", "-o", "three.csv", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    job_id = job_id_of(created.stdout)
    (tmp_path / "somedir").mkdir()
    os.mkfifo(tmp_path / "pipe")
    jobs_before = len(api(service, "GET", "/api/exports?limit=500")[1]["exports"])
    for out, kind in (("somedir", "is a directory"), ("somedir/", "names a directory"), ("pipe", "is a FIFO")):
        for command in (["download", job_id], ["create", "tasks", "--type", "csv", "--limit", "3"]):
            done = mexport(service, *command, "-o", out, cwd=tmp_path)
            assert done.returncode == 2, (out, command, done.stdout, done.stderr)
            assert done.stderr == f"mexport: -o {out}: {kind}{', not a regular file' if kind.startswith('is') else ''}; give a file name\n"
            assert done.stdout == ""  # create stopped before posting a job
    assert len(api(service, "GET", "/api/exports?limit=500")[1]["exports"]) == jobs_before
    assert (tmp_path / "somedir").is_dir() and not list((tmp_path / "somedir").iterdir())
    assert stat.S_ISFIFO((tmp_path / "pipe").lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "somedir", "three.csv"]  # no partial file left


class HtmlSite:
    """A plain web server whose every page, /api/exports included, is an HTML page with status 200."""

    def __enter__(self) -> "HtmlSite":
        class Page(http.server.BaseHTTPRequestHandler):
            def answer(self) -> None:
                body = b"<!doctype html><html><body><h1>Welcome</h1>\n</body></html>\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_an_answer_that_is_not_json_is_named_in_one_line(tmp_path: Path) -> None:
    with HtmlSite() as site:
        for command in (["list"], ["status", "6f8737134fb61d49223b1d31"], ["create", "tasks", "-o", "x.json"],
                        ["download", "6f8737134fb61d49223b1d31"], ["delete", "6f8737134fb61d49223b1d31"]):
            done = subprocess.run([*CLI, "--url", site.url, *command], cwd=tmp_path, env=cli_env(None, url=site.url),
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, (command, done.stderr)
            assert done.stderr == "mexport: not the export service's answer: HTTP 200, text/html\n", (command, done.stderr)
    assert not list(tmp_path.iterdir())


def test_the_service_with_its_port_in_use_stops_with_one_line(mongo_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "EXPORT_MONGO_URL": mongo_url, "EXPORT_DIR": str(tmp_path / "exports"),
               "EXPORT_HOST": "127.0.0.1", "EXPORT_PORT": str(port), "EXPORT_JOBS_COLLECTION": f"jobs_{secrets.token_hex(4)}"}
        proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: cannot listen on 127.0.0.1:{port} (EXPORT_HOST, EXPORT_PORT): Address already in use\n"


def test_the_service_on_port_0_names_the_port_it_listens_on(mongo_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "EXPORT_MONGO_URL": mongo_url, "EXPORT_DIR": str(tmp_path / "exports"), "EXPORT_HOST": "127.0.0.1",
           "EXPORT_PORT": "0", "EXPORT_JOBS_COLLECTION": f"jobs_{secrets.token_hex(4)}"}
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"Export service on http://127\.0\.0\.1:(\d+)/\n", line)
        assert match and match[1] != "0", line
        with urllib.request.urlopen(f"http://127.0.0.1:{match[1]}/healthz", timeout=10) as resp:
            assert json.load(resp)["event_loop"] == "ok"
    finally:
        proc.terminate()
        proc.wait(30)


class SilentServer:
    """Accepts connections and reads the requests, never answers: a service stuck before its first byte."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.held: list[socket.socket] = []
        self.received = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with suppress(OSError):  # the listener closed: the test is over
            while True:
                conn, _ = self.listener.accept()
                self.held.append(conn)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                self.received.set()

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("command, request_line, said", [
    (["create", "tasks", "-o", "x.json"], b"POST /api/exports ",
     "mexport: interrupted before the service answered; the export may have been created (mexport list shows it)\n"),
    (["download", "6f8737134fb61d49223b1d31", "-o", "x.json"], b"GET /api/exports/6f8737134fb61d49223b1d31 ",
     "mexport: interrupted\n"),
])
def test_ctrl_c_stops_a_request_the_service_does_not_answer(command: list[str], request_line: bytes, said: str, tmp_path: Path) -> None:
    silent = SilentServer()
    proc = subprocess.Popen([*CLI, *command], cwd=tmp_path, env=cli_env(None, url=silent.url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert silent.received.wait(30), "mexport sent no request"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)  # not the 120 s read timeout
    finally:
        proc.kill()
        silent.close()
    assert silent.requests[0].startswith(request_line), silent.requests
    assert (proc.returncode, out, err) == (130, "", said)
    assert not list(tmp_path.iterdir())


Lines = "queue.Queue[str | None]"


def lines_of(stream: Any) -> Lines:
    """stream's lines as they come, then None at its end, read by a thread of their own (a blocking
    readline cannot time out)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_line(lines: Lines, pattern: re.Pattern[str], timeout: float, seen: list[str]) -> str:
    """The first line matching pattern; the lines before it are added to seen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {pattern.pattern} within {timeout} s: {seen}") from None
        assert line is not None, f"the stream ended before {pattern.pattern}: {seen}"
        seen.append(line)
        if pattern.search(line):
            return line


def rest_of(lines: Lines, timeout: float = 10) -> list[str]:
    """The lines up to the stream's end (the process has exited)."""
    rest = []
    while (line := lines.get(timeout=timeout)) is not None:
        rest.append(line)
    return rest


# Stopped (SIGTERM), the service puts the job back in the queue; killed, it leaves the job's lease to run out
# (3 s here), and the next start queues it again. Killed is the way with Socket.IO: a stop waits for open
# connections, so the job would finish during it.
@pytest.mark.parametrize("options, end, put_back", [
    pytest.param(["--poll"], ServiceProcess.stop, {"queued"}, id="polling-stopped"),
    pytest.param([], ServiceProcess.kill, {"fetching", "processing"}, id="socketio-killed"),
])
def test_a_service_restarted_while_it_is_followed_is_waited_for(
    options: list[str], end: Any, put_back: set[str], mongo_url: str, sync_db: Any, big_tasks: list[dict[str, Any]], tmp_path: Path
) -> None:
    jobs = new_jobs_collection()
    env = {"EXPORT_MONGO_URL": mongo_url, "EXPORT_DB": DATA_DB, "EXPORT_DIR": str(tmp_path / "exports"),
           "EXPORT_JOBS_COLLECTION": jobs, "EXPORT_BATCH_SIZE": "10", "EXPORT_LEASE_SECONDS": "3",
           "EXPORT_API_TOKENS": f"{TOKEN}:alice"}
    restarted = asyncio.run(ServiceProcess(env).start())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([*CLI, "create", "tasks_big", "--type", "csv", "-f", "seq,title", *options, "-o", "big.csv"],
                            cwd=out_dir, env=cli_env(restarted), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = lines_of(proc.stdout), lines_of(proc.stderr)
    said: list[str] = []
    try:
        wait_line(stdout, re.compile(r"^processing: [1-9]"), 120, said)  # rows are flowing
        end(restarted)
        stopped = sync_db[jobs].find_one({"_id": job_id_of(said[0])})
        assert stopped["status"] in put_back and stopped["processed"] < 20_000, stopped  # ended mid-way
        wait_line(stderr, re.compile(r"^mexport: cannot reach the service at .*; retrying for up to 300 s$"), 60, said)
        asyncio.run(restarted.start())  # the same port
        assert proc.wait(180) == 0, said
    finally:
        proc.kill()
        restarted.stop()
    said += rest_of(stdout) + rest_of(stderr)
    assert "mexport: the service answers again" in said
    assert not [line for line in said if "Traceback" in line or line.startswith(("failed", "cancelled"))], said
    assert f"wrote big.csv (20,000 rows, {(out_dir / 'big.csv').stat().st_size:,} bytes)" in said
    with open(out_dir / "big.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    source = sorted(big_tasks, key=lambda d: d["_id"])
    assert rows == [["seq", "title"], *([str(d["seq"]), d["title"]] for d in source)]
    assert sorted(p.name for p in out_dir.iterdir()) == ["big.csv"]



class AnnouncingService(ThreadedSite):
    """A stand-in for the service that announces export-failed for a job its record shows completed, as an
    instance being stopped may for a job it put back in the queue and another run finished."""

    JOB = "6f8737134fb61d49223b1d31"
    FILE = b"seq\r\n1\r\n2\r\n"

    def __init__(self, unavailable: int = 0) -> None:
        super().__init__()
        self.gets = 0
        self.unavailable = unavailable  # the first snapshots asked for answer 503, as behind a gateway

    def snapshot(self, status: str) -> dict[str, Any]:
        snap = {"id": self.JOB, "status": status, "collection": "tasks", "format": "csv", "processed": 2, "total": 2}
        return {**snap, "download_url": f"/api/exports/{self.JOB}/download"} if status == "completed" else snap

    async def create(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot("queued"), status=202)

    async def get(self, request: web.Request) -> web.Response:
        self.gets += 1
        if self.gets <= self.unavailable:
            error = {"code": "unavailable", "message": "the database is unavailable", "field": None}
            return web.json_response({"error": error}, status=503)
        return web.json_response(self.snapshot("completed"))

    async def download(self, request: web.Request) -> web.Response:
        return web.Response(body=self.FILE, content_type="text/csv")

    async def subscribe(self, sid: str, data: Any) -> dict[str, Any]:
        failed = {**self.snapshot("failed"), "error": {"code": "interrupted", "message": "the service is stopping"}}
        await self.sio.emit("export-failed", failed, to=sid)
        return {"ok": True, "job": self.snapshot("queued")}

    def make_app(self) -> web.Application:
        self.sio = socketio.AsyncServer(async_mode="aiohttp")
        self.sio.on("subscribe", self.subscribe)
        app = web.Application()
        self.sio.attach(app)
        app.router.add_post("/api/exports", self.create)
        app.router.add_get(f"/api/exports/{self.JOB}", self.get)
        app.router.add_get(f"/api/exports/{self.JOB}/download", self.download)
        return app


def test_an_announced_failure_is_checked_against_the_record(tmp_path: Path) -> None:
    with AnnouncingService() as fake:
        done = subprocess.run([*CLI, "create", "tasks", "--type", "csv", "-o", "two.csv"], cwd=tmp_path,
                              env=cli_env(None, url=fake.url), capture_output=True, text=True, timeout=60)
        gets = fake.gets
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "two.csv").read_bytes() == AnnouncingService.FILE
    assert gets == 2  # the check of the announced end, then the fresh link for the download
    assert "failed" not in done.stdout and done.stdout.splitlines()[-2].startswith("completed: 2 of 2 rows"), done.stdout


def test_a_503_while_polling_is_retried(tmp_path: Path) -> None:
    with AnnouncingService(unavailable=3) as fake:
        done = subprocess.run([*CLI, "create", "tasks", "--type", "csv", "--poll", "-o", "two.csv"], cwd=tmp_path,
                              env=cli_env(None, url=fake.url), capture_output=True, text=True, timeout=60)
        gets = fake.gets
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "mexport: the service is unavailable: the database is unavailable; retrying for up to 300 s",
        "mexport: the service answers again",
    ]
    assert gets == 5 and (tmp_path / "two.csv").read_bytes() == AnnouncingService.FILE


async def test_an_outage_longer_than_the_bound_gives_up_saying_the_export_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_client, "OUTAGE_SECONDS", 1.5)
    warned: list[str] = []
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    async with ClientSession() as session:
        with pytest.raises(cli_client.CliError) as caught:
            await cli_client.lasting_snapshot(cli_client.Api(session, dead, None), AnnouncingService.JOB, warned.append)
    waited = time.monotonic() - started
    assert 1.5 <= waited < 5, waited
    assert caught.value.exit_code == 1
    job = AnnouncingService.JOB
    assert str(caught.value).startswith(f"cannot reach the service at {dead}")
    assert str(caught.value).endswith(f"; gave up after 1.5 s: export {job} may still be running (mexport status {job} shows it)")
    assert len(warned) == 1 and warned[0].endswith("; retrying for up to 1.5 s"), warned


@pytest.mark.parametrize("option, value, constant", [
    ("-q", '{"seq": NaN}', "NaN"), ("--sort", '{"seq": Infinity}', "Infinity"),
    ("--pipeline", '[{"$match": {"seq": {"$gt": -Infinity}}}]', "-Infinity"),
])
def test_nan_and_infinity_are_not_json(option: str, value: str, constant: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # refused before any request: asking this would exit 1
    done = subprocess.run([*CLI, "create", "tasks", option, value], cwd=tmp_path, env=cli_env(None, url=dead),
                          capture_output=True, text=True, timeout=60)
    name = {"-q": "--query"}.get(option, option)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.startswith(f"mexport: {name}: not valid JSON ({constant} is not JSON)"), done.stderr
