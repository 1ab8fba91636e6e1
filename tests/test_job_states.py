"""One guarded state machine: a cancel that races any transition wins and leaves no file, a give-up never
overwrites a cancel, leases alone decide who runs a job, and no export file outlives its job."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from service import manager as manager_module
from service import runner as runner_module
from service.app import create_app
from service.db import DatabaseUnavailable
from service.events import EventHub
from service.jobs import RUNNING, JobStatus, new_job_doc, now_ms, transition
from service.query import validate_request
from service.settings import MANAGER_KEY

from conftest import DATA_DB, Gate, HoldAfterTwoBatches, export_files, hold_queue, make_settings, release_queue, subscribe, until, wait_status

SPEC = {"collection": "tasks", "format": "csv", "fields": ["seq", "title"], "sort": {"seq": 1}}


def foreign_cancel(mongo_url: str, jobs_collection: str, job_id: str) -> None:
    """What a DELETE on another instance does to a job that runs here: the document says cancelled."""
    with MongoClient(mongo_url) as client:
        client[DATA_DB][jobs_collection].update_one({"_id": job_id}, {"$set": {"status": "cancelled", "owner": None, "finished_at": now_ms()}})


@pytest.mark.parametrize("racing", [JobStatus.PROCESSING, JobStatus.FINALIZING, JobStatus.COMPLETED])
async def test_a_cancel_that_races_a_transition_wins_and_leaves_no_file(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, racing: JobStatus, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(mongo_url, tmp_path)
    real = runner_module.transition

    async def cancelled_first(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        if to == racing:
            await asyncio.to_thread(foreign_cancel, mongo_url, settings.jobs_collection, kwargs["job_id"])
        return await real(db, expected, to, **kwargs)

    monkeypatch.setattr(runner_module, "transition", cancelled_first)
    api = await aiohttp_client(create_app(settings))
    seen: list[tuple[float, str, dict[str, Any]]] = []
    job = await (await api.post("/api/exports", json=SPEC)).json()
    sio = await subscribe(api, job["id"], seen)
    try:
        final = await wait_status(api, job["id"])
        await until(lambda: any(name == "export-cancelled" for _, name, _ in seen), "the export-cancelled event", timeout=5)
    finally:
        await sio.disconnect()
    assert final["status"] == "cancelled" and final["download_url"] is None, final
    names = [name for _, name, _ in seen]
    assert "export-cancelled" in names and "export-completed" not in names, names
    assert export_files(settings.export_dir) == []  # neither the partial file nor a renamed one


async def insert_queued(mongo_url: str, jobs_collection: str, attempts: int) -> str:
    doc = new_job_doc(validate_request(SPEC), "anonymous", "t.csv", order=1)
    doc["attempts"] = attempts
    with MongoClient(mongo_url) as client:
        client[DATA_DB][jobs_collection].insert_one(doc)
    return doc["_id"]


async def test_a_job_interrupted_too_often_is_failed_and_a_cancel_first_stays_a_cancel(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(mongo_url, tmp_path)
    api = await aiohttp_client(create_app(settings, source=gate))
    holders = await hold_queue(api, gate)  # so a subscriber is there before the job is claimed
    given_up = await insert_queued(mongo_url, settings.jobs_collection, attempts=manager_module.MAX_ATTEMPTS)
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(api, given_up, seen)
    try:
        await release_queue(api, gate, holders)
        await until(lambda: any(name == "export-failed" for _, name, _ in seen), "the export-failed event", timeout=30)
    finally:
        await sio.disconnect()
    [failed] = [data for _, name, data in seen if name == "export-failed"]
    assert (failed["error"]["code"], failed["phase"], failed["waiting_seconds"]) == ("too_many_attempts", "done", None), failed
    final = await wait_status(api, given_up)
    assert final["status"] == "failed" and final["error"]["code"] == "too_many_attempts", final
    await api.close()

    # The same, but a user's cancel lands between the claim and the give-up.
    settings = make_settings(mongo_url, tmp_path / "second")
    cancelled = await insert_queued(mongo_url, settings.jobs_collection, attempts=manager_module.MAX_ATTEMPTS)
    real = manager_module.transition

    gave_up = asyncio.Event()

    async def cancelled_first(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        if to != JobStatus.FAILED:
            return await real(db, expected, to, **kwargs)
        await asyncio.to_thread(foreign_cancel, mongo_url, settings.jobs_collection, kwargs["job_id"])
        try:
            return await real(db, expected, to, **kwargs)
        finally:
            gave_up.set()

    monkeypatch.setattr(manager_module, "transition", cancelled_first)
    api = await aiohttp_client(create_app(settings))
    await asyncio.wait_for(gave_up.wait(), 30)  # the give-up was tried after the cancel, and is over
    final = await (await api.get(f"/api/exports/{cancelled}")).json()
    assert final["status"] == "cancelled" and final["error"] is None, final


async def test_a_job_whose_completion_cannot_be_recorded_leaves_no_file(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = runner_module.transition

    async def completion_lost(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        if to == JobStatus.COMPLETED:
            raise DatabaseUnavailable("database unavailable: the reply to the final update was lost")
        return await real(db, expected, to, **kwargs)

    monkeypatch.setattr(runner_module, "transition", completion_lost)
    settings = make_settings(mongo_url, tmp_path)
    api = await aiohttp_client(create_app(settings))
    job = await (await api.post("/api/exports", json=SPEC)).json()
    final = await wait_status(api, job["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "database_unavailable", final
    assert export_files(settings.export_dir) == []  # the renamed file went with the job


async def test_start_up_and_the_sweeper_remove_files_no_completed_job_names(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    settings = make_settings(mongo_url, tmp_path)
    export_dir = Path(settings.export_dir)
    export_dir.mkdir(parents=True)
    with MongoClient(mongo_url) as client:
        jobs = client[DATA_DB][settings.jobs_collection]
        for status in ("completed", "failed", "cancelled", "expired"):
            doc = new_job_doc(validate_request(SPEC), "anonymous", "x.csv", order=1)
            jobs.insert_one({**doc, "status": status, "expires_at": now_ms() + 3_600_000})
            (export_dir / f"{doc['_id']}.csv").write_bytes(status.encode())
        kept = next(p.name for p in export_dir.iterdir() if p.read_bytes() == b"completed")
    (export_dir / ("f" * 24 + ".csv")).write_bytes(b"no job at all")
    (export_dir / "notes.txt").write_bytes(b"not an export: left alone")
    api = await aiohttp_client(create_app(settings))
    assert export_files(export_dir) == sorted([kept, "notes.txt"])
    (export_dir / ("e" * 24 + ".csv.gz")).write_bytes(b"left by an instance that died after a DELETE")
    await api.server.app[MANAGER_KEY].sweep()
    assert export_files(export_dir) == sorted([kept, "notes.txt"])


async def test_without_redis_a_restarting_instance_never_takes_a_job_another_one_runs(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: Any
) -> None:
    shared = dict(export_dir=tmp_path / "shared", batch_size=50, lease_seconds=2.0, max_concurrent=1)
    first = make_settings(mongo_url, tmp_path, **shared)
    held = HoldAfterTwoBatches(mongo_url)  # the job stays in processing until the other instance is done
    owner = await aiohttp_client(create_app(first, source=held))
    owner_id = owner.server.app[MANAGER_KEY].instance_id
    job = await (await owner.post("/api/exports", json={**SPEC, "collection": "tasks_big"})).json()
    await until(lambda: held.held == 1, "the job held after its first batches")
    # Another instance on the same jobs, no Redis: started, stopped and started again while the job runs.
    other_settings = make_settings(mongo_url, tmp_path, jobs_collection=first.jobs_collection, **shared)
    for _ in range(2):
        other = await aiohttp_client(create_app(other_settings))
        assert other.server.app[MANAGER_KEY].instance_id != owner_id
        await asyncio.sleep(3)  # longer than the lease: the owner renews it, the other must leave the job alone
        mid = await (await other.get(f"/api/exports/{job['id']}")).json()
        assert (mid["status"], mid["run"]) == ("processing", 1), mid
        await other.close()
    held.open()
    final = await wait_status(owner, job["id"], timeout=120)
    assert final["status"] == "completed" and final["processed"] == len(big_tasks), final
    with MongoClient(mongo_url) as client:
        doc = client[DATA_DB][first.jobs_collection].find_one({"_id": job["id"]})
    assert doc["instance"] == owner_id and doc["attempts"] == 1, doc  # finished once, by its owner
    await held.db.close()


async def follow(api: Any, gate: Gate, body: dict[str, Any]) -> tuple[str, list[tuple[float, str, dict[str, Any]]], Any]:
    """A job created behind the shut gate and subscribed to before its first batch: (id, its events, the client)."""
    gate.shut()
    job = await (await api.post("/api/exports", json=body)).json()
    seen: list[tuple[float, str, dict[str, Any]]] = []
    sio = await subscribe(api, job["id"], seen)
    gate.open()
    return job["id"], seen, sio


async def test_a_cancel_that_lands_after_the_completed_write_keeps_the_job_completed_with_its_file(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DELETE's cancel reaches the run after the server applied the completed state, before its reply came
    back: the job is completed, so its file stays and its room hears export-completed, never export-cancelled."""
    settings = make_settings(mongo_url, tmp_path)
    api = await aiohttp_client(create_app(settings, source=gate))
    manager = api.server.app[MANAGER_KEY]
    real = runner_module.transition

    async def cancelled_in_flight(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        doc = await real(db, expected, to, **kwargs)
        if to == JobStatus.COMPLETED:
            manager.cancelling.add(kwargs["job_id"])  # what a DELETE does to a job running here, no public way to time it
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)  # the cancel lands here, as if while waiting for the reply
        return doc

    monkeypatch.setattr(runner_module, "transition", cancelled_in_flight)
    job_id, seen, sio = await follow(api, gate, SPEC)
    try:
        await until(lambda: any(name in ("export-completed", "export-failed", "export-cancelled") for _, name, _ in seen), "an end event")
    finally:
        await sio.disconnect()
    final = await wait_status(api, job_id)
    assert final["status"] == "completed", final
    resp = await api.get(f"/api/exports/{job_id}/download")
    assert resp.status == 200 and len((await resp.text()).splitlines()) == len(tasks) + 1
    names = [name for _, name, _ in seen]
    assert "export-completed" in names and "export-cancelled" not in names, names


