"""An encoder process that dies under a running export: the job ends failed with encoder_crashed at once,
with the process's exit code, and leaves no file."""
from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from service import encoder as encoder_module
from service.app import create_app

from conftest import END_STATES, export_files, make_settings, subscribe, wait_status

# Well under the job's time limit and the lease: a crash is seen as the end of the encoder's stream, not
# by waiting for something to time out.
PROMPT_SECONDS = 5.0


def process_writing(export_dir: Path, job_id: str) -> psutil.Process:
    """The process under this one that holds the job's partial file open: the job's encoder."""
    for proc in psutil.Process().children(recursive=True):
        try:
            paths = [Path(f.path) for f in proc.open_files()]
        except psutil.NoSuchProcess:
            continue
        if any(path.parent == export_dir and path.name.startswith(job_id) for path in paths):
            return proc
    raise AssertionError(f"no process holds a file of job {job_id} open")


async def test_a_killed_encoder_fails_the_job_promptly_with_encoder_crashed(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: list[dict[str, Any]]
) -> None:
    # Small batches from the slow embedded server: the export is surely still running when its encoder dies.
    settings = make_settings(mongo_url, tmp_path, batch_size=50, max_concurrent=1)
    export_dir = Path(settings.export_dir).resolve()
    api = await aiohttp_client(create_app(settings))
    job = await (await api.post("/api/exports", json={"collection": "tasks_big", "format": "csv"})).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(api, job["id"], seen)
    running = await wait_status(api, job["id"], ("processing",) + END_STATES)
    assert running["status"] == "processing", running

    encoder = process_writing(export_dir, job["id"])
    killed_at = time.monotonic()
    encoder.send_signal(signal.SIGKILL)
    final = await wait_status(api, job["id"], timeout=30)
    ended_after = time.monotonic() - killed_at
    while not any(name == "export-failed" for _, name, _ in seen) and time.monotonic() - killed_at < PROMPT_SECONDS:
        await asyncio.sleep(0.05)
    await sio.disconnect()

    assert final["status"] == "failed", final
    assert final["error"]["code"] == "encoder_crashed", final["error"]
    assert f"exit code {-signal.SIGKILL}" in final["error"]["message"], final["error"]
    assert final["processed"] < len(big_tasks)
    assert ended_after < PROMPT_SECONDS, ended_after
    failed = [payload for _, name, payload in seen if name == "export-failed"]
    assert failed and failed[-1]["error"]["code"] == "encoder_crashed", seen[-3:]
    assert export_files(export_dir) == []  # no partial file left behind
    # The pool still serves the next export.
    again = await (await api.post("/api/exports", json={"collection": "tasks_big", "format": "ndjson", "limit": 120})).json()
    assert (await wait_status(api, again["id"]))["status"] == "completed"
    assert export_files(export_dir) == [f"{again['id']}.ndjson"]


async def test_a_hung_encoder_fails_the_job_with_encoder_hung_and_leaves_no_file(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoder_module, "REPLY_SECONDS", 1.0)
    settings = make_settings(mongo_url, tmp_path, batch_size=50, max_concurrent=1)
    export_dir = Path(settings.export_dir).resolve()
    api = await aiohttp_client(create_app(settings))
    job = await (await api.post("/api/exports", json={"collection": "tasks_big", "format": "csv"})).json()
    running = await wait_status(api, job["id"], ("processing",) + END_STATES)
    assert running["status"] == "processing", running

    encoder = process_writing(export_dir, job["id"])
    encoder.send_signal(signal.SIGSTOP)  # alive, and silent: as a deadlocked encoder
    try:
        final = await wait_status(api, job["id"], timeout=30)
    finally:
        if encoder.is_running():
            encoder.send_signal(signal.SIGCONT)
    assert final["status"] == "failed" and final["error"]["code"] == "encoder_hung", final
    assert not encoder.is_running() or encoder.status() == psutil.STATUS_ZOMBIE  # killed, not left stopped
    assert export_files(export_dir) == []
    again = await (await api.post("/api/exports", json={"collection": "tasks_big", "format": "ndjson", "limit": 120})).json()
    assert (await wait_status(api, again["id"]))["status"] == "completed"


async def test_an_interrupt_from_the_terminal_leaves_the_encoder_to_the_service(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: list[dict[str, Any]]
) -> None:
    """Ctrl-C reaches the whole process group; the service stops its encoders in order, so an encoder goes on."""
    settings = make_settings(mongo_url, tmp_path, batch_size=200, max_concurrent=1)
    api = await aiohttp_client(create_app(settings))
    job = await (await api.post("/api/exports", json={"collection": "tasks_big", "format": "csv", "limit": 6000})).json()
    assert (await wait_status(api, job["id"], ("processing",) + END_STATES))["status"] == "processing"
    process_writing(Path(settings.export_dir).resolve(), job["id"]).send_signal(signal.SIGINT)
    final = await wait_status(api, job["id"], timeout=60)
    assert (final["status"], final["processed"]) == ("completed", 6000), final
