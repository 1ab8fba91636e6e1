"""Parquet exports, read back with pyarrow.parquet and with DuckDB.

Pipeline level: every BSON type through ExportPipeline fed raw BSON (the embedded server cannot store
Decimal128, Regex and the like), each value checked against an expectation written out by hand; the type
conflict rule. Service level: exports through the real app against the test database with both drivers,
compared value for value with the same query evaluated in Python over the source documents.
"""
from __future__ import annotations

import csv
import json
import math
import re
import secrets
from contextlib import aclosing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncGenerator, Iterable

import bson
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bson import Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary
from bson.datetime_ms import DatetimeMS
from bson.errors import InvalidBSON
from bson.tz_util import utc

from service.app import create_app
from service.db import Database, FindSpec
from service import pipeline as pipeline_module
from service.pipeline import ExportPipeline, PipelineResult
from service.query import CsvOptions, ExportSpec, ParquetOptions
from service.writers import parquet_arrow

from conftest import DATA_DB, export_files, make_settings, wait_status
from expected import INF, NAN, OID, UUID, lookup
from playwright.async_api import expect
from test_browser import OUTPUT, job_item, open_page, start_export

# One document with a value of every BSON type; the second batch repeats it with another _id, so the first
# batch's path (decoded documents) and the later batches' path (PyMongoArrow where it reads the column)
# must give the same values.
TYPES_DOC: dict[str, Any] = {
    "_id": OID,
    "str": 'plain, "quoted"\nline',
    "int32": -42,
    "int64": Int64(2**53 + 1),
    "double": 0.1,
    "integral": 3.0,
    "mixed_num": 2,  # int here, double in the second document: a double column, which holds 2 exactly
    "nan": NAN,
    "inf": INF,
    "negzero": -0.0,
    "true": True,
    "date": datetime(2024, 2, 29, 13, 45, 30, 123000, tzinfo=utc),
    "date_1899": datetime(1899, 12, 31, 23, 59, 59, 999000, tzinfo=utc),
    "far_date": DatetimeMS(253402300800000),  # 10000-01-01, past Python's datetime
    "oid": ObjectId("000000000000000000000001"),
    "dec": Decimal128("1234.5600"),
    "bin": b"\x00\xffhi",
    "uuid": Binary(UUID.bytes, 4),
    "doc": {"a": 1, "b": {"c": "x"}},
    "tags": ["a", "b"],
    "ints": [1, Int64(2)],
    "arr": [1, "two", {"three": 3.0}],
    "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2"}],
    "null": None,
    "regex": Regex("^a", "i"),
    "ts": Timestamp(1700000000, 7),
    "min": MinKey(),
    "max": MaxKey(),
    "code": Code("f()"),
    "unicode": "Café 東京 🎉",
}
SECOND_ID = ObjectId("65a1b2c3d4e5f60718293a4c")
THIRD_ID = ObjectId("65a1b2c3d4e5f60718293a4d")
# column -> (Arrow type, value read back by pyarrow), written out by hand
EXPECTED: dict[str, tuple[pa.DataType, Any]] = {
    "_id": (pa.binary(12), bytes.fromhex("65a1b2c3d4e5f60718293a4b")),
    "str": (pa.string(), 'plain, "quoted"\nline'),
    "int32": (pa.int64(), -42),
    "int64": (pa.int64(), 9007199254740993),
    "double": (pa.float64(), 0.1),
    "integral": (pa.float64(), 3.0),
    "inf": (pa.float64(), math.inf),
    "true": (pa.bool_(), True),
    "date": (pa.timestamp("ms", tz="UTC"), datetime(2024, 2, 29, 13, 45, 30, 123000, tzinfo=timezone.utc)),
    "date_1899": (pa.timestamp("ms", tz="UTC"), datetime(1899, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc)),
    "oid": (pa.binary(12), bytes.fromhex("000000000000000000000001")),
    "dec": (pa.string(), "1234.5600"),
    "bin": (pa.binary(), b"\x00\xffhi"),
    "uuid": (pa.binary(), bytes.fromhex("0f8fad5bd9cb469fa16570867728950e")),
    "doc": (pa.string(), '{"a":1,"b":{"c":"x"}}'),
    "tags": (pa.list_(pa.string()), ["a", "b"]),
    "ints": (pa.list_(pa.int64()), [1, 2]),
    "arr": (pa.string(), '[1,"two",{"three":3.0}]'),
    "items": (pa.string(), '[{"sku":"A-1","qty":2},{"sku":"B-2"}]'),
    "null": (pa.string(), None),
    "regex": (pa.string(), '{"$regularExpression":{"pattern":"^a","options":"i"}}'),
    "ts": (pa.string(), '{"$timestamp":{"t":1700000000,"i":7}}'),
    "min": (pa.string(), '{"$minKey":1}'),
    "max": (pa.string(), '{"$maxKey":1}'),
    "code": (pa.string(), "f()"),
    "unicode": (pa.string(), "Café 東京 🎉"),
}


