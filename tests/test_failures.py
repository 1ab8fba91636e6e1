"""Faults end in a clear job state: failed with an export-failed event, and no partial file left."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
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
