"""Golden tests of every format through ExportPipeline, fed raw BSON as the service feeds it, read back
with independent parsers (csv, json, bson.json_util, openpyxl, gzip).

Expected outputs are written out by hand (the value table in DESIGN.md); none is computed by the code
under test.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import bson
import openpyxl
import pytest
from bson import Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp, json_util
from bson.binary import Binary
from bson.codec_options import DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.json_util import JSONOptions
from bson.tz_util import utc
from hypothesis import HealthCheck, given, settings, strategies as st
from openpyxl.utils import get_column_letter
from openpyxl.utils.escape import unescape

from service.api import content_disposition
from scripts.generate_data import make_documents
from service.pipeline import MAX_WARNED_PATHS, ExportPipeline, PipelineResult, non_finite_suspects
from service.query import CsvOptions, ExportSpec, JsonOptions, safe_filename

from expected import FORMULA_START, INF, NAN, OID, UUID, UUID_B64

LOAD_OPTIONS = JSONOptions(tz_aware=True, tzinfo=utc, datetime_conversion=DatetimeConversion.DATETIME_AUTO)

# One document with every row of the value table.
TYPES_DOC: dict[str, Any] = {
    "_id": OID,
    "str": 'plain, "quoted"\nline',
    "int32": -42,
    "int64": Int64(2**53 + 1),
    "int64_small": Int64(7),
    "double": 0.1,
    "integral": 3.0,
    "nan": NAN,
    "inf": INF,
    "ninf": -INF,
    "negzero": -0.0,
    "true": True,
    "false": False,
    "date": datetime(2024, 2, 29, 13, 45, 30, 123000, tzinfo=utc),
    "date_1969": datetime(1969, 7, 20, 20, 17, 40, tzinfo=utc),
    "date_1899": datetime(1899, 12, 31, 23, 59, 59, 999000, tzinfo=utc),
    "oid": ObjectId("000000000000000000000001"),
    "dec_exact": Decimal128("2.5"),
    "dec_inexact": Decimal128("0.1"),
    "bin": b"\x00\xffhi",  # binary subtype 0 decodes as bytes
    "uuid": Binary(UUID.bytes, 4),
    "doc": {"a": 1, "b": {"c": "x"}},
    "arr": [1, "two", {"three": 3.0}],
    "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2"}],
    "null": None,
    "formula": "=1+1",
    "url": "http://x.y",
    "neg_str": "-1",
    "unicode": "Café 東京 🎉",
}
# Types the table does not list: they must not crash, and JSON must keep them.
EXOTIC_DOC: dict[str, Any] = {
    "_id": 2,
    "regex": Regex("^a", "i"),
    "ts": Timestamp(1700000000, 7),
    "min": MinKey(),
    "max": MaxKey(),
    "code": Code("f()"),
    "scoped": Code("x", {"x": 1}),
    "far_date": DatetimeMS(253402300800000),  # 10000-01-01, past Python's datetime
    "ref": DBRef("users", OID),
}
SOURCE = [TYPES_DOC, EXOTIC_DOC]

# --- CSV ---------------------------------------------------------------------------------------
# (column, CSV cell for TYPES_DOC)
CSV_CELLS = [
    ("_id", "65a1b2c3d4e5f60718293a4b"),
    ("str", 'plain, "quoted"\nline'),
    ("int32", "-42"),
    ("int64", "9007199254740993"),
    ("int64_small", "7"),
    ("double", "0.1"),
    ("integral", "3.0"),
    ("nan", "NaN"),
    ("inf", "Infinity"),
    ("ninf", "-Infinity"),
    ("negzero", "-0.0"),
    ("true", "true"),
    ("false", "false"),
    ("date", "2024-02-29T13:45:30.123Z"),
    ("date_1969", "1969-07-20T20:17:40.000Z"),
    ("date_1899", "1899-12-31T23:59:59.999Z"),
    ("oid", "000000000000000000000001"),
    ("dec_exact", "2.5"),
    ("dec_inexact", "0.1"),
    ("bin", "AP9oaQ=="),
    ("uuid", "0f8fad5b-d9cb-469f-a165-70867728950e"),
    ("doc", '{"a":1,"b":{"c":"x"}}'),
    ("doc.a", "1"),
    ("doc.b.c", "x"),
    ("arr", '[1,"two",{"three":3.0}]'),
    ("arr.1", "two"),
    ("arr.2.three", "3.0"),
    ("items.0.sku", "A-1"),
    ("items.1.sku", "B-2"),
    ("items.1.qty", ""),
    ("items.2.sku", ""),
    ("null", ""),
    ("missing", ""),
    ("str.x", ""),
    ("formula", "'=1+1"),
    ("url", "http://x.y"),
    ("neg_str", "'-1"),
    ("unicode", "Café 東京 🎉"),
]
FIELDS = tuple(column for column, _ in CSV_CELLS)
# Without fields the columns are discovered: subdocuments flattened, arrays kept whole.
EXOTIC_CSV = [
    ["_id", "regex", "ts", "min", "max", "code", "scoped", "far_date", "ref"],
    [
        "2",
        '{"$regularExpression":{"pattern":"^a","options":"i"}}',
        '{"$timestamp":{"t":1700000000,"i":7}}',
        '{"$minKey":1}',
        '{"$maxKey":1}',
        "f()",
        '{"$code":"x","$scope":{"x":1}}',
        "253402300800000",
        '{"$ref":"users","$id":{"$oid":"65a1b2c3d4e5f60718293a4b"}}',
    ],
]
SMALL = [
    {"a": "x,y", "b": 'he said "hi"'},
    {"a": "line\nbreak", "b": None},
    {"a": 1.5, "b": True},
    {"a": "=cmd", "b": -7},
]
# (csv options, exact file bytes for SMALL with fields a, b)
CSV_BYTES = [
    (CsvOptions(), b'a,b\r\n"x,y","he said ""hi"""\r\n"line\nbreak",\r\n1.5,true\r\n\'=cmd,-7\r\n'),
    (CsvOptions(delimiter=";"), b'a;b\r\nx,y;"he said ""hi"""\r\n"line\nbreak";\r\n1.5;true\r\n\'=cmd;-7\r\n'),
    (CsvOptions(delimiter="\t"), b'a\tb\r\nx,y\t"he said ""hi"""\r\n"line\nbreak"\t\r\n1.5\ttrue\r\n\'=cmd\t-7\r\n'),
    (CsvOptions(header=False), b'"x,y","he said ""hi"""\r\n"line\nbreak",\r\n1.5,true\r\n\'=cmd,-7\r\n'),
    (CsvOptions(bom=True), b'\xef\xbb\xbfa,b\r\n"x,y","he said ""hi"""\r\n"line\nbreak",\r\n1.5,true\r\n\'=cmd,-7\r\n'),
    (CsvOptions(escape_formulas=False), b'a,b\r\n"x,y","he said ""hi"""\r\n"line\nbreak",\r\n1.5,true\r\n=cmd,-7\r\n'),
]

