"""Faults end in a clear job state: failed with an export-failed event, and no partial file left."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from service.app import create_app
from service.settings import MANAGER_KEY, Settings

from conftest import export_files, make_settings, subscribe, wait_status


async def test_unwritable_export_directory_fails_the_job_cleanly(client: Any, settings: Settings) -> None:
    api = client
    export_dir = Path(settings.export_dir)
    # The directory disappears behind the service's back and a file takes its name.
    shutil.rmtree(export_dir)
    export_dir.write_text("not a directory")
    manager = api.server.app[MANAGER_KEY]
    manager.pause()
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "csv"})).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(api, job["id"], seen)
    manager.resume()
    snap = await wait_status(api, job["id"])
    await asyncio.sleep(0.2)
    await sio.disconnect()

    assert snap["status"] == "failed"
    assert snap["error"]["code"] == "disk_error"
    assert "cannot write export file" in snap["error"]["message"]
    assert snap["download_url"] is None
    assert [n for _, n, _ in seen][-1] == "export-failed"
    assert seen[-1][2]["error"]["code"] == "disk_error"
    export_dir.unlink()
    export_dir.mkdir()
    assert export_files(export_dir) == []
    # The service is still up and the next job works once the directory is back.
    job2 = await (await api.post("/api/exports", json={"collection": "tasks", "format": "ndjson", "limit": 10})).json()
    assert (await wait_status(api, job2["id"]))["status"] == "completed"
    assert export_files(export_dir) == [f"{job2['id']}.ndjson"]


async def test_full_disk_fails_the_job_with_a_clear_message(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    settings = make_settings(mongo_url, tmp_path)
    api = await aiohttp_client(create_app(settings))
    manager = api.server.app[MANAGER_KEY]
    manager.pause()
    job = await (await api.post("/api/exports", json={"collection": "tasks", "format": "ndjson"})).json()
    # The job's partial file leads to /dev/full, where every write fails with ENOSPC, as on a full disk.
    part = Path(settings.export_dir) / f"{job['id']}.ndjson.{manager.instance_id}.part"
    part.symlink_to("/dev/full")
    manager.resume()
    snap = await wait_status(api, job["id"])
    assert snap["status"] == "failed"
    assert snap["error"]["code"] == "disk_error"
    assert "No space left on device" in snap["error"]["message"]
    assert export_files(settings.export_dir) == []  # nothing partial left behind
