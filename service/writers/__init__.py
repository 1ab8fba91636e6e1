"""One writer per format behind one interface; make_writer() is the only place that looks at the format."""
from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

from ..query import ExportSpec
from .base import Writer
from .csv_writer import CsvWriter
from .json_writer import JsonWriter, NdjsonWriter
from .parquet_writer import ParquetWriter
from .xlsx_writer import XlsxWriter

WRITERS: dict[str, type[Writer]] = {
    "csv": CsvWriter, "json": JsonWriter, "ndjson": NdjsonWriter, "xlsx": XlsxWriter, "parquet": ParquetWriter,
}


def writer_class(fmt: str) -> type[Writer]:
    return WRITERS[fmt]


def make_writer(
    out: BinaryIO, spec: ExportSpec, columns: Sequence[str] | None, info: Mapping[str, Any], scratch_dir: Path | None = None
) -> Writer:
    return WRITERS[spec.format](out, spec, columns, info, scratch_dir)


__all__ = ["Writer", "make_writer", "writer_class", "WRITERS"]