# --- JSON --------------------------------------------------------------------------------------
RELAXED_TYPES = (
    '{"_id":{"$oid":"65a1b2c3d4e5f60718293a4b"},"str":"plain, \\"quoted\\"\\nline","int32":-42,'
    '"int64":9007199254740993,"int64_small":7,"double":0.1,"integral":3.0,"nan":{"$numberDouble":"NaN"},'
    '"inf":{"$numberDouble":"Infinity"},"ninf":{"$numberDouble":"-Infinity"},"negzero":-0.0,"true":true,"false":false,'
    '"date":{"$date":"2024-02-29T13:45:30.123Z"},"date_1969":{"$date":{"$numberLong":"-14182940000"}},'
    '"date_1899":{"$date":{"$numberLong":"-2208988800001"}},"oid":{"$oid":"000000000000000000000001"},'
    '"dec_exact":{"$numberDecimal":"2.5"},"dec_inexact":{"$numberDecimal":"0.1"},'
    '"bin":{"$binary":{"base64":"AP9oaQ==","subType":"00"}},"uuid":{"$binary":{"base64":"' + UUID_B64 + '","subType":"04"}},'
    '"doc":{"a":1,"b":{"c":"x"}},"arr":[1,"two",{"three":3.0}],"items":[{"sku":"A-1","qty":2},{"sku":"B-2"}],'
    '"null":null,"formula":"=1+1","url":"http://x.y","neg_str":"-1","unicode":"Café 東京 🎉"}'
)
CANONICAL_TYPES = (
    '{"_id":{"$oid":"65a1b2c3d4e5f60718293a4b"},"str":"plain, \\"quoted\\"\\nline","int32":{"$numberInt":"-42"},'
    '"int64":{"$numberLong":"9007199254740993"},"int64_small":{"$numberLong":"7"},"double":{"$numberDouble":"0.1"},'
    '"integral":{"$numberDouble":"3.0"},"nan":{"$numberDouble":"NaN"},"inf":{"$numberDouble":"Infinity"},'
    '"ninf":{"$numberDouble":"-Infinity"},"negzero":{"$numberDouble":"-0.0"},"true":true,"false":false,'
    '"date":{"$date":{"$numberLong":"1709214330123"}},"date_1969":{"$date":{"$numberLong":"-14182940000"}},'
    '"date_1899":{"$date":{"$numberLong":"-2208988800001"}},"oid":{"$oid":"000000000000000000000001"},'
    '"dec_exact":{"$numberDecimal":"2.5"},"dec_inexact":{"$numberDecimal":"0.1"},'
    '"bin":{"$binary":{"base64":"AP9oaQ==","subType":"00"}},"uuid":{"$binary":{"base64":"' + UUID_B64 + '","subType":"04"}},'
    '"doc":{"a":{"$numberInt":"1"},"b":{"c":"x"}},"arr":[{"$numberInt":"1"},"two",{"three":{"$numberDouble":"3.0"}}],'
    '"items":[{"sku":"A-1","qty":{"$numberInt":"2"}},{"sku":"B-2"}],'
    '"null":null,"formula":"=1+1","url":"http://x.y","neg_str":"-1","unicode":"Café 東京 🎉"}'
)
RELAXED_EXOTIC = (
    '{"_id":2,"regex":{"$regularExpression":{"pattern":"^a","options":"i"}},"ts":{"$timestamp":{"t":1700000000,"i":7}},'
    '"min":{"$minKey":1},"max":{"$maxKey":1},"code":{"$code":"f()"},"scoped":{"$code":"x","$scope":{"x":1}},'
    '"far_date":{"$date":{"$numberLong":"253402300800000"}},'
    '"ref":{"$ref":"users","$id":{"$oid":"65a1b2c3d4e5f60718293a4b"}}}'
)
CANONICAL_EXOTIC = (
    '{"_id":{"$numberInt":"2"},"regex":{"$regularExpression":{"pattern":"^a","options":"i"}},'
    '"ts":{"$timestamp":{"t":1700000000,"i":7}},"min":{"$minKey":1},"max":{"$maxKey":1},"code":{"$code":"f()"},'
    '"scoped":{"$code":"x","$scope":{"x":{"$numberInt":"1"}}},"far_date":{"$date":{"$numberLong":"253402300800000"}},'
    '"ref":{"$ref":"users","$id":{"$oid":"65a1b2c3d4e5f60718293a4b"}}}'
)
JSON_LINES = {"relaxed": [RELAXED_TYPES, RELAXED_EXOTIC], "canonical": [CANONICAL_TYPES, CANONICAL_EXOTIC]}