def raw(docs: Iterable[dict[str, Any]]) -> bytes:
    """A raw batch as a cursor hands it over: concatenated BSON documents."""
    return b"".join(bson.encode(doc) for doc in docs)


def export(path: Path, batches: list[list[dict[str, Any]]], fields: tuple[str, ...] | None = None, **options: Any) -> PipelineResult:
    spec = ExportSpec(collection="golden", format="parquet", fields=fields, parquet=ParquetOptions(**options))
    pipeline = ExportPipeline(spec, path, {"collection": "golden"})
    for batch in batches:
        pipeline.feed(raw(batch))
    return pipeline.finish()


def test_every_bson_type_has_its_documented_column_type_and_value(tmp_path: Path) -> None:
    second = {**TYPES_DOC, "_id": SECOND_ID, "mixed_num": 2.5}
    third = {**TYPES_DOC, "_id": THIRD_ID}
    path = tmp_path / "types.parquet"
    result = export(path, [[TYPES_DOC, second], [third]], fields=tuple(TYPES_DOC))  # documents whole, not flattened
    table = pq.read_table(path)
    assert result.rows == table.num_rows == 3 and result.warnings == []
    assert table.schema.names == list(TYPES_DOC)
    for column, (arrow_type, value) in EXPECTED.items():
        assert table.schema.field(column).type == arrow_type, column
        if column not in ("_id", "mixed_num"):
            assert table.column(column).to_pylist() == [value] * 3, column
    assert table.column("_id").to_pylist() == [OID.binary, SECOND_ID.binary, THIRD_ID.binary]
    assert table.column("mixed_num").to_pylist() == [2.0, 2.5, 2.0]
    # values pyarrow cannot hand back as Python objects, or that == cannot compare
    assert table.column("far_date").cast(pa.int64()).to_pylist() == [253402300800000] * 3
    assert all(math.isnan(v) for v in table.column("nan").to_pylist())
    assert [math.copysign(1, v) for v in table.column("negzero").to_pylist()] == [-1.0] * 3


def test_dotted_fields_take_the_type_of_the_value_they_reach(tmp_path: Path) -> None:
    path = tmp_path / "dotted.parquet"
    fields = ("doc.a", "doc.b.c", "items.0.sku", "items.1.qty", "nope")
    export(path, [[TYPES_DOC], [{**TYPES_DOC, "_id": SECOND_ID}]], fields)
    table = pq.read_table(path)
    assert table.schema.names == list(fields)
    assert [table.schema.field(f).type for f in fields] == [pa.int64(), pa.string(), pa.string(), pa.string(), pa.string()]
    assert table.to_pylist() == [{"doc.a": 1, "doc.b.c": "x", "items.0.sku": "A-1", "items.1.qty": None, "nope": None}] * 2


