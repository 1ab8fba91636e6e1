"""Parquet column types: which Arrow type a column gets from the first batch, BSON values to Arrow arrays,
and the text a value of a widened column is written as.

The rules (the README's value table is the contract):
- one BSON type in the sample gives its Arrow type: int32/int64 -> int64, double -> float64 (integers
  within +-2^53 fit too), bool -> bool, string -> string, datetime -> timestamp[ms, UTC], ObjectId ->
  fixed_size_binary(12) (the id's 12 bytes), binary (UUID included) -> binary, an array of one scalar type
  (string, int, double, bool) -> list of it;
- everything else (documents, Decimal128, heterogeneous arrays, Regex, Code, Timestamp, ...) and a mix of
  types in the sample -> string, each value rendered as in a CSV cell (relaxed Extended JSON for documents
  and arrays, decimal text as stored for Decimal128); a column with no value in the sample is string too;
- a later value that does not fit its column's type widens the column: an int64 column meeting doubles
  becomes float64 while every integer in it is within +-2^53, any other to string, the values written
  before rendered as text the same way. Nothing is dropped and every widening is a warning. A double
  column remembers which of its values were ints, a binary column which were UUIDs (one bit a row), so
  that as text they read as in CSV (1, not 1.0; UUID text, not base64).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from bson.binary import Binary
from bson.code import Code
from bson.datetime_ms import DatetimeMS
from bson.dbref import DBRef
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp

from .values import MISSING, NonFiniteDouble, float_text, iso_datetime, relaxed_json, resolve, scalar_text

MAX_EXACT_INT = 2**53  # integers a double holds exactly
EPOCH = datetime(1970, 1, 1)
NONE = type(None)
TEXT = "text"
TYPE_KINDS: dict[type, str] = {
    bool: "bool", int: "int", Int64: "int", float: "double", NonFiniteDouble: "double", str: "str",
    datetime: "datetime", DatetimeMS: "datetime", ObjectId: "oid", bytes: "binary", Binary: "binary",
}
ELEMENT_KINDS = ("str", "int", "double", "bool")
ARROW_TYPES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "double": pa.float64(),
    "bool": pa.bool_(),
    "str": pa.string(),
    TEXT: pa.string(),
    "datetime": pa.timestamp("ms", tz="UTC"),
    "oid": pa.binary(12),
    "binary": pa.binary(),
}
ARROW_TYPES.update({f"list:{kind}": pa.list_(ARROW_TYPES[kind]) for kind in ELEMENT_KINDS})
# The Python types each kind accepts as they are (None, null or missing, fits every column).
FITS: dict[str, frozenset[type]] = {
    kind: frozenset({NONE, *(t for t, k in TYPE_KINDS.items() if k == kind)}) for kind in set(TYPE_KINDS.values())
}


@dataclass
class Column:
    name: str
    kind: str
    # For string columns: the value types of the sample; a later value of another type is reported.
    seen: frozenset[type] = frozenset({str, NONE})
    late: set[str] = field(default_factory=set)  # type names that arrived later in a string column
    max_abs: int = 0  # of an int column's values so far: whether a double column could still hold them all
    # Per row so far (a mask per batch), once the first such value came: in a double column, whether the
    # value was an int; in a binary column, whether it was a UUID. Their text is not the column type's.
    marks: list[pa.Array] | None = None
    origin: str = ""  # the kind the first documents gave
    steps: list[tuple[str, str]] = field(default_factory=list)  # each widening: the misfit types' names, the new kind
    get: Callable[[dict[str, Any]], Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.get = getter(self.name)
        self.origin = self.origin or self.kind

    def note_marks(self, rows_before: int, rows: int, mask: pa.Array | None) -> None:
        """Add a batch of rows to the column's marks; mask None: no value of the batch is marked. The marks
        start with the first marked value, every row before it unmarked."""
        if self.marks is None and mask is not None and mask.true_count:
            self.marks = [pa.repeat(False, rows_before)]
        if self.marks is not None:
            self.marks.append(pa.repeat(False, rows) if mask is None else mask)
            if len(self.marks) > 64:  # fewer, longer chunks
                self.marks = [pa.concat_arrays(self.marks)]

    @property
    def arrow_type(self) -> pa.DataType:
        return ARROW_TYPES[self.kind]

    @property
    def is_text(self) -> bool:
        return self.kind in ("str", TEXT)


def getter(path: str) -> Callable[[dict[str, Any]], Any]:
    """The column's value in a document, None when null or missing: Parquet has no other absence."""
    if "." not in path:
        return lambda doc: doc.get(path)

    def dotted(doc: dict[str, Any]) -> Any:
        value = resolve(doc, path)
        return None if value is MISSING else value

    return dotted


