from __future__ import annotations

import csv
import io
from typing import Any

from .base import Writer
from .values import FORMULA_PREFIXES, MISSING, csv_cell, make_getters, scalar_text

FORMULA_CHARS = "".join(FORMULA_PREFIXES)


class CsvWriter(Writer):
    tabular = True

    def write_header(self) -> None:
        opts = self.spec.csv
        self.text = io.TextIOWrapper(self.out, encoding="utf-8", newline="", write_through=False)
        if opts.bom:
            self.text.write("\ufeff")
        self.csv = csv.writer(self.text, delimiter=opts.delimiter, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
        self.getters = make_getters(self.columns or [])
        if opts.header:
            self.csv.writerow(self.columns or [])

    def write_batch(self, docs: list[dict[str, Any]]) -> int:
        getters = self.getters
        escape = self.spec.csv.escape_formulas
        rows = []
        for doc in docs:
            row = []
            for get in getters:
                value = get(doc)
                # the common types inline; everything else through csv_cell
                kind = type(value)
                if kind is str:
                    row.append(csv_cell(value, escape) if escape and value and value[0] in FORMULA_CHARS else value)
                elif kind is int:
                    row.append(value)
                elif value is None or value is MISSING:
                    row.append("")
                else:
                    row.append(scalar_text(value))
            rows.append(row)
        self.csv.writerows(rows)
        return len(rows)

    def write_footer(self) -> None:
        """CSV has no footer."""

    def close(self) -> None:
        self.text.flush()
        self.text.detach()
