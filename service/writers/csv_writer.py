"""CSV (RFC 4180 quoting, CRLF line ends) through the csv module; options: delimiter, header, BOM,
formula escaping."""
from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

from .base import Writer
from .values import FORMULA_PREFIXES, MISSING, csv_cell, float_text, iso_datetime, make_getters

FORMULA_CHARS = frozenset(FORMULA_PREFIXES)


class CsvWriter(Writer):
    tabular = True

    resumable = True

    def _prepare(self) -> None:
        opts = self.spec.csv
        self.text = io.TextIOWrapper(self.out, encoding="utf-8", newline="", write_through=False)
        self.csv = csv.writer(self.text, delimiter=opts.delimiter, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
        self.getters = make_getters(self.columns or [])

    def write_header(self) -> None:
        self._prepare()
        if self.spec.csv.bom:
            self.text.write("\ufeff")
        if self.spec.csv.header and self.columns:
            # The names come from the documents' keys as much as from the request: escaped like any string.
            self.csv.writerow([csv_cell(name, self.spec.csv.escape_formulas) for name in self.columns])

    def resume(self, rows: int) -> None:
        self._prepare()  # the BOM and the header row are in the file already

    def flush(self) -> None:
        self.text.flush()

    def write_batch(self, docs: list[dict[str, Any]]) -> int:
        getters = self.getters
        escape = self.spec.csv.escape_formulas
        rows = []
        for doc in docs:
            row: list[Any] = []
            for get in getters:
                value = get(doc)
                # The common types inline (the csv module writes ints and finite floats as repr does);
                # everything else, and strings that need escaping, through csv_cell.
                kind = type(value)
                if kind is str:
                    row.append(csv_cell(value, escape) if escape and value and value[0] in FORMULA_CHARS else value)
                elif kind is int:
                    row.append(value)
                elif kind is float:
                    row.append(value if value - value == 0.0 else float_text(value))
                elif kind is datetime:
                    row.append(iso_datetime(value))
                elif kind is bool:
                    row.append("true" if value else "false")
                elif value is None or value is MISSING:
                    row.append("")
                else:
                    row.append(csv_cell(value, escape))
            rows.append(row)
        self.csv.writerows(rows)
        return len(rows)

    def write_footer(self) -> None:
        """CSV has no footer."""

    def close(self) -> None:
        self.text.flush()
        self.text.detach()
