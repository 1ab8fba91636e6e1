"""The job queue: creation, FIFO claiming with a lease, cancellation, recovery at start-up, retention.

Jobs live in MongoDB, so a restart loses none. Workers claim the oldest queued job atomically
(find_one_and_update), so several instances can share one queue; a job whose lease ran out (its
instance died) is queued again.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from bisect import bisect_left
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .db import Database, DatabaseError
from .encoder import EncoderPool
from .events import EventHub
from .jobs import ACTIVE_VALUES, RUNNING_VALUES, JobStatus, new_job_doc, snapshot, now_ms
from .metrics import Metrics
from .pipeline import remove_partial
from .query import ExportSpec, safe_filename
from .runner import BatchSource, RunContext, execute, final_path
from .settings import Settings

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often idle workers look for jobs queued by other instances
MAX_ATTEMPTS = 3  # a job that killed its instance this often is failed, not retried forever
STOP_TIMEOUT_SECONDS = 15.0  # workers put their jobs back in the queue on stop; a silent database must not hang it
REQUEUE = {"$set": {"status": JobStatus.QUEUED.value, "owner": None}}  # back in line, claimable by any instance


class JobNotFound(LookupError):
    pass


class JobConflict(RuntimeError):
    """The job is in a state that does not allow the request (e.g. downloading an unfinished job)."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class TooManyJobs(RuntimeError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} active exports per user; wait for one to finish")
        self.limit = limit


