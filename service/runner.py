"""The export loop of one job: count, cursor, encoder, progress, cancel, finalize.

The loop never looks at the format: the encoder process owns the writer. The encoder holds the batch
it encodes and the next one while the cursor fetches more, so the database and the encoding overlap.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncGenerator, Callable, Coroutine, Iterable, Protocol

from .db import Database, DatabaseError, FindSpec
from .encoder import EncoderError, EncoderPool, EncoderSession
from .events import EventHub
from .jobs import ACTIVE, RUNNING, JobStatus, expiry, now_ms, snapshot, transition
from .metrics import Metrics
from .files import CheckpointGone, discard_partial, final_path, part_path, remove_file
from .query import ExportSpec, ValidationError, check_exportable
from .resume import ResumePlan, after, export_order, last_key, plan, resumable
from .settings import Settings
from .signing import UrlSigner

log = logging.getLogger(__name__)

MIN_EVENT_GAP = 0.1  # at most ten progress events a second
PERSIST_EVERY = 1.0  # progress and lease written to the jobs collection at most once a second
RATE_WINDOW = 5.0  # seconds of progress the rate (and so the time left) is taken over
OWNERSHIP_CHECK_SECONDS = 2.0  # the lease is renewed at least this often, which tells a run it was cancelled elsewhere
RECORD_RETRY_SECONDS, RECORD_RETRIES = 2.0, 900  # an end state waits up to half an hour for the database
# While nothing else is said, the current state is sent again this often: the page never looks frozen for
# a second, whatever the database or the encoder is doing.
HEARTBEAT_SECONDS = 0.6
COUNT_GRACE_SECONDS = 5.0  # a server that ignores maxTimeMS gets this long past it before the count is abandoned
STATUS_EVENTS = {
    JobStatus.FETCHING: "export-fetching",
    JobStatus.PROCESSING: "export-processing",
    JobStatus.FINALIZING: "export-finalizing",
}


class JobLost(RuntimeError):
    """The job document moved on without us: cancelled elsewhere, or claimed by another instance."""


class BatchSource(Protocol):
    """Where rows come from: the database in service, an in-process generator in the benchmark."""

    async def count(self, spec: FindSpec) -> int: ...  # may honour spec.count_max_time_ms

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
    signer: UrlSigner
    background: set[asyncio.Task[None]] = field(default_factory=set)


class JobRun:
    def __init__(self, ctx: RunContext, job: dict[str, Any]) -> None:
        self.ctx = ctx
        self.job = job
        self.id: str = job["_id"]
        # The job is this run's while it is held by this instance under this claim: the same instance may claim
        # it again after another one queued it again (this run's renewals failing longer than the lease).
        self.claim: str | None = job.get("claim")
        self.spec = ExportSpec.from_doc(job["spec"])
        self.final_path = final_path(ctx.settings.export_dir, self.id, self.spec)
        # One partial file per instance: a job taken over after a lost lease never shares its file.
        self.part_path = part_path(self.final_path, ctx.instance_id)
        self.encoder: EncoderSession | None = None
        self.started = time.monotonic()
        # (time, rows) of this run's progress over the last RATE_WINDOW seconds, from its first rows on: the rate
        # leaves out the wait for the first batch (a count, a sort). Until they span enough time, the rate is of the
        # rows this run read since it started; never of those a checkpoint brought.
        self.samples: deque[tuple[float, int]] = deque()
        self.rate_since, self.rate_base = self.started, 0
        self.last_event = 0.0
        self.last_persist = 0.0
        self.waiting_since: float | None = None  # when the run began waiting for the database, while it waits
        self.unsaved_total: int | None = None  # the count, arrived and not persisted yet
        self.renamed = False  # the final file is ours: it goes if the job is recorded as ended otherwise
        self.lost = False  # set when the lease shows the job was cancelled or claimed elsewhere
        self.completing = False  # the completed state is being written: the lease no longer matters
        self.announced = False  # the completion was counted and told: a cancel landing after that must not repeat it

    # --- persistence -------------------------------------------------------------------------
    async def _change(self, fields: dict[str, Any], expected: Iterable[JobStatus], to: JobStatus | None = None) -> None:
        """Write fields (and move to `to`) if the job is still ours and in an expected state; else it was taken."""
        fields = {**fields, "lease_until": self._lease()}
        doc = await transition(self.ctx.db, expected, to, fields=fields, **self._ours())
        if doc is None:
            raise JobLost(self.id)
        self.last_persist = time.monotonic()  # the lease is renewed, and the job found still ours
        self.job.update(doc)
        if self.unsaved_total is not None:  # counted while this write was on its way: the stored null is older
            self.job["total"] = self.unsaved_total

    async def keep_lease(self, task: asyncio.Task[Any]) -> None:
        """Renew the lease while the job runs, even when no batch arrives (a slow count or cursor);
        stop the run when the job is no longer ours (cancelled, or claimed elsewhere)."""
        # Often enough that a cancel through another instance stops this run within seconds, whatever the lease.
        interval = min(self.ctx.settings.lease_seconds / 3, OWNERSHIP_CHECK_SECONDS)
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - self.last_persist < interval:
                continue  # the run's own writes, guarded the same way, renewed it and found the job still ours
            try:
                still_ours = await transition(self.ctx.db, RUNNING, fields={"lease_until": self._lease()}, **self._ours())
            except DatabaseError:
                continue  # an outage fails the run itself; the lease only matters once the database is back
            if still_ours is None:
                if self.completing:  # it met the completed state this run wrote; a real loss fails that write
                    return
                self.lost = True
                task.cancel()
                return

    def _ours(self) -> dict[str, Any]:
        """What transition() is given to change the job only while it is still this run's."""
        return {"job_id": self.id, "owner": self.ctx.instance_id, "guard": {"claim": self.claim}}

    def _lease(self) -> int:
        return now_ms() + int(self.ctx.settings.lease_seconds * 1000)

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.job, sign=self.ctx.signer.download_url)

    async def emit(self, event: str, **extra: Any) -> None:
        """Tell the job's room; every event says what the run is doing (phase) and how long it has waited."""
        now = time.monotonic()
        extra.setdefault("phase", self._phase())
        extra.setdefault("waiting_seconds", round(now - self.waiting_since, 1) if self.waiting_since is not None else None)
        await self.ctx.events.emit(event, self.snapshot(), **extra)
        self.last_event = now

    def _phase(self) -> str:
        if self.job["status"] == JobStatus.FINALIZING.value:
            return "finalizing"
        return "waiting_for_database" if self.waiting_since is not None else "writing"

    async def heartbeat(self) -> None:
        """Progress is never quiet for long: while the run waits (for the database, the encoder, the file
        system), the current state is sent again with its phase and the time waited so far."""
        while True:
            await asyncio.sleep(max(0.05, self.last_event + HEARTBEAT_SECONDS - time.monotonic()))
            event = STATUS_EVENTS.get(JobStatus(self.job["status"]))
            if event is None:  # ended: its last event says so
                return
            if time.monotonic() - self.last_event >= HEARTBEAT_SECONDS * 0.95:
                await self.emit(event)

    # --- the loop ----------------------------------------------------------------------------
    def _find(self, resume: ResumePlan | None) -> FindSpec:
        settings = self.ctx.settings
        order = export_order(self.spec)
        query = self.spec.filter
        if resume is not None:  # the rows after the checkpoint's last one
            query = {"$and": [query, after(order, resume.key)]} if query else after(order, resume.key)
        return FindSpec(
            collection=self.spec.collection,
            filter=query,
            projection=self.spec.projection(),
            sort=order,
            limit=self.spec.limit,  # an export with a limit is never resumed (resumable())
            batch_size=settings.batch_size,
            max_time_ms=settings.query_max_time_ms,
            count_max_time_ms=settings.count_max_time_ms,
            pipeline=self.spec.pipeline,
        )

    async def _count(self, find: FindSpec) -> int | None:
        """The total, counted beside the cursor; None when the count runs out of time or fails (the export
        goes on with an indeterminate bar, and the cursor reports a real problem itself)."""
        if self.spec.pipeline_json is not None and not self.spec.count:
            return None  # a pipeline's output is counted only when asked: counting runs the whole pipeline once more
        limit = find.count_max_time_ms / 1000 + COUNT_GRACE_SECONDS if find.count_max_time_ms else None
        try:
            async with asyncio.timeout(limit):
                total = await self.ctx.source.count(find)
        except (DatabaseError, TimeoutError) as exc:
            log.warning("job %s: no total, the count did not finish: %s", self.id, exc or "client-side time limit")
            return None
        self.job["total"] = self.unsaved_total = total
        return total

    async def export(self) -> None:
        """Read the rows and write the file: start (or resume), count beside the cursor, copy, finalize. A resumed
        file that does not hold every row is written again from the first row."""
        settings = self.ctx.settings
        check_exportable(self.spec, settings.jobs_collection, settings.collections)
        resume = plan(self.job, self.spec, settings.export_dir)
        processed = await self._resumed(resume) if resume is not None else None
        if processed is None:
            processed, _ = await self._read(None)
        await self._finalize(processed)

    async def _resumed(self, resume: ResumePlan) -> int | None:
        """The rows in the file when the run went on from the checkpoint; None when it must start again from the
        first row: the checkpoint's file went away before it was copied, or the resumed file misses rows."""
        try:
            processed, total = await self._read(resume)
        except EncoderError as exc:
            if exc.code != CheckpointGone.code:
                raise
            log.warning("job %s: %s; writing it again from the first row", self.id, exc.message)
            self.discard()
            return None
        if processed != total:
            log.warning("job %s: resumed at row %d, it holds %d rows of %s; writing it again from the first row",
                        self.id, resume.rows, processed, "an unknown number" if total is None else total)
            self.discard()
            return None
        return processed

    async def _read(self, resume: ResumePlan | None) -> tuple[int, int | None]:
        """Write the partial file from the first row or from resume; the rows in it, and the total when this run
        resumed. The resume filter only matches rows after the checkpoint's key (MongoDB compares within one BSON
        type, as it sorts), so as many rows as the total means none was left out; fewer means the key's values
        are of several types, or the server compares otherwise than it sorts (the embedded one, integer _id)."""
        await self._start(resume)
        find = self._find(resume)
        # The total is of the whole export, whatever part of it this run reads.
        counting = asyncio.create_task(self._count(self._find(None)), name=f"count-{self.id}")
        try:
            if self.spec.json.envelope and self.spec.format == "json" and resume is None:
                await asyncio.shield(counting)  # the envelope's header names the total
            point = resume.point if resume is not None else None
            self.encoder = await self.ctx.encoders.open(self.spec, self.part_path, self._info(), point)
            if resume is not None:
                await self._adopt(resume)
            await self._clear_stale_parts()
            processed = await self._copy_rows(find, resume.rows if resume is not None else 0)
            total = await self._total(counting) if resume is not None else None
        finally:
            counting.cancel()
        return processed, total

    async def _total(self, counting: "asyncio.Task[int | None]") -> int | None:
        """The count beside the cursor, or, when it ran out of time, one given the cursor's time limit."""
        total = await asyncio.shield(counting)
        if total is not None:
            return total
        find = self._find(None)
        return await self._count(replace(find, count_max_time_ms=find.max_time_ms))

    async def _start(self, resume: ResumePlan | None) -> None:
        """Record where this run starts: row one, or a checkpoint (and how many rows past it the run before
        this one had read, which are read again now)."""
        resumed = None
        if resume is not None:
            reread = max(0, int(self.job.get("processed") or 0) - resume.rows)
            resumed = {"rows": resume.rows, "bytes": resume.point.bytes, "reread_rows": reread}
            log.info("job %s: resuming at row %d (byte %d); %d rows are read again", self.id, resume.rows, resume.point.bytes, reread)
        fields = {"processed": resume.rows if resume else 0, "total": None, "bytes": 0, "rate": None, "resumed_from": resumed}
        self.samples.clear()
        self.rate_since, self.rate_base = time.monotonic(), fields["processed"]
        if resume is None:
            fields["checkpoint"] = None
        # Processing already when a resumed file came out short and is written again.
        await self._change(fields, [JobStatus.FETCHING, JobStatus.PROCESSING])
        self.waiting_since = time.monotonic()
        await self.emit("export-fetching")

    def _info(self) -> dict[str, Any]:
        snap = self.snapshot()
        return {
            "collection": self.spec.collection,
            "filter": snap["filter"],
            "fields": list(self.spec.fields) if self.spec.fields else None,
            "sort": dict(self.spec.sort),
            "limit": self.spec.limit,
            **({"pipeline": snap["pipeline"]} if self.spec.pipeline_json is not None else {}),
            "total": self.job.get("total"),
        }

    async def _adopt(self, resume: ResumePlan) -> None:
        """The checkpoint's rows are in this run's partial file now: made durable there, the checkpoint names
        that file before the one they were copied from is removed, so a stop or a crash before this run's first
        checkpoint still leaves a file to go on from."""
        assert self.encoder is not None
        _, state = await self.encoder.checkpoint()  # no rows fed yet: only flushes and fsyncs the copied bytes
        await asyncio.to_thread(_fsync_dir, self.part_path.parent)  # and the new file's name, before the checkpoint names it
        point = {"part": self.part_path.name, **state, "key": resume.key}
        await self._change({"checkpoint": point}, [JobStatus.FETCHING, JobStatus.PROCESSING])

    async def _clear_stale_parts(self) -> None:
        for stale in self.final_path.parent.glob(f"{self.final_path.name}.*.part"):
            if stale != self.part_path:
                discard_partial(stale)  # left by an instance that lost this job; we own it now

    async def _copy_rows(self, find: FindSpec, processed: int) -> int:
        assert self.encoder is not None
        checkpoint_every = self.ctx.settings.checkpoint_batches if resumable(self.spec) else 0
        batches_fed = 0
        fed = False
        async with aclosing(self.ctx.source.raw_batches(find)) as batches:
            while True:
                self.waiting_since = time.monotonic()
                try:
                    raw = await anext(batches)
                except StopAsyncIteration:
                    break
                finally:
                    self.waiting_since = None
                if not raw:
                    continue  # an empty batch (a source may send one) holds no rows, and the encoder reads it as the end
                # feed() returns once the encoder holds this batch; it encodes it while the progress is
                # recorded and the next batch is fetched, so the database, the event loop and the encoder overlap.
                done = await self.encoder.feed(raw)
                fed = True
                batches_fed += 1
                if checkpoint_every and batches_fed % checkpoint_every == 0:
                    processed = await self._checkpoint(processed + done, raw, find.sort)
                elif done:
                    processed += done
                    await self._progress(processed)
        if fed:
            processed += await self.encoder.drain()
            await self._progress(processed, last=True)
        return processed

    async def _checkpoint(self, processed: int, last_raw: bytes, order: Any) -> int:
        """Make the file whole and durable up to the last batch fed, and record where a new owner can go on."""
        assert self.encoder is not None
        rows, state = await self.encoder.checkpoint()
        point = {"part": self.part_path.name, **state, "key": last_key(last_raw, order)}
        await self._progress(processed + rows, persist=True, extra={"checkpoint": point})
        return processed + rows

    def _rate(self, now: float, processed: int) -> float:
        """Rows a second over the last RATE_WINDOW seconds; over the whole run while the rows span under a second
        (a short export's one or two batches)."""
        samples = self.samples
        samples.append((now, processed))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:  # one sample stays older than the window
            samples.popleft()
        then, rows = samples[0]
        if now - then >= 1.0:
            return (processed - rows) / (now - then)
        return (processed - self.rate_base) / max(now - self.rate_since, 1e-6)

    async def _progress(self, processed: int, persist: bool = False, extra: dict[str, Any] | None = None, last: bool = False) -> None:
        """Record progress (in the job's record when persist, last, or PERSIST_EVERY has passed) and tell the room,
        at most every MIN_EVENT_GAP; the export's last progress is always told, once that gap has passed."""
        persist = persist or last
        now = time.monotonic()
        fields: dict[str, Any] = {"processed": processed, "rate": self._rate(now, processed), **(extra or {})}
        if self.unsaved_total is not None:
            fields["total"] = self.unsaved_total
        if self.job["status"] == JobStatus.FETCHING.value:
            await self._change(fields, [JobStatus.FETCHING], JobStatus.PROCESSING)
        elif persist or now - self.last_persist >= PERSIST_EVERY:
            await self._change(fields, [JobStatus.PROCESSING])
        else:
            self.job.update(fields)
            fields = {}
        if "total" in fields:  # persisted now; a count that came in while the write was on its way is not
            self.unsaved_total = None
        if last:
            await asyncio.sleep(max(0.0, self.last_event + MIN_EVENT_GAP - time.monotonic()))
        if last or time.monotonic() - self.last_event >= MIN_EVENT_GAP:
            await self.emit("export-processing")

    async def _finalize(self, processed: int) -> None:
        await self._change({"processed": processed}, [JobStatus.PROCESSING, JobStatus.FETCHING], JobStatus.FINALIZING)
        await self.emit("export-finalizing")
        assert self.encoder is not None
        result = await self.encoder.finish()
        self.encoder = None
        os.replace(self.part_path, self.final_path)
        self.renamed = True
        _fsync_dir(self.final_path.parent)
        finished = now_ms()
        fields = {
            "processed": result.rows,
            "total": result.rows,
            "bytes": result.bytes,
            "warnings": list(self.job.get("warnings") or []) + result.warnings,
            "finished_at": finished,
            "expires_at": expiry(finished, self.ctx.settings.ttl_hours),
            "owner": None,
        }
        self.completing = True
        await self._change(fields, [JobStatus.FINALIZING], JobStatus.COMPLETED)
        self.renamed = False  # the completed job names the file now; run_job tells it

    async def _completed(self) -> None:
        """Count the completed export and tell the room, from the job as recorded."""
        self.announced = True
        duration = time.monotonic() - self.started
        self.ctx.metrics.job_completed(self.spec.format, self.job["processed"], self.job["bytes"], duration)
        log.info("job %s completed: %d rows, %d bytes in %.1f s", self.id, self.job["processed"], self.job["bytes"], duration)
        snap = self.snapshot()
        await self.emit(
            "export-completed",
            bytes=snap["bytes"],
            file_name=snap["file_name"],
            download_url=snap["download_url"],
            duration_seconds=round(duration, 3),
            finished_at=snap["finished_at"],
            expires_at=snap["expires_at"],
            warnings=snap["warnings"],
            phase="done",
            waiting_seconds=None,
        )

    def discard(self) -> None:
        """Stop the encoder and remove the partial file and the writer's temporary files. A renamed final file
        stays: the job may have been recorded completed even when the reply was lost; record_end removes it
        once it has recorded another end, and the sweep removes any file no active or completed job names."""
        self._kill_encoder()
        discard_partial(self.part_path)

    def _kill_encoder(self) -> None:
        if self.encoder is not None:
            self.encoder.kill()
            self.encoder = None

    def stop(self) -> None:
        """The service is stopping and the job goes back to the queue: stop the encoder. The partial file stays
        when this run's last checkpoint describes it, for the next run to go on from as after a crash."""
        point = self.job.get("checkpoint") or {}
        if point.get("part") != self.part_path.name or not resumable(self.spec):
            self.discard()
        else:
            self._kill_encoder()

    async def _record_later(self, status: JobStatus, fields: dict[str, Any]) -> None:
        """Record the end once the database is back, and only then count it and tell the room: the job may have
        completed meanwhile (the completed write landed, its reply was lost), or run out its lease and be queued."""
        for _ in range(RECORD_RETRIES):
            await asyncio.sleep(RECORD_RETRY_SECONDS)
            try:
                recorded = await transition(self.ctx.db, ACTIVE, status, fields=fields, **self._ours())
            except DatabaseError:
                continue
            if recorded is None:
                log.info("job %s: not recorded %s, it had ended or moved on meanwhile", self.id, status.value)
                # Its partial file went when the end was first tried; the name may be a new run's now.
                await self._judge_takeover()
            else:
                log.info("job %s: recorded %s once the database was back", self.id, status.value)
                await self._ended(status, fields)
            return
        log.error("job %s: could not record %s; it is run again once its lease runs out", self.id, status.value)

    async def record_end(self, status: JobStatus, error: dict[str, str] | None = None) -> JobStatus:
        """Record a failed or cancelled end, then count it and tell the room, and return it; when the job is no longer
        this run's to end (completed, cancelled or claimed meanwhile), stop as taken over and return what it is."""
        self.discard()
        fields: dict[str, Any] = {"finished_at": now_ms(), "owner": None}
        if error is not None:
            fields["error"] = error
        # Only an active job that is still ours changes here: a DELETE may have cancelled it, the completed
        # state may have been written before a lost reply, another instance may have claimed it.
        try:
            recorded = await transition(self.ctx.db, ACTIVE, status, fields=fields, **self._ours())
        except DatabaseError:
            # The database is down (often the very reason for the failure): keep trying in the background, and
            # say nothing until then, as what is recorded may turn out otherwise.
            task = asyncio.create_task(self._record_later(status, fields), name=f"record-{self.id}")
            self.ctx.background.add(task)
            task.add_done_callback(self.ctx.background.discard)
            return status
        if recorded is None:
            return await self.taken_over()
        await self._ended(status, fields)
        return status

    async def _ended(self, status: JobStatus, fields: dict[str, Any]) -> None:
        """The failed or cancelled end is recorded: remove the file this run renamed, count it, tell the room."""
        if self.renamed:
            remove_file(self.final_path)
            self.renamed = False
        error = fields.get("error")
        self.ctx.metrics.job_ended(error["code"] if error is not None else "cancelled")
        self.job.update(fields, status=status.value)
        self.waiting_since = None
        if status == JobStatus.FAILED:
            await self.emit("export-failed", error=error, phase="done")
        else:
            await self.emit("export-cancelled", phase="done")

    async def taken_over(self) -> JobStatus:
        """The job document says someone else decides now: a user cancelled it, or another instance claimed
        it after our lease ran out. Stop without touching its state."""
        self.discard()
        return await self._judge_takeover()

    async def _judge_takeover(self) -> JobStatus:
        """What the job is now, and what this run still has to do about it: tell its own completion, or a
        cancel, and remove a file it renamed that no job will name."""
        try:
            current = await self.ctx.db.get_job(self.id)
        except DatabaseError as exc:
            log.warning("job %s was taken over; its state cannot be read: %s", self.id, exc)
            return JobStatus(self.job["status"])  # a renamed file stays for the sweep to judge
        status = JobStatus(current["status"]) if current else JobStatus.CANCELLED
        if self.renamed and not status.active and status != JobStatus.COMPLETED:
            remove_file(self.final_path)  # the job ended otherwise for good: nothing will name this file
        self.renamed = False  # else the file is the completed job's, or an active job's new owner's
        # Not when told already: a cancel may land while the completion is being told.
        if status == JobStatus.COMPLETED and self.completing and current is not None and not self.announced:
            self.job.update(current)  # this run's own completion, whose reply a cancel or an outage cut short
            await self._completed()
        elif status == JobStatus.CANCELLED:
            self.job.update(current or {})
            await self.emit("export-cancelled", phase="done", waiting_seconds=None)
        log.info("job %s was taken over (now %s); this instance stops running it", self.id, status.value)
        return status


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def run_job(ctx: RunContext, job: dict[str, Any], cancelled: Callable[[], bool]) -> JobStatus:
    """Run one claimed job to its end state and return it. A cancellation that is not a user's
    cancel (the service is stopping) leaves the job to be run again and propagates."""
    run = JobRun(ctx, job)
    this_task = asyncio.current_task()
    assert this_task is not None
    helpers = [
        asyncio.create_task(run.keep_lease(this_task), name=f"lease-{run.id}"),
        asyncio.create_task(run.heartbeat(), name=f"heartbeat-{run.id}"),
    ]
    limit = ctx.settings.job_timeout_seconds or None
    deadline = asyncio.timeout(limit)
    outcome: Coroutine[Any, Any, JobStatus]
    try:
        try:
            async with deadline:
                await run.export()
        finally:
            # Stopped before any outcome is handled: a lease check that finds the job gone (as the run's own
            # JobLost may have just done) must not cancel the handling below halfway.
            for helper in helpers:
                helper.cancel()
        outcome = _done(run)
    except asyncio.CancelledError:
        outcome = _cancelled(run, cancelled)
    except Exception as exc:
        # A cancel that landed inside a library and came out as its own error (the driver reports a
        # connection it closed on the way out): still the cancel, not a failure of the export.
        cancel = this_task.cancelling() > 0
        outcome = _cancelled(run, cancelled) if cancel else _failed(run, exc, limit if deadline.expired() else None)
    return await _settle(run, outcome, cancelled)