# --- the sample -----------------------------------------------------------------------------------------
def _list_kind(values: Iterable[Any]) -> str:
    """list:<kind> when every element of these arrays is of one scalar kind (or null), else text."""
    kinds = {TYPE_KINDS.get(type(e), TEXT) for value in values if type(value) is list for e in value if e is not None}
    if not kinds:
        return "list:str"  # only empty arrays: strings are the most likely and the widest
    kind = kinds.pop()
    return f"list:{kind}" if not kinds and kind in ELEMENT_KINDS else TEXT


def _exact_ints(values: Iterable[Any]) -> bool:
    return all(-MAX_EXACT_INT <= v <= MAX_EXACT_INT for v in values if type(v) in (int, Int64))


def plan_column(name: str, docs: Sequence[dict[str, Any]]) -> tuple[Column, str | None]:
    """The column's type from its values in the first batch, and a warning when they were of several types."""
    get = getter(name)
    values = [get(doc) for doc in docs]
    types = set(map(type, values)) - {NONE}
    kinds = {"list" if t is list else TYPE_KINDS.get(t, TEXT) for t in types}
    if kinds == {"int", "double"} and _exact_ints(values):
        kinds = {"double"}
    if not kinds:
        return Column(name, "str"), None
    if len(kinds) == 1:
        kind = kinds.pop()
        if kind == "list":
            kind = _list_kind(values)
        if kind == "str":
            return Column(name, "str"), None
        return Column(name, kind, frozenset(types | {NONE})), None
    names = ", ".join(sorted({_type_name(t) for t in types}))
    warning = f"column {name} holds values of several types in the first documents ({names}); it is written as text"
    return Column(name, TEXT, frozenset(types | {NONE})), warning


# The names MongoDB's $type gives BSON types (a document and a DBRef are "document", not "object").
BSON_NAMES: dict[type, str] = {
    NONE: "null", bool: "bool", int: "int", Int64: "long", float: "double", NonFiniteDouble: "double",
    Decimal128: "decimal", str: "string", datetime: "date", DatetimeMS: "date", ObjectId: "objectId",
    bytes: "binData", Binary: "binData", dict: "document", DBRef: "document", list: "array", Regex: "regex",
    Timestamp: "timestamp", Code: "javascript", MinKey: "minKey", MaxKey: "maxKey",
}


def _type_name(kind: type) -> str:
    return BSON_NAMES.get(kind, kind.__name__)


# --- values to arrays ------------------------------------------------------------------------------------
def to_array(column: Column, values: list[Any]) -> pa.Array | None:
    """The column's values as an Arrow array of its type, or None when one of them does not fit it."""
    kind = column.kind
    if column.is_text:
        return _text_array(column, values)
    types = set(map(type, values))
    if kind.startswith("list:"):
        return _list_array(column, values, types)
    fits = FITS[kind]
    if kind == "double":
        fits = fits | FITS["int"]
        if not types <= fits or not (types.isdisjoint(FITS["int"] - {NONE}) or _exact_ints(values)):
            return None
    elif not types <= fits:
        return None
    if kind == "oid":
        values = [None if v is None else v.binary for v in values]
    elif kind == "datetime" and DatetimeMS in types:  # dates outside years 1-9999, as epoch milliseconds
        values = [v if type(v) is not datetime else DatetimeMS(v) for v in values]
        values = [None if v is None else int(v) for v in values]
    return pa.array(values, column.arrow_type)


def _list_array(column: Column, values: list[Any], types: set[type]) -> pa.Array | None:
    if not types <= {list, NONE}:
        return None
    fits = FITS[column.kind[5:]]
    if not all(set(map(type, value)) <= fits for value in values if value):
        return None
    return pa.array(values, column.arrow_type)


def _text_array(column: Column, values: list[Any]) -> pa.Array:
    types = set(map(type, values))
    if not types <= column.seen:
        column.late.update(_type_name(t) for t in types - column.seen)
    if types <= {str, NONE}:
        return pa.array(values, pa.string())
    return pa.array([_text(v) for v in values], pa.string())


def _text(value: Any) -> str | None:
    """A string column's cell: documents and arrays (the common case) straight to relaxed Extended JSON."""
    kind = type(value)
    if kind is str or value is None:
        return value
    if kind is dict or kind is list:
        return relaxed_json(value).decode("utf-8")
    return scalar_text(value)