def test_pymongoarrow_reads_later_batches_when_it_covers_every_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[set[str]] = []
    original = parquet_arrow.ArrowReader.read

    def spy(self: Any, raw_batch: bytes, columns: Any) -> dict[str, pa.Array]:
        arrays = original(self, raw_batch, columns)
        read.append(set(arrays))
        return arrays

    monkeypatch.setattr(parquet_arrow.ArrowReader, "read", spy)
    docs = [{"_id": i, "n": i, "x": i / 2, "s": f"s{i}", "d": datetime(2024, 1, 1, tzinfo=utc), "b": i % 2 == 0} for i in range(4)]
    # batch 3 carries a NaN (PyMongoArrow reads it as null) and batch 4 a bool in the int column (read as 1)
    batches = [docs[:1], docs[1:2], [{**docs[2], "x": NAN}], [{**docs[3], "n": True}]]
    path = tmp_path / "fast.parquet"
    result = export(path, batches)
    assert read[0] == {"_id", "n", "x", "s", "d", "b"}  # the first batch is the sample, decoded; the rest are read
    assert "x" not in read[1] and "n" in read[1]
    table = pq.read_table(path)
    assert table.column("s").to_pylist() == ["s0", "s1", "s2", "s3"]
    assert table.column("d").to_pylist() == [datetime(2024, 1, 1, tzinfo=timezone.utc)] * 4
    assert math.isnan(table.column("x").to_pylist()[2])
    assert table.column("n").to_pylist() == ["0", "1", "2", "true"]  # widened, not read as 1
    assert len(result.warnings) == 1 and "column n " in result.warnings[0]

    read.clear()  # a column PyMongoArrow does not cover: the batches are decoded, and read once only
    export(tmp_path / "decoded.parquet", [[{**d, "doc": {"k": 1}} for d in docs[:2]], [{**docs[2], "doc": {"k": 2}}]])
    assert read == []


def test_without_fields_batches_pymongoarrow_reads_are_not_decoded_yet_new_keys_are_warned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []
    original = pipeline_module.decode_batch

    def spy(raw_batch: bytes) -> list[dict[str, Any]]:
        docs = original(raw_batch)
        decoded.append(len(docs))
        return docs

    monkeypatch.setattr(pipeline_module, "decode_batch", spy)
    flat = [[{"_id": b * 100 + i, "n": i, "x": i / 4, "s": f"s{i}", "ok": True} for i in range(100)] for b in range(3)]
    result = export(tmp_path / "flat.parquet", flat)
    assert decoded == [100] and result.warnings == []  # the sample only: PyMongoArrow read the rest, undecoded
    assert pq.read_table(tmp_path / "flat.parquet").column("s").to_pylist() == [f"s{i}" for i in range(100)] * 3

    decoded.clear()
    late = [
        flat[1][:99] + [{"_id": 199, "n": 1, "x": 0.5, "s": "s", "ok": True, "new": 1}],
        # "q" takes the place of "n", the document's size unchanged; a null, and an int64 beside an int32
        [{"_id": 200, "q": 7, "x": 0.5, "s": "s", "ok": True}, {"_id": 201, "n": None}, {"_id": 202, "n": Int64(3)}, {"_id": 203, "n": 4}],
        flat[2],
    ]
    result = export(tmp_path / "late.parquet", [flat[0], *late])
    assert decoded == [100, 1, 3]  # only the documents that hold a field the sample missed, or may, are decoded
    (warning,) = result.warnings
    assert warning.endswith("later documents also have new, q (pass fields to export them)"), warning
    assert pq.read_table(tmp_path / "late.parquet").column("n").to_pylist()[199:204] == [1, None, None, 3, 4]


def test_a_later_value_that_does_not_fit_widens_the_column_to_text(tmp_path: Path) -> None:
    first = [{"_id": i, "n": i, "when": datetime(2024, 1, 1, 0, 0, i % 60, tzinfo=utc), "s": f"s{i}"} for i in range(1000)]
    later = [{"_id": 1000, "n": 2.5, "when": "soon", "s": 7}, {"_id": 1001, "n": "x", "when": None, "s": "t"}]
    path = tmp_path / "widened.parquet"
    # the first batch is a whole row group, on disk before the conflict arrives: it is rewritten
    result = export(path, [first, later], row_group_size=1000)
    meta = pq.ParquetFile(path).metadata
    table = pq.read_table(path)
    assert meta.num_rows == 1002 and meta.num_row_groups == 2
    assert table.schema.field("n").type == pa.string() and table.schema.field("when").type == pa.string()
    assert table.schema.field("_id").type == pa.int64()
    assert table.column("n").to_pylist() == [str(i) for i in range(1000)] + ["2.5", "x"]
    assert table.column("when").to_pylist()[:2] == ["2024-01-01T00:00:00.000Z", "2024-01-01T00:00:01.000Z"]
    assert table.column("when").to_pylist()[-2:] == ["soon", None]
    assert table.column("s").to_pylist()[-2:] == ["7", "t"]
    assert len(result.warnings) == 3
    for column, words in (("n", "int64"), ("when", "timestamp"), ("s", "int")):
        assert any(f"column {column} " in w and words in w for w in result.warnings), (column, result.warnings)
    assert not list(tmp_path.glob("widened.parquet.tmp/*"))  # the rewritten copy was moved into the export file