async def _settle(run: JobRun, outcome: Coroutine[Any, Any, JobStatus], cancelled: Callable[[], bool]) -> JobStatus:
    """Handle the run's outcome in a task of its own, which a user's cancel cannot cut short halfway: an end
    recorded but neither told nor counted, a completion told twice. A stop waits for it as well, then goes on
    cancelling, so the worker queues the job again if it is still running; a second cancel of a stop that
    found it waiting (on a silent database) ends it."""
    handling = asyncio.create_task(outcome, name=f"outcome-{run.id}")
    stopping = False
    while True:
        try:
            status = await asyncio.shield(handling)
        except asyncio.CancelledError:
            if handling.cancelled():  # the handling's own: a stop found while the export ran
                raise
            if stopping:
                handling.cancel()
                raise
            stopping = not cancelled()
            continue
        if stopping:
            raise asyncio.CancelledError
        return status


async def _done(run: JobRun) -> JobStatus:
    await run._completed()
    return JobStatus.COMPLETED


async def _cancelled(run: JobRun, cancelled: Callable[[], bool]) -> JobStatus:
    """The run's task was cancelled: the job was taken over, a user cancelled it, or the service is stopping,
    which leaves the job to be run again and goes on cancelling."""
    if run.lost:
        return await run.taken_over()
    if cancelled():
        return await run.record_end(JobStatus.CANCELLED)
    run.stop()
    raise asyncio.CancelledError