# --- widening -------------------------------------------------------------------------------------------
def wider_kind(column: Column, values: list[Any]) -> str:
    """What a column becomes when values do not fit it."""
    if column.kind == "int" and column.max_abs <= MAX_EXACT_INT and to_array(Column(column.name, "double"), values) is not None:
        return "double"
    return TEXT


def marks_of(kind: str, values: list[Any]) -> pa.Array | None:
    """Which values a column of kind marks (see Column.marks); None when it marks none."""
    marked = _MARKED[kind]
    if not any(map(marked, values)):
        return None
    return pa.array(list(map(marked, values)), pa.bool_())


def _is_uuid(value: Any) -> bool:
    return type(value) is Binary and value.subtype == 4 and len(value) == 16  # as binary_text has it


_MARKED: dict[str, Callable[[Any], bool]] = {"double": lambda v: type(v) in (int, Int64), "binary": _is_uuid}
MARKED_KINDS = frozenset(_MARKED)


def convert(old_kind: str, new_kind: str, array: pa.Array | pa.ChunkedArray, marks: pa.Array | None = None) -> pa.Array:
    """Values written as old_kind, as new_kind (one that wider_kind gives); marks: see Column.marks."""
    if new_kind == "double":
        return pc.cast(array, pa.float64()).combine_chunks() if isinstance(array, pa.ChunkedArray) else pc.cast(array, pa.float64())
    return as_text(old_kind, array, marks)


def note_range(column: Column, array: pa.Array) -> None:
    """Keep an int column's largest magnitude up to date."""
    low, high = pc.min_max(array).values()
    if low.is_valid:
        column.max_abs = max(column.max_abs, abs(low.as_py()), abs(high.as_py()))


def as_text(kind: str, array: pa.Array | pa.ChunkedArray, marks: pa.Array | None = None) -> pa.Array:
    """Values of a column of kind as the text a string column holds for them (see scalar_text); marks: of
    a double column, the ints, written as ints (within +-2^53, so a double held them exactly); of a binary
    column, the UUIDs, written as UUID text."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if kind in ("str", TEXT):
        return array
    if kind == "int":
        return pc.cast(array, pa.string())
    if kind == "double" and marks is not None:
        as_ints = pc.cast(pc.cast(array, pa.int64(), safe=False), pa.string())
        return pc.if_else(marks, as_ints, as_text(kind, array))
    if kind == "binary" and marks is not None:
        return pc.if_else(marks, pa.array([_uuid_text(v) for v in array.to_pylist()], pa.string()), as_text(kind, array))
    render = _RENDER.get(kind, _render_list)
    if kind == "datetime":
        array = array.cast(pa.int64())
    return pa.array([None if v is None else render(v) for v in array.to_pylist()], pa.string())


def _uuid_text(value: bytes | None) -> str | None:
    return None if value is None or len(value) != 16 else str(uuid.UUID(bytes=value))


def _render_datetime(ms: int) -> str:
    try:
        return iso_datetime(EPOCH + timedelta(milliseconds=ms))
    except OverflowError:  # outside years 1-9999: milliseconds since the epoch, as in CSV
        return str(ms)


def _render_list(value: list[Any]) -> str:
    return relaxed_json(value).decode("utf-8")


_RENDER: dict[str, Callable[[Any], str]] = {
    "double": float_text,
    "bool": lambda v: "true" if v else "false",
    "datetime": _render_datetime,
    "oid": lambda v: v.hex(),
    "binary": lambda v: scalar_text(bytes(v)),
}


def widen_step(column: Column, value_types: Iterable[type]) -> None:
    """Record that values of these types made the column its (new) kind."""
    column.steps.append((", ".join(sorted({_type_name(t) for t in value_types} - {"null"})), column.kind))


def widening_warning(column: Column) -> str:
    """Every widening of the column, from the kind the first documents gave."""
    steps = ", then ".join(f"later values ({names}) did not fit and made it {'double' if kind == 'double' else 'text'}" for names, kind in column.steps)
    now = "as double" if column.kind == "double" else "as text"
    return f"column {column.name} was {ARROW_TYPES[column.origin]} in the first documents; {steps}; the whole column is written {now}"


def late_warning(column: Column) -> str:
    return f"column {column.name} is text; later documents also hold {', '.join(sorted(column.late))} values, written as text"
