"""Rendering of single BSON values (service/writers/values.py) against the value table in DESIGN.md.

Every expected value below is written out by hand; none is computed by the code under test.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from bson import Code, DBRef, Decimal128, Int64, MaxKey, MinKey, Regex, Timestamp
from bson.binary import Binary
from bson.son import SON
from bson.datetime_ms import DatetimeMS
from bson.tz_util import utc

from service.writers.values import (
    MISSING,
    binary_text,
    canonical_json,
    csv_cell,
    decimal_as_float,
    discover_columns,
    float_text,
    iso_datetime,
    make_getters,
    project,
    projection_tree,
    relaxed_json,
    resolve,
    scalar_text,
)

from expected import INF, NAN, OID, UUID, UUID_B64

DOC = {
    "a": 1,
    "b": {"c": {"d": "deep"}, "e": None},
    "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2"}, "loose"],
    "matrix": [[1, 2], [3, 4]],
    "s": "text",
}


# --- paths -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, expected",
    [
        ("a", 1),
        ("b.c.d", "deep"),
        ("b.e", None),
        ("b.c", {"d": "deep"}),
        ("items.0.sku", "A-1"),
        ("items.1.sku", "B-2"),
        ("items.1.qty", MISSING),
        ("items.2", "loose"),
        ("items.2.sku", MISSING),  # a string has no fields
        ("items.3.sku", MISSING),  # past the end
        ("items.-1.sku", MISSING),  # no negative indexes
        ("items.sku", MISSING),  # a field name on an array does not resolve
        ("matrix.1.0", 3),
        ("s.length", MISSING),
        ("nope", MISSING),
        ("b.nope.deeper", MISSING),
    ],
)
def test_resolve_walks_documents_and_array_indexes(path: str, expected: Any) -> None:
    result = resolve(DOC, path)
    assert result is MISSING if expected is MISSING else result == expected


def test_getters_match_resolve() -> None:
    getters = make_getters(["a", "b.c.d", "items.0.sku", "nope"])
    assert [get(DOC) for get in getters] == [1, "deep", "A-1", MISSING]


def test_discovered_columns_flatten_documents_but_not_arrays_in_first_seen_order() -> None:
    docs = [
        {"_id": 1, "a": {"x": 1, "y": {"z": 2}}, "tags": ["t"]},
        {"_id": 2, "b": 3, "a": {"w": 0}, "empty": {}},
        {"_id": 3, "a": 5},
    ]
    assert discover_columns(docs) == ["_id", "a.x", "a.y.z", "tags", "b", "a.w", "empty", "a"]


def test_projection_keeps_document_order_and_projects_arrays_element_wise() -> None:
    tree = projection_tree(["items.sku", "b.c", "b", "a"])
    assert tree == {"items": {"sku": True}, "b": True, "a": True}  # the shorter path b wins over b.c
    doc = {"_id": 7, "s": "x", "b": {"c": 1, "z": 2}, "items": [{"sku": "A", "qty": 1}, "loose", [{"sku": "B"}]], "a": 0}
    assert project(doc, tree) == {"_id": 7, "b": {"c": 1, "z": 2}, "items": [{"sku": "A"}, [{"sku": "B"}]], "a": 0}
    assert list(project(doc, tree)) == ["_id", "b", "items", "a"]


# --- text --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected",
    [
        (datetime(2024, 2, 29, 13, 45, 30, 123000, tzinfo=utc), "2024-02-29T13:45:30.123Z"),
        (datetime(2024, 2, 29, 13, 45, 30, 123999, tzinfo=utc), "2024-02-29T13:45:30.123Z"),
        (datetime(1969, 7, 20, 20, 17, 40, tzinfo=utc), "1969-07-20T20:17:40.000Z"),
        (datetime(5, 1, 2, 3, 4, 5, tzinfo=utc), "0005-01-02T03:04:05.000Z"),
        (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc), "9999-12-31T23:59:59.999Z"),
        (datetime(2024, 1, 1, 1, 30), "2024-01-01T01:30:00.000Z"),  # naive: taken as UTC
        (datetime(2024, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))), "2023-12-31T23:30:00.000Z"),
    ],
)
def test_iso_datetime_is_utc_with_milliseconds_and_z(value: datetime, expected: str) -> None:
    assert iso_datetime(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [(NAN, "NaN"), (INF, "Infinity"), (-INF, "-Infinity"), (-0.0, "-0.0"), (0.1, "0.1"), (1e20, "1e+20"), (2.5e-7, "2.5e-07"), (3.0, "3.0")],
)
def test_float_text(value: float, expected: str) -> None:
    assert float_text(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"\x00\xffhi", "AP9oaQ=="),
        (Binary(b"\x00\xffhi", 5), "AP9oaQ=="),
        (Binary(UUID.bytes, 4), "0f8fad5b-d9cb-469f-a165-70867728950e"),
        (Binary(UUID.bytes, 3), UUID_B64),  # legacy UUID: byte order unknown, so base64
        (Binary(b"short", 4), "c2hvcnQ="),
        (UUID, "0f8fad5b-d9cb-469f-a165-70867728950e"),
        (b"", ""),
    ],
)
def test_binary_text(value: Any, expected: str) -> None:
    assert binary_text(value) == expected


# The CSV column of the value table, one row per BSON type (XLSX text cells use the same text).
SCALAR_TEXT = [
    ("null", None, ""),
    ("missing", MISSING, ""),
    ("string", "as is, \"quoted\"\n", "as is, \"quoted\"\n"),
    ("int32", -42, "-42"),
    ("int64", Int64(2**53 + 1), "9007199254740993"),
    ("int64 min", Int64(-(2**63)), "-9223372036854775808"),
    ("double", 0.1, "0.1"),
    ("double integral", 3.0, "3.0"),
    ("NaN", NAN, "NaN"),
    ("Infinity", INF, "Infinity"),
    ("-Infinity", -INF, "-Infinity"),
    ("-0.0", -0.0, "-0.0"),
    ("true", True, "true"),
    ("false", False, "false"),
    ("datetime", datetime(2024, 2, 29, 13, 45, 30, 123000, tzinfo=utc), "2024-02-29T13:45:30.123Z"),
    ("datetime before 1970", datetime(1969, 7, 20, 20, 17, 40, tzinfo=utc), "1969-07-20T20:17:40.000Z"),
    ("datetime out of range", DatetimeMS(-62198755200000), "-62198755200000"),
    ("ObjectId", OID, "65a1b2c3d4e5f60718293a4b"),
    ("Decimal128", Decimal128("1234.5600"), "1234.5600"),
    ("Decimal128 huge", Decimal128("1E+400"), "1E+400"),
    ("Decimal128 NaN", Decimal128("NaN"), "NaN"),
    ("binary", b"\x00\xffhi", "AP9oaQ=="),
    ("UUID", Binary(UUID.bytes, 4), "0f8fad5b-d9cb-469f-a165-70867728950e"),
    ("document", {"a": 1, "b": [True, None], "c": "é"}, '{"a":1,"b":[true,null],"c":"é"}'),
    ("array", [1, "two", {"d": datetime(2024, 1, 1, tzinfo=utc)}], '[1,"two",{"d":{"$date":"2024-01-01T00:00:00.000Z"}}]'),
    ("empty document", {}, "{}"),
    ("empty array", [], "[]"),
    ("nested non-finite", [NAN, None], '[{"$numberDouble":"NaN"},null]'),
    ("Regex", Regex("^a.*", "i"), '{"$regularExpression":{"pattern":"^a.*","options":"i"}}'),
    ("Timestamp", Timestamp(1700000000, 7), '{"$timestamp":{"t":1700000000,"i":7}}'),
    ("MinKey", MinKey(), '{"$minKey":1}'),
    ("MaxKey", MaxKey(), '{"$maxKey":1}'),
    ("Code", Code("return 1"), "return 1"),
    ("Code with scope", Code("return x", {"x": 1}), '{"$code":"return x","$scope":{"x":1}}'),
    ("DBRef", DBRef("users", OID), '{"$ref":"users","$id":{"$oid":"65a1b2c3d4e5f60718293a4b"}}'),
]


@pytest.mark.parametrize("value, expected", [row[1:] for row in SCALAR_TEXT], ids=[row[0] for row in SCALAR_TEXT])
def test_scalar_text(value: Any, expected: str) -> None:
    assert scalar_text(value) == expected


@pytest.mark.parametrize(
    "value, escape, expected",
    [
        ("=1+1", True, "'=1+1"),
        ("+1", True, "'+1"),
        ("-1", True, "'-1"),
        ("@SUM(A1)", True, "'@SUM(A1)"),
        ("\tx", True, "'\tx"),
        ("\rx", True, "'\rx"),
        ("=1+1", False, "=1+1"),
        ("a=1", True, "a=1"),
        ("", True, ""),
        (Code("=cmd"), True, "'=cmd"),  # Code is a string too
        (-1, True, "-1"),  # numbers are never escaped
        (-1.5, True, "-1.5"),
        (-INF, True, "-Infinity"),
        (Int64(-3), True, "-3"),
        (Decimal128("-7.0"), True, "-7.0"),
        (datetime(2024, 1, 1, tzinfo=utc), True, "2024-01-01T00:00:00.000Z"),
        (["=1"], True, '["=1"]'),  # JSON text starts with [ or {
    ],
)
def test_csv_cell_escapes_formulas_in_strings_only(value: Any, escape: bool, expected: str) -> None:
    assert csv_cell(value, escape) == expected


# --- Extended JSON -----------------------------------------------------------------------------
# (value, relaxed, canonical) of {"v": value}
EJSON = [
    ("string", "é\"\n", '{"v":"é\\"\\n"}', '{"v":"é\\"\\n"}'),
    ("int32", 42, '{"v":42}', '{"v":{"$numberInt":"42"}}'),
    ("int64 small", Int64(7), '{"v":7}', '{"v":{"$numberLong":"7"}}'),
    ("int64 beyond 2^53", Int64(2**53 + 1), '{"v":9007199254740993}', '{"v":{"$numberLong":"9007199254740993"}}'),
    ("double", 0.1, '{"v":0.1}', '{"v":{"$numberDouble":"0.1"}}'),
    ("double integral", 3.0, '{"v":3.0}', '{"v":{"$numberDouble":"3.0"}}'),
    ("-0.0", -0.0, '{"v":-0.0}', '{"v":{"$numberDouble":"-0.0"}}'),
    ("NaN", NAN, '{"v":{"$numberDouble":"NaN"}}', '{"v":{"$numberDouble":"NaN"}}'),
    ("Infinity", INF, '{"v":{"$numberDouble":"Infinity"}}', '{"v":{"$numberDouble":"Infinity"}}'),
    ("-Infinity", -INF, '{"v":{"$numberDouble":"-Infinity"}}', '{"v":{"$numberDouble":"-Infinity"}}'),
    ("bool", True, '{"v":true}', '{"v":true}'),
    ("null", None, '{"v":null}', '{"v":null}'),
    (
        "datetime",
        datetime(2024, 2, 29, 13, 45, 30, 123000, tzinfo=utc),
        '{"v":{"$date":"2024-02-29T13:45:30.123Z"}}',
        '{"v":{"$date":{"$numberLong":"1709214330123"}}}',
    ),
    ("epoch", datetime(1970, 1, 1, tzinfo=utc), '{"v":{"$date":"1970-01-01T00:00:00.000Z"}}', '{"v":{"$date":{"$numberLong":"0"}}}'),
    (
        "before 1970",
        datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=utc),
        '{"v":{"$date":{"$numberLong":"-1"}}}',
        '{"v":{"$date":{"$numberLong":"-1"}}}',
    ),
    ("out of range", DatetimeMS(-62198755200000), '{"v":{"$date":{"$numberLong":"-62198755200000"}}}', '{"v":{"$date":{"$numberLong":"-62198755200000"}}}'),
    ("ObjectId", OID, '{"v":{"$oid":"65a1b2c3d4e5f60718293a4b"}}', '{"v":{"$oid":"65a1b2c3d4e5f60718293a4b"}}'),
    ("Decimal128", Decimal128("0.1"), '{"v":{"$numberDecimal":"0.1"}}', '{"v":{"$numberDecimal":"0.1"}}'),
    ("binary", b"\x00\xffhi", '{"v":{"$binary":{"base64":"AP9oaQ==","subType":"00"}}}', '{"v":{"$binary":{"base64":"AP9oaQ==","subType":"00"}}}'),
    (
        "UUID",
        Binary(UUID.bytes, 4),
        '{"v":{"$binary":{"base64":"' + UUID_B64 + '","subType":"04"}}}',
        '{"v":{"$binary":{"base64":"' + UUID_B64 + '","subType":"04"}}}',
    ),
    # JavaScript code as mongoexport writes it in both modes; the scope follows the mode
    ("Code", Code("f()"), '{"v":{"$code":"f()"}}', '{"v":{"$code":"f()"}}'),
    ("Code with scope", Code("x", {"x": 1}), '{"v":{"$code":"x","$scope":{"x":1}}}', '{"v":{"$code":"x","$scope":{"x":{"$numberInt":"1"}}}}'),
    (
        "Code with a scope of BSON values",
        Code("f(d, n)", {"d": datetime(2024, 2, 29, 13, 45, 30, 123000, tzinfo=utc), "n": Int64(5), "o": OID}),
        '{"v":{"$code":"f(d, n)","$scope":{"d":{"$date":"2024-02-29T13:45:30.123Z"},"n":5,"o":{"$oid":"65a1b2c3d4e5f60718293a4b"}}}}',
        '{"v":{"$code":"f(d, n)","$scope":{"d":{"$date":{"$numberLong":"1709214330123"}},"n":{"$numberLong":"5"},'
        '"o":{"$oid":"65a1b2c3d4e5f60718293a4b"}}}}',
    ),
    ("Code with a non-finite double in its scope", Code("f(y)", {"y": [NAN]}), '{"v":{"$code":"f(y)","$scope":{"y":[{"$numberDouble":"NaN"}]}}}',
     '{"v":{"$code":"f(y)","$scope":{"y":[{"$numberDouble":"NaN"}]}}}'),
    ("Code in an array", [Code("a()"), Code("b()", {})], '{"v":[{"$code":"a()"},{"$code":"b()","$scope":{}}]}',
     '{"v":[{"$code":"a()"},{"$code":"b()","$scope":{}}]}'),
    ("Int64", Int64(9007199254740993), '{"v":9007199254740993}', '{"v":{"$numberLong":"9007199254740993"}}'),
    ("Int64 in a document", {"n": Int64(-7)}, '{"v":{"n":-7}}', '{"v":{"n":{"$numberLong":"-7"}}}'),
    # other subclasses of the built-in types, as a document_class or the caller may give them
    ("SON", SON([("b", 1), ("a", "x")]), '{"v":{"b":1,"a":"x"}}', '{"v":{"b":{"$numberInt":"1"},"a":"x"}}'),
    ("DBRef", DBRef("users", OID), '{"v":{"$ref":"users","$id":{"$oid":"65a1b2c3d4e5f60718293a4b"}}}',
     '{"v":{"$ref":"users","$id":{"$oid":"65a1b2c3d4e5f60718293a4b"}}}'),
    ("Regex", Regex("^a", "im"), '{"v":{"$regularExpression":{"pattern":"^a","options":"im"}}}', '{"v":{"$regularExpression":{"pattern":"^a","options":"im"}}}'),
    ("Timestamp", Timestamp(5, 6), '{"v":{"$timestamp":{"t":5,"i":6}}}', '{"v":{"$timestamp":{"t":5,"i":6}}}'),
    ("MinKey", MinKey(), '{"v":{"$minKey":1}}', '{"v":{"$minKey":1}}'),
    ("MaxKey", MaxKey(), '{"v":{"$maxKey":1}}', '{"v":{"$maxKey":1}}'),
    ("array", [1, [NAN], {"z": None}], '{"v":[1,[{"$numberDouble":"NaN"}],{"z":null}]}', '{"v":[{"$numberInt":"1"},[{"$numberDouble":"NaN"}],{"z":null}]}'),
    ("a string that says null", "null", '{"v":"null"}', '{"v":"null"}'),
]


@pytest.mark.parametrize("value, relaxed, canonical", [row[1:] for row in EJSON], ids=[row[0] for row in EJSON])
def test_extended_json(value: Any, relaxed: str, canonical: str) -> None:
    assert relaxed_json({"v": value}).decode("utf-8") == relaxed
    assert canonical_json({"v": value}).decode("utf-8") == canonical


@pytest.mark.parametrize(
    "value, expected",
    [
        (Decimal128("2.5"), 2.5),
        (Decimal128("-0"), -0.0),
        (Decimal128("1E+2"), 100.0),
        (Decimal128("0.1"), None),  # no double is exactly 0.1
        (Decimal128("9007199254740993"), None),  # 2^53 + 1
        (Decimal128("1E+400"), None),
        (Decimal128("NaN"), None),
        (Decimal128("Infinity"), None),
    ],
)
def test_decimal_as_float_only_when_exact(value: Decimal128, expected: float | None) -> None:
    assert decimal_as_float(value) == expected
