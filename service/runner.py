"""The export loop of one job: count, cursor, encoder, progress, cancel, finalize.

The loop never looks at the format: the encoder process owns the writer. The encoder holds the batch
it encodes and the next one while the cursor fetches more, so the database and the encoding overlap.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator, Callable, Protocol

from .db import Database, DatabaseError, FindSpec
from .encoder import EncoderError, EncoderPool, EncoderSession
from .events import EventHub
from .jobs import ACTIVE, RUNNING, JobStatus, expiry, now_ms, snapshot
from .metrics import Metrics
from .pipeline import remove_file, remove_partial
from .query import ExportSpec
from .settings import Settings

log = logging.getLogger(__name__)

MIN_EVENT_GAP = 0.1  # at most ten progress events a second
PERSIST_EVERY = 1.0  # progress and lease written to the jobs collection at most once a second
RECORD_RETRY_SECONDS, RECORD_RETRIES = 2.0, 900  # an end state waits up to half an hour for the database


class JobLost(RuntimeError):
    """The job document moved on without us: cancelled elsewhere, or claimed by another instance."""


class BatchSource(Protocol):
    """Where rows come from: the database in service, an in-process generator in the benchmark."""

    async def count(self, spec: FindSpec) -> int: ...

    def raw_batches(self, spec: FindSpec) -> AsyncGenerator[bytes, None]: ...


@dataclass
class RunContext:
    settings: Settings
    db: Database
    events: EventHub
    encoders: EncoderPool
    metrics: Metrics
    instance_id: str
    source: BatchSource
    background: set[asyncio.Task[None]] = field(default_factory=set)


def final_path(export_dir: Path, job_id: str, spec: ExportSpec) -> Path:
    return Path(export_dir) / f"{job_id}.{spec.extension}"


class JobRun:
    def __init__(self, ctx: RunContext, job: dict[str, Any]) -> None:
        self.ctx = ctx
        self.job = job
        self.id: str = job["_id"]
        self.spec = ExportSpec.from_doc(job["spec"])
        self.final_path = final_path(ctx.settings.export_dir, self.id, self.spec)
        # One partial file per instance: a job taken over after a lost lease never shares its file.
        self.part_path = self.final_path.with_name(f"{self.final_path.name}.{ctx.instance_id}.part")
        self.encoder: EncoderSession | None = None
        self.started = time.monotonic()
        self.last_event = 0.0
        self.last_persist = 0.0
        self.lost = False  # set when the lease shows the job was cancelled or claimed elsewhere

    # --- persistence -------------------------------------------------------------------------
    def _owned(self, *statuses: JobStatus) -> dict[str, Any]:
        return {"_id": self.id, "owner": self.ctx.instance_id, "status": {"$in": [s.value for s in statuses]}}

    async def _set(self, fields: dict[str, Any], *expected: JobStatus) -> None:
        """Write fields if the job is still ours and in an expected state; else the job was taken from us."""
        fields = {**fields, "lease_until": self._lease()}
        if not await self.ctx.db.update_job(self._owned(*expected), {"$set": fields}):
            raise JobLost(self.id)
        self.job.update(fields)

    async def keep_lease(self, task: asyncio.Task[Any]) -> None:
        """Renew the lease while the job runs, even when no batch arrives (a slow count or cursor);
        stop the run when the job is no longer ours."""
        interval = self.ctx.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                still_ours = await self.ctx.db.update_job(self._owned(*RUNNING), {"$set": {"lease_until": self._lease()}})
            except DatabaseError:
                continue  # an outage fails the run itself; the lease only matters once the database is back
            if not still_ours:
                self.lost = True
                task.cancel()
                return

    def _lease(self) -> int:
        return now_ms() + int(self.ctx.settings.lease_seconds * 1000)

    async def _emit(self, event: str, **extra: Any) -> None:
        await self.ctx.events.emit(event, snapshot(self.job), **extra)
        self.last_event = time.monotonic()

    # --- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        settings, source = self.ctx.settings, self.ctx.source
        find = FindSpec(
            collection=self.spec.collection,
            filter=self.spec.filter,
            projection=self.spec.projection(),
            sort=self.spec.sort,
            limit=self.spec.limit,
            batch_size=settings.batch_size,
        )
        total = await source.count(find)
        await self._set({"total": total, "processed": 0, "bytes": 0}, JobStatus.FETCHING)
        await self._emit("export-fetching")
        info = {
            "collection": self.spec.collection,
            "filter": snapshot(self.job)["filter"],
            "fields": list(self.spec.fields) if self.spec.fields else None,
            "sort": dict(self.spec.sort),
            "limit": self.spec.limit,
            "total": total,
            "xlsx_max_rows_per_sheet": settings.xlsx_max_rows_per_sheet,
        }
        for stale in self.final_path.parent.glob(f"{self.final_path.name}.*.part"):
            if stale != self.part_path:
                remove_partial(stale)  # left by an instance that lost this job; we own it now
        self.encoder = await self.ctx.encoders.open(self.spec, self.part_path, info)
        processed = 0
        fed = False
        async with aclosing(source.raw_batches(find)) as batches:
            async for raw in batches:
                # feed() returns once the encoder holds this batch; it encodes it while the progress is
                # recorded and the next batch is fetched, so the database, the event loop and the encoder overlap.
                done = await self.encoder.feed(raw)
                fed = True
                if done:
                    processed += done
                    await self._progress(processed)
        if fed:
            processed += await self.encoder.drain()
            await self._progress(processed, force=True)
        await self._finalize(processed)

    async def _progress(self, processed: int, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = max(now - self.started, 1e-6)
        fields = {"processed": processed, "rate": processed / elapsed}
        if self.job["status"] == JobStatus.FETCHING.value:
            await self._set({**fields, "status": JobStatus.PROCESSING.value}, JobStatus.FETCHING)
            self.last_persist = now
        elif force or now - self.last_persist >= PERSIST_EVERY:
            await self._set(fields, JobStatus.PROCESSING)
            self.last_persist = now
        else:
            self.job.update(fields)
        if force or now - self.last_event >= MIN_EVENT_GAP:
            await self._emit("export-processing")

    async def _finalize(self, processed: int) -> None:
        await self._set({"status": JobStatus.FINALIZING.value, "processed": processed}, JobStatus.PROCESSING, JobStatus.FETCHING)
        await self._emit("export-finalizing")
        assert self.encoder is not None
        result = await self.encoder.finish()
        self.encoder = None
        os.replace(self.part_path, self.final_path)
        _fsync_dir(self.final_path.parent)
        finished = now_ms()
        fields = {
            "status": JobStatus.COMPLETED.value,
            "processed": result.rows,
            "total": result.rows,
            "bytes": result.bytes,
            "warnings": list(self.job.get("warnings") or []) + result.warnings,
            "finished_at": finished,
            "expires_at": expiry(finished, self.ctx.settings.ttl_hours),
            "owner": None,
        }
        await self._set(fields, JobStatus.FINALIZING)
        duration = time.monotonic() - self.started
        self.ctx.metrics.job_completed(self.spec.format, result.rows, result.bytes, duration)
        snap = snapshot(self.job)
        await self._emit(
            "export-completed",
            bytes=result.bytes,
            file_name=snap["file_name"],
            download_url=snap["download_url"],
            duration_seconds=round(duration, 3),
            finished_at=snap["finished_at"],
            expires_at=snap["expires_at"],
            warnings=snap["warnings"],
        )

    def discard(self) -> None:
        """Stop the encoder and remove the partial file and the writer's temporary files."""
        if self.encoder is not None:
            self.encoder.kill()
            self.encoder = None
        remove_partial(self.part_path)

    async def _record_later(self, query: dict[str, Any], fields: dict[str, Any]) -> None:
        for _ in range(RECORD_RETRIES):
            await asyncio.sleep(RECORD_RETRY_SECONDS)
            try:
                await self.ctx.db.update_job(query, {"$set": fields})
                log.info("job %s: recorded %s once the database was back", self.id, fields["status"])
                return
            except DatabaseError:
                continue
        log.error("job %s: could not record %s; it is run again at the next start", self.id, fields["status"])

    async def end(self, status: JobStatus, error: dict[str, str] | None = None) -> None:
        """Record a failed or cancelled end and tell the room."""
        self.discard()
        fields: dict[str, Any] = {"status": status.value, "finished_at": now_ms(), "owner": None}
        if error is not None:
            fields["error"] = error
        # The job may already be cancelled by a DELETE; only an active job changes here.
        # Only while it is still ours: another instance may have claimed it after our lease ran out.
        query = self._owned(*ACTIVE)
        try:
            await self.ctx.db.update_job(query, {"$set": fields})
        except DatabaseError:
            # The database is down (often the very reason for the failure): keep trying in the background.
            task = asyncio.create_task(self._record_later(query, fields), name=f"record-{self.id}")
            self.ctx.background.add(task)
            task.add_done_callback(self.ctx.background.discard)
        self.job.update(fields)
        if status == JobStatus.FAILED:
            await self._emit("export-failed", error=error)
        else:
            await self._emit("export-cancelled")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def execute(ctx: RunContext, job: dict[str, Any], cancelled: Callable[[], bool]) -> JobStatus:
    """Run one claimed job to its end state and return it. A cancellation that is not a user's
    cancel (the service is stopping) leaves the job to be run again and propagates."""
    run = JobRun(ctx, job)
    this_task = asyncio.current_task()
    assert this_task is not None
    renewer = asyncio.create_task(run.keep_lease(this_task), name=f"lease-{run.id}")
    try:
        try:
            await run.run()
        finally:
            # Stopped before any outcome is handled: a lease check that finds the job gone (as the run's own
            # JobLost may have just done) must not cancel the handling below halfway.
            renewer.cancel()
        return JobStatus.COMPLETED
    except asyncio.CancelledError:
        if run.lost:
            return await _taken_over(ctx, run)
        if cancelled():
            await run.end(JobStatus.CANCELLED)
            ctx.metrics.job_ended("cancelled")
            return JobStatus.CANCELLED
        run.discard()
        raise
    except JobLost:
        return await _taken_over(ctx, run)
    except DatabaseError as exc:
        log.warning("job %s failed: %s", run.id, exc)
        return await _fail(ctx, run, exc.code, str(exc))
    except EncoderError as exc:
        log.warning("job %s failed in the encoder: %s", run.id, exc.message)
        return await _fail(ctx, run, exc.code, exc.message)
    except OSError as exc:
        log.exception("job %s failed writing its file", run.id)
        return await _fail(ctx, run, "disk_error", f"cannot write export file: {exc.strerror or exc}")
    except Exception as exc:  # a defect must not leave the job active forever: fail it, loudly
        log.exception("job %s failed unexpectedly", run.id)
        return await _fail(ctx, run, "internal_error", f"internal error: {exc.__class__.__name__}")


async def _fail(ctx: RunContext, run: JobRun, code: str, message: str) -> JobStatus:
    ctx.metrics.job_ended(code)
    await run.end(JobStatus.FAILED, {"code": code, "message": message})
    return JobStatus.FAILED


async def _taken_over(ctx: RunContext, run: JobRun) -> JobStatus:
    """The job document says someone else decides now: a user cancelled it, or another instance
    claimed it after our lease ran out. Stop without touching its state."""
    run.discard()
    current = await ctx.db.get_job(run.id)
    status = JobStatus(current["status"]) if current else JobStatus.CANCELLED
    if status == JobStatus.CANCELLED:
        remove_file(run.final_path)  # cancelled while finalizing: the file must not outlive the job
        run.job.update(current or {})
        await run._emit("export-cancelled")
    log.info("job %s was taken over (now %s); this instance stops running it", run.id, status.value)
    return status
