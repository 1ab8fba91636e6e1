"""One writer per format behind one interface; make_writer() is the only place that looks at the format."""
from __future__ import annotations

from typing import Any, BinaryIO, Mapping, Sequence

from ..query import ExportSpec
from .base import Writer
from .csv_writer import CsvWriter
from .json_writer import JsonWriter, NdjsonWriter
from .xlsx_writer import XlsxWriter

WRITERS: dict[str, type[Writer]] = {"csv": CsvWriter, "json": JsonWriter, "ndjson": NdjsonWriter, "xlsx": XlsxWriter}


def writer_class(fmt: str) -> type[Writer]:
    return WRITERS[fmt]


def make_writer(out: BinaryIO, spec: ExportSpec, columns: Sequence[str] | None, info: Mapping[str, Any]) -> Writer:
    return WRITERS[spec.format](out, spec, columns, info)


__all__ = ["Writer", "make_writer", "writer_class", "WRITERS"]