def test_an_int_column_meeting_doubles_becomes_double_while_every_int_fits(tmp_path: Path) -> None:
    path = tmp_path / "double.parquet"
    result = export(path, [[{"_id": 1, "n": 1, "big": 2**53 + 1}], [{"_id": 2, "n": 2.5, "big": 0.5}]], row_group_size=1000)
    table = pq.read_table(path)
    assert table.schema.field("n").type == pa.float64() and table.column("n").to_pylist() == [1.0, 2.5]
    # 2^53 + 1 has no double: that column becomes text instead
    assert table.column("big").to_pylist() == ["9007199254740993", "0.5"]
    assert sorted(w.split()[1] for w in result.warnings) == ["big", "n"]
    assert any("column n " in w and "as double" in w for w in result.warnings)


def test_widened_columns_hold_what_a_csv_cell_holds_for_the_values_written_before(tmp_path: Path) -> None:
    # (value, its CSV cell from the README's table), one column each; every column meets a string later
    cases = {
        "int": (Int64(-42), "-42"),
        "double": (3.0, "3.0"),
        "nan": (NAN, "NaN"),
        "negzero": (-0.0, "-0.0"),
        "bool": (True, "true"),
        "date": (datetime(2024, 2, 29, 13, 45, 30, 123000, tzinfo=utc), "2024-02-29T13:45:30.123Z"),
        "far_date": (DatetimeMS(253402300800000), "253402300800000"),
        "oid": (OID, "65a1b2c3d4e5f60718293a4b"),
        "bin": (b"\x00\xffhi", "AP9oaQ=="),
        "tags": (["a", "b"], '["a","b"]'),
        "floats": ([1.5, INF], '[1.5,{"$numberDouble":"Infinity"}]'),
    }
    first = [{"_id": 0, **{name: value for name, (value, _) in cases.items()}}]
    first += [{"_id": i, **dict.fromkeys(cases)} for i in range(1, 1000)]  # nulls fit every type
    path = tmp_path / "rendered.parquet"
    result = export(path, [first, [{"_id": 1000, **dict.fromkeys(cases, "x")}]], row_group_size=1000)
    table = pq.read_table(path)
    row = table.slice(0, 1).to_pylist()[0]
    assert {name: row[name] for name in cases} == {name: cell for name, (_, cell) in cases.items()}
    assert table.slice(1000).to_pylist()[0] == {"_id": 1000, **dict.fromkeys(cases, "x")}
    assert all(table.schema.field(name).type == pa.string() for name in cases)
    assert len(result.warnings) == len(cases)


@pytest.mark.parametrize("group_rows", [1000, 50_000])  # the ints on disk before the text, or still pending
def test_ints_widened_to_double_then_to_text_read_as_their_csv_cells(tmp_path: Path, group_rows: int) -> None:
    batches = [
        [{"_id": i, "n": i, "m": i} for i in range(1000)],  # n and m are int64 columns
        [{"_id": 1000, "n": 2.5, "m": 0.5}, {"_id": 1001, "n": 7, "m": 3.0}],  # both double now; 7 is still an int
        [{"_id": 1002, "n": Int64(2**60), "m": 4}],  # 2^60 has no double: n becomes text, m stays double
        [{"_id": 1003, "n": 8, "m": 1.0}],
    ]
    path = tmp_path / "twice.parquet"
    result = export(path, batches, row_group_size=group_rows)
    spec = ExportSpec(collection="golden", format="csv", csv=CsvOptions(escape_formulas=False))
    csv_pipeline = ExportPipeline(spec, tmp_path / "twice.csv", {"collection": "golden"})
    for batch in batches:
        csv_pipeline.feed(raw(batch))
    csv_pipeline.finish()
    with open(tmp_path / "twice.csv", newline="", encoding="utf-8") as handle:
        cells = [row[1] for row in csv.reader(handle)][1:]
    table = pq.read_table(path)
    assert table.schema.field("n").type == pa.string()
    assert table.column("n").to_pylist() == cells
    assert cells[:2] + cells[-4:] == ["0", "1", "2.5", "7", "1152921504606846976", "8"]  # what CSV gives, spelled out
    assert table.schema.field("m").type == pa.float64()
    assert table.column("m").to_pylist() == [float(i) for i in range(1000)] + [0.5, 3.0, 4.0, 1.0]
    (warning,) = [w for w in result.warnings if "column n " in w]
    assert "was int64 in the first documents" in warning and "double" in warning and "as text" in warning, warning


