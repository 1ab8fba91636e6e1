"""The service as a real process: killed mid-export, started with a bad directory; and a database outage."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import psutil
import pytest
from pymongo import MongoClient

from scripts.generate_data import make_documents
from service.app import check_export_dir, create_app
from service.embedded_db import EmbeddedDbError, EmbeddedMongo, free_port
from service.settings import MANAGER_KEY, SettingsError

from conftest import DATA_DB, export_files, make_settings, new_jobs_collection, replace_collection, until, wait_status
from service_process import ROOT, ServiceProcess

@pytest.fixture
def service_env(mongo_url: str, tmp_path: Path, tasks: Any) -> Iterator[dict[str, str]]:
    yield {
        "EXPORT_MONGO_URL": mongo_url,
        "EXPORT_DB": DATA_DB,
        "EXPORT_DIR": str(tmp_path / "exports"),
        "EXPORT_BATCH_SIZE": "10",  # many round trips: the export is surely mid-way when killed
        "EXPORT_MAX_CONCURRENT": "1",
        "EXPORT_API_TOKENS": "",
        "EXPORT_JOBS_COLLECTION": new_jobs_collection(),
        "EXPORT_LEASE_SECONDS": "3",  # a killed instance's job is run again once its lease runs out
    }


async def test_killed_mid_export_the_job_completes_after_restart_with_a_whole_file(service_env: dict[str, str], tmp_path: Path) -> None:
    spec = {"collection": "tasks", "format": "csv", "sort": {"seq": 1}, "fields": ["seq", "title", "description", "createdAt"]}
    service = ServiceProcess(service_env)
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(service.url + "/api/exports", json=spec) as resp:
                job = await resp.json()
            snap = await wait_status(http, job["id"], ("processing", "completed"), timeout=60, base=service.url)
            assert snap["status"] == "processing" and 0 < snap["processed"] < snap["total"], snap
            service.kill()

            service = ServiceProcess(service_env)
            await service.start()
            final = await wait_status(http, job["id"], ("completed", "failed", "cancelled"), timeout=60, base=service.url)
            assert final["status"] == "completed", final
            async with http.get(service.url + final["download_url"]) as resp:
                recovered = await resp.read()
            # A clean export of the same spec, from the restarted service.
            async with http.post(service.url + "/api/exports", json=spec) as resp:
                clean_job = await resp.json()
            clean = await wait_status(http, clean_job["id"], ("completed", "failed"), timeout=60, base=service.url)
            async with http.get(service.url + clean["download_url"]) as resp:
                assert recovered == await resp.read()
            assert final["processed"] == clean["processed"] == 3000
            listing = await (await http.get(service.url + "/api/exports")).json()
            assert all(j["status"] == "completed" for j in listing["exports"])  # nothing left active
        assert not list(Path(service_env["EXPORT_DIR"]).glob("*.part*"))
    finally:
        service.stop()


async def test_start_up_removes_partial_files_and_scratch_directories_of_dead_jobs(aiohttp_client: Any, mongo_url: str, tmp_path: Path) -> None:
    export_dir = tmp_path / "exports"
    export_dir.mkdir()
    (export_dir / "0123abcd.csv.gone1.part").write_bytes(b"half a file")
    (export_dir / "0123abcd.csv.gone1.part.tmp").mkdir()  # a scratch directory whose partial file is gone already
    scratch = export_dir / "4567cdef.xlsx.gone2.part.tmp"
    scratch.mkdir()
    (scratch / "tmp8x9y").write_bytes(b"<row/>" * 1000)
    (export_dir / "4567cdef.xlsx.gone2.part").write_bytes(b"PK")
    (export_dir / "89abcdef.csv").write_bytes(b"a finished export\r\n")
    client = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path)))
    assert (await client.get("/healthz")).status == 200
    assert export_files(export_dir) == ["89abcdef.csv"]


def test_a_full_export_dir_at_start_up_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    export_dir = tmp_path / "exports"
    export_dir.mkdir()
    (export_dir / f".write-probe-{os.getpid()}").symlink_to("/dev/full")  # the probe's byte finds the disk full
    with pytest.raises(SettingsError, match="is not writable: No space left on device"):
        check_export_dir(make_settings("mongodb://127.0.0.1:1", tmp_path, export_dir=export_dir))
    assert list(export_dir.iterdir()) == []  # no probe left behind


async def test_start_up_with_unwritable_export_dir_stops_with_one_line(service_env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = {**os.environ, **service_env, "EXPORT_DIR": str(blocker / "exports"), "EXPORT_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "EXPORT_DIR" in lines[0] and "not writable" in lines[0], lines
    env["EXPORT_DIR"], env["EXPORT_BATCH_SIZE"] = str(tmp_path / "ok"), "many"
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == "error: EXPORT_BATCH_SIZE must be an integer, got 'many'"


@pytest.mark.parametrize(("variables", "said"), [
    ({"EXPORT_MONGO_URL": "", "EXPORT_EMBEDDED_DIR": "/proc/no-such-dir"}, "cannot keep the embedded database in /proc/no-such-dir"),
    ({"EXPORT_MONGO_URL": "mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=500"}, "database unavailable"),
])
def test_a_database_it_cannot_start_with_stops_it_with_one_line(service_env: dict[str, str], tmp_path: Path,
                                                                 variables: dict[str, str], said: str) -> None:
    port = free_port()  # nothing listens there
    env = {**os.environ, **service_env, "EXPORT_DIR": str(tmp_path / "exports"), "EXPORT_PORT": str(free_port()),
           **{name: value.format(port=port) for name, value in variables.items()}}
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if " INFO " not in line and " WARNING " not in line]
    assert proc.returncode == 1 and len(errors) == 1 and errors[0].startswith("error: cannot start: ") and said in errors[0], proc.stderr


async def poll_until(api: Any, path: str, status: int, timeout: float) -> dict[str, Any]:
    """The body of the first answer of path with status, polled until timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        resp = await api.get(path)
        if resp.status == status or asyncio.get_running_loop().time() > deadline:
            assert resp.status == status, f"{path} still answers {resp.status}"
            return await resp.json()
        await asyncio.sleep(0.2)


