from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import xlsxwriter

from .base import Writer
from .values import MISSING, XLSX_MAX_CELL, decimal_as_float, make_getters, relaxed_json, scalar_text
from bson.decimal128 import Decimal128

MAX_EXACT_INT = 2**53
DATE_FORMAT = "yyyy-mm-dd hh:mm:ss"


class XlsxWriter(Writer):
    """Typed cells in constant memory; a new sheet, header repeated, every max_rows data rows."""

    tabular = True

    def write_header(self) -> None:
        self.max_rows = int(self.info.get("xlsx_max_rows_per_sheet", 1_048_575))
        self.book = xlsxwriter.Workbook(
            self.out,
            {
                "constant_memory": True,
                "strings_to_formulas": False,
                "strings_to_urls": False,
                "strings_to_numbers": False,
                "in_memory": False,
            },
        )
        self.bold = self.book.add_format({"bold": True})
        self.date_format = self.book.add_format({"num_format": DATE_FORMAT})
        self.getters = make_getters(self.columns or [])
        self.sheet = None
        self.sheets = 0
        self._new_sheet()

    def _new_sheet(self) -> None:
        self._finish_sheet()
        self.sheets += 1
        self.sheet = self.book.add_worksheet(f"Sheet{self.sheets}" if self.sheets > 1 else "Export")
        self.row = 0
        if self.columns:
            self.sheet.write_row(0, 0, self.columns, self.bold)
            self.sheet.freeze_panes(1, 0)
        self.row = 1

    def _finish_sheet(self) -> None:
        if self.sheet is not None and self.columns:
            self.sheet.autofilter(0, 0, max(self.row - 1, 0), len(self.columns) - 1)

    def write_batch(self, docs: list[dict[str, Any]]) -> int:
        getters = self.getters
        for doc in docs:
            if self.row > self.max_rows:
                self._new_sheet()
            sheet, row = self.sheet, self.row
            for col, get in enumerate(getters):
                value = get(doc)
                kind = type(value)
                if kind is str:
                    sheet.write_string(row, col, value[:XLSX_MAX_CELL])
                elif kind is float:
                    if value == value and value not in (float("inf"), float("-inf")):
                        sheet.write_number(row, col, value)
                    else:
                        sheet.write_string(row, col, scalar_text(value))
                elif kind is bool:
                    sheet.write_boolean(row, col, value)
                elif isinstance(value, int) and not isinstance(value, bool):
                    if -MAX_EXACT_INT <= value <= MAX_EXACT_INT:
                        sheet.write_number(row, col, value)
                    else:
                        sheet.write_string(row, col, str(value))
                elif value is None or value is MISSING:
                    continue
                elif isinstance(value, datetime):
                    self._write_datetime(row, col, value)
                elif isinstance(value, Decimal128):
                    exact = decimal_as_float(value)
                    if exact is None:
                        sheet.write_string(row, col, str(value))
                    else:
                        sheet.write_number(row, col, exact)
                elif isinstance(value, (dict, list)):
                    sheet.write_string(row, col, relaxed_json(value).decode("utf-8")[:XLSX_MAX_CELL])
                else:
                    sheet.write_string(row, col, scalar_text(value)[:XLSX_MAX_CELL])
            self.row = row + 1
        return len(docs)

    def _write_datetime(self, row: int, col: int, value: datetime) -> None:
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        if value.year < 1900:  # Excel has no dates before 1900
            self.sheet.write_string(row, col, scalar_text(value))
        else:
            self.sheet.write_datetime(row, col, value, self.date_format)

    def write_footer(self) -> None:
        self._finish_sheet()

    def close(self) -> None:
        self.book.close()