def test_a_double_column_holding_ints_renders_them_as_ints_when_widened_to_text(tmp_path: Path) -> None:
    path = tmp_path / "mixed_then_text.parquet"
    first = [{"_id": 0, "v": 1}, {"_id": 1, "v": 2.5}, {"_id": 2, "v": 3.0}] + [{"_id": i, "v": None} for i in range(3, 1000)]
    # batch 2 is all numbers, which PyMongoArrow could read, an int32 as a double
    export(path, [first, [{"_id": 1000, "v": 4}, {"_id": 1001, "v": 5.0}], [{"_id": 1002, "v": "x"}]], row_group_size=1000)
    values = pq.read_table(path).column("v").to_pylist()
    assert values[:3] + values[-3:] == ["1", "2.5", "3.0", "4", "5.0", "x"]


def test_a_binary_column_widened_to_text_writes_uuids_as_uuid_text_as_csv_does(tmp_path: Path) -> None:
    first = [{"_id": 0, "b": Binary(UUID.bytes, 4)}, {"_id": 1, "b": b"\x00\xffhi"}] + [{"_id": i, "b": None} for i in range(2, 1000)]
    path = tmp_path / "uuid.parquet"
    result = export(path, [first, [{"_id": 1000, "b": Binary(UUID.bytes, 4)}, {"_id": 1001, "b": "x"}]], row_group_size=1000)
    values = pq.read_table(path).column("b").to_pylist()
    assert values[:2] + values[-2:] == [str(UUID), "AP9oaQ==", str(UUID), "x"]
    assert result.warnings == ["column b was binary in the first documents; later values (string) did not fit and made it text; "
                               "the whole column is written as text"]


def test_warnings_name_bson_types(tmp_path: Path) -> None:
    sample = [{"_id": 1, "v": Int64(1), "w": "a"}, {"_id": 2, "v": NAN, "w": "b"}, {"_id": 3, "v": b"\x01", "w": "c"}]
    later = [{"_id": 4, "v": 1, "w": Decimal128("1.5")}, {"_id": 5, "v": 1, "w": datetime(2024, 1, 1, tzinfo=utc)}]
    result = export(tmp_path / "names.parquet", [sample, later])
    assert result.warnings == [
        "column v holds values of several types in the first documents (binData, double, long); it is written as text",
        "column w is text; later documents also hold date, decimal values, written as text",
    ]


def test_a_widened_column_before_any_row_group_is_written(tmp_path: Path) -> None:
    path = tmp_path / "pending.parquet"
    result = export(path, [[{"_id": 1, "v": True}], [{"_id": 2, "v": [1]}], [{"_id": 3, "v": False}]])
    assert pq.read_table(path).column("v").to_pylist() == ["true", "[1]", "false"]
    assert len(result.warnings) == 1 and "column v" in result.warnings[0]


def test_a_mixed_sample_is_text_from_the_start_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "mixed.parquet"
    result = export(path, [[{"_id": 1, "v": 1}, {"_id": 2, "v": "two"}, {"_id": 3, "v": [1, "x"]}]])
    table = pq.read_table(path)
    assert table.schema.field("v").type == pa.string()
    assert table.column("v").to_pylist() == ["1", "two", '[1,"x"]']
    assert len(result.warnings) == 1 and "column v" in result.warnings[0] and "several types" in result.warnings[0]