@pytest.mark.parametrize("sent", [True, False], ids=["after-the-send", "before-the-send"])
async def test_a_cancel_that_lands_while_the_completion_is_told_counts_and_tells_it_once(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, monkeypatch: pytest.MonkeyPatch, sent: bool
) -> None:
    """A DELETE's cancel reaches the run while export-completed is on its way (a publish through Redis waits for
    its reply, or for its connection): the completion is counted and told once, neither twice nor cut short."""
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path)))
    manager = api.server.app[MANAGER_KEY]
    real_emit, told, cancelled = EventHub.emit, [], []

    async def cancelled_while_telling(hub: EventHub, event: str, snap: dict[str, Any], **extra: Any) -> None:
        if event != "export-completed":
            return await real_emit(hub, event, snap, **extra)
        if sent:
            await real_emit(hub, event, snap, **extra)
            told.append(snap["id"])
        if snap["id"] in manager.running and snap["id"] not in manager.cancelling:
            manager.cancelling.add(snap["id"])  # what a DELETE does to a job running here
            manager.running[snap["id"]].cancel()
            cancelled.append(snap["id"])
        await asyncio.sleep(0.01)  # the cancel lands here, as if waiting on the network
        if not sent:
            await real_emit(hub, event, snap, **extra)
            told.append(snap["id"])

    monkeypatch.setattr(EventHub, "emit", cancelled_while_telling)
    job = await (await api.post("/api/exports", json={**SPEC, "limit": 20})).json()
    await until(lambda: cancelled and job["id"] not in manager.running, "the run's end after the cancel")
    assert (await wait_status(api, job["id"]))["status"] == "completed"
    assert told == [job["id"]], told
    assert manager.metrics.jobs_completed == {"csv": 1} and manager.metrics.rows == {"csv": 20}, manager.metrics
    assert not manager.metrics.jobs_ended, manager.metrics.jobs_ended


