"""Rendering of BSON values: dotted-path lookup, CSV text, relaxed/canonical Extended JSON, column discovery.

The table in DESIGN.md ("Value rendering") is the contract; each function below covers one column of it.
"""
from __future__ import annotations

import base64
import struct
import uuid
from bisect import bisect_right
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import orjson
from bson import json_util
from bson.binary import Binary, UuidRepresentation
from bson.code import Code
from bson.datetime_ms import DatetimeMS
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.json_util import JSONMode, JSONOptions
from bson.objectid import ObjectId
from bson.tz_util import utc as BSON_UTC


class _Missing:
    """A path that does not resolve; rendered like null."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class NonFiniteDouble(float):
    """A NaN or infinite double, as ExportPipeline decodes one (see mark_non_finite). orjson writes a plain
    float of that kind as null; a float subclass it hands to the default, which spells it $numberDouble."""

    __slots__ = ()


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
XLSX_MAX_CELL = 32_767
RELAXED_OPTIONS = JSONOptions(json_mode=JSONMode.RELAXED, tz_aware=True, uuid_representation=UuidRepresentation.STANDARD)
CANONICAL_OPTIONS = JSONOptions(json_mode=JSONMode.CANONICAL, tz_aware=True, uuid_representation=UuidRepresentation.STANDARD)
_INT32 = struct.Struct("<i")
_FIRST_ISO_YEAR = 1970  # relaxed EJSON spells dates as ISO text from 1970 to 9999, as $numberLong outside


# --- paths ------------------------------------------------------------------------------------
def resolve(doc: Any, path: str) -> Any:
    """Walk documents and array indexes (items.0.sku); MISSING when the path does not resolve."""
    value = doc
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part, MISSING)
            if value is MISSING:
                return MISSING
        elif isinstance(value, list) and part.isdigit():
            index = int(part)
            if index >= len(value):
                return MISSING
            value = value[index]
        else:
            return MISSING
    return value


def make_getters(columns: Sequence[str]) -> list[Callable[[dict[str, Any]], Any]]:
    """One fast getter per column: a plain key lookup for top-level fields, a walk for dotted ones."""
    getters: list[Callable[[dict[str, Any]], Any]] = []
    for column in columns:
        if "." in column:
            getters.append(lambda doc, _p=column: resolve(doc, _p))
        else:
            getters.append(lambda doc, _k=column: doc.get(_k, MISSING))
    return getters


def paths_of(doc: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Column paths of a document: subdocuments are flattened, arrays and scalars are leaves."""
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from paths_of(value, path + ".")
        else:
            yield path


