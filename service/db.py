"""The only module that imports a MongoDB driver.

PyMongo's AsyncMongoClient is the default; EXPORT_MONGO_DRIVER=motor selects Motor. Only calls both
drivers share are used, and the few differences (awaitable aggregate, awaitable close) are absorbed here.
Driver errors leave this module as DatabaseUnavailable (the server cannot be reached) or DatabaseError.
"""
from __future__ import annotations

import asyncio
import inspect
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Sequence
from urllib.parse import parse_qs, urlsplit

from bson.errors import InvalidDocument
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.raw_bson import RawBSONDocument
from bson.tz_util import utc
import pymongo
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo import errors as pymongo_errors

# Datetimes come back timezone-aware in UTC; those outside Python's range come back as DatetimeMS.
CODEC_OPTIONS: CodecOptions = CodecOptions(
    tz_aware=True, tzinfo=utc, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
# Pipeline output read as undecoded documents, joined back into a raw batch (see Database._aggregate_documents).
RAW_DOCUMENTS: CodecOptions = CodecOptions(document_class=RawBSONDocument)
SERVER_SELECTION_TIMEOUT_MS = 5000
# The longest wait for any one reply. The driver's default is forever: a reply lost on the way would then hold a
# job in "processing" (and its worker) for good. Five minutes outlasts a getMore that scans a large collection
# for sparse matches; a connection string that sets socketTimeoutMS (0 = no limit) wins.
SOCKET_TIMEOUT_MS = 300_000
# A blocking stage ($sort, $group) can spend the query's whole time limit before its first reply: the wait for a
# reply outlasts that limit by this much, so the server's own time-out is the one a user sees.
REPLY_MARGIN_MS = 60_000
# Closing ends the server sessions and kills open cursors: if the server drops one of those replies, stopping
# the service waits this long, not the whole socket timeout.
CLOSE_TIMEOUT_SECONDS = 10.0


class DatabaseError(RuntimeError):
    """The database answered with an error (a bad operator, a dropped collection...)."""

    code = "database_error"


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached."""

    code = "database_unavailable"


class QueryTimeout(DatabaseError):
    """The server stopped a query at its time limit (maxTimeMS)."""

    code = "timeout"


def translate(exc: BaseException) -> DatabaseError:
    # Without the reply PyMongo appends: for a raw-batch cursor it is a RawBSONDocument's bytes.
    text = str(exc).split(", full error: ")[0]
    if isinstance(exc, pymongo_errors.ExecutionTimeout):
        return QueryTimeout(f"the query ran past its time limit: {text[:300]}")
    if isinstance(exc, (pymongo_errors.ConnectionFailure, pymongo_errors.ServerSelectionTimeoutError)):
        return DatabaseUnavailable(f"database unavailable: {exc.__class__.__name__}: {text[:300]}")
    return DatabaseError(f"database error: {text[:500]}")


@asynccontextmanager
async def driver_errors() -> AsyncIterator[None]:
    """Re-raise driver exceptions as this module's domain errors."""
    try:
        yield
    except (pymongo_errors.PyMongoError, InvalidDocument) as exc:  # the latter: a document past 16 MB, say
        raise translate(exc) from exc


def _raise_swallowed_cancel() -> None:
    """Raise a cancellation the driver swallowed. On Python 3.11, asyncio.wait_for (which PyMongo wraps
    around socket calls when the client has timeouts) returns the result of an operation that completes as
    the cancel arrives, and the task goes on: a cancelled export would run to its end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _resolve(value: Any) -> Any:
    # PyMongo's async API returns coroutines where Motor returns objects (aggregate, close).
    return await value if inspect.isawaitable(value) else value


async def _aggregate_count(collection: Any, pipeline: list[dict[str, Any]], max_time_ms: int = 0) -> int:
    """The documents pipeline leaves, counted by the server ($count), not by count_documents."""
    options = {"maxTimeMS": max_time_ms} if max_time_ms else {}
    async with driver_errors():
        cursor = await _resolve(collection.aggregate([*pipeline, {"$count": "n"}], **options))
        rows = [row async for row in cursor]
    return int(rows[0]["n"]) if rows else 0


def url_options(url: str) -> set[str]:
    """The option names a connection string sets, lower-cased (MongoDB reads them case-insensitively)."""
    return {name.lower() for name in parse_qs(urlsplit(url).query, keep_blank_values=True)}


def reply_timeout_ms(query_max_time_ms: int) -> int:
    """The longest wait for one reply: five minutes, or the query's time limit and a minute when that is longer."""
    return max(SOCKET_TIMEOUT_MS, query_max_time_ms + REPLY_MARGIN_MS) if query_max_time_ms else SOCKET_TIMEOUT_MS


def make_client(url: str, driver: str = "pymongo", connect_timeout_ms: int = 5000, query_max_time_ms: int = 0) -> Any:
    """A client with the service's timeouts, except those the connection string sets itself (the driver
    would let a keyword argument override the string)."""
    given = url_options(url)
    defaults = {
        "serverSelectionTimeoutMS": SERVER_SELECTION_TIMEOUT_MS,
        "connectTimeoutMS": connect_timeout_ms,
        "socketTimeoutMS": reply_timeout_ms(query_max_time_ms),
    }
    common: dict[str, Any] = {name: value for name, value in defaults.items() if name.lower() not in given}
    common["tz_aware"] = True
    if driver == "motor":
        from motor.motor_asyncio import AsyncIOMotorClient

        return AsyncIOMotorClient(url, **common)
    from pymongo import AsyncMongoClient

    return AsyncMongoClient(url, **common)


@dataclass(frozen=True)
class FindSpec:
    collection: str
    filter: Mapping[str, Any]
    projection: Mapping[str, Any] | None
    sort: Sequence[tuple[str, int]]
    limit: int
    batch_size: int = 1000
    max_time_ms: int = 0  # the cursor's server-side time limit, over all its batches (0: none)
    count_max_time_ms: int = 0  # the pre-count's (0: none)
    # An aggregation pipeline replaces filter, projection and sort; limit becomes a final $limit.
    pipeline: Sequence[Mapping[str, Any]] | None = None

    def stages(self) -> list[dict[str, Any]]:
        stages = [dict(stage) for stage in self.pipeline or ()]
        if self.limit:
            stages.append({"$limit": self.limit})
        return stages

    def aggregate_options(self, max_time_ms: int) -> dict[str, Any]:
        """Spilling to disk allowed (a $group or $sort may outgrow memory), and the find's time limits."""
        return {"allowDiskUse": True, **({"maxTimeMS": max_time_ms} if max_time_ms else {})}


class Database:
    def __init__(self, client: Any, name: str, jobs_collection: str = "export_jobs") -> None:
        self.client = client
        self.db = client[name]
        self.name = name
        self.jobs_collection = jobs_collection
        self.raw_aggregate: bool | None = None
        self.embedded: bool | None = None  # see is_embedded_server  # whether the server suits aggregate_raw_batches; probed once

    @classmethod
    def connect(
        cls, url: str, name: str, driver: str = "pymongo", jobs_collection: str = "export_jobs", connect_timeout_ms: int = 5000,
        query_max_time_ms: int = 0,
    ) -> "Database":
        return cls(make_client(url, driver, connect_timeout_ms, query_max_time_ms), name, jobs_collection)

    async def close(self) -> None:
        # A client-side operation timeout covers the round trips inside close() for both drivers (Motor closes
        # synchronously, where no asyncio timeout could reach), and they give up quietly when it runs out.
        with pymongo.timeout(CLOSE_TIMEOUT_SECONDS):
            await _resolve(self.client.close())

    def collection(self, name: str) -> Any:
        return self.db.get_collection(name, codec_options=CODEC_OPTIONS)

    @property
    def jobs(self) -> Any:
        # Job documents hold no dates (times are epoch milliseconds): the client's defaults suffice.
        return self.db[self.jobs_collection]

    async def is_embedded_server(self) -> bool:
        """Whether the server is the embedded one (nx-27017, which names itself in buildInfo): it runs some
        pipelines over a whole collection where MongoDB stops early. Asked once."""
        if self.embedded is None:
            async with driver_errors():
                info = await self.client.admin.command("buildInfo")
            self.embedded = info.get("process") == "nx_27017"
        return self.embedded

    def server_state(self) -> tuple[bool, str | None]:
        """Whether the driver's server monitoring knows a server that takes writes, and what went wrong if
        not: read from its last heartbeats, without a round trip."""
        description = self.client.topology_description
        if description.has_writable_server():
            return True, None
        errors = [str(server.error) for server in description.server_descriptions().values() if server.error]
        return False, "; ".join(errors)[:500] or "no server that takes writes is known yet"

    async def ensure_indexes(self) -> None:
        async with driver_errors():
            await self.jobs.create_index([("status", ASCENDING), ("order", ASCENDING)])
            await self.jobs.create_index([("user", ASCENDING), ("order", DESCENDING)])

    async def collection_names(self) -> list[str]:
        async with driver_errors():
            return sorted(await self.db.list_collection_names())

    async def estimated_count(self, name: str, max_time_ms: int = 0) -> int:
        options = {"maxTimeMS": max_time_ms} if max_time_ms else {}
        async with driver_errors():
            return int(await self.collection(name).estimated_document_count(**options))

    async def sample(self, name: str, size: int = 100, max_time_ms: int = 0) -> list[dict[str, Any]]:
        """The first size documents in natural order."""
        options = {"max_time_ms": max_time_ms} if max_time_ms else {}
        async with driver_errors():
            cursor = self.collection(name).find({}, batch_size=size, **options).limit(size)
            return [doc async for doc in cursor]

    async def aggregate(self, name: str, pipeline: Sequence[Mapping[str, Any]], max_time_ms: int = 0) -> list[dict[str, Any]]:
        """Every document a (small-result) pipeline leaves, in one list."""
        options = {"maxTimeMS": max_time_ms} if max_time_ms else {}
        async with driver_errors():
            cursor = await _resolve(self.collection(name).aggregate([dict(stage) for stage in pipeline], **options))
            return [doc async for doc in cursor]

    async def count(self, spec: FindSpec) -> int:
        """Count matches with an aggregation ($match, $limit, $count), which every server runs fast."""
        if spec.pipeline is not None:
            return await self._count_pipeline(spec)
        pipeline: list[dict[str, Any]] = [{"$match": dict(spec.filter)}]
        if spec.limit:
            pipeline.append({"$limit": spec.limit})
        return await _aggregate_count(self.collection(spec.collection), pipeline, spec.count_max_time_ms)

    async def raw_batches(self, spec: FindSpec) -> AsyncIterator[bytes]:
        """Yield the matching documents as raw BSON batches (concatenated documents), unparsed.

        The server-side cursor is closed when the iteration ends, fails or is abandoned.
        """
        if spec.pipeline is not None:
            async with aclosing(self._aggregate_batches(spec)) as batches:
                async for batch in batches:
                    _raise_swallowed_cancel()
                    yield batch
            return
        options = {"max_time_ms": spec.max_time_ms} if spec.max_time_ms else {}
        cursor = self.collection(spec.collection).find_raw_batches(
            dict(spec.filter), dict(spec.projection) if spec.projection else None, batch_size=spec.batch_size, **options
        )
        if spec.sort:
            cursor = cursor.sort(list(spec.sort))
        if spec.limit:
            cursor = cursor.limit(spec.limit)
        try:
            async with driver_errors():
                async for batch in cursor:
                    _raise_swallowed_cancel()
                    yield batch
        finally:
            await _resolve(cursor.close())

    # --- aggregation pipelines ---------------------------------------------------------------
    async def _count_pipeline(self, spec: FindSpec) -> int:
        """The pipeline's output counted by the server: the pipeline, then $count."""
        async with driver_errors():
            cursor = await _resolve(
                self.collection(spec.collection).aggregate(
                    [*spec.stages(), {"$count": "n"}], **spec.aggregate_options(spec.count_max_time_ms)
                )
            )
            rows = [row async for row in cursor]
        return int(rows[0]["n"]) if rows else 0

    async def _aggregate_batches(self, spec: FindSpec) -> AsyncIterator[bytes]:
        if await self._suits_raw_aggregate(spec.collection):
            batches = self._aggregate_raw(spec)
        else:
            batches = self._aggregate_documents(spec)
        async with aclosing(batches):
            async for batch in batches:
                yield batch

    async def _suits_raw_aggregate(self, collection: str) -> bool:
        """aggregate_raw_batches asks for an empty first batch (cursor batchSize 0) and the driver asserts it got
        one. MongoDB complies; the embedded server answers with 101 documents. Asked with a one-document aggregate
        whose cursor is killed right after, until an answer settles it: an empty, closed cursor (an empty
        collection on a server that ignores batchSize 0) does not."""
        if self.raw_aggregate is None:
            async with driver_errors():
                reply = await self.db.command({"aggregate": collection, "pipeline": [{"$limit": 1}], "cursor": {"batchSize": 0}})
                cursor = reply["cursor"]
                if cursor["id"]:
                    await self.db.command({"killCursors": collection, "cursors": [cursor["id"]]})
            if cursor["firstBatch"]:
                self.raw_aggregate = False
            elif cursor["id"]:
                self.raw_aggregate = True
            else:
                return False
        return self.raw_aggregate

    async def _aggregate_raw(self, spec: FindSpec) -> AsyncIterator[bytes]:
        cursor = None
        try:
            async with driver_errors():
                cursor = await _resolve(
                    self.collection(spec.collection).aggregate_raw_batches(
                        spec.stages(), batchSize=spec.batch_size, **spec.aggregate_options(spec.max_time_ms)
                    )
                )
                async for batch in cursor:
                    yield batch
        finally:
            if cursor is not None:
                await _resolve(cursor.close())

    async def _aggregate_documents(self, spec: FindSpec) -> AsyncIterator[bytes]:
        """For servers unfit for aggregate_raw_batches: documents arrive undecoded (RawBSONDocument, a view of
        the reply's bytes) and are joined back into a raw batch, so the encoder gets the same input."""
        collection = self.db.get_collection(spec.collection, codec_options=RAW_DOCUMENTS)
        cursor = None
        try:
            async with driver_errors():
                cursor = await _resolve(
                    collection.aggregate(spec.stages(), batchSize=spec.batch_size, **spec.aggregate_options(spec.max_time_ms))
                )
                while docs := await cursor.to_list(spec.batch_size):
                    yield b"".join(doc.raw for doc in docs)
        finally:
            if cursor is not None:
                await _resolve(cursor.close())

    # --- the jobs collection -------------------------------------------------------------------
    async def insert_job(self, doc: Mapping[str, Any]) -> None:
        async with driver_errors():
            await self.jobs.insert_one(dict(doc))

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        async with driver_errors():
            return await self.jobs.find_one({"_id": job_id})

    async def find_jobs(
        self, query: Mapping[str, Any], sort: Sequence[tuple[str, int]] = (("order", DESCENDING),), limit: int = 0
    ) -> list[dict[str, Any]]:
        async with driver_errors():
            cursor = self.jobs.find(dict(query)).sort(list(sort))
            if limit:
                cursor = cursor.limit(limit).batch_size(limit)  # one round trip for a listing, however long
            return [doc async for doc in cursor]

    async def job_orders(self, query: Mapping[str, Any]) -> list[int]:
        """The queue order of every job matching query, ascending, in one round trip for any likely queue."""
        async with driver_errors():
            cursor = self.jobs.find(dict(query), {"order": 1, "_id": 0}, batch_size=100_000).sort([("order", ASCENDING)])
            return [doc["order"] async for doc in cursor]

    async def count_jobs(self, query: Mapping[str, Any]) -> int:
        return await _aggregate_count(self.jobs, [{"$match": dict(query)}])

    async def change_job(self, query: Mapping[str, Any], update: Mapping[str, Any], oldest_first: bool = False) -> dict[str, Any] | None:
        """Atomically update the job matching query (the oldest in queue order with oldest_first), returning it
        as updated; None when none matches. Only service.jobs.transition calls this."""
        async with driver_errors():
            return await self.jobs.find_one_and_update(
                dict(query), dict(update), sort=[("order", ASCENDING)] if oldest_first else None, return_document=ReturnDocument.AFTER
            )

    async def delete_job(self, job_id: str) -> None:
        async with driver_errors():
            await self.jobs.delete_one({"_id": job_id})