async def test_database_outage_fails_the_job_then_service_recovers(aiohttp_client: Any, tmp_path: Path) -> None:
    if os.environ.get("EXPORT_MONGO_URL"):
        pytest.skip("stops and restarts its own embedded server; a shared MongoDB is not ours to stop")
    server = EmbeddedMongo(tmp_path / "db").start()
    try:
        with MongoClient(server.url) as sync:
            replace_collection(sync[DATA_DB], "tasks", list(make_documents(3000, 7)))
        settings = make_settings(server.url, tmp_path, batch_size=10)
        api = await aiohttp_client(create_app(settings))
        events: list[tuple[str, dict[str, Any]]] = []
        import socketio

        sio = socketio.AsyncClient(reconnection=False)
        sio.on("export-failed", lambda data: events.append(("export-failed", data)))
        await sio.connect(str(api.make_url("/")), transports=["websocket"])
        job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "ndjson"})).json()
        assert (await sio.call("subscribe", {"id": job["id"]}))["ok"]
        snap = await wait_status(api, job["id"], ("processing",), timeout=4)
        assert snap["status"] == "processing", snap

        server.kill()
        manager = api.server.app[MANAGER_KEY]
        # The run fails, and its failure waits for the database to be recorded (slack for a busy machine).
        await until(lambda: job["id"] not in manager.running and manager.ctx.background, "the failure waiting", timeout=30)
        # Liveness is the service's own: it stays up; readiness follows the database, from the cached pings.
        assert (await api.get("/healthz")).status == 200
        ready = await poll_until(api, "/readyz", 503, timeout=20)
        assert ready["status"] == "unavailable" and ready["database"] == "unavailable" and ready["error"], ready
        assert (await api.get("/")).status == 200  # the page is still served
        assert (await api.get("/metrics")).status == 200
        resp = await api.get(f"/api/exports/{job['id']}")
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "database_unavailable"
        assert not list(Path(settings.export_dir).glob("*.part"))
        # Told only once recorded: while the database is down, a failure may yet turn out a lost completion.
        assert events == [] and not manager.metrics.jobs_ended, (events, manager.metrics)

        server = EmbeddedMongo(server.data_dir, port=server.port).start()
        assert (await poll_until(api, "/readyz", 200, timeout=30))["database"] == "ok"
        await until(lambda: events, "the export-failed event, once the failure is recorded", timeout=30)
        assert events[0][1]["error"]["code"] == "database_unavailable", events
        assert manager.metrics.jobs_ended == {"database_unavailable": 1}, manager.metrics.jobs_ended
        snap = await wait_status(api, job["id"], ("failed",), timeout=10)  # recorded once the database is back
        assert snap["status"] == "failed" and snap["error"]["code"] == "database_unavailable"
        job2 = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv", "limit": 100})).json()
        snap2 = await wait_status(api, job2["id"], ("completed", "failed"), timeout=10)
        assert snap2["status"] == "completed" and snap2["processed"] == 100
        await sio.disconnect()
    finally:
        server.stop()