class JobManager:
    def __init__(self, settings: Settings, db: Database, events: EventHub, metrics: Metrics, source: BatchSource | None = None) -> None:
        self.settings = settings
        self.db = db
        self.events = events
        self.metrics = metrics
        self.instance_id = secrets.token_hex(6)
        self.encoders = EncoderPool(settings.max_concurrent)
        self.ctx = RunContext(settings, db, events, self.encoders, metrics, self.instance_id, source or db)
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.running: dict[str, asyncio.Task[JobStatus]] = {}
        self.cancelling: set[str] = set()
        self.claiming = asyncio.Event()  # cleared by pause(): workers finish their job and claim no other
        self.claiming.set()
        self.last_order = 0
        self.stopping = False

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.db.ensure_indexes()
        await self.recover()
        for n in range(self.settings.max_concurrent):
            self.tasks.append(asyncio.create_task(self._worker(), name=f"export-worker-{n}"))
        self.tasks.append(asyncio.create_task(self._maintenance(), name="export-maintenance"))
        for task in self.tasks:
            task.add_done_callback(self._report_end)

    def _report_end(self, task: "asyncio.Task[None]") -> None:
        """Workers and maintenance run until stop(); any other end is a defect, and said loudly."""
        if self.stopping:
            return
        if task.cancelled():
            log.error("%s was cancelled", task.get_name())
        elif task.exception() is not None:
            log.error("%s stopped", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        _, pending = await asyncio.wait(self.tasks, timeout=STOP_TIMEOUT_SECONDS) if self.tasks else (set(), set())
        if pending:
            # Cancelled again, they give up putting their jobs back in the queue: those jobs stay running in the
            # database, and the next start queues them again (recover()).
            names = ", ".join(sorted(task.get_name() for task in pending))
            log.error("%s still waiting for the database after %.0f s; stopping without requeueing", names, STOP_TIMEOUT_SECONDS)
            for task in pending:
                task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        self.encoders.close()

    async def recover(self) -> None:
        """Queue again the jobs a dead process left active, and remove stale partial files (with their
        scratch directories)."""
        now = now_ms()
        stale: dict[str, Any] = {"status": {"$in": RUNNING_VALUES}}
        if self.settings.redis_url:
            # Other live instances may be running jobs: only those whose lease ran out are orphans.
            stale["lease_until"] = {"$lt": now}
        requeued = await self.db.update_jobs(stale, REQUEUE)
        if requeued:
            log.warning("queued %d interrupted export(s) again", requeued)
        running = {job["_id"] for job in await self.db.find_jobs({"status": {"$in": RUNNING_VALUES}})}
        export_dir = Path(self.settings.export_dir)
        parts = {*export_dir.glob("*.part"), *(scratch.with_suffix("") for scratch in export_dir.glob("*.part.tmp"))}
        for part in parts:
            if part.name.split(".", 1)[0] not in running:
                remove_partial(part)
                log.info("removed stale partial file %s", part.name)

    # --- requests ----------------------------------------------------------------------------
    async def create(self, spec: ExportSpec, user: str) -> dict[str, Any]:
        active = await self.db.count_jobs({"user": user, "status": {"$in": ACTIVE_VALUES}})
        if active >= self.settings.max_active_per_user:
            raise TooManyJobs(self.settings.max_active_per_user)
        doc = new_job_doc(spec, user, "", self._next_order())
        doc["file_name"] = self.file_name(spec, doc)
        await self.db.insert_job(doc)
        self.metrics.job_created(spec.format)
        self.wake.set()
        return await self.snapshot_of(doc)

    @staticmethod
    def file_name(spec: ExportSpec, doc: dict[str, Any]) -> str:
        created = datetime.fromtimestamp(doc["created_at"] / 1000, timezone.utc)
        base = spec.filename or f"{spec.collection}-{created.strftime('%Y%m%d-%H%M%S')}"
        base = safe_filename(base)
        bare = "." + spec.extension.split(".")[0]
        if base.lower().endswith(bare):  # "report.csv" with gzip becomes report.csv.gz, not report.csv.csv.gz
            base = base[: -len(bare)] or base
        return base + "." + spec.extension

    async def snapshot_of(self, doc: dict[str, Any], position: int | None = None) -> dict[str, Any]:
        """The job's snapshot; a queued job's position is counted unless given (a listing finds them all at once)."""
        if position is None and doc["status"] == JobStatus.QUEUED.value:
            position = 1 + await self.db.count_jobs({"status": JobStatus.QUEUED.value, "order": {"$lt": doc["order"]}})
        return snapshot(doc, position)

    async def get_doc(self, user: str, job_id: str) -> dict[str, Any]:
        doc = await self.db.get_job(job_id) if _plausible_id(job_id) else None
        if doc is None or doc.get("user") != user:
            raise JobNotFound(job_id)  # another user's job answers as if it did not exist
        return doc

    async def get(self, user: str, job_id: str) -> dict[str, Any]:
        return await self.snapshot_of(await self.get_doc(user, job_id))

    async def lookup(self, user: str, job_id: str) -> dict[str, Any] | None:
        try:
            return await self.get(user, job_id)
        except JobNotFound:
            return None

    async def list(self, user: str, status: str | None, limit: int) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"user": user}
        if status:
            query["status"] = status
        docs = await self.db.find_jobs(query, limit=limit)
        positions = await self._queue_positions(docs)
        return [await self.snapshot_of(doc, positions.get(doc["_id"])) for doc in docs]

    async def _queue_positions(self, docs: list[dict[str, Any]]) -> dict[str, int]:
        """The queue positions of the queued jobs among docs, from one query for the orders of all the jobs
        queued up to the last of them (every user's: they share one queue), whatever the number of docs."""
        queued = [doc for doc in docs if doc["status"] == JobStatus.QUEUED.value]
        if not queued:
            return {}
        last = max(doc["order"] for doc in queued)
        orders = await self.db.job_orders({"status": JobStatus.QUEUED.value, "order": {"$lte": last}})
        return {doc["_id"]: 1 + bisect_left(orders, doc["order"]) for doc in queued}

    def path_of(self, doc: dict[str, Any]) -> Path:
        return final_path(self.settings.export_dir, doc["_id"], ExportSpec.from_doc(doc["spec"]))

    async def cancel_or_delete(self, user: str, job_id: str) -> dict[str, Any]:
        """Cancel an active job, or delete a finished one with its file."""
        doc = await self.get_doc(user, job_id)
        status = JobStatus(doc["status"])
        if not status.active:
            self.path_of(doc).unlink(missing_ok=True)
            await self.db.delete_job(job_id)
            return {**snapshot(doc), "deleted": True}
        task = self.running.get(job_id)
        if task is not None:
            # Running here: the runner records the cancel, kills its encoder and removes the .part file.
            self.cancelling.add(job_id)
            task.cancel()
            await asyncio.wait([task], timeout=5)
            return await self.get(user, job_id)
        fields = {"status": JobStatus.CANCELLED.value, "finished_at": now_ms(), "owner": None}
        # Queued, or running on another instance, which sees the change at its next progress write.
        if await self.db.update_job({"_id": job_id, "status": {"$in": ACTIVE_VALUES}}, {"$set": fields}):
            doc.update(fields)
            self.metrics.job_ended("cancelled")
            await self.events.emit("export-cancelled", snapshot(doc))
            return snapshot(doc)
        return await self.get(user, job_id)

    # --- workers -----------------------------------------------------------------------------
    async def _claim(self) -> dict[str, Any] | None:
        now = now_ms()
        return await self.db.claim_job(
            {"status": JobStatus.QUEUED.value},
            {
                "$set": {
                    "status": JobStatus.FETCHING.value,
                    "owner": self.instance_id,
                    "instance": self.instance_id,  # kept after the end, to tell which instance ran it
                    "lease_until": now + int(self.settings.lease_seconds * 1000),
                    "started_at": now,
                    "processed": 0,
                    "error": None,
                },
                "$inc": {"attempts": 1},
            },
        )

    def _next_order(self) -> int:
        """Microseconds, bumped on ties: jobs created in the same millisecond keep their order and queue
        positions never tie. Across instances the clock orders them."""
        self.last_order = max(time.time_ns() // 1000, self.last_order + 1)
        return self.last_order

    def pause(self) -> None:
        """Stop claiming queued jobs (running ones go on), e.g. to drain an instance before maintenance."""
        self.claiming.clear()

    def resume(self) -> None:
        self.claiming.set()
        self.last_order = 0
        self.wake.set()

    async def _worker(self) -> None:
        while True:
            await self.claiming.wait()
            try:
                job = await self._claim()
            except DatabaseError as exc:
                log.warning("cannot claim jobs: %s", exc)
                job = None
            if job is None:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
                continue
            if job.get("attempts", 1) > MAX_ATTEMPTS:
                await self._give_up(job)
                continue
            await self._run(job)

    async def _run(self, job: dict[str, Any]) -> None:
        job_id = job["_id"]
        task = asyncio.create_task(execute(self.ctx, job, lambda: job_id in self.cancelling), name=f"export-{job_id}")
        self.running[job_id] = task
        self.metrics.running += 1
        try:
            await asyncio.shield(task)  # a user's cancel ends the task, not this worker
        except asyncio.CancelledError:
            worker = asyncio.current_task()
            if worker is not None and not worker.cancelling():
                # Only the job's task ended cancelled (its lease ran out as it finished): the job is someone
                # else's now, and this worker goes on.
                log.warning("job %s: its run ended cancelled after the job was taken over", job_id)
                return
            # The service is stopping: the job goes back to the queue for the next start.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self._requeue(job_id)
            raise
        finally:
            self.running.pop(job_id, None)
            self.cancelling.discard(job_id)
            self.metrics.running -= 1

    async def _requeue(self, job_id: str) -> None:
        try:
            await self.db.update_job(
                {"_id": job_id, "owner": self.instance_id, "status": {"$in": RUNNING_VALUES}},
                REQUEUE,
            )
        except DatabaseError:
            log.warning("job %s could not be queued again; its lease will expire", job_id)

    async def _give_up(self, job: dict[str, Any]) -> None:
        error = {"code": "too_many_attempts", "message": f"the export was interrupted {MAX_ATTEMPTS} times"}
        await self.db.update_job({"_id": job["_id"]}, {"$set": {"status": JobStatus.FAILED.value, "error": error, "finished_at": now_ms(), "owner": None}})
        job.update(status=JobStatus.FAILED.value, error=error)
        self.metrics.job_ended("too_many_attempts")
        await self.events.emit("export-failed", snapshot(job), error=error)

    # --- maintenance -------------------------------------------------------------------------
    async def _maintenance(self) -> None:
        while True:
            await asyncio.sleep(min(self.settings.sweep_interval_seconds, self.settings.lease_seconds / 2))
            try:
                await self.sweep()
                if self.settings.redis_url:
                    await self.recover_orphans()
            except DatabaseError as exc:
                log.warning("maintenance skipped: %s", exc)

    async def recover_orphans(self) -> None:
        """Queue again running jobs whose instance stopped renewing their lease."""
        orphaned = {"status": {"$in": RUNNING_VALUES}, "lease_until": {"$lt": now_ms()}}
        if await self.db.update_jobs(orphaned, REQUEUE):
            self.wake.set()

    async def sweep(self) -> int:
        """Retention: completed files past expires_at are removed and their jobs marked expired."""
        expired = await self.db.find_jobs({"status": JobStatus.COMPLETED.value, "expires_at": {"$lt": now_ms()}})
        for doc in expired:
            self.path_of(doc).unlink(missing_ok=True)
            await self.db.update_job({"_id": doc["_id"], "status": JobStatus.COMPLETED.value}, {"$set": {"status": JobStatus.EXPIRED.value}})
            log.info("job %s expired; its file was removed", doc["_id"])
        return len(expired)


def _plausible_id(job_id: str) -> bool:
    return len(job_id) == 24 and all(c in "0123456789abcdef" for c in job_id)
