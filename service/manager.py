"""The job queue: creation, FIFO claiming with a lease, cancellation, recovery at start-up, retention.

Jobs live in MongoDB, so a restart loses none. Workers claim the oldest queued job atomically
(find_one_and_update), so several instances can share one queue; a job whose lease ran out (its
instance died) is queued again.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from bisect import bisect_left
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .db import Database, DatabaseError
from .encoder import EncoderPool
from .events import EventHub
from .jobs import ACTIVE, ACTIVE_VALUES, RUNNING, RUNNING_VALUES, JobStatus, new_job_doc, now_ms, snapshot, transition
from .metrics import Metrics
from .files import discard_partial, final_path, remove_file
from .query import ExportSpec, safe_filename
from .runner import BatchSource, RunContext, run_job
from .settings import Settings
from .signing import UrlSigner, load_key

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often idle workers look for jobs queued by other instances
MAX_ATTEMPTS = 3  # a job that killed its instance this often is failed, not retried forever
# Graceful stops are no attempts (a rolling deploy is no failure of the export), but a job whose run gets its
# instance stopped again and again (a failing liveness probe, an eviction for memory) must end too.
MAX_STOPS = 20
STOP_TIMEOUT_SECONDS = 15.0  # workers put their jobs back in the queue on stop; a silent database must not hang it
RECORD_STOP_SECONDS = 5.0  # on stop, end states the database has not taken yet get this long
# Files in the export directory that are neither partial files nor scratch directories: <24 hex digits>.<ext>
FINAL_FILE = re.compile(r"^([0-9a-f]{24})\.[a-z.]+$")
FILE_KEEPING_STATES = frozenset(s.value for s in ACTIVE | {JobStatus.COMPLETED})


class JobNotFound(LookupError):
    pass


class JobConflict(RuntimeError):
    """The job is in a state that does not allow the request (e.g. downloading an unfinished job)."""

    def __init__(self, message: str, status: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # None: the API's own by status (expired, not_ready)


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
        self.signer = UrlSigner(load_key(settings.secret_key, settings.export_dir), settings.download_url_seconds)
        self.ctx = RunContext(settings, db, events, self.encoders, metrics, self.instance_id, source or db, self.signer)
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.running: dict[str, asyncio.Task[JobStatus]] = {}
        self.cancelling: set[str] = set()
        self.last_order = 0
        self.stopping = False
        # One create at a time per user here: the limit is a count, then an insert, and two creates between them
        # would both pass. (Creates through two instances at once can still pass it by one.)
        # Users are the token table's, or the one of open mode: a lock each stays bounded.
        self.creating: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

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
        if self.stopping:  # stopped already, at shutdown before the app's clean-up
            return
        self.stopping = True
        self.wake.set()
        log.info("stopping: %d running job(s) go back to the queue", len(self.running))
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
        await self._settle_records()
        self.encoders.close()

    async def _settle_records(self) -> None:
        """End states still waiting for the database get one last chance, then stop: their jobs keep their
        lease, which runs out, and whichever instance sees that first runs them again."""
        pending = set(self.ctx.background)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=RECORD_STOP_SECONDS)
        for task in late:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if late:
            log.error("%d job end(s) could not be recorded before stopping; those jobs run again later", len(late))

    async def recover(self) -> None:
        """At start-up: queue again the jobs whose lease ran out, and remove files no job needs any more."""
        await self.requeue_expired_leases()
        await self.remove_stale_parts()
        await self.remove_unowned_files()

    async def remove_stale_parts(self) -> None:
        """Remove partial files (and scratch directories) of jobs that are no longer active. A queued job's
        partial file may hold its checkpoint: the run that takes it over goes on from there, and removes the
        partial files it does not need itself."""
        export_dir = Path(self.settings.export_dir)
        parts = {*export_dir.glob("*.part"), *(scratch.with_suffix("") for scratch in export_dir.glob("*.part.tmp"))}
        if not parts:
            return
        active = await self._jobs_in({part.name.split(".", 1)[0] for part in parts}, ACTIVE_VALUES)
        for part in parts:
            if part.name.split(".", 1)[0] not in active and discard_partial(part):
                log.info("removed stale partial file %s", part.name)

    async def _jobs_in(self, ids: Iterable[str], states: Iterable[str]) -> set[str]:
        """Which of the job ids (named by files in the export directory) are in one of states."""
        return {job["_id"] for job in await self.db.find_jobs({"_id": {"$in": sorted(ids)}, "status": {"$in": sorted(states)}})}

    async def requeue_expired_leases(self) -> int:
        """Queue again the running jobs whose instance stopped renewing their lease. The lease is the only
        truth: a job whose lease still runs belongs to a live instance, whether instances share Redis or not."""
        requeued = 0
        for job in await self.db.find_jobs({"status": {"$in": RUNNING_VALUES}, "lease_until": {"$lt": now_ms()}}):
            if job["_id"] in self.running:
                continue  # still running here (its renewals failed in an outage): queued, it would run twice
            # Guarded by the lease as read: an owner that renews it meanwhile keeps its job.
            if await transition(
                self.db, RUNNING, JobStatus.QUEUED, job_id=job["_id"], owner=job.get("owner"),
                fields={"owner": None}, guard={"lease_until": job["lease_until"]},
            ):
                requeued += 1
                log.warning("job %s: its lease ran out on instance %s; queued again", job["_id"], job.get("owner"))
        if requeued:
            self.wake.set()
        return requeued

    async def remove_unowned_files(self) -> int:
        """Remove export files that no active or completed job names (a job that failed or was cancelled after
        its file was renamed, a deleted job whose instance died before removing the file)."""
        files = {m.group(1): path for path in Path(self.settings.export_dir).iterdir() if (m := FINAL_FILE.match(path.name))}
        if not files:
            return 0
        kept = await self._jobs_in(files, FILE_KEEPING_STATES)
        removed = 0
        for job_id, path in files.items():
            if job_id not in kept and path.is_file() and remove_file(path):
                removed += 1
                log.info("removed %s: no completed export names it", path.name)
        return removed

    # --- requests ----------------------------------------------------------------------------
    async def create(self, spec: ExportSpec, user: str) -> dict[str, Any]:
        async with self.creating[user]:
            active = await self.db.count_jobs({"user": user, "status": {"$in": ACTIVE_VALUES}})
            if active >= self.settings.max_active_per_user:
                raise TooManyJobs(self.settings.max_active_per_user)
            doc = new_job_doc(spec, user, "", self._next_order())
            doc["file_name"] = self.file_name(spec, doc)
            await self.db.insert_job(doc)
        log.info("job %s created by %s: %s of %s", doc["_id"], user, spec.format, spec.collection)
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
        return self.snapshot(doc, position)

    def snapshot(self, doc: dict[str, Any], queue_position: int | None = None) -> dict[str, Any]:
        return snapshot(doc, queue_position, self.signer.download_url)

    async def get_doc(self, user: str, job_id: str) -> dict[str, Any]:
        doc = await self.db.get_job(job_id) if _plausible_id(job_id) else None
        if doc is None or doc.get("user") != user:
            raise JobNotFound(job_id)  # another user's job answers as if it did not exist
        return doc

    async def get_signed_doc(self, job_id: str, expires: str, signature: str) -> dict[str, Any]:
        """The job a signed download link names; a SignatureError unless the link is valid for its owner."""
        doc = await self.db.get_job(job_id) if _plausible_id(job_id) else None
        # An unknown job answers like a bad signature: a link tells nothing about jobs it does not sign.
        self.signer.verify(job_id, doc["user"] if doc else "", expires, signature)
        if doc is None:
            raise JobNotFound(job_id)
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

    async def cancel_or_delete(self, user: str, job_id: str, cancel_only: bool = False) -> dict[str, Any]:
        """Cancel an active job, or delete a finished one with its file; with cancel_only, a finished job is left
        as it is (a cancel that comes as the job completes must not delete its file)."""
        doc = await self.get_doc(user, job_id)
        status = JobStatus(doc["status"])
        if not status.active and cancel_only:
            raise JobConflict(f"the export is {status.value}: there is nothing to cancel", status.value, "not_active")
        if not status.active:
            # The record first: were its removal to fail, the job would still name its file, whole. A file left
            # behind by a failure after this is one no job names, which the sweep removes.
            await self.db.delete_job(job_id)
            remove_file(self.path_of(doc))
            log.info("job %s deleted by %s, with its file", job_id, user)
            return {**self.snapshot(doc), "download_url": None, "deleted": True}
        log.info("job %s: cancel asked by %s", job_id, user)
        task = self.running.get(job_id)
        if task is not None:
            # Running here: the runner records the cancel, kills its encoder and removes the .part file.
            self.cancelling.add(job_id)
            task.cancel()
            await asyncio.wait([task], timeout=5)
            # And on to the guarded write below, which finds the job ended when the run recorded its end: a run
            # cancelled before its first step, or inside the write of its own failure, recorded nothing.
        # Queued, or running on another instance, which sees the change at its next write.
        cancelled = await transition(self.db, ACTIVE, JobStatus.CANCELLED, job_id=job_id, fields={"finished_at": now_ms(), "owner": None})
        if cancelled is not None:
            self.metrics.job_ended("cancelled")
            await self.events.emit("export-cancelled", self.snapshot(cancelled), phase="done", waiting_seconds=None)
            return self.snapshot(cancelled)
        return await self.get(user, job_id)

    # --- workers -----------------------------------------------------------------------------
    async def _claim(self) -> dict[str, Any] | None:
        now = now_ms()
        fields = {
            "owner": self.instance_id,
            "instance": self.instance_id,  # kept after the end, to tell which instance ran it
            # This claim's own: the run it starts changes the job only while it holds it, whoever claims it next
            # (this instance included, should another one queue it again after this run's lease ran out).
            "claim": secrets.token_hex(8),
            "lease_until": now + int(self.settings.lease_seconds * 1000),
            "started_at": now,
            "error": None,
        }
        return await transition(self.db, [JobStatus.QUEUED], JobStatus.FETCHING, fields=fields, inc={"attempts": 1})

    def _next_order(self) -> int:
        """Microseconds, bumped on ties: jobs created in the same millisecond keep their order and queue
        positions never tie. Across instances the clock orders them."""
        self.last_order = max(time.time_ns() // 1000, self.last_order + 1)
        return self.last_order

    async def _worker(self) -> None:
        # The flag as well as the cancel: a cancel that lands inside the driver can be swallowed there.
        while not self.stopping:
            try:
                job = await self._claim()
            except DatabaseError as exc:
                log.warning("cannot claim jobs: %s", exc)
                job = None
            if self.stopping:  # the stop came while claiming
                if job is not None:
                    await self._requeue(job)
                return
            if job is None:
                self.wake.clear()
                # asyncio.timeout, not wait_for: wait_for can turn a stop's cancel that meets its own time-out into
                # a plain time-out, and the worker would go on.
                try:
                    async with asyncio.timeout(POLL_SECONDS):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                continue
            try:
                worn = job.get("attempts", 1) > MAX_ATTEMPTS or job.get("stops", 0) >= MAX_STOPS
                await (self._give_up(job) if worn else self._supervise(job))
            except DatabaseError as exc:
                log.warning("job %s: its end could not be handled (%s); its lease decides what comes next", job["_id"], exc)
            except Exception:  # a defect in one job's handling must not end the worker, and with it the queue
                log.exception("job %s: its end could not be handled; its lease decides what comes next", job["_id"])

    async def _supervise(self, job: dict[str, Any]) -> None:
        """Run a claimed job in a task of its own: a user's cancel ends that task, not this worker; a stop
        puts the job back in the queue."""
        job_id = job["_id"]
        try:
            await self._end_stale_run(job_id)
        except asyncio.CancelledError:
            await self._requeue(job)  # the service is stopping: this claim's job goes back to the queue
            raise
        task = asyncio.create_task(run_job(self.ctx, job, lambda: job_id in self.cancelling), name=f"export-{job_id}")
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
            await self._requeue(job)
            raise
        finally:
            if self.running.get(job_id) is task:  # else a run of a later claim of the job, here, has it now
                self.running.pop(job_id)
                self.cancelling.discard(job_id)
            self.metrics.running -= 1

    async def _end_stale_run(self, job_id: str) -> None:
        """A run of this job may still go on here under a claim it lost (its lease renewals failed while another
        instance queued the job again) without having noticed yet: it ends, as at a stop, before the new run
        starts, as the two would share the partial file's name."""
        stale = self.running.get(job_id)
        if stale is not None:
            log.warning("job %s: claimed again while an earlier run of it goes on here; that run ends", job_id)
            stale.cancel()
            await asyncio.wait([stale], timeout=RECORD_STOP_SECONDS)
            if not stale.done():  # handling its outcome, waiting for a silent database: a second cancel cuts it short
                stale.cancel()
                await asyncio.wait([stale])

    async def _requeue(self, job: dict[str, Any]) -> None:
        """Put a job this instance stops back in the queue, with the attempt its claim counted given back: a
        graceful stop (a rolling deploy) is no failure of the export. A crash still counts, its lease runs out."""
        try:
            await transition(
                self.db, RUNNING, JobStatus.QUEUED, job_id=job["_id"], owner=self.instance_id, guard={"claim": job.get("claim")},
                fields={"owner": None}, inc={"attempts": -1, "stops": 1},
            )
        except DatabaseError:
            log.warning("job %s could not be queued again; its lease will expire", job["_id"])

    async def _give_up(self, job: dict[str, Any]) -> None:
        stops = job.get("stops", 0)
        how = f"its instance was stopped {stops} times while it ran" if stops >= MAX_STOPS else f"the export was interrupted {MAX_ATTEMPTS} times"
        error = {"code": "too_many_attempts", "message": how}
        # Guarded like any end: a cancel that came first stays a cancel.
        failed = await transition(
            self.db, [JobStatus.FETCHING], JobStatus.FAILED, job_id=job["_id"], owner=self.instance_id, guard={"claim": job.get("claim")},
            fields={"error": error, "finished_at": now_ms(), "owner": None},
        )
        if failed is None:
            log.info("job %s: not given up, it changed first (now %s)", job["_id"], (await self.db.get_job(job["_id"]) or {}).get("status"))
            return
        self.metrics.job_ended("too_many_attempts")
        await self.events.emit("export-failed", self.snapshot(failed), error=error, phase="done", waiting_seconds=None)

    # --- maintenance -------------------------------------------------------------------------
    async def _maintenance(self) -> None:
        while not self.stopping:
            await asyncio.sleep(min(self.settings.sweep_interval_seconds, self.settings.lease_seconds / 2))
            try:
                await self.sweep()
                await self.requeue_expired_leases()
            except DatabaseError as exc:
                log.warning("maintenance skipped: %s", exc)
            except OSError as exc:  # the export directory failing (gone, a stale network mount): this round only
                log.error("maintenance failed, it runs again in its next round: %s: %s", exc.strerror or exc, exc.filename)
            except Exception:  # a defect: said loudly, and the loop goes on
                log.exception("maintenance failed; it runs again in its next round")

    async def sweep(self) -> int:
        """Retention: completed files past expires_at are removed and their jobs marked expired."""
        expired = 0
        for doc in await self.db.find_jobs({"status": JobStatus.COMPLETED.value, "expires_at": {"$lt": now_ms()}}):
            # The state first: a crash between the two leaves a file no completed job names, which the next
            # sweep removes, never a completed job without its file.
            if await transition(self.db, [JobStatus.COMPLETED], JobStatus.EXPIRED, job_id=doc["_id"]):
                remove_file(self.path_of(doc))
                expired += 1
                log.info("job %s expired; its file was removed", doc["_id"])
        await self.remove_unowned_files()
        await self.remove_stale_parts()
        return expired


def _plausible_id(job_id: str) -> bool:
    return len(job_id) == 24 and all(c in "0123456789abcdef" for c in job_id)
