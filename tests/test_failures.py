"""Faults end in a clear job state: failed with an export-failed event, and no partial file left."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any, AsyncGenerator

import pytest

from service import runner as runner_module
from service.app import create_app
from service.db import DatabaseError, FindSpec
from service.jobs import JobStatus
from service.settings import MANAGER_KEY, Settings

from conftest import Gate, export_files, hold_queue, make_settings, release_queue, subscribe, until, wait_status


async def test_unwritable_export_directory_fails_the_job_cleanly(gated_client: Any, gate: Gate, settings: Settings) -> None:
    api = gated_client
    export_dir = Path(settings.export_dir)
    holders = await hold_queue(api, gate)  # the job below stays queued until subscribed to
    # The directory disappears behind the service's back and a file takes its name.
    shutil.rmtree(export_dir)
    export_dir.write_text("not a directory")
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv"})).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(api, job["id"], seen)
    await release_queue(api, gate, holders)
    snap = await wait_status(api, job["id"])
    await until(lambda: seen and seen[-1][1] == "export-failed", "the export-failed event", timeout=5)
    await sio.disconnect()

    assert snap["status"] == "failed"
    assert snap["error"]["code"] == "disk_error"
    assert "cannot write export file" in snap["error"]["message"]
    assert snap["download_url"] is None
    assert seen[-1][2]["error"]["code"] == "disk_error"
    export_dir.unlink()
    export_dir.mkdir()
    assert export_files(export_dir) == []
    # The service is still up and the next job works once the directory is back.
    job2 = await (await api.post("/api/exports", json={"collection": "tasks", "format": "ndjson", "limit": 10})).json()
    assert (await wait_status(api, job2["id"]))["status"] == "completed"
    assert export_files(export_dir) == [f"{job2['id']}.ndjson"]


@pytest.mark.parametrize("fmt", ["ndjson", "xlsx"])  # XLSX writes its file only when closing, through xlsxwriter
async def test_full_disk_fails_the_job_with_a_clear_message(
        aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, fmt: str) -> None:
    settings = make_settings(mongo_url, tmp_path)
    api = await aiohttp_client(create_app(settings, source=gate))
    holders = await hold_queue(api, gate)
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": fmt})).json()
    # The job's partial file leads to /dev/full, where every write fails with ENOSPC, as on a full disk. Its
    # name is the service's own: no public behaviour points a job's writes elsewhere.
    part = Path(settings.export_dir) / f"{job['id']}.{fmt}.{api.server.app[MANAGER_KEY].instance_id}.part"
    part.symlink_to("/dev/full")
    await release_queue(api, gate, holders)
    snap = await wait_status(api, job["id"])
    assert snap["status"] == "failed"
    assert snap["error"]["code"] == "disk_error"
    assert "No space left on device" in snap["error"]["message"]
    assert export_files(settings.export_dir) == []  # nothing partial left behind


async def test_a_partial_file_that_cannot_be_removed_still_ends_the_job_with_its_error(
        aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate) -> None:
    """A failed export's partial file is removed; when that fails too (a read-only or failing filesystem: here a
    directory in its place), the job still ends with the first error, not hanging until its attempts ran out."""
    settings = make_settings(mongo_url, tmp_path)
    api = await aiohttp_client(create_app(settings, source=gate))
    holders = await hold_queue(api, gate)
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv"})).json()
    part = Path(settings.export_dir) / f"{job['id']}.csv.{api.server.app[MANAGER_KEY].instance_id}.part"
    (part / "held").mkdir(parents=True)  # neither opened for writing nor removed
    await release_queue(api, gate, holders)
    snap = await wait_status(api, job["id"], timeout=20)
    assert (snap["status"], snap["error"]["code"]) == ("failed", "disk_error"), snap
    assert "Is a directory" in snap["error"]["message"], snap["error"]
    job2 = await (await api.post("/api/exports", json={"collection": "tasks", "format": "ndjson", "limit": 10})).json()
    assert (await wait_status(api, job2["id"]))["status"] == "completed"


class Refused:
    """A BatchSource whose server refuses the query (and the count), once asked to go on: every export fails."""

    def __init__(self) -> None:
        self.go_on = asyncio.Event()

    async def count(self, spec: FindSpec) -> int:
        raise DatabaseError("the server refused the count")

    async def raw_batches(self, spec: FindSpec) -> AsyncGenerator[bytes, None]:
        await self.go_on.wait()
        raise DatabaseError("the server refused the query")
        yield b""  # a generator, as a source's batches are


async def test_a_cancel_that_lands_while_the_failure_is_recorded_leaves_it_told_and_counted(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DELETE's cancel reaches the run while the reply to its failed write is on its way: the failure stands,
    and is told and counted, not left silent."""
    source = Refused()
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path), source=source))
    manager = api.server.app[MANAGER_KEY]
    real, injected = runner_module.transition, []

    async def cancelled_in_flight(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        doc = await real(db, expected, to, **kwargs)
        if to == JobStatus.FAILED and kwargs["job_id"] in manager.running:
            injected.append(kwargs["job_id"])
            manager.cancelling.add(kwargs["job_id"])  # what a DELETE does to a job running here
            manager.running[kwargs["job_id"]].cancel()
            await asyncio.sleep(0.01)  # the cancel lands here, as if waiting for the reply
        return doc

    monkeypatch.setattr(runner_module, "transition", cancelled_in_flight)
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv"})).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(api, job["id"], seen)
    source.go_on.set()
    try:
        await until(lambda: any(name in ("export-failed", "export-cancelled") for _, name, _ in seen), "an end event")
    finally:
        await sio.disconnect()
    final = await wait_status(api, job["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "database_error", final
    assert injected == [job["id"]]  # the cancel did land inside the failure's write
    assert [name for _, name, _ in seen if name in ("export-failed", "export-cancelled")] == ["export-failed"], seen
    await until(lambda: job["id"] not in manager.running, "the run's end")
    assert manager.metrics.jobs_ended == {"database_error": 1}, manager.metrics.jobs_ended