def dotted_keys(doc: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Paths to the keys whose name holds a dot: a path cannot name them (a.b is a's b), so no column holds
    their values."""
    for key, value in doc.items():
        if "." in key:
            yield prefix + key
        elif isinstance(value, dict):
            yield from dotted_keys(value, f"{prefix}{key}.")


def discover_columns(docs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The union of paths in docs, in first-seen order."""
    seen: dict[str, None] = {}
    for doc in docs:
        for path in paths_of(doc):
            seen.setdefault(path, None)
    return list(seen)


def projection_tree(fields: Sequence[str]) -> dict[str, Any]:
    """{"a.b", "a.c", "d"} -> {"a": {"b": True, "c": True}, "d": True}; a shorter path wins."""
    tree: dict[str, Any] = {}
    for path in fields:
        node = tree
        parts = path.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is True:
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = True
    return tree


def project(doc: Mapping[str, Any], tree: Mapping[str, Any], keep_id: bool = True) -> dict[str, Any]:
    """MongoDB's inclusion projection, client-side: document order kept, arrays of documents projected
    element-wise (non-document elements dropped), as the server does for dotted paths."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        sub = tree.get(key)
        if sub is None:
            if key == "_id" and keep_id:
                out[key] = value
            continue
        if sub is True:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = project(value, sub, keep_id=False)
        elif isinstance(value, list):
            out[key] = _project_list(value, sub)
    return out


def _project_list(values: list[Any], tree: Mapping[str, Any]) -> list[Any]:
    result = []
    for item in values:
        if isinstance(item, dict):
            result.append(project(item, tree, keep_id=False))
        elif isinstance(item, list):
            result.append(_project_list(item, tree))
    return result


# --- text ---------------------------------------------------------------------------------------
def as_utc(value: datetime) -> datetime:
    """value in UTC; naive values are taken as UTC already. Decoded values carry bson's utc, so the
    identity checks spare the conversion on the common path."""
    tz = value.tzinfo
    if tz is None or tz is BSON_UTC or tz is timezone.utc:
        return value
    return value.astimezone(timezone.utc)


# orjson formats a datetime in C, several times faster than isoformat(); a naive one it takes as UTC.
_ISO_OPTS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z


def _iso_head(value: datetime) -> bytes:
    """value's ISO 8601 text in UTC as a JSON string cut after the milliseconds, with the opening quote and
    no Z: b'"2024-01-01T19:53:44.475' (years padded to four digits). orjson writes six fraction digits, or
    none for whole seconds; cutting the last three truncates to milliseconds as
    isoformat(timespec="milliseconds") does (a BSON date holds whole milliseconds)."""
    if value.tzinfo is not None:
        value = as_utc(value).replace(tzinfo=None)
    text = orjson.dumps(value, option=_ISO_OPTS)  # b'"2024-01-01T19:53:44.475000Z"'
    return text[:-5] if value.microsecond else text[:-2] + b".000"


def iso_datetime(value: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and Z."""
    return _iso_head(value)[1:].decode("ascii") + "Z"


def float_text(value: float) -> str:
    if value - value == 0.0:  # finite: inf - inf and NaN - NaN are NaN
        return repr(value)
    if value != value:
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def binary_text(value: bytes | uuid.UUID) -> str:
    """A UUID (subtype 4) as canonical UUID text, any other binary as base64. Legacy subtype 3 stays
    base64: its byte order depends on the driver that wrote it, so no UUID text would be sure."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Binary) and value.subtype == 4 and len(value) == 16:
        return str(uuid.UUID(bytes=bytes(value)))
    return base64.b64encode(value).decode("ascii")


def scalar_text(value: Any) -> str:
    """Text for any value, shared by CSV cells and XLSX text cells; documents and arrays become
    compact relaxed Extended JSON. Binary subtype 0 decodes as plain bytes, hence the bytes check."""
    if value is None or value is MISSING:
        return ""
    kind = type(value)
    if kind is str:
        return value
    if kind is bool:
        return "true" if value else "false"
    if isinstance(value, int):  # int and Int64
        return str(int(value))
    if kind is float or kind is NonFiniteDouble:
        return float_text(value)
    if kind is datetime:
        return iso_datetime(value)
    if kind is ObjectId or kind is Decimal128:
        return str(value)
    if isinstance(value, (bytes, uuid.UUID)):
        return binary_text(value)
    if kind is DatetimeMS:  # a date outside Python's years 1-9999: milliseconds since the epoch
        return str(int(value))
    if kind is Code:
        if value.scope is None:
            return str(value)
        value = {"$code": str(value), "$scope": value.scope}  # orjson would write only the code string
    return relaxed_json(value).decode("utf-8")


def csv_cell(value: Any, escape_formulas: bool) -> str:
    """The CSV text of value; a string (Code included) starting with a formula character gets a
    leading apostrophe when escape_formulas is on, so spreadsheets show it instead of evaluating it."""
    text = scalar_text(value)
    if escape_formulas and isinstance(value, str) and text.startswith(FORMULA_PREFIXES):
        return "'" + text
    return text


def non_finite_suspects(raw: bytes) -> set[int]:
    """Indexes of the documents in a raw BSON batch that may hold a NaN or infinite double: one whose last
    two bytes (little-endian) are F0-FF then 7F or FF, right after a key's terminating zero, itself after
    a non-zero byte (a key character or the type byte). Far cheaper than looking at every decoded value;
    other data matches now and then, and such a document is only looked at more closely."""
    ends = []
    for last in (b"\x7f", b"\xff"):
        pos = raw.find(last, 9)
        while pos >= 0:
            if raw[pos - 1] >= 0xF0 and raw[pos - 8] == 0 and raw[pos - 9] != 0:
                ends.append(pos)
            pos = raw.find(last, pos + 1)
    if not ends:
        return set()
    starts, start = [], 0
    while start < len(raw):
        starts.append(start)
        start += _INT32.unpack_from(raw, start)[0]
    return {bisect_right(starts, pos) - 1 for pos in ends}


# --- Extended JSON ---------------------------------------------------------------------------------
def _relaxed_default(value: Any) -> Any:
    """orjson calls this for the values it does not write itself: datetimes (passed through on purpose),
    subclasses of str and int (passed through so JavaScript code keeps its $code wrapper), ObjectId and the
    other BSON types. Int64 is the one such subclass common in data: it costs one call, as a date does."""
    kind = type(value)
    if kind is datetime:
        utc = value if value.tzinfo is None else as_utc(value)
        if utc.year >= _FIRST_ISO_YEAR:
            return orjson.Fragment(b'{"$date":' + _iso_head(utc) + b'Z"}')
    elif kind is ObjectId:
        return {"$oid": value.binary.hex()}
    elif kind is Int64:
        return int(value)
    elif kind is NonFiniteDouble:
        return {"$numberDouble": float_text(value)}
    elif kind is Code:
        # As mongoexport writes it, with or without a scope; the scope is relaxed EJSON like the rest (the
        # document's own scan for NaN and infinities does not look inside code).
        return {"$code": str(value)} if value.scope is None else {"$code": str(value), "$scope": mark_non_finite(value.scope)}
    return _relaxed_other(value)


def _relaxed_other(value: Any) -> Any:
    try:
        return json_util.default(value, RELAXED_OPTIONS)
    except TypeError:
        # Other subclasses of the built-in types, which orjson passes on now: their base type's value.
        for base in (dict, list, str, int):
            if isinstance(value, base):
                return base(value)
        raise


def _has_non_finite(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return value - value != 0.0
    if kind is dict:
        return any(_has_non_finite(v) for v in value.values())
    if kind is list:
        return any(_has_non_finite(v) for v in value)
    return False


def mark_non_finite(value: Any) -> Any:
    """value with every NaN or infinite float, however deep, as a NonFiniteDouble; value itself when it
    holds none."""
    if not _has_non_finite(value):
        return value
    kind = type(value)
    if kind is float:
        return NonFiniteDouble(value)
    if kind is dict:
        return {k: mark_non_finite(v) for k, v in value.items()}
    return [mark_non_finite(v) for v in value]


_RELAXED_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS


def relaxed_json(value: Any) -> bytes:
    """Relaxed Extended JSON, compact, of any value. orjson writes a NaN or infinite float as null, so a
    value whose output holds a null and really holds such a float is encoded again with those doubles
    marked, which spells them $numberDouble."""
    out = relaxed_json_decoded(value)
    if b"null" in out:
        marked = mark_non_finite(value)
        if marked is not value:
            out = relaxed_json_decoded(marked)
    return out


def relaxed_json_decoded(doc: Any) -> bytes:
    """relaxed_json of a document as ExportPipeline decodes it: its non-finite doubles are NonFiniteDouble
    already, so the output needs no second look (which costs as much as a third of the encoding)."""
    return orjson.dumps(doc, default=_relaxed_default, option=_RELAXED_OPTS)


def canonical_json(value: Any) -> bytes:
    """Canonical Extended JSON: every number typed, every date as $numberLong milliseconds."""
    return orjson.dumps(_canonical(value))


def _canonical(value: Any) -> Any:
    """value with every non-JSON value in the form json_util.default gives it (the converter its dumps() uses
    is private); plain containers, strings and null are walked or kept without a call into json_util."""
    kind = type(value)
    if kind is dict:
        return {k: _canonical(v) for k, v in value.items()}
    if kind is list:
        return [_canonical(v) for v in value]
    if kind is str or value is None or kind is bool:
        return value
    try:
        return json_util.default(value, CANONICAL_OPTIONS)  # numbers, dates, ObjectId, Code, DBRef, ...
    except TypeError:
        if isinstance(value, Mapping):
            return {k: _canonical(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_canonical(v) for v in value]
        return value


def encoder_for(mode: str) -> Callable[[Any], bytes]:
    """The encoder of decoded documents for a json mode."""
    return canonical_json if mode == "canonical" else relaxed_json_decoded


# --- XLSX ------------------------------------------------------------------------------------------
def decimal_as_float(value: Decimal128) -> float | None:
    """The double equal to value, or None when no double is exactly equal."""
    dec = value.to_decimal()
    if not dec.is_finite():
        return None
    as_float = float(dec)
    return as_float if Decimal(as_float) == dec else None