async def _failed(run: JobRun, exc: Exception, expired_limit: float | None) -> JobStatus:
    """Record why the export failed; expired_limit is EXPORT_JOB_TIMEOUT_SECONDS when that ended it."""
    if isinstance(exc, TimeoutError) and expired_limit is not None:
        log.warning("job %s ran out of time after %s s", run.id, expired_limit)
        return await _fail(run, "timeout", f"the export did not finish within {expired_limit:g} s (EXPORT_JOB_TIMEOUT_SECONDS)")
    if isinstance(exc, JobLost):
        return await run.taken_over()
    if isinstance(exc, DatabaseError):
        log.warning("job %s failed: %s", run.id, exc)
        return await _fail(run, exc.code, str(exc))
    if isinstance(exc, ValidationError):
        log.warning("job %s may not run: %s", run.id, exc.message)
        return await _fail(run, exc.code, exc.message)
    if isinstance(exc, EncoderError):
        log.warning("job %s failed in the encoder: %s", run.id, exc.message)
        return await _fail(run, exc.code, exc.message)
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
        log.error("job %s failed writing its file: %s", run.id, exc)  # an operator's matter (a full disk): no traceback
        return await _fail(run, "disk_error", f"cannot write export file: {exc.strerror or exc}")
    # A defect must not leave the job active forever: fail it, loudly.
    return await _fail_unexpected(run, exc)


async def _fail_unexpected(run: JobRun, exc: BaseException) -> JobStatus:
    log.error("job %s failed unexpectedly", run.id, exc_info=exc)
    return await _fail(run, "internal_error", f"internal error: {exc.__class__.__name__}")


async def _fail(run: JobRun, code: str, message: str) -> JobStatus:
    log.info("job %s fails with %s", run.id, code)  # the line above says why, in words
    return await run.record_end(JobStatus.FAILED, {"code": code, "message": message})