def test_row_groups_and_compression_follow_the_options(tmp_path: Path) -> None:
    docs = [{"_id": i, "n": i} for i in range(3500)]
    batches = [docs[i:i + 1000] for i in range(0, 3500, 1000)]
    for compression, codec in (("zstd", "ZSTD"), ("snappy", "SNAPPY"), ("gzip", "GZIP"), ("none", "UNCOMPRESSED")):
        path = tmp_path / f"{compression}.parquet"
        export(path, batches, row_group_size=2000, compression=compression)
        meta = pq.ParquetFile(path).metadata
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [2000, 1500]
        assert meta.row_group(0).column(1).compression == codec
        assert pq.read_table(path).column("n").to_pylist() == list(range(3500))


def test_an_empty_export_is_a_valid_file_with_the_fields_as_columns(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    result = export(path, [], fields=("a", "b.c"))
    table = pq.read_table(path)
    assert result.rows == 0 and table.num_rows == 0 and table.schema.names == ["a", "b.c"]


def test_rows_without_any_field_fail_the_export_rather_than_vanish(tmp_path: Path) -> None:
    # A Parquet file holds rows only in columns: documents with no field (a pipeline projecting nothing)
    # would give a file of 0 rows for an export of 3.
    with pytest.raises(ValueError, match="no field"):
        export(tmp_path / "nothing.parquet", [[{}, {}, {}]])
    rows = [{}, {"a": 1}]  # one field among them is enough: the others are nulls in its column
    assert export(tmp_path / "some.parquet", [rows], fields=("a",)).rows == 2
    assert pq.read_table(tmp_path / "some.parquet").to_pylist() == [{"a": None}, {"a": 1}]


def bad_utf8_document(doc_id: Any, field: str) -> bytes:
    """{"_id": doc_id, field: <the bytes ab FF FE>}: a string whose bytes are not UTF-8, as a server that does
    not check them may hand over; bson.encode refuses to write one, so a valid string is swapped for it."""
    valid = bson.encode({"_id": doc_id, field: "abcd"})
    return valid.replace(b"abcd\x00", b"ab\xff\xfe\x00")


def test_a_string_that_is_not_utf8_fails_the_export_as_in_csv(tmp_path: Path) -> None:
    # the first batch is the sample (decoded); the second is one PyMongoArrow covers whole, which copies
    # string bytes unchecked
    first = raw({"_id": i, "s": "ok"} for i in range(3))
    for fmt in ("csv", "parquet"):
        spec = ExportSpec(collection="golden", format=fmt, fields=("_id", "s"))
        pipeline = ExportPipeline(spec, tmp_path / f"bad.{fmt}", {"collection": "golden"})
        pipeline.feed(first)
        with pytest.raises(InvalidBSON, match="utf-8"):
            pipeline.feed(raw({"_id": 3 + i, "s": "ok"} for i in range(2)) + bad_utf8_document(9, "s"))


# --- through the service ------------------------------------------------------------------------------------
FILTER = {"archived": False}
FIELDS = ["_id", "seq", "title", "status", "createdAt", "estimate", "points", "archived", "tags", "assignee.name", "items", "completedAt"]
LIMIT = 1001  # one whole batch and one row more


def expected_rows(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The export's query evaluated in Python: filter, sort by seq, limit, each field as the README says."""
    rows = sorted((d for d in tasks if d.get("archived") is False), key=lambda d: d["seq"])[:LIMIT]
    return [{field: expected_value(field, lookup(doc, field)) for field in FIELDS} for doc in rows]


def expected_value(field: str, value: Any) -> Any:
    if isinstance(value, ObjectId):
        return value.binary
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc)
    if field == "items" and value is not None:  # arrays of documents: JSON text
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value


async def test_parquet_export_end_to_end_read_by_pyarrow_and_duckdb(client: Any, tasks: list[dict[str, Any]], tmp_path: Path) -> None:
    body = {"collection": "tasks", "format": "parquet", "filter": FILTER, "sort": {"seq": 1}, "fields": FIELDS, "limit": LIMIT,
            "options": {"parquet": {"row_group_size": 1000}}}
    resp = await client.post("/api/exports", json=body)
    assert resp.status == 202, await resp.text()
    snap = await wait_status(client, (await resp.json())["id"], timeout=60)
    assert snap["status"] == "completed", snap
    assert snap["file_name"].endswith(".parquet") and snap["processed"] == LIMIT and snap["warnings"] == []
    assert snap["options"]["parquet"] == {"row_group_size": 1000, "compression": "zstd"}
    download = await client.get(snap["download_url"])
    assert download.status == 200 and download.headers["Content-Type"] == "application/vnd.apache.parquet"
    path = tmp_path / "tasks.parquet"
    path.write_bytes(await download.read())

    expected = expected_rows(tasks)
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [1000, 1]
    table = pq.read_table(path)
    assert table.schema.names == FIELDS
    assert table.to_pylist() == expected

    # DuckDB reads the same file; ids as hex and dates as epoch milliseconds, so no time zone library is involved
    rows = duckdb.sql(
        f"""SELECT lower(hex("_id")), seq, title, status, epoch_ms("createdAt"), estimate, points, archived, tags,
                   "assignee.name", items, epoch_ms("completedAt") FROM read_parquet('{path}') ORDER BY seq"""
    ).fetchall()
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert row == tuple(
            (v.hex() if f == "_id" else int(v.timestamp() * 1000) if isinstance(v, datetime) else v) if v is not None else None
            for f, v in want.items()
        )
    counts = duckdb.sql(f"SELECT status, count(*), sum(points) FROM read_parquet('{path}') GROUP BY status ORDER BY status").fetchall()
    by_status: dict[str, list[int]] = {}
    for doc in expected:
        entry = by_status.setdefault(doc["status"], [0, 0])
        entry[0] += 1
        entry[1] += doc["points"]
    assert counts == [(status, n, total) for status, (n, total) in sorted(by_status.items())]


async def test_a_type_conflict_through_the_service_widens_and_warns(aiohttp_client: Any, mongo_url: str, tmp_path: Path, sync_db: Any) -> None:
    name = f"parquet_{secrets.token_hex(4)}"
    docs = [{"i": i, "n": i} for i in range(1500)]  # the embedded server sorts integer _ids as text
    docs[1200]["n"] = "twelve hundred"
    sync_db[name].insert_many(docs)
    try:
        api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, "pymongo")))
        body = {"collection": name, "format": "parquet", "sort": {"i": 1}, "options": {"parquet": {"row_group_size": 1000}}}
        resp = await api.post("/api/exports", json=body)
        assert resp.status == 202, await resp.text()
        snap = await wait_status(api, (await resp.json())["id"], timeout=60)
        assert snap["status"] == "completed", snap
        data = await (await api.get(snap["download_url"])).read()
    finally:
        sync_db.drop_collection(name)
    path = tmp_path / "conflict.parquet"
    path.write_bytes(data)
    table = pq.read_table(path)
    assert table.column("i").to_pylist() == list(range(1500))
    assert table.column("n").to_pylist() == [str(i) for i in range(1200)] + ["twelve hundred"] + [str(i) for i in range(1201, 1500)]
    assert len(snap["warnings"]) == 1 and "column n " in snap["warnings"][0]
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}') WHERE n = 'twelve hundred'").fetchall() == [(1,)]