async def test_a_cancel_before_the_run_takes_its_first_step_is_recorded(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, real_run = asyncio.Event(), manager_module.run_job

    async def late_start(ctx: Any, job: dict[str, Any], cancelled: Any) -> Any:
        started.set()
        await asyncio.Event().wait()  # the DELETE's cancel lands here, before anything of the run has run
        return await real_run(ctx, job, cancelled)

    monkeypatch.setattr(manager_module, "run_job", late_start)
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path)))
    job = await (await api.post("/api/exports", json=SPEC)).json()
    await asyncio.wait_for(started.wait(), 30)
    resp = await api.delete(f"/api/exports/{job['id']}")
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    # Recorded, not left running without a lease to be queued again later.
    assert (await (await api.get(f"/api/exports/{job['id']}")).json())["status"] == "cancelled"


async def test_a_count_that_arrives_while_a_write_is_on_its_way_is_kept(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count comes in between the processing write leaving and its reply (which carries the stored null
    total): the total is not lost for the rest of the run."""
    in_flight, counted = asyncio.Event(), asyncio.Event()
    real_transition, real_count = runner_module.transition, gate.count

    async def late_count(spec: Any) -> int:
        await in_flight.wait()
        total = await real_count(spec)
        counted.set()
        return total

    async def slow_reply(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        doc = await real_transition(db, expected, to, **kwargs)
        if to == JobStatus.PROCESSING:
            in_flight.set()
            await counted.wait()
        return doc

    monkeypatch.setattr(gate, "count", late_count)
    monkeypatch.setattr(runner_module, "transition", slow_reply)
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path), source=gate))
    job_id, seen, sio = await follow(api, gate, SPEC)
    try:
        await until(lambda: any(name == "export-completed" for _, name, _ in seen), "the export-completed event")
    finally:
        await sio.disconnect()
    [finalizing] = [data for _, name, data in seen if name == "export-finalizing"]
    assert (finalizing["total"], finalizing["percent"]) == (len(tasks), 100.0), finalizing


async def test_a_lease_renewal_that_meets_the_completed_state_does_not_silence_the_end(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    renewal_refused, real = asyncio.Event(), runner_module.transition

    async def renewal_after_completion(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        doc = await real(db, expected, to, **kwargs)
        if to is None and set(kwargs.get("fields") or {}) == {"lease_until"} and doc is None:
            renewal_refused.set()  # a renewal found the job no longer running
        if to == JobStatus.COMPLETED:
            await renewal_refused.wait()  # the reply comes back only after a renewal met the completed state
        return doc

    monkeypatch.setattr(runner_module, "transition", renewal_after_completion)
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, lease_seconds=0.3), source=gate))
    job_id, seen, sio = await follow(api, gate, SPEC)
    try:
        await until(lambda: any(name == "export-completed" for _, name, _ in seen), "the export-completed event")
    finally:
        await sio.disconnect()
    assert (await wait_status(api, job_id))["status"] == "completed"


async def test_a_job_still_running_here_is_not_queued_again_when_its_lease_looks_expired(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate
) -> None:
    """Renewals that failed in an outage leave an old lease behind a live run: this instance's own sweep must not
    queue the job for a second run beside the first."""
    settings = make_settings(mongo_url, tmp_path)
    api = await aiohttp_client(create_app(settings, source=gate))
    gate.shut()
    job = await (await api.post("/api/exports", json=SPEC)).json()
    await until(lambda: gate.held == 1, "the export held at its first batch")
    with MongoClient(mongo_url) as client:
        client[DATA_DB][settings.jobs_collection].update_one({"_id": job["id"]}, {"$set": {"lease_until": now_ms() - 60_000}})
    assert await api.server.app[MANAGER_KEY].requeue_expired_leases() == 0
    gate.open()
    final = await wait_status(api, job["id"])
    assert final["status"] == "completed", final
    with MongoClient(mongo_url) as client:  # claimed once: never queued for a second run
        assert client[DATA_DB][settings.jobs_collection].find_one({"_id": job["id"]})["attempts"] == 1


async def test_a_job_claimed_again_by_the_instance_that_lost_it_runs_once(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This instance's lease renewals fail longer than the lease; another instance queues the job again, and an
    idle worker here claims it before the first run noticed: the first run ends there, and the new one alone
    writes the file (they would share its partial file's name) and completes the export, counted once."""
    settings = make_settings(mongo_url, tmp_path, lease_seconds=6)
    api = await aiohttp_client(create_app(settings, source=gate))
    manager = api.server.app[MANAGER_KEY]
    gate.shut()
    job_id = (await (await api.post("/api/exports", json=SPEC)).json())["id"]
    await until(lambda: gate.held == 1, "the export held at its first batch")
    first = manager.running[job_id]
    cut_off = {first, *(t for t in asyncio.all_tasks() if t.get_name() == f"lease-{job_id}")}
    real = runner_module.transition

    async def unreachable_for_the_first_run(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        if asyncio.current_task() in cut_off:
            raise DatabaseUnavailable("this instance cannot reach the database")
        return await real(db, expected, to, **kwargs)

    monkeypatch.setattr(runner_module, "transition", unreachable_for_the_first_run)
    doc = await manager.db.get_job(job_id)
    # The write another instance's sweep makes once the lease has run out (the wait for it left out).
    assert await transition(manager.db, RUNNING, JobStatus.QUEUED, job_id=job_id, owner=doc["owner"],
                            fields={"owner": None}, guard={"lease_until": doc["lease_until"]})
    manager.wake.set()
    await until(lambda: manager.running.get(job_id) not in (None, first), "the job claimed again here")
    second = manager.running[job_id]
    cut_off.clear()  # the database is back for the first run too: its next lease check may notice
    await until(first.done, "the first run's end", timeout=10)
    assert manager.running.get(job_id) is second and not second.done()
    gate.open()
    final = await wait_status(api, job_id)
    assert final["status"] == "completed" and final["error"] is None, final
    resp = await api.get(f"/api/exports/{job_id}/download")
    assert resp.status == 200 and len((await resp.text()).splitlines()) == len(tasks) + 1
    await until(lambda: not manager.running, "the second run's end")
    assert manager.metrics.jobs_completed == {"csv": 1} and not manager.metrics.jobs_ended, manager.metrics
    assert export_files(settings.export_dir) == [f"{job_id}.csv"]  # no partial file left behind
    assert (await manager.db.get_job(job_id))["attempts"] == 2


async def test_a_failure_recorded_late_does_not_end_the_same_instance_s_later_claim(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run fails while this instance cannot reach the database, so its failure waits to be recorded; meanwhile
    another instance queues the job again (the lease ran out) and this one claims it again. The late record finds
    the job held under another claim, though by the same instance: it must not fail the new run."""
    monkeypatch.setattr(runner_module, "RECORD_RETRY_SECONDS", 0.2)
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, lease_seconds=6), source=gate))
    manager = api.server.app[MANAGER_KEY]
    down, cut_off, real = [True], set(), runner_module.transition

    async def unreachable(db: Any, expected: Any, to: Any = None, **kwargs: Any) -> Any:
        if down[0] or asyncio.current_task() in cut_off:
            raise DatabaseUnavailable("this instance cannot reach the database")
        return await real(db, expected, to, **kwargs)

    monkeypatch.setattr(runner_module, "transition", unreachable)
    gate.shut()
    job_id = (await (await api.post("/api/exports", json=SPEC)).json())["id"]
    # The run fails at its first write, and its failure waits for the database.
    await until(lambda: job_id not in manager.running and manager.ctx.background, "the failure waiting")
    cut_off.update(manager.ctx.background)  # that record stays cut off; a new run reaches the database
    down[0] = False
    doc = await manager.db.get_job(job_id)
    # The write another instance's sweep makes once the lease has run out (the wait for it left out).
    assert await transition(manager.db, RUNNING, JobStatus.QUEUED, job_id=job_id, owner=doc["owner"],
                            fields={"owner": None}, guard={"lease_until": doc["lease_until"]})
    manager.wake.set()
    await until(lambda: gate.held == 1, "the job claimed again here, its new run held at its first batch")
    cut_off.clear()  # the late record reaches the database now
    await until(lambda: not manager.ctx.background, "the late record's end")
    assert (await manager.db.get_job(job_id))["status"] == "fetching"
    assert not manager.metrics.jobs_ended, manager.metrics.jobs_ended
    gate.open()
    final = await wait_status(api, job_id)
    assert final["status"] == "completed" and final["error"] is None, final
    assert manager.metrics.jobs_completed == {"csv": 1} and not manager.metrics.jobs_ended, manager.metrics


async def test_a_job_stopped_with_its_instance_too_often_is_given_up(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "MAX_STOPS", 2)
    settings = make_settings(mongo_url, tmp_path, max_concurrent=1)
    gate.shut()
    api = await aiohttp_client(create_app(settings, source=gate))
    job_id = (await (await api.post("/api/exports", json=SPEC)).json())["id"]
    for _ in range(2):
        await until(lambda: gate.held == 1, "the export running, held at its first batch")
        await api.close()  # its run gets the instance stopped, again
        api = await aiohttp_client(create_app(settings, source=gate))
    final = await wait_status(api, job_id, timeout=30)
    assert final["status"] == "failed" and final["error"]["code"] == "too_many_attempts", final
    assert final["error"]["message"] == "its instance was stopped 2 times while it ran"


async def test_graceful_stops_are_not_attempts_and_a_crash_is(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate
) -> None:
    """A rolling deploy stops an instance while its export runs, more often than MAX_ATTEMPTS: each stop puts the
    job back in the queue with its attempt given back, and the export completes. A lease that runs out (the
    instance died) still counts."""
    settings = make_settings(mongo_url, tmp_path, max_concurrent=1)
    gate.shut()
    job_id = ""
    with MongoClient(mongo_url) as client:
        jobs = client[DATA_DB][settings.jobs_collection]
        for _ in range(manager_module.MAX_ATTEMPTS + 1):
            api = await aiohttp_client(create_app(settings, source=gate))
            if not job_id:
                job_id = (await (await api.post("/api/exports", json=SPEC)).json())["id"]
            await until(lambda: gate.held == 1, "the export running, held at its first batch")
            assert jobs.find_one({"_id": job_id})["attempts"] == 1
            await api.close()  # a graceful stop
            doc = jobs.find_one({"_id": job_id})
            assert (doc["status"], doc["attempts"]) == ("queued", 0), doc
        # An instance that died running another job: its lease runs out, and that attempt stays counted.
        crashed = new_job_doc(validate_request(SPEC), "anonymous", "t.csv", order=2**62)  # after the other in the queue
        crashed.update(status="processing", owner="deadbeef0000", lease_until=now_ms() - 60_000, attempts=1)
        jobs.insert_one(crashed)
        api = await aiohttp_client(create_app(settings, source=gate))  # its start-up queues the crashed job
        await until(lambda: gate.held == 1, "the export running again")
        doc = jobs.find_one({"_id": crashed["_id"]})
        assert (doc["status"], doc["attempts"]) == ("queued", 1), doc
    gate.open()
    final = await wait_status(api, job_id, timeout=60)
    assert final["status"] == "completed" and final["error"] is None, final
