"""XLSX through xlsxwriter in constant memory: typed cells, a bold frozen header with autofilter, and a
new sheet with the header repeated every max_rows data rows."""
from __future__ import annotations

from datetime import datetime
from typing import Any

import xlsxwriter
from xlsxwriter.exceptions import FileCreateError
from bson.decimal128 import Decimal128

from .base import Writer
from .values import MISSING, XLSX_MAX_CELL, as_utc, decimal_as_float, make_getters, scalar_text

EXCEL_MAX_DATA_ROWS = 1_048_575  # Excel's 1,048,576 rows less the header
MAX_EXACT_INT = 2**53  # larger ints do not survive as a double; they are written as text
DATE_FORMAT = "yyyy-mm-dd hh:mm:ss"
# Excel has no dates before 1900 and counts a 29 February 1900 that never was, so its serial numbers
# are off by one before March 1900 (and xlsxwriter writes 1900-01-01 as a bare time): earlier dates
# are written as ISO text.
FIRST_EXCEL_DATE = datetime(1900, 3, 1)
EXCEL_MAX_COLUMNS = 16_384
SHEET_NAME = "Export"
TRUNCATED = -2  # what xlsxwriter's write_string returns when it cut a string at Excel's cell limit


class XlsxWriter(Writer):
    tabular = True

    def write_header(self) -> None:
        self.max_rows = min(self.spec.xlsx_rows_per_sheet, EXCEL_MAX_DATA_ROWS)
        self.book = xlsxwriter.Workbook(
            self.out,
            {
                "constant_memory": True,
                # every string stays a string: never a formula, a hyperlink or a number
                "strings_to_formulas": False,
                "strings_to_urls": False,
                "strings_to_numbers": False,
                "in_memory": False,
                # sheet data waits here until close(): on the export volume, and removed with the
                # partial file if the export never gets that far
                "tmpdir": str(self.scratch_dir) if self.scratch_dir else None,
                # a sheet's XML past 4 GB (a full sheet of large documents) needs ZIP64, used only where needed
                "use_zip64": True,
            },
        )
        self.all_columns = len(self.columns or ())
        if self.columns and len(self.columns) > EXCEL_MAX_COLUMNS:  # only discovered columns get this far
            self.columns = self.columns[:EXCEL_MAX_COLUMNS]
        self.bold = self.book.add_format({"bold": True})
        self.date_format = self.book.add_format({"num_format": DATE_FORMAT})
        self.getters = make_getters(self.columns or [])
        self.sheet: Any = None
        self.sheets = 0
        self.row = 0
        self.truncated = 0
        self._new_sheet()

    def _new_sheet(self) -> None:
        self._finish_sheet()
        self.sheets += 1
        self.sheet = self.book.add_worksheet(SHEET_NAME if self.sheets == 1 else f"{SHEET_NAME} {self.sheets}")
        if self.columns:
            for col, name in enumerate(self.columns):
                self.sheet.write_string(0, col, name, self.bold)
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
                    if sheet.write_string(row, col, value) == TRUNCATED:
                        self.truncated += 1
                elif kind is float:
                    if value - value == 0.0:
                        sheet.write_number(row, col, value)
                    else:  # Excel has no NaN or infinity
                        sheet.write_string(row, col, scalar_text(value))
                elif kind is bool:
                    sheet.write_boolean(row, col, value)
                elif isinstance(value, int):  # int and Int64
                    if -MAX_EXACT_INT <= value <= MAX_EXACT_INT:
                        sheet.write_number(row, col, value)
                    else:
                        sheet.write_string(row, col, str(int(value)))
                elif value is None or value is MISSING:
                    continue
                elif kind is datetime:
                    self._write_datetime(row, col, value)
                elif kind is Decimal128:
                    exact = decimal_as_float(value)
                    if exact is None:
                        sheet.write_string(row, col, str(value))
                    else:
                        sheet.write_number(row, col, exact)
                else:
                    # documents and arrays as relaxed Extended JSON, the rest as in CSV
                    if sheet.write_string(row, col, scalar_text(value)) == TRUNCATED:
                        self.truncated += 1
            self.row = row + 1
        return len(docs)

    def _write_datetime(self, row: int, col: int, value: datetime) -> None:
        value = as_utc(value).replace(tzinfo=None)
        if value < FIRST_EXCEL_DATE:
            self.sheet.write_string(row, col, scalar_text(value))
        else:
            self.sheet.write_datetime(row, col, value, self.date_format)

    def write_footer(self) -> None:
        self._finish_sheet()

    def warnings(self) -> list[str]:
        warnings = []
        if self.all_columns > EXCEL_MAX_COLUMNS:
            warnings.append(f"only the first {EXCEL_MAX_COLUMNS:,} of {self.all_columns:,} columns fit in an XLSX sheet")
        if self.truncated:
            warnings.append(f"{self.truncated} XLSX cells were cut at {XLSX_MAX_CELL:,} characters, Excel's limit for one cell")
        return warnings

    def close(self) -> None:
        try:
            self.book.close()
        except FileCreateError as exc:
            # xlsxwriter wraps the OSError of a full or failing disk: the export fails as any write would.
            if isinstance(exc.args[0] if exc.args else None, OSError):
                raise exc.args[0] from None
            raise