# --- XLSX --------------------------------------------------------------------------------------
# (column, cell value as openpyxl reads it, openpyxl data type); "n" with None is a blank cell.
XLSX_CELLS = [
    ("_id", "65a1b2c3d4e5f60718293a4b", "s"),
    ("str", 'plain, "quoted"\nline', "s"),
    ("int32", -42, "n"),
    ("int64", "9007199254740993", "s"),
    ("int64_small", 7, "n"),
    ("double", 0.1, "n"),
    ("integral", 3, "n"),
    ("nan", "NaN", "s"),
    ("inf", "Infinity", "s"),
    ("ninf", "-Infinity", "s"),
    ("negzero", 0, "n"),
    ("true", True, "b"),
    ("false", False, "b"),
    ("date", datetime(2024, 2, 29, 13, 45, 30, 123000), "d"),
    ("date_1969", datetime(1969, 7, 20, 20, 17, 40), "d"),
    ("date_1899", "1899-12-31T23:59:59.999Z", "s"),  # Excel has no dates before 1900
    ("oid", "000000000000000000000001", "s"),
    ("dec_exact", 2.5, "n"),
    ("dec_inexact", "0.1", "s"),
    ("bin", "AP9oaQ==", "s"),
    ("uuid", "0f8fad5b-d9cb-469f-a165-70867728950e", "s"),
    ("doc", '{"a":1,"b":{"c":"x"}}', "s"),
    ("doc.a", 1, "n"),
    ("doc.b.c", "x", "s"),
    ("arr", '[1,"two",{"three":3.0}]', "s"),
    ("arr.1", "two", "s"),
    ("arr.2.three", 3, "n"),
    ("items.0.sku", "A-1", "s"),
    ("items.1.sku", "B-2", "s"),
    ("items.1.qty", None, "n"),
    ("items.2.sku", None, "n"),
    ("null", None, "n"),
    ("missing", None, "n"),
    ("str.x", None, "n"),
    ("formula", "=1+1", "s"),  # never a formula
    ("url", "http://x.y", "s"),  # never a hyperlink
    ("neg_str", "-1", "s"),  # never a number
    ("unicode", "Café 東京 🎉", "s"),
]
EXOTIC_XLSX = [
    ("_id", 2, "n"),
    ("regex", '{"$regularExpression":{"pattern":"^a","options":"i"}}', "s"),
    ("ts", '{"$timestamp":{"t":1700000000,"i":7}}', "s"),
    ("min", '{"$minKey":1}', "s"),
    ("max", '{"$maxKey":1}', "s"),
    ("code", "f()", "s"),
    ("scoped", '{"$code":"x","$scope":{"x":1}}', "s"),
    ("far_date", "253402300800000", "s"),
    ("ref", '{"$ref":"users","$id":{"$oid":"65a1b2c3d4e5f60718293a4b"}}', "s"),
]


# --- helpers -----------------------------------------------------------------------------------
def raw(docs: Iterable[dict[str, Any]]) -> bytes:
    """A raw batch as a cursor hands it over: concatenated BSON documents."""
    return b"".join(bson.encode(doc) for doc in docs)


def export(
    directory: Path,
    fmt: str,
    batches: list[list[dict[str, Any]]],
    info: dict[str, Any] | None = None,
    **spec: Any,
) -> tuple[bytes, PipelineResult]:
    path = directory / f"out-{fmt}-{len(list(directory.iterdir()))}.part"
    pipeline = ExportPipeline(ExportSpec(collection="golden", format=fmt, **spec), path, info or {"collection": "golden"})
    for batch in batches:
        assert pipeline.feed(raw(batch)) == len(batch)
    result = pipeline.finish()
    data = path.read_bytes()
    assert result.bytes == len(data)
    return data, result


def csv_rows(data: bytes, delimiter: str = ",", bom: bool = False) -> list[list[str]]:
    text = data.decode("utf-8-sig" if bom else "utf-8")
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))


