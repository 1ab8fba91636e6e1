"""Two service processes, one database, one export directory, Redis for Socket.IO fan-out."""
from __future__ import annotations

import asyncio
import csv
import io
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import socketio

from service.embedded_db import free_port

from conftest import BIG_ROWS, DATA_DB, EVENTS, new_jobs_collection, until, wait_status
from service_process import ServiceProcess


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; `make test` and `make test-fast` install it (Debian package redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL,
    )
    asyncio.run(until(lambda: accepts(port), f"redis-server to accept connections on port {port}", timeout=10))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def cluster_env(mongo_url: str, redis_url: str, tmp_path: Path, tasks: Any, big_tasks: Any) -> dict[str, str]:
    return {
        "EXPORT_MONGO_URL": mongo_url,
        "EXPORT_DB": DATA_DB,
        "EXPORT_DIR": str(tmp_path / "shared-exports"),
        "EXPORT_REDIS_URL": redis_url,
        "EXPORT_JOBS_COLLECTION": new_jobs_collection(),
        "EXPORT_MAX_CONCURRENT": "1",
        "EXPORT_BATCH_SIZE": "20",
        "EXPORT_LEASE_SECONDS": "3",
        "EXPORT_API_TOKENS": "",
    }


def job_docs(sync_db: Any, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {d["_id"]: d for d in sync_db[env["EXPORT_JOBS_COLLECTION"]].find()}


async def test_jobs_created_on_one_instance_run_once_across_both_and_events_reach_the_other(cluster_env: dict[str, str], sync_db: Any) -> None:
    a = await ServiceProcess(cluster_env).start()
    b = await ServiceProcess(cluster_env).start()
    sio = socketio.AsyncClient(reconnection=False)
    seen: dict[str, list[str]] = {}
    for name in EVENTS:
        sio.on(name, lambda data, _n=name: seen.setdefault(data["id"], []).append(_n))
    try:
        await sio.connect(b.url, transports=["websocket"])  # the listener talks to instance B only
        async with aiohttp.ClientSession() as http:
            # Two long blockers occupy both instances' single worker, so the six jobs below are queued
            # (and subscribed to) before any of them can start.
            blockers = []
            for _ in range(2):
                async with http.post(a.url + "/api/exports", json={"collection": "tasks_big", "format": "xlsx"}) as resp:
                    blockers.append((await resp.json())["id"])
            for blocker in blockers:
                assert (await wait_status(http, blocker, ("processing",), timeout=60, base=a.url))["status"] == "processing"
                assert (await sio.call("subscribe", {"id": blocker}))["ok"]
            jobs = []
            for fmt in ("csv", "json", "ndjson", "xlsx", "csv", "ndjson"):
                async with http.post(a.url + "/api/exports", json={"collection": "tasks", "format": fmt, "limit": 1000, "sort": {"seq": 1}}) as resp:
                    job = await resp.json()
                assert job["status"] == "queued", job
                ack = await sio.call("subscribe", {"id": job["id"]})
                assert ack["ok"] and ack["job"]["status"] == "queued"
                jobs.append(job["id"])
            # B's blocker first, and B takes a queued job before A's worker is free: both instances work.
            docs = job_docs(sync_db, cluster_env)
            on_b, on_a = sorted(blockers, key=lambda blocker: docs[blocker]["instance"] != b.instance)
            assert (docs[on_b]["instance"], docs[on_a]["instance"]) == (b.instance, a.instance), docs
            async with http.delete(f"{a.url}/api/exports/{on_b}") as resp:
                assert resp.status == 200
            await until(lambda: any(job_docs(sync_db, cluster_env)[j].get("instance") == b.instance for j in jobs), "instance B to take a queued job")
            async with http.delete(f"{a.url}/api/exports/{on_a}") as resp:
                assert resp.status == 200
            finals = [await wait_status(http, j, timeout=90, base=a.url) for j in jobs]
            assert all(f["status"] == "completed" and f["processed"] == 1000 for f in finals), finals
            # Events cross Redis after the state is written.
            await until(lambda: all(seen.get(j, [])[-1:] == ["export-completed"] for j in jobs), "every job's export-completed event at B", timeout=10)
        docs = job_docs(sync_db, cluster_env)
        assert all(docs[j]["attempts"] == 1 for j in jobs)  # each ran exactly once
        assert {docs[j]["instance"] for j in jobs} == {a.instance, b.instance}  # and both instances worked
        for job_id in jobs:
            names = seen.get(job_id, [])
            assert names and names[0] == "export-fetching" and names[-2:] == ["export-finalizing", "export-completed"], names
            assert "export-processing" in names
        for blocker in blockers:
            assert docs[blocker]["status"] == "cancelled"
            # Cancelled through A while running on A and on B: whatever the running instance sent before it saw the
            # cancel, the last word at B is the cancel.
            assert seen[blocker][-1] == "export-cancelled", seen[blocker][-5:]
        assert not list(Path(cluster_env["EXPORT_DIR"]).glob("*.part"))
    finally:
        await sio.disconnect()
        a.stop()
        b.stop()


async def test_a_killed_instance_job_is_finished_by_the_other_after_its_lease(cluster_env: dict[str, str], sync_db: Any) -> None:
    a = await ServiceProcess(cluster_env).start()
    b = await ServiceProcess(cluster_env).start()
    instances = {a.instance: a, b.instance: b}
    try:
        async with aiohttp.ClientSession() as http:
            spec = {"collection": "tasks_big", "format": "csv", "sort": {"seq": 1}, "fields": ["seq", "title", "createdAt"]}
            async with http.post(a.url + "/api/exports", json=spec) as resp:
                job_id = (await resp.json())["id"]
            snap = await wait_status(http, job_id, ("processing", "completed"), timeout=60, base=a.url)
            assert snap["status"] == "processing"
            runner = instances[job_docs(sync_db, cluster_env)[job_id]["instance"]]
            survivor = b if runner is a else a
            runner.kill()
            final = await wait_status(http, job_id, timeout=60, base=survivor.url)
            assert final["status"] == "completed", final
            doc = job_docs(sync_db, cluster_env)[job_id]
            assert doc["instance"] == survivor.instance and doc["attempts"] == 2
            async with http.get(survivor.url + final["download_url"]) as resp:
                rows = list(csv.reader(io.StringIO((await resp.read()).decode("utf-8"), newline="")))
        assert rows[0] == ["seq", "title", "createdAt"]
        assert [int(r[0]) for r in rows[1:]] == list(range(BIG_ROWS))  # every row once, in order
        assert not list(Path(cluster_env["EXPORT_DIR"]).glob("*.part"))
    finally:
        a.stop()
        b.stop()
