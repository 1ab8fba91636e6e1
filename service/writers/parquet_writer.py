"""Parquet through pyarrow's ParquetWriter: typed columns (see parquet_columns for the rules), row groups of
a set number of rows, zstd by default. At most one row group waits in memory.

A Parquet file has one schema, fixed when its first row group is written. When a later value does not fit
its column's type, the column becomes text: the row groups already written are copied, one at a time,
into a new file in the scratch directory with that column rendered as text, and the export goes on there;
the finished file is copied back into the export file at the end. A column widens at most twice (int64 to
float64, then to string).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .base import Writer
from .parquet_arrow import ArrowReader, unaccounted
from .parquet_columns import (
    MARKED_KINDS,
    Column,
    convert,
    late_warning,
    marks_of,
    note_range,
    plan_column,
    to_array,
    widen_step,
    widening_warning,
    wider_kind,
)

# A widened column: its kind before, after, and its marks (see Column.marks) when it had some.
Widened = tuple[str, str, "pa.Array | None"]

COPY_CHUNK = 1 << 20


class ParquetWriter(Writer):
    tabular = True
    raw_input = True

    def write_header(self) -> None:
        opts = self.spec.parquet
        self.group_rows = opts.row_group_size
        self.compression = "none" if opts.compression == "none" else opts.compression
        self.plan: list[Column] | None = None
        self.reader: ArrowReader | None = None
        self.pending: list[list[pa.Array]] = []
        self.pending_rows = 0
        self.rows_in = 0  # rows appended so far, on disk and pending
        self.last_read: tuple[bytes, dict[str, pa.Array]] | None = None  # the last batch PyMongoArrow read whole
        self.sink: pq.ParquetWriter | None = None
        self.target: Path | None = None  # None: the export file itself; else a file in the scratch directory
        self.groups = 0
        self.rewrites = 0
        self.notes: dict[str, str] = {}  # column -> warning, one each

    # --- batches ------------------------------------------------------------------------------------------
    def write_batch(self, docs: list[dict[str, Any]]) -> int:
        if self.plan is None:
            self._plan(docs)
        return self._add(docs, {})

    def write_raw(self, raw: bytes, decode: Callable[[], list[dict[str, Any]]]) -> int:
        if self.plan is None:
            return self.write_batch(decode())
        assert self.reader is not None
        fast = self.reader.read(raw, self.plan) if self.reader.covers(self.plan) else {}
        self.last_read = None
        if fast and len(fast) == len(self.plan):
            self.last_read = (raw, fast)
            return self._append([fast[c.name] for c in self.plan], len(fast[self.plan[0].name]), {})
        return self._add(decode(), fast)

    def raw_suspects(self) -> list[bytes] | None:
        if self.last_read is None:
            return None
        assert self.plan is not None
        return unaccounted(*self.last_read, self.plan)

    def _plan(self, docs: list[dict[str, Any]]) -> None:
        self.plan = []
        for name in self.columns or []:
            column, warning = plan_column(name, docs)
            self.plan.append(column)
            if warning:
                self.notes[name] = warning
        self.pending = [[] for _ in self.plan]
        self.reader = ArrowReader(self.plan)

    def _add(self, docs: list[dict[str, Any]], fast: dict[str, pa.Array]) -> int:
        """Arrays for the columns fast did not cover, from the decoded documents; widens what does not fit."""
        assert self.plan is not None
        arrays, widened, marks = [], {}, {}
        for index, column in enumerate(self.plan):
            array = fast.get(column.name)
            if array is None:
                values = [column.get(doc) for doc in docs]
                array = to_array(column, values)
                if array is None:
                    widened[index] = self._widen(index, column, values)
                    array = to_array(column, values)
                    assert array is not None  # the wider kind takes every value
                if column.kind in MARKED_KINDS:
                    marks[index] = marks_of(column.kind, values)
            arrays.append(array)
        if widened and self.groups:
            self._rewrite(widened)
        return self._append(arrays, len(docs), marks)

    def _append(self, arrays: list[pa.Array], rows: int, marks: dict[int, pa.Array | None]) -> int:
        """Add a batch's arrays; marks: of the columns that keep marks (not given: none marked)."""
        assert self.plan is not None
        if rows and not self.plan:
            # A Parquet file holds rows in its columns only: without one, these rows would vanish from the file.
            raise ValueError("the rows have no field to make a Parquet column of (name fields, or project some)")
        for index, (column, chunks, array) in enumerate(zip(self.plan, self.pending, arrays)):
            chunks.append(array)
            if column.kind == "int":
                note_range(column, array)
            elif column.kind in MARKED_KINDS:
                column.note_marks(self.rows_in, rows, marks.get(index))
        self.pending_rows += rows
        self.rows_in += rows
        while self.pending_rows >= self.group_rows:
            self._flush_group(self.group_rows)
        return rows

    # --- row groups ----------------------------------------------------------------------------------------
    def _schema(self) -> pa.Schema:
        assert self.plan is not None
        return pa.schema([pa.field(c.name, c.arrow_type) for c in self.plan])

    def _open(self, where: Any) -> pq.ParquetWriter:
        return pq.ParquetWriter(where, self._schema(), compression=self.compression)

    def _flush_group(self, rows: int) -> None:
        """Write the first rows pending rows as one row group; the rest stays pending."""
        schema = self._schema()
        table = pa.Table.from_arrays([pa.chunked_array(chunks, f.type) for chunks, f in zip(self.pending, schema)], schema=schema)
        if self.sink is None:
            self.sink = self._open(self.out)
        self.sink.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self.pending = [list(rest.column(i).chunks) for i in range(rest.num_columns)]
        self.pending_rows = rest.num_rows
        self.groups += 1

    # --- widening ------------------------------------------------------------------------------------------
    def _widen(self, index: int, column: Column, values: list[Any]) -> Widened:
        """Change the column to a kind that takes values, and what is pending with it."""
        old, new = column.kind, wider_kind(column, values)
        misfits = [type(v) for v in values if to_array(Column(column.name, old), [v]) is None]
        column.kind, column.seen = new, frozenset(misfits) | column.seen
        widen_step(column, misfits)
        self.notes[column.name] = widening_warning(column)
        marks = pa.concat_arrays(column.marks) if column.marks else None
        # an int column's rows so far are all ints; a text column keeps no marks
        column.marks = [pa.repeat(True, self.rows_in)] if new == "double" else None
        offset = self.rows_in - self.pending_rows  # the pending rows are the last ones
        for number, chunk in enumerate(self.pending[index]):
            self.pending[index][number] = convert(old, new, chunk, None if marks is None else marks.slice(offset, len(chunk)))
            offset += len(chunk)
        assert self.reader is not None
        self.reader.update(column)
        return old, new, marks

    def _rewrite(self, widened: dict[int, Widened]) -> None:
        """Copy the row groups written so far into a new file with the widened columns as text."""
        assert self.sink is not None
        self.sink.close()
        self.out.flush()
        source = self.target or Path(self.out.name)
        self.rewrites += 1
        target = self._scratch() / f"widened-{self.rewrites}.parquet"
        sink = self._open(target)
        schema = self._schema()
        old = pq.ParquetFile(source)
        offset = 0
        try:
            for group in range(old.num_row_groups):
                table = old.read_row_group(group)
                columns = [self._converted(widened.get(i), col, offset) for i, col in enumerate(table.columns)]
                sink.write_table(pa.Table.from_arrays(columns, schema=schema), row_group_size=self.group_rows)
                offset += table.num_rows
        finally:
            old.close()
        if self.target is None:
            self.out.seek(0)
            self.out.truncate()  # the export file gets the finished copy at the end
        else:
            self.target.unlink()
        self.sink, self.target = sink, target

    @staticmethod
    def _converted(widened: Widened | None, column: pa.ChunkedArray, offset: int) -> pa.Array | pa.ChunkedArray:
        """A row group's column, converted when it was widened; offset: the group's first row."""
        if widened is None:
            return column
        old, new, marks = widened
        return convert(old, new, column, None if marks is None else marks.slice(offset, len(column)))

    def _scratch(self) -> Path:
        if self.scratch_dir is None:
            raise RuntimeError("a Parquet export needs a scratch directory to widen a column")
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        return self.scratch_dir

    # --- the end --------------------------------------------------------------------------------------------
    def write_footer(self) -> None:
        if self.plan is None:
            self._plan([])
        if self.pending_rows:
            self._flush_group(self.pending_rows)
        if self.sink is None:  # no rows: a file with the columns and no row group
            self.sink = self._open(self.out)
        self.sink.close()
        if self.target is not None:
            with open(self.target, "rb") as finished:
                shutil.copyfileobj(finished, self.out, COPY_CHUNK)
            self.target.unlink()

    def warnings(self) -> list[str]:
        notes = dict(self.notes)
        for column in self.plan or []:
            if column.late and column.name not in notes:
                notes[column.name] = late_warning(column)
        return list(notes.values())
