"""Validation of an export request into an ExportSpec.

Every rejection is a ValidationError naming the offending field, turned into a 400 by the API.
"""
from __future__ import annotations

import base64
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import bson
import orjson
from bson import Regex, json_util
from bson.errors import BSONError
from bson.json_util import JSONOptions, JSONMode

FORMATS = ("csv", "json", "ndjson", "xlsx", "parquet")
# Formats that compress inside the file: gzip around them would only cost time.
SELF_COMPRESSED = frozenset({"xlsx", "parquet"})
FORBIDDEN_OPERATORS = frozenset({"$where", "$function", "$accumulator"})
# Query operators that take a list.
LIST_OPERATORS = frozenset({"$and", "$or", "$nor", "$in", "$nin", "$all"})
# Legacy Extended JSON wrappers that json_util reads even with other keys beside them, which it then drops; their
# own companion keys.
LEGACY_WRAPPERS = {"$undefined": frozenset(), "$binary": frozenset({"$type"})}
REGEX_OPTIONS = "imsux"  # what MongoDB's $regex takes; json_util ignored other letters, the server refuses them
MAX_BODY_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_FIELDS = 1000
MAX_SORT_KEYS = 32
TOP_LEVEL_KEYS = frozenset(
    {"collection", "format", "filter", "fields", "sort", "limit", "options", "filename", "pipeline", "count"}
)
FIND_KEYS = ("filter", "fields", "sort")  # what a pipeline replaces ($match, $project, $sort)
# Read-only stages. Anything else ($out, $merge, $unionWith, $graphLookup, $documents...) is refused: a stage
# that writes, or reads a collection the allow list does not vouch for, has no place in an export.
ALLOWED_STAGES = frozenset({
    "$match", "$project", "$addFields", "$set", "$unset", "$sort", "$limit", "$skip", "$group", "$unwind",
    "$lookup", "$count", "$facet", "$bucket", "$replaceRoot", "$replaceWith", "$sample", "$sortByCount",
})
MAX_STAGES = 100
MAX_INT64 = 2**63 - 1
# What bson raises for a malformed value: a bad $oid (InvalidId), $numberDecimal (InvalidOperation), an
# integer beyond 64 bits (OverflowError), a document BSON cannot hold (InvalidDocument).
EJSON_ERRORS = (ValueError, TypeError, KeyError, OverflowError, ArithmeticError, BSONError)
OPTION_KEYS = frozenset({"csv", "json", "parquet", "compress"})
CSV_OPTION_KEYS = frozenset({"delimiter", "header", "bom", "escape_formulas"})
JSON_OPTION_KEYS = frozenset({"mode", "envelope"})
PARQUET_OPTION_KEYS = frozenset({"row_group_size", "compression"})
PARQUET_COMPRESSIONS = ("zstd", "snappy", "gzip", "none")
# A row group is what the writer holds in memory before writing it; 1,000 is one cursor batch.
ROW_GROUP_MIN, ROW_GROUP_DEFAULT, ROW_GROUP_MAX = 1_000, 50_000, 1_000_000
COMPRESSIONS = ("none", "gzip")
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))})
UNSEEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_PATH_PART = re.compile(r"^[^$.\x00][^.\x00]*$")
RELAXED = JSONOptions(json_mode=JSONMode.RELAXED, tz_aware=True)
CANONICAL = JSONOptions(json_mode=JSONMode.CANONICAL, tz_aware=True)