def assert_same(got: Any, want: Any, strict_ints: bool, where: str = "$") -> None:
    """Equality that also checks key order and types, and holds for NaN and tells -0.0 from 0.0."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], strict_ints, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for index, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, strict_ints, f"{where}[{index}]")
    elif isinstance(want, float):
        assert type(got) is float and (math.isnan(got) and math.isnan(want) or repr(got) == repr(want)), (where, got, want)
    elif isinstance(want, int) and not isinstance(want, bool) and not strict_ints:
        assert type(got) in (int, Int64) and got == want, (where, got, want)  # relaxed EJSON has one integer
    else:
        assert type(got) is type(want) and got == want, (where, got, want)


def xlsx_cell_value(cell: Any) -> Any:
    return unescape(cell.value) if isinstance(cell.value, str) else cell.value


# --- CSV ---------------------------------------------------------------------------------------
def test_csv_golden_every_value(tmp_path: Path) -> None:
    data, result = export(tmp_path, "csv", [[TYPES_DOC]], fields=FIELDS)
    assert csv_rows(data) == [list(FIELDS), [cell for _, cell in CSV_CELLS]]
    assert result.rows == 1 and result.columns == list(FIELDS) and result.warnings == []


def test_csv_exotic_types_with_discovered_columns(tmp_path: Path) -> None:
    data, result = export(tmp_path, "csv", [[EXOTIC_DOC]])
    assert csv_rows(data) == EXOTIC_CSV
    assert result.columns == EXOTIC_CSV[0]


def test_csv_discovered_columns_flatten_documents(tmp_path: Path) -> None:
    data, result = export(tmp_path, "csv", [[TYPES_DOC]])
    rows = csv_rows(data)
    # "doc" is flattened to its leaves; arrays stay one JSON column
    assert rows[0][21:25] == ["doc.a", "doc.b.c", "arr", "items"]
    assert rows[1][21:25] == ["1", "x", '[1,"two",{"three":3.0}]', '[{"sku":"A-1","qty":2},{"sku":"B-2"}]']
    assert len(rows[0]) == len(TYPES_DOC) + 1 and rows[0] == result.columns


@pytest.mark.parametrize("options, expected", CSV_BYTES, ids=["default", "semicolon", "tab", "no header", "bom", "no escaping"])
def test_csv_options_exact_bytes(tmp_path: Path, options: CsvOptions, expected: bytes) -> None:
    data, _ = export(tmp_path, "csv", [SMALL[:2], SMALL[2:]], fields=("a", "b"), csv=options)
    assert data == expected
    rows = csv_rows(data, options.delimiter, options.bom)
    want = [["x,y", 'he said "hi"'], ["line\nbreak", ""], ["1.5", "true"], ["'=cmd" if options.escape_formulas else "=cmd", "-7"]]
    assert rows == ([["a", "b"]] if options.header else []) + want


def test_csv_numbers_are_never_escaped(tmp_path: Path) -> None:
    doc = {"i": -1, "l": Int64(-(2**62)), "d": -0.5, "n": -INF, "m": Decimal128("-3.25"), "s": "-x", "p": "+1", "at": "@a"}
    data, _ = export(tmp_path, "csv", [[doc]], fields=tuple(doc))
    assert csv_rows(data)[1] == ["-1", "-4611686018427387904", "-0.5", "-Infinity", "-3.25", "'-x", "'+1", "'@a"]


def test_csv_header_names_are_escaped_like_strings(tmp_path: Path) -> None:
    doc = {"=HYPERLINK(\"http://x\",\"y\")": 1, "@SUM(A1)": 2, "plain": 3}
    assert csv_rows(export(tmp_path, "csv", [[doc]])[0])[0] == ["'=HYPERLINK(\"http://x\",\"y\")", "'@SUM(A1)", "plain"]
    assert csv_rows(export(tmp_path, "csv", [[doc]], csv=CsvOptions(escape_formulas=False))[0])[0] == list(doc)


def test_empty_export_of_every_format(tmp_path: Path) -> None:
    assert export(tmp_path, "csv", [])[0] == b""  # no documents, no fields: no columns, no header
    assert export(tmp_path, "csv", [], fields=("a", "b"))[0] == b"a,b\r\n"
    assert json.loads(export(tmp_path, "json", [])[0]) == []
    assert export(tmp_path, "ndjson", [])[0] == b""
    data, result = export(tmp_path, "xlsx", [], fields=("a",))
    rows = list(openpyxl.load_workbook(io.BytesIO(data)).active.values)
    assert rows == [("a",)] and result.rows == 0


# Strings that make CSV writers trip, beside what hypothesis finds.
TRICKY = ["", " ", '"', '""', ",", ";", "\t", "\r", "\n", "\r\n", "a\rb", "a\n", "\ufeffbom", "'", "=1", "+", "-", "@", "é東🎉", "x" * 300]
CSV_STRINGS = st.one_of(st.sampled_from(TRICKY), st.text(max_size=40))
# Any character the API accepts as a delimiter (one character, not a quote or a line break).
DELIMITERS = st.one_of(st.sampled_from([",", ";", "\t", "|", " "]), st.characters(exclude_characters='"\r\n', exclude_categories=("Cs",)))


@given(
    rows=st.lists(st.tuples(CSV_STRINGS, CSV_STRINGS, CSV_STRINGS), min_size=1, max_size=4),
    delimiter=DELIMITERS,
    header=st.booleans(),
    bom=st.booleans(),
    escape=st.booleans(),
)
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_string_survives_csv_round_trip(rows: list[tuple[str, str, str]], delimiter: str, header: bool, bom: bool, escape: bool) -> None:
    fields = ("a", 'we"ird, name', "c")
    docs = [dict(zip(fields, row)) for row in rows]
    options = CsvOptions(delimiter=delimiter, header=header, bom=bom, escape_formulas=escape)
    with tempfile.TemporaryDirectory() as directory:
        data, _ = export(Path(directory), "csv", [docs], fields=fields, csv=options)
    if bom:
        assert data.startswith(b"\xef\xbb\xbf")
    read = csv_rows(data, delimiter, bom)
    if header:
        assert read.pop(0) == list(fields)
    expected = [["'" + s if escape and s.startswith(FORMULA_START) else s for s in row] for row in rows]
    assert read == expected


# --- JSON and NDJSON ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["relaxed", "canonical"])
def test_ndjson_golden_lines(tmp_path: Path, mode: str) -> None:
    data, result = export(tmp_path, "ndjson", [[TYPES_DOC], [EXOTIC_DOC]], json=JsonOptions(mode=mode))
    assert data.decode("utf-8").split("\n") == [*JSON_LINES[mode], ""]  # one document a line, each ended
    assert result.rows == 2 and result.columns is None


@pytest.mark.parametrize("mode", ["relaxed", "canonical"])
def test_json_array_golden(tmp_path: Path, mode: str) -> None:
    data, _ = export(tmp_path, "json", [[TYPES_DOC], [EXOTIC_DOC]], json=JsonOptions(mode=mode))
    assert data.decode("utf-8") == "[\n" + ",\n".join(JSON_LINES[mode]) + "\n]\n"


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
@pytest.mark.parametrize("mode", ["relaxed", "canonical"])
def test_json_reads_back_as_the_source_documents(tmp_path: Path, fmt: str, mode: str) -> None:
    data, _ = export(tmp_path, fmt, [[TYPES_DOC], [EXOTIC_DOC, TYPES_DOC]], json=JsonOptions(mode=mode))
    text = data.decode("utf-8")
    if fmt == "json":
        docs = json_util.loads(text, json_options=LOAD_OPTIONS)
    else:
        docs = [json_util.loads(line, json_options=LOAD_OPTIONS) for line in text.splitlines()]
    assert_same(docs, [TYPES_DOC, EXOTIC_DOC, TYPES_DOC], strict_ints=mode == "canonical")


# Keys as BSON allows them (no NUL), none read back as an Extended JSON operator.
KEYS = st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=6).filter(
    lambda key: not key.startswith("$")
)
NUMBERS = st.one_of(
    st.floats(),  # NaN (any payload, either sign), both infinities, -0.0, subnormals
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(Int64),
    st.text(max_size=8),
)
NESTED = st.recursive(NUMBERS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


@given(st.lists(st.dictionaries(KEYS, NESTED, max_size=6), min_size=1, max_size=8), st.sampled_from(["json", "ndjson"]))
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_numbers_survive_json_round_trip(docs: list[dict[str, Any]], fmt: str) -> None:
    """NaN and the infinities are found in raw batches by their bytes; no document holding one may be missed,
    wherever it sits, whatever the keys and the numbers beside it look like."""
    with tempfile.TemporaryDirectory() as directory:
        data, _ = export(Path(directory), fmt, [docs])
    text = data.decode("utf-8")
    if fmt == "json":
        got = json_util.loads(text, json_options=LOAD_OPTIONS)
    else:  # not splitlines(): a string may hold U+0085 or U+2028, which JSON leaves as they are
        got = [json_util.loads(line, json_options=LOAD_OPTIONS) for line in text.split("\n")[:-1]]
    assert_same(got, bson.decode_all(raw(docs)), strict_ints=False)  # as stored: a top-level _id comes first


def test_non_finite_doubles_found_across_a_batch_of_1001(tmp_path: Path) -> None:
    """Negative 64-bit integers end in the same bytes as a NaN; the NaN in the last document is still found."""
    docs: list[dict[str, Any]] = [{"n": index, "long": Int64(-index - 1), "x": 1.5} for index in range(1000)]
    docs.append({"n": 1000, "deep": [{"v": NAN}, -INF], "x": INF})
    data, result = export(tmp_path, "ndjson", [docs])
    lines = data.decode("utf-8").splitlines()
    assert result.rows == 1001 and len(lines) == 1001
    assert lines[-1] == '{"n":1000,"deep":[{"v":{"$numberDouble":"NaN"}},{"$numberDouble":"-Infinity"}],"x":{"$numberDouble":"Infinity"}}'
    assert lines[999] == '{"n":999,"long":-1000,"x":1.5}'


def test_generated_data_takes_the_fast_path() -> None:
    """The generator's documents (realistic data) hold nothing that looks like a non-finite double, so no
    document of theirs is walked value by value."""
    docs = list(make_documents(3000, seed=7))
    assert non_finite_suspects(raw(docs)) == set()


@pytest.mark.parametrize("mode", ["relaxed", "canonical"])
def test_json_envelope(tmp_path: Path, mode: str) -> None:
    info = {"collection": "golden", "filter": {"a": 1}, "fields": None, "sort": {}, "limit": 0, "total": 2}
    data, _ = export(tmp_path, "json", [[TYPES_DOC], [EXOTIC_DOC]], info, json=JsonOptions(mode=mode, envelope=True))
    body = json_util.loads(data.decode("utf-8"), json_options=LOAD_OPTIONS)
    assert list(body) == ["exportInfo", "documents"]
    assert_same(body["documents"], SOURCE, strict_ints=mode == "canonical")
    export_info = body["exportInfo"]
    assert list(export_info) == ["collection", "filter", "fields", "sort", "limit", "total", "exported_at"]
    assert export_info["collection"] == "golden" and export_info["total"] == 2 and export_info["filter"] == {"a": 1}
    assert isinstance(export_info["exported_at"], datetime) and export_info["exported_at"].tzinfo is not None


def test_json_fields_project_like_the_server(tmp_path: Path) -> None:
    data, _ = export(tmp_path, "ndjson", [[TYPES_DOC]], fields=("doc.b", "items.sku", "int32", "missing"))
    assert data == (
        b'{"_id":{"$oid":"65a1b2c3d4e5f60718293a4b"},"int32":-42,"doc":{"b":{"c":"x"}},'
        b'"items":[{"sku":"A-1"},{"sku":"B-2"}]}\n'
    )


def test_an_empty_first_batch_is_no_sample(tmp_path: Path) -> None:
    data, result = export(tmp_path, "csv", [[], [{"a": 1}]])
    assert csv_rows(data) == [["a"], ["1"]] and result.warnings == []


def test_json_array_over_many_batches_is_one_valid_array(tmp_path: Path) -> None:
    batches = [[{"_id": i * 10 + j, "s": "x"} for j in range(n)] for i, n in enumerate([3, 0, 1, 5])]
    data, result = export(tmp_path, "json", batches)
    assert [doc["_id"] for doc in json.loads(data)] == [0, 1, 2, 20, 30, 31, 32, 33, 34]
    assert result.rows == 9


# --- XLSX --------------------------------------------------------------------------------------
def test_xlsx_golden_every_value_and_styles(tmp_path: Path) -> None:
    data, result = export(tmp_path, "xlsx", [[TYPES_DOC]], fields=FIELDS)
    book = openpyxl.load_workbook(io.BytesIO(data))
    assert book.sheetnames == ["Export"]
    sheet = book.active
    assert [c.value for c in sheet[1]] == list(FIELDS)
    assert all(c.font.b for c in sheet[1]) and not any(c.font.b for c in sheet[2])
    assert sheet.freeze_panes == "A2"
    assert sheet.auto_filter.ref == f"A1:{get_column_letter(len(FIELDS))}2"
    got = [(column, xlsx_cell_value(cell), cell.data_type) for column, cell in zip(FIELDS, sheet[2])]
    assert got == XLSX_CELLS
    for (column, value, _), cell in zip(XLSX_CELLS, sheet[2]):
        assert type(xlsx_cell_value(cell)) is type(value), column  # True stays bool, 3 stays a number
        assert cell.hyperlink is None
        if isinstance(value, datetime):
            assert cell.number_format == "yyyy-mm-dd hh:mm:ss"
    assert sheet._hyperlinks == []  # noqa: SLF001 - no cell became a link
    assert result.warnings == []


def test_xlsx_exotic_types(tmp_path: Path) -> None:
    data, _ = export(tmp_path, "xlsx", [[EXOTIC_DOC]])
    sheet = openpyxl.load_workbook(io.BytesIO(data)).active
    assert [(h.value, xlsx_cell_value(c), c.data_type) for h, c in zip(sheet[1], sheet[2])] == EXOTIC_XLSX


XLSX_STRINGS = ["=SUM(A1:A2)", "=HYPERLINK(\"http://x\")", "http://example.com", "mailto:a@b.c", "0123", "1e5", "TRUE",
                "a\rb", "a\r\nb", "_x000D_", "\x01ctl", "  padded  ", "\t", "Café 東京 🎉"]


def test_xlsx_strings_stay_strings(tmp_path: Path) -> None:
    docs = [{"s": s} for s in XLSX_STRINGS]
    data, _ = export(tmp_path, "xlsx", [docs])
    sheet = openpyxl.load_workbook(io.BytesIO(data)).active
    cells = [row[0] for row in sheet.iter_rows(min_row=2)]
    assert [xlsx_cell_value(c) for c in cells] == XLSX_STRINGS
    assert {c.data_type for c in cells} == {"s"}
    assert sheet._hyperlinks == []  # noqa: SLF001


@given(st.lists(st.text(max_size=30), min_size=1, max_size=5))
@settings(max_examples=40, deadline=None, database=None)
def test_any_string_survives_xlsx_round_trip(strings: list[str]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        data, _ = export(Path(directory), "xlsx", [[{"s": s} for s in strings]], fields=("s",))
    sheet = openpyxl.load_workbook(io.BytesIO(data), read_only=True).worksheets[0]
    read = [row[0] for row in sheet.iter_rows(min_row=2, values_only=True)]
    assert [unescape(v) if v is not None else "" for v in read] == strings  # an empty string reads back blank


def test_xlsx_cuts_cells_at_excel_limit_and_says_so(tmp_path: Path) -> None:
    docs = [{"s": "a" * 32_767, "d": {"k": "b" * 40_000}}, {"s": "c" * 40_000, "d": None}]
    data, result = export(tmp_path, "xlsx", [docs], fields=("s", "d"))
    sheet = openpyxl.load_workbook(io.BytesIO(data), read_only=True).worksheets[0]
    rows = list(sheet.iter_rows(min_row=2, values_only=True))
    assert rows[0][0] == "a" * 32_767
    assert rows[0][1] == ('{"k":"' + "b" * 40_000)[:32_767]
    assert rows[1] == ("c" * 32_767, None)
    assert result.warnings == ["2 XLSX cells were cut at 32,767 characters, Excel's limit for one cell"]


@pytest.mark.parametrize(
    "value, expected",
    [
        (datetime(1899, 12, 31, 23, 59, 59, 999000, tzinfo=utc), "1899-12-31T23:59:59.999Z"),
        (datetime(1900, 1, 1, tzinfo=utc), "1900-01-01T00:00:00.000Z"),
        (datetime(1900, 2, 28, 12, tzinfo=utc), "1900-02-28T12:00:00.000Z"),  # Excel would show 29 February
        (datetime(1900, 3, 1, tzinfo=utc), datetime(1900, 3, 1)),
        (datetime(1970, 1, 1, tzinfo=utc), datetime(1970, 1, 1)),
        (datetime(2024, 1, 1, 0, 0, 0, 1000, tzinfo=utc), datetime(2024, 1, 1, 0, 0, 0, 1000)),
        (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=utc), datetime(9999, 12, 31, 23, 59, 59, 999000)),
    ],
)
def test_xlsx_dates_from_march_1900_are_date_cells_earlier_ones_text(tmp_path: Path, value: datetime, expected: Any) -> None:
    data, _ = export(tmp_path, "xlsx", [[{"d": value}]], fields=("d",))
    cell = openpyxl.load_workbook(io.BytesIO(data)).active["A2"]
    assert cell.value == expected and type(cell.value) is type(expected)
    assert cell.data_type == ("d" if isinstance(expected, datetime) else "s")


def test_xlsx_keeps_the_columns_a_sheet_can_hold_and_says_so(tmp_path: Path) -> None:
    doc = {f"k{i}": i for i in range(16_390)}
    data, result = export(tmp_path, "xlsx", [[doc]])
    assert result.columns == [f"k{i}" for i in range(16_384)]
    sheet = openpyxl.load_workbook(io.BytesIO(data), read_only=True).worksheets[0]
    header, row = sheet.iter_rows(values_only=True)
    assert header[-1] == "k16383" and row[-1] == 16383 and len(row) == 16_384
    assert result.warnings == ["only the first 16,384 of 16,390 columns fit in an XLSX sheet"]


@pytest.mark.parametrize("count, sizes", [(8, [3, 3, 2]), (6, [3, 3]), (3, [3]), (1, [1])])
def test_xlsx_new_sheet_every_max_rows_with_header_repeated(tmp_path: Path, count: int, sizes: list[int]) -> None:
    docs = [{"seq": i, "name": f"n{i}"} for i in range(count)]
    batches = [docs[:2], docs[2:7], docs[7:]]
    data, result = export(tmp_path, "xlsx", batches, fields=("seq", "name"), xlsx_rows_per_sheet=3)
    book = openpyxl.load_workbook(io.BytesIO(data))
    assert book.sheetnames == ["Export", "Export 2", "Export 3"][: len(sizes)]
    seen = []
    for sheet, size in zip(book.worksheets, sizes):
        rows = list(sheet.values)
        assert rows[0] == ("seq", "name") and len(rows) == size + 1
        assert sheet["A1"].font.b and sheet["B1"].font.b and sheet.freeze_panes == "A2"
        assert sheet.auto_filter.ref == f"A1:B{size + 1}"
        seen += [seq for seq, _ in rows[1:]]
    assert seen == list(range(count)) and result.rows == count


@pytest.mark.parametrize("finish", [True, False])
def test_xlsx_sheet_data_waits_beside_the_partial_file_and_goes_with_it(tmp_path: Path, finish: bool) -> None:
    part = tmp_path / "job.xlsx.here.part"
    pipeline = ExportPipeline(ExportSpec(collection="golden", format="xlsx", fields=("n", "text")), part, {})
    for start in range(0, 3000, 1000):
        pipeline.feed(raw({"n": n, "text": f"row {n}"} for n in range(start, start + 1000)))
    scratch = tmp_path / "job.xlsx.here.part.tmp"
    assert sum(f.stat().st_size for f in scratch.iterdir()) > 3000 * 20  # the rows so far, not in /tmp
    if finish:
        assert pipeline.finish().rows == 3000
        assert [p.name for p in tmp_path.iterdir()] == [part.name]
        assert len(list(openpyxl.load_workbook(io.BytesIO(part.read_bytes()), read_only=True).active.values)) == 3001
    else:
        pipeline.discard()
        assert list(tmp_path.iterdir()) == []


# --- gzip --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "json", "ndjson"])
def test_gzip_decompresses_to_the_uncompressed_export(tmp_path: Path, fmt: str) -> None:
    batches = [[TYPES_DOC, EXOTIC_DOC], [{"_id": i, "s": "x" * (i % 50)} for i in range(2000)]]
    plain, plain_result = export(tmp_path, fmt, batches)
    packed, packed_result = export(tmp_path, fmt, batches, compress="gzip")
    assert gzip.decompress(packed) == plain
    assert packed[:2] == b"\x1f\x8b" and len(packed) < len(plain)
    assert packed[3] & 0x08 == 0 and packed[4:8] == b"\0\0\0\0"  # no file name and no time in the header
    assert packed_result.rows == plain_result.rows == 2002
    assert packed_result.warnings == plain_result.warnings


# --- column discovery --------------------------------------------------------------------------
def test_columns_from_the_first_batch_and_a_warning_for_paths_it_missed(tmp_path: Path) -> None:
    first = [{"_id": 1, "a": 1, "b": {"x": 1}}, {"_id": 2, "a": 2, "b": {"x": 2}}]
    later = [{"_id": 3, "a": {"nested": True}, "b": {"x": 3, "y": 4}, "c": 5}, {"_id": 4, "b": 7}]
    data, result = export(tmp_path, "csv", [first, later])
    assert csv_rows(data) == [["_id", "a", "b.x"], ["1", "1", "1"], ["2", "2", "2"], ["3", '{"nested":true}', "3"], ["4", "", ""]]
    assert result.warnings == [
        "columns were chosen from the first documents; later documents also have b.y, c, b (pass fields to export them)"
    ]


def test_keys_with_a_dot_in_their_name_are_warned_of(tmp_path: Path) -> None:
    first = [{"_id": 1, "a.b": 1, "c": {"d.e": 3}, "g": {"h": 5}}]
    later = [{"_id": 2, "x.y": 4, "g": {"h": 6}}]
    data, result = export(tmp_path, "csv", [first, later])
    assert csv_rows(data)[0] == ["_id", "a.b", "c.d.e", "g.h"]
    assert [row[1:3] for row in csv_rows(data)[1:]] == [["", ""], ["", ""]]  # what the warning is about
    assert result.warnings == ["keys with a dot in their name are in no column, since a path cannot name them: "
                               "a.b, c.d.e, x.y (rename them in a pipeline, with $getField)"]


def test_keys_that_differ_in_every_document_keep_the_checkpoint_and_the_warning_small(tmp_path: Path) -> None:
    """Dotted keys, or fields the first documents missed, new in every document: a checkpoint carried them all, and
    grew past MongoDB's 16 MB document limit in a long export."""
    pipeline = ExportPipeline(ExportSpec(collection="golden", format="csv"), tmp_path / "out.part", {"collection": "golden"})
    for start in range(0, 3000, 1000):
        pipeline.feed(raw([{"_id": i, "a": i, f"k.{i}": i, **({f"new{i}": i} if start else {})} for i in range(start, start + 1000)]))
        point = pipeline.checkpoint()
        assert len(point["dotted"]) == MAX_WARNED_PATHS and len(point["missed"]) <= MAX_WARNED_PATHS, point
    assert point["missed"] == [f"new{i}" for i in range(1000, 1000 + MAX_WARNED_PATHS)]
    dotted, missed = pipeline.finish().warnings
    assert dotted.startswith("keys with a dot in their name are in no column, since a path cannot name them: k.0, k.1, "), dotted
    assert dotted.endswith(f"k.19 and perhaps more (the first {MAX_WARNED_PATHS} are named) (rename them in a pipeline, with $getField)")
    assert missed.endswith(f"new1019 and perhaps more (the first {MAX_WARNED_PATHS} are named) (pass fields to export them)")