def ended(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet: either way it no longer serves."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_the_embedded_database_ends_with_a_killed_service(tmp_path: Path) -> None:
    db_dir = tmp_path / "db"
    env = {"EXPORT_MONGO_URL": "", "EXPORT_EMBEDDED_DIR": str(db_dir), "EXPORT_DIR": str(tmp_path / "exports"),
           "EXPORT_API_TOKENS": ""}
    service = await ServiceProcess(env).start()
    try:
        server = int((db_dir / "export.db.pid").read_text())
        assert not ended(server)
    finally:
        service.kill()
    killed = time.monotonic()
    await until(lambda: ended(server), "the embedded database to end after its service was killed", timeout=15)
    # The README says within a few seconds (the guard looks twice a second, then the server stops in order).
    assert time.monotonic() - killed < 5


def test_a_server_left_on_the_data_file_is_stopped_before_another_starts(tmp_path: Path) -> None:
    # A service killed outright, and restarted before its server's guard noticed (it looks twice a second).
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time; from service.embedded_db import EmbeddedMongo; "
                              "left = EmbeddedMongo(sys.argv[1]).start(); print(left.process.pid, flush=True); time.sleep(60)",
                              str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert owner.stdout is not None
    left = int(owner.stdout.readline())
    owner.kill()
    owner.wait()
    with EmbeddedMongo(tmp_path) as server, MongoClient(server.url, serverSelectionTimeoutMS=5000) as client:
        assert ended(left), "the earlier server still runs"
        assert client.admin.command("ping")["ok"] == 1


def test_a_server_another_running_service_uses_is_left_alone(tmp_path: Path) -> None:
    with EmbeddedMongo(tmp_path) as first:
        with pytest.raises(EmbeddedDbError, match="is in use by process"):
            _start_from_another_service(tmp_path)
        with MongoClient(first.url, serverSelectionTimeoutMS=5000) as client:
            assert client.admin.command("ping")["ok"] == 1


def _start_from_another_service(data_dir: Path) -> None:
    """EmbeddedMongo(data_dir).start() in a process of its own, as another service would; its error raised here."""
    done = subprocess.run([sys.executable, "-c", "import sys; from service.embedded_db import EmbeddedMongo, EmbeddedDbError\n"
                           "try:\n    EmbeddedMongo(sys.argv[1]).start().stop()\nexcept EmbeddedDbError as exc:\n"
                           "    print(exc); sys.exit(3)", str(data_dir)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    if done.returncode == 3:
        raise EmbeddedDbError(done.stdout.strip())
    assert done.returncode == 0, done.stderr


async def test_a_stop_with_a_page_connected_puts_the_running_job_back(service_env: dict[str, str], mongo_url: str) -> None:
    # An open Socket.IO connection is a request still being handled: the stop must not wait on it (aiohttp waits
    # up to a minute for those) while the export goes on and a container's grace period runs out.
    import socketio

    service = await ServiceProcess(service_env).start()
    sio = socketio.AsyncClient(reconnection=False)
    try:
        await sio.connect(service.url, transports=["websocket"])
        async with aiohttp.ClientSession() as http:
            async with http.post(service.url + "/api/exports", json={"collection": "tasks", "format": "xlsx"}) as resp:
                job = await resp.json()
            assert (await sio.call("subscribe", {"id": job["id"]}))["ok"]
            snap = await wait_status(http, job["id"], ("processing", "completed"), timeout=60, base=service.url)
            assert snap["status"] == "processing", snap
        service.stop()  # SIGTERM; killed after 15 s
        with MongoClient(mongo_url) as client:
            doc = client[DATA_DB][service_env["EXPORT_JOBS_COLLECTION"]].find_one({"_id": job["id"]})
        assert doc["status"] == "queued" and doc["owner"] is None, {k: doc.get(k) for k in ("status", "owner", "processed")}
    finally:
        await sio.disconnect()
        service.stop()


async def test_a_stop_fits_a_containers_grace_period_after_a_long_polling_client_left(service_env: dict[str, str]) -> None:
    # A long-polling client's last poll stays open at the server after the client has said goodbye (until the
    # server's next ping, 25 s, which is also how long the client's disconnect() takes); a stop must not wait
    # for that request.
    import socketio

    service = await ServiceProcess(service_env).start()
    try:
        sio = socketio.AsyncClient(reconnection=False)
        await sio.connect(service.url, transports=["polling"])
        await sio.call("subscribe", {"id": "0" * 24})  # a round trip: the client polls again after it
        await sio.disconnect()
        service.stop(grace=10)  # Docker's default: SIGTERM, then SIGKILL 10 s later
        assert service.proc is not None and service.proc.returncode == 0, "the service had to be killed"
    finally:
        service.stop()


async def test_an_embedded_database_that_dies_is_started_again(tmp_path: Path) -> None:
    db_dir = tmp_path / "db"
    env = {"EXPORT_MONGO_URL": "", "EXPORT_EMBEDDED_DIR": str(db_dir), "EXPORT_DIR": str(tmp_path / "exports"),
           "EXPORT_API_TOKENS": "", "EXPORT_SEED_DEMO_ROWS": "50"}
    service = await ServiceProcess(env).start()
    try:
        first = int((db_dir / "export.db.pid").read_text())
        os.kill(first, signal.SIGKILL)  # as the OOM killer would
        await until(lambda: ended(first), "the embedded database to end")
        again = await until(lambda: (pid := int((db_dir / "export.db.pid").read_text())) != first and not ended(pid) and pid,
                            "the service to start its embedded database again", timeout=20)
        async with aiohttp.ClientSession() as http:
            async with http.post(service.url + "/api/exports", json={"collection": "tasks", "format": "csv", "limit": 10}) as resp:
                assert resp.status == 202, await resp.text()
                job = await resp.json()
            final = await wait_status(http, job["id"], timeout=60, base=service.url)
        assert (final["status"], final["processed"]) == ("completed", 10), final
        assert "starting it again" in service.log_tail() and not ended(again)
    finally:
        service.stop()
