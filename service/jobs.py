"""Job states, the job document stored in MongoDB, and the snapshot clients see."""
from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import orjson
from bson import json_util

from .query import RELAXED, ExportSpec, ejson_loads

if TYPE_CHECKING:  # jobs.py is imported by the encoder processes, which need no driver
    from .db import Database


class JobStatus(str, Enum):
    QUEUED = "queued"
    FETCHING = "fetching"
    PROCESSING = "processing"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def active(self) -> bool:
        return self in ACTIVE

    @property
    def running(self) -> bool:
        return self in RUNNING


RUNNING = frozenset({JobStatus.FETCHING, JobStatus.PROCESSING, JobStatus.FINALIZING})
ACTIVE = RUNNING | {JobStatus.QUEUED}
ACTIVE_VALUES = [s.value for s in ACTIVE]
RUNNING_VALUES = [s.value for s in RUNNING]

# Every state change a job may make. A running job goes back to the queue when its instance stops or its lease
# runs out; a finished job changes only by expiring.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.FETCHING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.FETCHING: frozenset({JobStatus.PROCESSING, JobStatus.FINALIZING, JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.PROCESSING: frozenset({JobStatus.FINALIZING, JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.FINALIZING: frozenset({JobStatus.COMPLETED, JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.COMPLETED: frozenset({JobStatus.EXPIRED}),
}


class _Anyone:
    def __repr__(self) -> str:
        return "ANYONE"


ANYONE: Any = _Anyone()  # transition(owner=ANYONE): whoever owns the job, or nobody


async def transition(
    db: "Database",
    expected: Iterable[JobStatus],
    to: JobStatus | None = None,
    *,
    job_id: str | None = None,
    owner: str | None = ANYONE,
    fields: Mapping[str, Any] | None = None,
    inc: Mapping[str, int] | None = None,
    guard: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The one way a job document changes: atomically, and only if it is still in one of the expected states,
    held by owner (None: by no one; ANYONE: not checked) and matching guard. Returns the document as updated,
    or None when the job moved on first (a concurrent cancel, another instance's claim): the caller lost.

    to=None writes fields without a change of state (progress, the lease). Without job_id the oldest job in
    queue order that matches is taken (a claim)."""
    expected = frozenset(expected)
    if to is not None:
        illegal = [s.value for s in expected if to not in TRANSITIONS.get(s, frozenset())]
        if illegal:
            raise ValueError(f"no transition from {', '.join(sorted(illegal))} to {to.value}")
    query: dict[str, Any] = {"status": {"$in": sorted(s.value for s in expected)}, **(guard or {})}
    if job_id is not None:
        query["_id"] = job_id
    if owner is not ANYONE:
        query["owner"] = owner
    update: dict[str, Any] = {"$set": {**(fields or {}), **({"status": to.value} if to is not None else {})}}
    if inc:
        update["$inc"] = dict(inc)
    return await db.change_job(query, update, oldest_first=job_id is None)


def now_ms() -> int:
    """Job times are stored as epoch milliseconds: they compare and sort the same on every server
    (the embedded one turns a datetime written by $set into text)."""
    return int(time.time() * 1000)


def new_job_id() -> str:
    return secrets.token_hex(12)


def new_job_doc(spec: ExportSpec, user: str, file_name: str, order: int) -> dict[str, Any]:
    return {
        "_id": new_job_id(),
        "status": JobStatus.QUEUED.value,
        "user": user,
        "spec": spec.to_doc(),
        "file_name": file_name,
        "processed": 0,
        "total": None,
        "bytes": 0,
        "rate": None,
        "error": None,
        "warnings": [],
        "attempts": 0,
        "owner": None,
        "lease_until": None,
        "created_at": now_ms(),
        "order": order,  # the queue position: strictly increasing, unlike created_at
        "started_at": None,
        "finished_at": None,
        "expires_at": None,
    }


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    value = datetime.fromtimestamp(ms / 1000, timezone.utc)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def percent(processed: int, total: int | None) -> float | None:
    if not total:
        return 100.0 if total == 0 else None
    return round(min(100.0, 100.0 * processed / total), 1)


def eta(processed: int, total: int | None, rate: float | None) -> float | None:
    if total is None or not rate:
        return None
    return round(max(0, total - processed) / rate, 1)


def snapshot(doc: Mapping[str, Any], queue_position: int | None = None, sign: Callable[[str, str], str] | None = None) -> dict[str, Any]:
    """The job as the API and the events show it; once completed, with the download link sign(job id, owner)
    gives (signed only then: progress events, sent many times a second, need none)."""
    spec = ExportSpec.from_doc(doc["spec"])
    status = JobStatus(doc["status"])
    processed = int(doc.get("processed") or 0)
    total = doc.get("total")
    rate = doc.get("rate")
    snap: dict[str, Any] = {
        "id": doc["_id"],
        "status": status.value,
        "collection": spec.collection,
        "format": spec.format,
        **_query_of(spec),
        "limit": spec.limit,
        "options": {
            "csv": {
                "delimiter": spec.csv.delimiter,
                "header": spec.csv.header,
                "bom": spec.csv.bom,
                "escape_formulas": spec.csv.escape_formulas,
            },
            "json": {"mode": spec.json.mode, "envelope": spec.json.envelope},
            "parquet": {"row_group_size": spec.parquet.row_group_size, "compression": spec.parquet.compression},
            "compress": spec.compress,
        },
        "processed": processed,
        "total": total,
        "percent": 100.0 if status == JobStatus.COMPLETED else percent(processed, total),
        "rate": round(rate, 1) if rate else None,
        "eta_seconds": eta(processed, total, rate) if status.running else None,
        "bytes": int(doc.get("bytes") or 0),
        "file_name": doc.get("file_name"),
        "download_url": sign(doc["_id"], doc["user"]) if sign is not None and status == JobStatus.COMPLETED else None,
        "error": doc.get("error"),
        "warnings": list(doc.get("warnings") or []),
        "resumed_from": doc.get("resumed_from"),  # {rows, bytes, reread_rows} when a run went on from a checkpoint
        "run": run_number(doc),
        "created_at": iso(doc.get("created_at")),
        "started_at": iso(doc.get("started_at")),
        "finished_at": iso(doc.get("finished_at")),
        "expires_at": iso(doc.get("expires_at")),
    }
    if status == JobStatus.QUEUED:
        snap["queue_position"] = queue_position
    return snap


def run_number(doc: Mapping[str, Any]) -> int:
    """How many times the job was claimed: 0 while it waits for its first run. A claim adds an attempt and a
    graceful stop gives it back as a stop, so the sum counts the claims. Clients order what they hear by it: a
    later run's news wins even though its row count starts lower, and a job put back in the queue shows the
    number of the run it came from."""
    return int(doc.get("attempts") or 0) + int(doc.get("stops") or 0)


def _relaxed(canonical: str) -> Any:
    return orjson.loads(json_util.dumps(ejson_loads(canonical), json_options=RELAXED))


def _query_of(spec: ExportSpec) -> dict[str, Any]:
    """What the export reads: a find (filter, fields, sort; always counted) or a pipeline (counted if asked)."""
    if spec.pipeline_json is not None:
        return {"filter": None, "fields": None, "sort": None, "pipeline": _relaxed(spec.pipeline_json), "count": spec.count}
    return {
        "filter": _relaxed(spec.filter_json),
        "fields": list(spec.fields) if spec.fields is not None else None,
        "sort": dict(spec.sort),
        "pipeline": None,
        "count": True,
    }


def expiry(finished_ms: int, ttl_hours: float) -> int:
    return finished_ms + int(ttl_hours * 3600 * 1000)
