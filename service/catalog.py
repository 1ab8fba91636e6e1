"""GET /api/collections: the exportable collections, each with its estimated count and the field paths of a
random sample, all looked at concurrently and each within a time limit, so one slow collection cannot hold
up the listing.

The server samples ($sample) and sends back only the paths of the sampled documents, never their values:
a $project turns each document into the list of its paths (a subdocument's into a nested list), down to
MAX_DEPTH levels and MAX_KEYS keys a level. The embedded server, which would run that $project over the
whole collection, sends the sampled documents instead; a server that cannot run the pipeline gets a plain
find of the first documents. Either way the same limits are applied here.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .db import Database, DatabaseError, QueryTimeout
from .query import ValidationError, validate_collection_name

SAMPLE_SIZE = 100
MAX_DEPTH = 5  # path parts: a subdocument deeper than this is one path
MAX_KEYS = 200  # keys per level of one document
MAX_FIELDS = 500  # paths per collection
SERVER_TIME_MS = 2_000  # maxTimeMS of each count and sample
LISTING_SECONDS = 3.0  # the whole listing's limit, for servers that overrun maxTimeMS and for queueing
CONCURRENCY = 8  # collections looked at at once


@dataclass
class Sample:
    fields: list[str]
    truncated: bool = False
    timed_out: bool = False


def _paths_expression(var: str, prefix: Any, depth: int) -> dict[str, Any]:
    """A list whose items are a key's path, or for a non-empty subdocument the list of its paths."""
    item = f"f{depth}"
    path: Any = f"$${item}.k" if prefix is None else {"$concat": [prefix, ".", f"$${item}.k"]}
    value: Any = path
    if depth + 1 < MAX_DEPTH:
        nonempty_document = {
            "$and": [
                {"$eq": [{"$type": f"$${item}.v"}, "object"]},
                {"$gt": [{"$size": {"$objectToArray": f"$${item}.v"}}, 0]},
            ]
        }
        value = {"$cond": [nonempty_document, _paths_expression(f"$${item}.v", path, depth + 1), path]}
    return {"$slice": [{"$map": {"input": {"$objectToArray": var}, "as": item, "in": value}}, MAX_KEYS]}


def sample_pipeline(size: int = SAMPLE_SIZE) -> list[dict[str, Any]]:
    return [{"$sample": {"size": size}}, {"$project": {"_id": 0, "paths": _paths_expression("$$ROOT", None, 0)}}]


def document_paths(doc: Mapping[str, Any], prefix: str | None = None, depth: int = 0) -> list[Any]:
    """What sample_pipeline's $project makes of doc, for documents found without it."""
    out: list[Any] = []
    for key, value in list(doc.items())[:MAX_KEYS]:
        path = key if prefix is None else f"{prefix}.{key}"
        if depth + 1 < MAX_DEPTH and isinstance(value, dict) and value:
            out.append(document_paths(value, path, depth + 1))
        else:
            out.append(path)
    return out


def merge_paths(shapes: Iterable[list[Any]]) -> Sample:
    """The distinct paths in the documents' path lists, in first-seen order, at most MAX_FIELDS; truncated
    when there were more, or when a level had MAX_KEYS keys (it may have had more)."""
    seen: dict[str, None] = {}
    truncated = False

    def walk(items: list[Any]) -> None:
        nonlocal truncated
        truncated = truncated or len(items) >= MAX_KEYS
        for item in items:
            if isinstance(item, list):
                walk(item)
            elif isinstance(item, str):
                seen.setdefault(item, None)

    for shape in shapes:
        walk(shape)
    fields = list(seen)
    return Sample(fields[:MAX_FIELDS], truncated or len(fields) > MAX_FIELDS)


async def sample_fields(db: Database, name: str, size: int = SAMPLE_SIZE, paths_on_server: bool = True) -> Sample:
    """The paths in a random sample of the collection: found by the server (paths_on_server), or here from
    the sampled documents; from the first documents where the server has no $sample."""
    try:
        if paths_on_server:
            rows = await db.aggregate(name, sample_pipeline(size), SERVER_TIME_MS)
            return merge_paths(row.get("paths", []) for row in rows)
        docs = await db.aggregate(name, [{"$sample": {"size": size}}], SERVER_TIME_MS)
    except QueryTimeout:
        raise
    except DatabaseError:
        docs = await db.sample(name, size, SERVER_TIME_MS)
    return merge_paths(document_paths(doc) for doc in docs)


async def _within(deadline: float, work: Any, errors: list[str]) -> Any:
    """work's result, or None when it timed out (at the server or at the deadline) or the server refused it (a
    view whose pipeline fails, a collection this user may not read): that error goes to errors."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        work.close()
        return None
    try:
        return await asyncio.wait_for(work, remaining)
    except (asyncio.TimeoutError, QueryTimeout):
        return None
    except DatabaseError as exc:
        errors.append(str(exc))
        return None


async def describe(db: Database, name: str, deadline: float, gate: asyncio.Semaphore, paths_on_server: bool) -> dict[str, Any]:
    errors: list[str] = []
    async with gate:
        count, sample = await asyncio.gather(
            _within(deadline, db.estimated_count(name, SERVER_TIME_MS), errors),
            _within(deadline, sample_fields(db, name, paths_on_server=paths_on_server), errors),
        )
    if sample is None:
        sample = Sample([], timed_out=not errors)
    return {
        "name": name,
        "estimated_count": count,  # null when the count timed out or failed
        "fields": sample.fields,
        "fields_truncated": sample.truncated,
        "sample_timed_out": sample.timed_out,
        "error": errors[0] if errors else None,  # one collection's failure is its own, not the listing's
    }


async def list_collections(db: Database, jobs_collection: str, allowed: Sequence[str], paths_on_server: bool = True) -> list[dict[str, Any]]:
    """Every exportable collection described. paths_on_server=False samples whole documents, for a server that
    evaluates the paths $project slowly (the embedded one runs it over the whole collection, past maxTimeMS)."""
    names = []
    for name in await db.collection_names():
        try:
            validate_collection_name(name, jobs_collection, allowed)
        except ValidationError:
            continue
        names.append(name)
    deadline = time.monotonic() + LISTING_SECONDS
    gate = asyncio.Semaphore(CONCURRENCY)
    return list(await asyncio.gather(*(describe(db, name, deadline, gate, paths_on_server) for name in names)))