def test_no_discovery_warning_with_fields_or_for_documents(tmp_path: Path) -> None:
    later = [{"_id": 3, "c": 5}]
    assert export(tmp_path, "csv", [[{"_id": 1}], later], fields=("_id",))[1].warnings == []
    assert export(tmp_path, "ndjson", [[{"_id": 1}], later])[1].warnings == []


# --- file names --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        ("open-tasks", "open-tasks"),
        ("Café 東京", "Café 東京"),
        ("Cafe\u0301", "Café"),  # NFC
        ("../../etc/passwd", "etc-passwd"),
        ('a:b*c?"d"<e>|f\\g', "a-b-c-d-e-f-g"),
        ("tab\there\x00nul", "tab-here-nul"),
        ("  .hidden. ", "hidden"),
        ("...", "export"),
        ("x" * 200, "x" * 150),
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert safe_filename(name) == expected


@pytest.mark.parametrize(
    "name, header",
    [
        ("tasks.csv", 'attachment; filename="tasks.csv"'),
        ("Café 東京.csv", "attachment; filename=\"Caf_ __.csv\"; filename*=UTF-8''Caf%C3%A9%20%E6%9D%B1%E4%BA%AC.csv"),
        ("50% off.json", "attachment; filename=\"50_ off.json\"; filename*=UTF-8''50%25%20off.json"),
    ],
)
def test_content_disposition(name: str, header: str) -> None:
    assert content_disposition(name) == header


