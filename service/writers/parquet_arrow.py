"""Raw BSON batches to Arrow arrays with PyMongoArrow, for the top-level columns its builders read exactly.

PyMongoArrow reads a raw batch in C, without making a Python object per value: when it covers every
column of an export, the batch is not decoded into Python objects (measured 2-2.5 times the rows per CPU
second of the decoded path); without fields, only the few documents whose sizes leave room for a field the
columns lack are decoded, to look for it (see unaccounted). When some column needs the decoded documents (a subdocument, an array, a
dotted path, text), the batch is decoded anyway, and reading it a second time with PyMongoArrow costs more
than it saves, so it is not. With a schema it raises
TypeError on a value of another type, but some conversions it makes without a word: a double into an
int64 column (truncated), an int or a bool into a double column, a bool into an int64 one, and a NaN into
null. So a column takes this path for a batch only when the batch's bytes show none of those: no element
of a coerced type under the column's key, and no NaN at all for double columns. The check looks for the
bytes such an element starts with (type byte, key, terminating zero) anywhere in the batch, so it never
misses one; other data that happens to hold those bytes only sends that batch down the decoded path,
which gives the same values. PyMongoArrow also copies a string's bytes without checking that they are
UTF-8: every string array it gives is checked, and a batch holding one that is not is decoded instead,
which fails the export as in the other formats.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from pymongoarrow.context import PyMongoArrowContext
from pymongoarrow.schema import Schema
from pymongoarrow.types import ObjectIdType

from .parquet_columns import ARROW_TYPES, NONE, Column
from .values import non_finite_suspects

# BSON element type bytes PyMongoArrow converts into each kind of column silently. An int32 fits a double
# exactly, but a double column must know which of its values were ints (as text they read as ints).
COERCED = {"int": b"\x01\x08", "double": b"\x08\x10\x12"}
# Bytes of a value of each kind in BSON; an int takes 4 (int32) or 8 (int64), a string 4 + its bytes + 1.
VALUE_BYTES = {"double": 8, "bool": 1, "datetime": 8, "oid": 12, "int": 8}
INT32 = (-(2**31), 2**31 - 1)
SCHEMA_TYPES = {"int": pa.int64(), "double": pa.float64(), "bool": pa.bool_(), "str": pa.string(), "datetime": ARROW_TYPES["datetime"]}


class ArrowReader:
    """Reads the columns of a plan that PyMongoArrow covers from raw batches."""

    def __init__(self, columns: Sequence[Column]) -> None:
        # per covered column, the byte strings (type byte, key, zero) of the elements PyMongoArrow would coerce
        self.guards: dict[str, tuple[bytes, ...]] = {}
        for column in columns:
            self.update(column)

    def update(self, column: Column) -> None:
        """Take the column's kind into account: it is new, or it was widened."""
        self.guards.pop(column.name, None)
        if "." in column.name or not _covered(column):
            return
        key = column.name.encode("utf-8") + b"\x00"
        self.guards[column.name] = tuple(bytes([kind]) + key for kind in COERCED.get(column.kind, b""))

    def covers(self, columns: Sequence[Column]) -> bool:
        """Whether PyMongoArrow can read every one of columns."""
        return bool(columns) and all(column.name in self.guards for column in columns)

    def read(self, raw: bytes, columns: Sequence[Column]) -> dict[str, pa.Array]:
        """Arrays of the covered columns whose values in raw PyMongoArrow reads exactly; {} when it cannot
        read the batch (a value of another type: the decoded path renders or widens it)."""
        suspect_nan: bool | None = None
        schema = {}
        for column in columns:
            if column.name not in self.guards or not _covered(column):
                continue
            if any(element in raw for element in self.guards[column.name]):
                continue
            if column.kind == "double":
                if suspect_nan is None:
                    suspect_nan = bool(non_finite_suspects(raw))
                if suspect_nan:
                    continue
            schema[column.name] = ObjectIdType() if column.kind == "oid" else SCHEMA_TYPES[column.kind]
        if not schema:
            return {}
        context = PyMongoArrowContext(Schema(schema))
        try:
            context.process_bson_stream(raw)
        except TypeError:
            return {}
        table = context.finish()
        arrays = {name: _plain(table.column(name).combine_chunks()) for name in schema}
        if not all(map(_valid_text, arrays.values())):
            return {}
        return arrays


def unaccounted(raw: bytes, arrays: dict[str, pa.Array], columns: Sequence[Column]) -> list[bytes]:
    """The documents of raw, read whole into arrays, that may hold a top-level field other than the columns.

    A document holds none when the fewest bytes its columns' elements can take, plus 5 for its length and
    end, are all its bytes: a null is counted as missing, an int as an int32 when it fits one and the batch
    holds an int32 under its key. Nothing is counted that is not there, so any other field leaves bytes
    over, and so do a null or an int64 that fits an int32: those few documents must be decoded to tell.
    (numpy rather than pyarrow.compute here: its calls cost a few microseconds less each.)"""
    starts, sizes = _documents(raw)
    least = np.full(len(sizes), 5, np.int64)
    for column in columns:
        array = arrays[column.name]
        if len(array) != len(sizes):  # cannot happen: one row a document
            return [raw[start:start + size] for start, size in zip(starts, sizes)]
        least += _least_bytes(raw, column, array)
    return [raw[starts[i]:starts[i] + sizes[i]] for i in np.flatnonzero(least != np.array(sizes, np.int64))]


def _least_bytes(raw: bytes, column: Column, array: pa.Array) -> Any:
    """Per document, the fewest bytes the column's element takes: type byte, key, zero, value; 0 if null."""
    key = column.name.encode("utf-8")
    if column.kind in ("str", "text"):  # length, bytes, terminating zero
        offsets = np.frombuffer(array.buffers()[1], np.int32, len(array) + 1, array.offset * 4)
        value: Any = np.diff(offsets) + 5
    elif column.kind != "int" or b"\x10" + key + b"\x00" not in raw:  # no int32 under the key: every int an int64
        value = VALUE_BYTES[column.kind]
    else:
        ints = array.to_numpy(zero_copy_only=False)  # float64 with NaN for nulls, which count 0 below
        value = np.where((ints < INT32[0]) | (ints > INT32[1]), 8, 4)
    element = value + len(key) + 2
    if array.null_count:
        return np.where(array.is_valid().to_numpy(zero_copy_only=False), element, 0)
    return element


def _documents(raw: bytes) -> tuple[list[int], list[int]]:
    """Where each document of a raw batch starts, and its size."""
    starts, sizes, start = [], [], 0
    while start < len(raw):
        size = int.from_bytes(raw[start:start + 4], "little")
        starts.append(start)
        sizes.append(size)
        start += size
    return starts, sizes


def _covered(column: Column) -> bool:
    if column.kind in ("str", "text"):
        return column.seen <= {str, NONE} and not column.late
    return column.kind in SCHEMA_TYPES or column.kind == "oid"


def _valid_text(array: pa.Array) -> bool:
    """False for a string array holding bytes that are not UTF-8: PyMongoArrow copies a string's bytes
    unchecked, and pyarrow would write them into a file no reader can read. Decoding such a batch fails the
    export, as it does in every other format. (About 0.01 µs a value.)"""
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return True
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _plain(array: pa.Array) -> pa.Array:
    """PyMongoArrow's ObjectId extension type as its storage, the 12 bytes."""
    return array.storage if isinstance(array, pa.ExtensionArray) else array
