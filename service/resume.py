"""Resuming an export from its last checkpoint instead of its first row.

A csv, json or ndjson export whose order is total (sorted by _id, the default, or by keys ending with _id)
records a checkpoint every few batches: the partial file's length at a document boundary, the rows in it, the
columns, and the sort key of its last row. A run that takes the job over keeps those bytes and asks the
database for the rows after that key; the file it finishes is the one an uninterrupted run would have written.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import bson
from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion

from .files import ResumePoint
from .query import CANONICAL, ExportSpec

log = logging.getLogger(__name__)

RESUMABLE_FORMATS = frozenset({"csv", "json", "ndjson"})  # XLSX and Parquet files are whole only when closed
DEFAULT_ORDER: tuple[tuple[str, int], ...] = (("_id", 1),)
_INT32 = struct.Struct("<i")
KEY_DECODE = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)  # any date a key may hold
KEY_JSON = CANONICAL.with_options(datetime_conversion=DatetimeConversion.DATETIME_AUTO)


def export_order(spec: ExportSpec) -> tuple[tuple[str, int], ...]:
    """The order rows are read in: the request's sort, or _id ascending (one order every run agrees on)."""
    return tuple(spec.sort) or DEFAULT_ORDER


def resumable(spec: ExportSpec) -> bool:
    """Read in a total order by a find, to a file that is whole at each checkpoint, and without a limit: with one,
    the rows a resume left out would be made up for by later ones, and the count could not tell."""
    order = export_order(spec)
    return (spec.format in RESUMABLE_FORMATS and getattr(spec, "pipeline_json", None) is None and order[-1][0] == "_id"
            and not spec.limit)


def last_key(raw: bytes, order: Sequence[tuple[str, int]]) -> str:
    """The sort key of the last document of a raw batch, as canonical Extended JSON."""
    start = 0
    while True:
        size = _INT32.unpack_from(raw, start)[0]
        if start + size >= len(raw):
            break
        start += size
    doc = bson.decode(raw[start:], codec_options=KEY_DECODE)
    return json_util.dumps([_lookup(doc, path) for path, _ in order], json_options=CANONICAL)


def _lookup(doc: Mapping[str, Any], path: str) -> Any:
    """The value at path; an array met on the way is the value (plan() never resumes after one)."""
    value: Any = doc
    for part in path.split("."):
        if isinstance(value, list):
            return value
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def after(order: Sequence[tuple[str, int]], key_json: str) -> dict[str, Any]:
    """The filter for the rows that come after key in this order (lexicographic over the sort keys).

    Null and missing sort before every other value, so after every other value in a descending order: a
    descending key gets a branch for them, within the rows equal on the keys before it. $eq, not a bare value:
    the embedded server's $or matches a bare null only where the field is missing."""
    values = json_util.loads(key_json, json_options=KEY_JSON)
    branches: list[dict[str, Any]] = []
    for index, (path, direction) in enumerate(order):
        equal = {prior: {"$eq": values[i]} for i, (prior, _) in enumerate(order[:index])}
        value = values[index]
        if value is None:
            if direction == 1:  # every non-null value sorts after null; nothing does in a descending order
                branches.append({**equal, path: {"$nin": [None]}})
        elif direction == 1:
            branches.append({**equal, path: {"$gt": value}})
        else:
            branches.append({**equal, path: {"$lt": value}})
            if path != "_id":  # never null nor missing
                branches.append({**equal, path: {"$eq": None}})
    if not branches:
        return {"_id": {"$in": []}}
    return branches[0] if len(branches) == 1 else {"$or": branches}


@dataclass(frozen=True)
class ResumePlan:
    point: ResumePoint  # the partial file and what its checkpoint says of it: what the encoder goes on from
    key: str  # canonical Extended JSON of the last row's sort key: where the database's rows go on from

    @property
    def rows(self) -> int:
        return self.point.rows


def plan(job: Mapping[str, Any], spec: ExportSpec, export_dir: Path) -> ResumePlan | None:
    """Where this job can go on from, or None to start at its first row."""
    point = job.get("checkpoint")
    if not point or not resumable(spec):
        return None
    source = Path(export_dir) / point["part"]
    try:
        size = source.stat().st_size
    except FileNotFoundError:
        size = -1
    values = json_util.loads(point["key"], json_options=KEY_JSON)
    if size < point["bytes"]:
        log.warning("job %s: its checkpoint's file %s is gone or short; starting again", job["_id"], point["part"])
        return None
    if any(isinstance(value, list) for value in values):
        return None  # an array sorts by one of its elements, unknown here
    notes = tuple(point.get("missed") or ()), tuple(point.get("dotted") or ())
    return ResumePlan(ResumePoint(source, int(point["bytes"]), int(point["rows"]), point.get("columns"), *notes), point["key"])