class WithBadBatch:
    """A BatchSource reading the test database that hands over one more batch at the end, holding a string
    that is not UTF-8: MongoDB stores such strings as given, the embedded server refuses them."""

    def __init__(self, mongo_url: str, batch: bytes) -> None:
        self.db = Database.connect(mongo_url, DATA_DB)
        self.batch = batch

    async def count(self, spec: FindSpec) -> int:
        return await self.db.count(spec) + 1

    async def raw_batches(self, spec: FindSpec) -> AsyncGenerator[bytes, None]:
        async with aclosing(self.db.raw_batches(spec)) as batches:
            async for batch in batches:
                yield batch
        yield self.batch


async def test_a_string_that_is_not_utf8_fails_the_job_with_no_file(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: list[dict[str, Any]]
) -> None:
    source = WithBadBatch(mongo_url, raw({"_id": ObjectId(), "title": "fine"} for _ in range(5)) + bad_utf8_document(ObjectId(), "title"))
    settings = make_settings(mongo_url, tmp_path, "pymongo")
    try:
        api = await aiohttp_client(create_app(settings, source=source))
        body = {"collection": "tasks", "format": "parquet", "fields": ["_id", "title"], "options": {"parquet": {"row_group_size": 1000}}}
        resp = await api.post("/api/exports", json=body)
        assert resp.status == 202, await resp.text()
        snap = await wait_status(api, (await resp.json())["id"], timeout=60)
    finally:
        await source.db.close()
    assert snap["status"] == "failed", snap
    assert snap["error"]["code"] == "encode_error" and "utf-8" in snap["error"]["message"], snap["error"]
    assert snap.get("download_url") is None and snap["processed"] < len(tasks) + 6
    assert export_files(settings.export_dir) == []  # neither a finished file nor the partial one