class ValidationError(ValueError):
    def __init__(self, field: str, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


@dataclass(frozen=True)
class CsvOptions:
    delimiter: str = ","
    header: bool = True
    bom: bool = False
    escape_formulas: bool = True


@dataclass(frozen=True)
class JsonOptions:
    mode: str = "relaxed"
    envelope: bool = False


@dataclass(frozen=True)
class ParquetOptions:
    row_group_size: int = ROW_GROUP_DEFAULT
    compression: str = "zstd"


@dataclass(frozen=True)
class ExportSpec:
    collection: str
    format: str
    filter_json: str = "{}"  # canonical Extended JSON, so every BSON type survives storage as a string
    fields: tuple[str, ...] | None = None
    sort: tuple[tuple[str, int], ...] = ()
    limit: int = 0
    csv: CsvOptions = field(default_factory=CsvOptions)
    json: JsonOptions = field(default_factory=JsonOptions)
    compress: str = "none"
    parquet: ParquetOptions = field(default_factory=ParquetOptions)
    filename: str | None = None
    pipeline_json: str | None = None  # canonical Extended JSON; set for a pipeline export, then filter/fields/sort are unused
    count: bool = False  # a pipeline export counts its output first (a find export always counts)
    # How the file is laid out, from the settings when the job is created (so every instance writes it alike).
    xlsx_rows_per_sheet: int = 1_048_575

    @property
    def filter(self) -> dict[str, Any]:
        return ejson_loads(self.filter_json)

    @property
    def pipeline(self) -> list[dict[str, Any]] | None:
        if self.pipeline_json is None:
            return None
        return ejson_loads(self.pipeline_json)

    @property
    def extension(self) -> str:
        # Each format's name is its file extension.
        return f"{self.format}.gz" if self.compress == "gzip" else self.format

    def projection(self) -> dict[str, int] | None:
        """Top-level projection: dotted paths are resolved client-side, the same on every server. The sort keys'
        fields come too, for a checkpoint's key; the writers keep to fields, so they are never written."""
        if not self.fields:
            return None
        heads = {path.split(".", 1)[0]: 1 for path in (*self.fields, *(key for key, _ in self.sort))}
        if "_id" not in heads:
            heads["_id"] = 1  # kept for JSON output; CSV/XLSX columns come from fields alone
        return heads

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["fields"] = list(self.fields) if self.fields is not None else None
        doc["sort"] = [[k, v] for k, v in self.sort]
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> "ExportSpec":
        return cls(
            collection=doc["collection"],
            format=doc["format"],
            filter_json=doc.get("filter_json", "{}"),
            fields=tuple(doc["fields"]) if doc.get("fields") is not None else None,
            sort=tuple((k, int(v)) for k, v in doc.get("sort") or ()),
            limit=int(doc.get("limit") or 0),
            csv=CsvOptions(**(doc.get("csv") or {})),
            json=JsonOptions(**(doc.get("json") or {})),
            compress=doc.get("compress", "none"),
            parquet=ParquetOptions(**(doc.get("parquet") or {})),
            filename=doc.get("filename"),
            pipeline_json=doc.get("pipeline_json"),
            count=bool(doc.get("count", False)),
            xlsx_rows_per_sheet=int(doc.get("xlsx_rows_per_sheet") or 1_048_575),
        )


def parse_body(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BODY_BYTES:
        raise ValidationError("body", f"request body is over {MAX_BODY_BYTES // 1024} KiB", "body_too_large")
    if not raw.strip():
        raise ValidationError("body", "request body is empty; send a JSON object", "invalid_body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationError("body", f"request body is not valid JSON: {exc}", "invalid_body") from None
    if not isinstance(body, dict):
        raise ValidationError("body", "request body must be a JSON object", "invalid_body")
    return body


def _check_operators(value: Any, where: str, depth: int, limit: int, code: str, query: bool = False) -> None:
    """$where, $function and $accumulator anywhere, and nesting up to limit; in a query, also lists for the
    operators that take one, which the server refuses only when the job runs. An error names the full path."""
    if depth > limit:
        raise ValidationError(where, f"{where} is nested deeper than {MAX_DEPTH} levels", code)
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}"
            if key in FORBIDDEN_OPERATORS:
                raise ValidationError(path, f"operator {key} is not allowed in {where.split('.')[0]}", "forbidden_operator")
            if query and key in LIST_OPERATORS and not isinstance(item, list):
                raise ValidationError(path, f"{key} takes a list, such as [1, 2]", code)
            # Below $expr an aggregation expression, where {"$and": "$flag"} is a list of one.
            _check_operators(item, path, depth + 1, limit, code, query and key != "$expr")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_operators(item, f"{where}.{index}", depth + 1, limit, code, query)


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 1024 and all(_PATH_PART.match(p) for p in value.split("."))


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(where, f"{where} must be true or false", "invalid_option")
    return value


def _object(value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(where, f"{where} must be an object", "invalid_option")
    for key in value:
        if key not in allowed:
            raise ValidationError(f"{where}.{key}", f"unknown option {where}.{key}; known: {', '.join(sorted(allowed))}", "unknown_option")
    return value


def plain_int(text: str, max_digits: int) -> int | None:
    """text as an unsigned integer of at most max_digits ASCII digits, else None: str.isdigit() also takes "²",
    which int() refuses, and int() of thousands of digits is refused too."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= max_digits else None


def _from_extended_json(value: Any, field: str, code: str) -> Any:
    """value parsed as relaxed Extended JSON, and encoded to BSON once: what the server could not be sent is
    refused now, not when the job runs."""
    try:
        parsed = ejson_loads(orjson.dumps(value))
        bson.encode({field: parsed})
    except EJSON_ERRORS as exc:
        raise ValidationError(field, f"{field} is not valid Extended JSON: {exc}", code) from None
    return parsed


def ejson_loads(text: str | bytes) -> Any:
    """Extended JSON as json_util reads it, except for what it would lose. Where a query names a field,
    {"$regex": "^T", "$ne": "Tea"} stays the $regex operator beside others: json_util reads a regular expression
    value and drops the rest (and the embedded server cannot match such a value at all). Elsewhere (the list of $in,
    $nin or $all, $regexMatch's regex, an expression) {"$regex": ...} alone is a regular expression value, as
    json_util reads it. Other keys beside a legacy wrapper, and base64 that is not, are refused: json_util drops
    them, and reads bad base64 as empty bytes. A filter is a query from its root; a pipeline in its $match stages."""
    parsed = json.loads(text, object_hook=_ejson_object)
    return _regex_values(parsed, isinstance(parsed, dict))


def _regex_values(value: Any, query: bool, key: str | None = None) -> Any:
    """value with each {"$regex": ...} that is not a query's operator made a regular expression value."""
    if isinstance(value, list):
        return [_regex_values(item, query) for item in value]
    if not isinstance(value, dict):
        return value
    if isinstance(value.get("$regex"), str) and value.keys() <= {"$regex", "$options"} and not (query and _names_a_field(key)):
        return Regex(value["$regex"], value.get("$options", ""))
    for name, item in value.items():
        value[name] = _regex_values(item, (query or name == "$match") and name != "$expr", name)
    return value


def _names_a_field(key: str | None) -> bool:
    """Whether a query's value under key holds operators on a field: {field: {...}}, $not and $elemMatch."""
    return key is not None and (not key.startswith("$") or key in ("$not", "$elemMatch"))


def _ejson_object(doc: dict[str, Any]) -> Any:
    if isinstance(doc.get("$regex"), str):
        options = doc.get("$options", "")
        if not isinstance(options, str) or set(options) - set(REGEX_OPTIONS):
            raise ValueError(f"$options must be some of the letters {REGEX_OPTIONS}, got {options!r}")
        return doc
    for key, companions in LEGACY_WRAPPERS.items():
        extra = doc.keys() - {key} - companions if key in doc else set()
        if extra:
            raise ValueError(f"{key} takes no other keys beside it, got {', '.join(sorted(extra))}")
    binary = doc.get("$binary")
    encoded = binary.get("base64") if isinstance(binary, dict) else binary
    if isinstance(encoded, str):
        base64.b64decode(encoded, validate=True)
    return json_util.object_hook(doc, RELAXED)


def _filter(value: Any) -> str:
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise ValidationError("filter", "filter must be a JSON object", "invalid_filter")
    _check_operators(value, "filter", 0, MAX_DEPTH, "invalid_filter", query=True)
    parsed = _from_extended_json(value, "filter", "invalid_filter")
    if not isinstance(parsed, dict):
        raise ValidationError("filter", "filter must be a JSON object", "invalid_filter")
    return json_util.dumps(parsed, json_options=CANONICAL)


def _fields(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValidationError("fields", "fields must be a non-empty list of dotted paths", "invalid_fields")
    if len(value) > MAX_FIELDS:
        raise ValidationError("fields", f"at most {MAX_FIELDS} fields", "invalid_fields")
    seen: set[str] = set()
    for index, path in enumerate(value):
        if not _is_path(path):
            raise ValidationError(f"fields.{index}", f"{path!r} is not a dotted field path such as assignee.name", "invalid_fields")
        if path in seen:
            raise ValidationError(f"fields.{index}", f"field {path!r} is listed twice", "invalid_fields")
        seen.add(path)
    return tuple(value)


def _sort(value: Any) -> tuple[tuple[str, int], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValidationError("sort", "sort must be an object such as {\"createdAt\": -1}", "invalid_sort")
    if len(value) > MAX_SORT_KEYS:
        raise ValidationError("sort", f"at most {MAX_SORT_KEYS} sort keys", "invalid_sort")
    result = []
    for key, direction in value.items():
        if not _is_path(key):
            raise ValidationError(f"sort.{key}", f"{key!r} is not a dotted field path", "invalid_sort")
        if isinstance(direction, bool) or direction not in (1, -1):
            raise ValidationError(f"sort.{key}", f"sort value for {key!r} must be 1 or -1", "invalid_sort")
        result.append((key, int(direction)))
    return tuple(result)


def _limit(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT64:
        raise ValidationError("limit", "limit must be an integer from 0 (no limit) to 2^63-1", "invalid_limit")
    return value


def _filename(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise ValidationError("filename", "filename must be a non-empty string of at most 200 characters", "invalid_filename")
    return value


def _parquet_options(value: Any) -> ParquetOptions:
    raw = _object(value, "options.parquet", PARQUET_OPTION_KEYS)
    size = raw.get("row_group_size", ROW_GROUP_DEFAULT)
    if isinstance(size, bool) or not isinstance(size, int) or not ROW_GROUP_MIN <= size <= ROW_GROUP_MAX:
        raise ValidationError(
            "options.parquet.row_group_size",
            f"options.parquet.row_group_size must be an integer from {ROW_GROUP_MIN:,} to {ROW_GROUP_MAX:,} (rows)",
            "invalid_option",
        )
    compression = raw.get("compression", "zstd")
    if compression not in PARQUET_COMPRESSIONS:
        raise ValidationError(
            "options.parquet.compression", f"options.parquet.compression must be one of {', '.join(PARQUET_COMPRESSIONS)}", "invalid_option"
        )
    return ParquetOptions(row_group_size=size, compression=compression)


def _options(value: Any, fmt: str) -> tuple[CsvOptions, JsonOptions, str, ParquetOptions]:
    if value is None:
        return CsvOptions(), JsonOptions(), "none", ParquetOptions()
    opts = _object(value, "options", OPTION_KEYS)
    csv_raw = _object(opts.get("csv", {}), "options.csv", CSV_OPTION_KEYS)
    json_raw = _object(opts.get("json", {}), "options.json", JSON_OPTION_KEYS)
    delimiter = csv_raw.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\"\r\n":
        raise ValidationError("options.csv.delimiter", "delimiter must be one character other than a quote or a line break", "invalid_option")
    csv = CsvOptions(
        delimiter=delimiter,
        header=_bool(csv_raw.get("header", True), "options.csv.header"),
        bom=_bool(csv_raw.get("bom", False), "options.csv.bom"),
        escape_formulas=_bool(csv_raw.get("escape_formulas", True), "options.csv.escape_formulas"),
    )
    mode = json_raw.get("mode", "relaxed")
    if mode not in ("relaxed", "canonical"):
        raise ValidationError("options.json.mode", "options.json.mode must be relaxed or canonical", "invalid_option")
    json = JsonOptions(mode=mode, envelope=_bool(json_raw.get("envelope", False), "options.json.envelope"))
    compress = opts.get("compress", "none")
    if compress not in COMPRESSIONS:
        raise ValidationError("options.compress", "options.compress must be none or gzip", "invalid_option")
    if compress == "gzip" and fmt in SELF_COMPRESSED:
        raise ValidationError("options.compress", f"{fmt} files are already compressed; use compress none", "invalid_option")
    return csv, json, compress, _parquet_options(opts.get("parquet", {}))


def validate_collection_name(value: Any, jobs_collection: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or not value or len(value) > 255 or "\x00" in value or value.startswith("$"):
        raise ValidationError("collection", "collection must be a collection name", "invalid_collection")
    if value.startswith("system.") or value == jobs_collection:
        raise ValidationError("collection", f"collection {value!r} cannot be exported", "collection_not_exportable")
    if allowed and value not in allowed:
        raise ValidationError("collection", f"collection {value!r} is not in the exportable collections", "collection_not_exportable")
    return value


class _PipelineCheck:
    """Walks a pipeline and the pipelines nested in it ($facet, $lookup), with the request's collection rules."""

    def __init__(self, jobs_collection: str, allowed: tuple[str, ...]) -> None:
        self.jobs_collection = jobs_collection
        self.allowed = allowed

    def pipeline(self, value: Any, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:  # $facet in $facet in $lookup...: nesting is bounded like a filter's
            raise ValidationError(where, f"{where} is nested deeper than {MAX_DEPTH} levels", "invalid_pipeline")
        if not isinstance(value, list):
            raise ValidationError(where, f'{where} must be a list of stages such as [{{"$match": {{}}}}]', "invalid_pipeline")
        if len(value) > MAX_STAGES:
            raise ValidationError(where, f"{where} has more than {MAX_STAGES} stages", "invalid_pipeline")
        for index, stage in enumerate(value):
            path = f"{where}.{index}"
            if not isinstance(stage, dict) or len(stage) != 1:
                raise ValidationError(path, 'a stage is an object with exactly one key, such as {"$match": {...}}', "invalid_pipeline")
            name, body = next(iter(stage.items()))
            self.stage(name, body, f"{path}.{name}", depth + 2)

    def stage(self, name: str, body: Any, where: str, depth: int) -> None:
        if name not in ALLOWED_STAGES:
            raise ValidationError(
                where, f"stage {name} is not allowed in an export; allowed: {', '.join(sorted(ALLOWED_STAGES))}", "forbidden_stage"
            )
        if name == "$facet":
            if not isinstance(body, dict):
                raise ValidationError(where, "$facet must be an object of named pipelines", "invalid_pipeline")
            for key, sub in body.items():
                self.pipeline(sub, f"{where}.{key}", depth + 1)
        elif name == "$lookup":
            self.lookup(body, where, depth)
        else:
            self.operators(body, where, depth)

    def lookup(self, body: Any, where: str, depth: int) -> None:
        if not isinstance(body, dict):
            raise ValidationError(where, "$lookup must be an object naming the collection in from", "invalid_pipeline")
        try:
            validate_collection_name(body.get("from"), self.jobs_collection, self.allowed)
        except ValidationError as exc:
            raise ValidationError(f"{where}.from", f"$lookup from: {exc.message}", exc.code) from None
        for key, item in body.items():
            if key == "pipeline":
                self.pipeline(item, f"{where}.pipeline", depth + 1)
            else:
                self.operators(item, f"{where}.{key}", depth + 1)

    @staticmethod
    def operators(value: Any, where: str, depth: int) -> None:
        # + the pipeline list and the stage object: a $match gets as deep as a filter
        _check_operators(value, where, depth, MAX_DEPTH + 2, "invalid_pipeline")


def _count(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValidationError("count", "count must be true or false", "invalid_count")
    return value


def _pipeline(body: Mapping[str, Any], jobs_collection: str, allowed: tuple[str, ...]) -> str | None:
    """The pipeline as canonical Extended JSON, or None for a find-shaped export."""
    value = body.get("pipeline")
    if value is None:
        if body.get("count") is not None:
            raise ValidationError("count", "count applies to pipeline exports; a find export is always counted", "conflicting_fields")
        return None
    for key in FIND_KEYS:
        if body.get(key) is not None:
            raise ValidationError(
                key, f"{key} cannot be combined with pipeline; use $match, $project and $sort stages instead", "conflicting_fields"
            )
    _PipelineCheck(jobs_collection, allowed).pipeline(value, "pipeline", 0)
    return json_util.dumps(_from_extended_json(value, "pipeline", "invalid_pipeline"), json_options=CANONICAL)


def check_exportable(spec: "ExportSpec", jobs_collection: str, allowed: tuple[str, ...]) -> None:
    """A stored job against the collections exportable now: the settings may have changed since it was created,
    or it may have been created by an instance with other settings."""
    validate_collection_name(spec.collection, jobs_collection, allowed)
    if spec.pipeline_json is not None:
        _PipelineCheck(jobs_collection, allowed).pipeline(ejson_loads(spec.pipeline_json), "pipeline", 0)


def validate_request(body: Mapping[str, Any], jobs_collection: str = "export_jobs", allowed: tuple[str, ...] = ()) -> ExportSpec:
    for key in body:
        if key not in TOP_LEVEL_KEYS:
            raise ValidationError(key, f"unknown field {key!r}; known: {', '.join(sorted(TOP_LEVEL_KEYS))}", "unknown_field")
    collection = validate_collection_name(body.get("collection"), jobs_collection, allowed)
    fmt = body.get("format")
    if fmt not in FORMATS:
        raise ValidationError("format", f"format must be one of {', '.join(FORMATS)}", "invalid_format")
    csv, json, compress, parquet = _options(body.get("options"), fmt)
    pipeline_json = _pipeline(body, jobs_collection, allowed)
    return ExportSpec(
        collection=collection,
        format=fmt,
        filter_json=_filter(body.get("filter")),
        fields=_fields(body.get("fields")),
        sort=_sort(body.get("sort")),
        limit=_limit(body.get("limit")),
        csv=csv,
        json=json,
        compress=compress,
        parquet=parquet,
        filename=_filename(body.get("filename")),
        pipeline_json=pipeline_json,
        count=_count(body.get("count")),
    )


def safe_filename(name: str) -> str:
    """A file name that is safe on every common filesystem and in a header, keeping non-ASCII letters."""
    name = unicodedata.normalize("NFC", name)
    # Controls, invisible format characters (U+202E turns "txt.exe" around on screen, U+200B hides) and line or
    # paragraph separators go too.
    name = "".join("\x00" if unicodedata.category(c) in UNSEEN_CATEGORIES else c for c in name)
    name = re.sub(r"[\x00-\x1f\x7f/\\:*?\"<>|]+", "-", name).strip(" .-")[:150]
    if name.split(".")[0].upper() in WINDOWS_RESERVED:
        name = "_" + name  # CON, NUL, COM1... cannot be file names on Windows, whatever the extension
    return name or "export"