async def test_a_pipeline_whose_rows_have_no_field_fails_the_job_with_no_file(client: Any, settings: Any, tasks: Any) -> None:
    body = {"collection": "tasks", "format": "parquet", "pipeline": [{"$limit": 3}, {"$project": {"_id": 0, "gone": "$no_such_field"}}]}
    resp = await client.post("/api/exports", json=body)
    assert resp.status == 202, await resp.text()
    snap = await wait_status(client, (await resp.json())["id"], timeout=60)
    assert snap["status"] == "failed" and snap["error"]["code"] == "encode_error", snap
    assert "no field" in snap["error"]["message"] and export_files(settings.export_dir) == []


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"parquet": {"row_group_size": 10}}, "options.parquet.row_group_size"),
        ({"parquet": {"row_group_size": "1000"}}, "options.parquet.row_group_size"),
        ({"parquet": {"row_group_size": True}}, "options.parquet.row_group_size"),
        ({"parquet": {"compression": "lz4"}}, "options.parquet.compression"),
        ({"parquet": {"dictionary": True}}, "options.parquet.dictionary"),
        ({"parquet": []}, "options.parquet"),
        ({"compress": "gzip"}, "options.compress"),
    ],
)
async def test_bad_parquet_options_are_rejected_naming_the_field(client: Any, options: dict[str, Any], field: str) -> None:
    resp = await client.post("/api/exports", json={"collection": "tasks", "format": "parquet", "options": options})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["field"] == field and error["code"] in ("invalid_option", "unknown_option") and error["message"]


# --- the page -----------------------------------------------------------------------------------------------
@pytest.mark.browser
async def test_the_page_exports_parquet_with_its_options(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: list[dict[str, Any]], browser: Any
) -> None:
    settings = make_settings(mongo_url, tmp_path, "pymongo", collections=("tasks",))
    client = await aiohttp_client(create_app(settings))
    page, errors = await open_page(browser, str(client.make_url("/")), collection="tasks")
    options = page.get_by_role("group", name="Parquet options")
    await expect(options).to_be_hidden()
    await page.locator('label[for="format-parquet"]').click()
    await expect(options).to_be_visible()
    await expect(page.get_by_label("Compression", exact=True)).to_be_disabled()
    await expect(page.get_by_label("Compression", exact=True)).to_have_value("none")
    OUTPUT.mkdir(exist_ok=True)
    await page.locator("#export-form").screenshot(path=str(OUTPUT / "parquet-options.png"), animations="disabled")

    rows = page.get_by_label("Rows per row group")
    await rows.fill("10")  # refused in the page, before any request
    await page.get_by_role("button", name="Start export").click()
    await expect(page.locator("#form-error")).to_contain_text("Rows per row group")
    await expect(rows).to_be_focused()

    await rows.fill("1000")
    await page.get_by_label("Column compression").select_option("snappy")
    job_id = await start_export(page, "parquet")
    item = job_item(page, job_id)
    await expect(item).to_have_attribute("data-status", "completed", timeout=60_000)
    async with page.expect_download() as download_info:
        await item.get_by_role("link", name=re.compile(r"^Download tasks-.*\.parquet")).click()
    saved = tmp_path / "page.parquet"
    await (await download_info.value).save_as(saved)
    errors.check()
    meta = pq.ParquetFile(saved).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [1000] * (len(tasks) // 1000)
    assert meta.row_group(0).column(0).compression == "SNAPPY"
    assert sorted(pq.read_table(saved).column("seq").to_pylist()) == sorted(d["seq"] for d in tasks)
