"""Format options through the real app on the test database: gzip, XLSX sheet rollover, column discovery
warnings and download file names. Value-by-value rendering is covered at the pipeline level in
test_formats.py (the embedded server cannot store every BSON type)."""
from __future__ import annotations

import csv
import gzip
import io
import re
import secrets
from datetime import timezone
from pathlib import Path
from typing import Any

import openpyxl
import pytest

from service.app import create_app

from conftest import make_settings, wait_status

ROWS_PER_SHEET = 1000
BATCH_SIZE = 250


@pytest.fixture
async def api(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: list[dict[str, Any]]) -> Any:
    settings = make_settings(mongo_url, tmp_path, "pymongo", xlsx_max_rows_per_sheet=ROWS_PER_SHEET, batch_size=BATCH_SIZE)
    return await aiohttp_client(create_app(settings))


async def create(api: Any, body: dict[str, Any]) -> str:
    resp = await api.post("/api/exports", json=body)
    assert resp.status == 202, await resp.text()
    return (await resp.json())["id"]


async def finished(api: Any, job_id: str, timeout: float = 60) -> dict[str, Any]:
    snap = await wait_status(api, job_id, timeout=timeout)
    assert snap["status"] == "completed", snap
    return snap


async def download(api: Any, snap: dict[str, Any]) -> tuple[bytes, Any]:
    resp = await api.get(snap["download_url"])
    assert resp.status == 200
    return await resp.read(), resp.headers


async def test_gzip_export_is_the_uncompressed_export_compressed(api: Any, tasks: list[dict[str, Any]]) -> None:
    spec = {"collection": "tasks", "sort": {"seq": 1}, "filter": {"status": {"$ne": "archived"}}}
    pairs = {}
    for fmt in ("csv", "json", "ndjson"):
        plain = await create(api, {**spec, "format": fmt})
        packed = await create(api, {**spec, "format": fmt, "options": {"compress": "gzip"}})
        pairs[fmt] = (plain, packed)
    for fmt, (plain_id, packed_id) in pairs.items():
        plain, plain_headers = await download(api, await finished(api, plain_id))
        packed_snap = await finished(api, packed_id)
        packed, packed_headers = await download(api, packed_snap)
        assert gzip.decompress(packed) == plain and len(packed) < len(plain)
        assert packed_headers["Content-Type"] == "application/gzip"
        assert packed_snap["file_name"].endswith(f".{fmt}.gz") and packed_snap["processed"] == len(tasks)
        assert plain_headers["Content-Type"].split(";")[0] in ("text/csv", "application/json", "application/x-ndjson")


async def test_xlsx_rolls_over_to_new_sheets_without_losing_a_row(api: Any, tasks: list[dict[str, Any]]) -> None:
    fields = ["seq", "title", "createdAt", "assignee.name"]
    snap = await finished(api, await create(api, {"collection": "tasks", "format": "xlsx", "fields": fields, "sort": {"seq": 1}}))
    data, _ = await download(api, snap)
    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True)
    assert book.sheetnames == ["Export", "Export 2", "Export 3"]
    rows: list[tuple[Any, ...]] = []
    for sheet in book.worksheets:
        values = list(sheet.iter_rows(values_only=True))
        assert list(values[0]) == fields and len(values) == ROWS_PER_SHEET + 1
        rows += values[1:]
    by_seq = sorted(tasks, key=lambda d: d["seq"])
    assert [r[0] for r in rows] == [d["seq"] for d in by_seq]  # none lost, none twice, in order
    assert [r[2] for r in rows] == [d["createdAt"].astimezone(timezone.utc).replace(tzinfo=None) for d in by_seq]
    assert [r[3] for r in rows] == [(d.get("assignee") or {}).get("name") for d in by_seq]
    styled = openpyxl.load_workbook(io.BytesIO(data))
    for sheet in styled.worksheets:
        assert sheet.freeze_panes == "A2" and sheet["A1"].font.b and sheet.auto_filter.ref == f"A1:D{ROWS_PER_SHEET + 1}"


async def test_columns_are_sampled_and_later_fields_are_reported(api: Any, sync_db: Any) -> None:
    name = f"formats_{secrets.token_hex(4)}"
    docs = [{"_id": i, "a": i, "b": f"b{i}"} for i in range(300)] + [{"_id": i, "a": i, "b": "late", "c": True} for i in range(300, 305)]
    sync_db[name].insert_many(docs)
    try:
        snap = await finished(api, await create(api, {"collection": name, "format": "csv", "sort": {"a": 1}}))
        data, _ = await download(api, snap)
    finally:
        sync_db.drop_collection(name)
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert rows[0] == ["_id", "a", "b"] and len(rows) == 306
    assert rows[-1] == ["304", "304", "late"]
    assert len(snap["warnings"]) == 1 and re.search(r"\bc\b", snap["warnings"][0]), snap["warnings"]


async def test_a_regex_keeps_the_operators_beside_it(api: Any, sync_db: Any) -> None:
    """{"$regex": ..., "$ne": ...} is one field's two conditions; read as a regular expression value, the $ne was
    dropped and the export held the rows it excludes."""
    name = f"regex_{secrets.token_hex(4)}"
    sync_db[name].insert_many([{"_id": i, "name": text} for i, text in enumerate(["Tea", "Toast", "tart", "Coffee", "Tarte"])])
    try:
        filters = {"plain": {"$regex": "^T", "$ne": "Tea"}, "options": {"$regex": "^t", "$options": "i", "$nin": ["Tarte"]},
                   "range": {"$regex": "a", "$lt": "Tf"}}
        names = {}
        for case, condition in filters.items():
            body = {"collection": name, "format": "csv", "filter": {"name": condition}, "sort": {"_id": 1}, "fields": ["name"]}
            data, _ = await download(api, await finished(api, await create(api, body)))
            names[case] = [row[0] for row in csv.reader(io.StringIO(data.decode("utf-8"), newline=""))][1:]
    finally:
        sync_db.drop_collection(name)
    assert names == {"plain": ["Toast", "Tarte"], "options": ["Tea", "Toast", "tart"], "range": ["Tea", "Tarte"]}


async def test_download_names_non_ascii_with_rfc6266_filename_star(api: Any) -> None:
    named = await finished(api, await create(api, {"collection": "tasks", "format": "csv", "limit": 5, "filename": "Café 東京"}))
    assert named["file_name"] == "Café 東京.csv"
    _, headers = await download(api, named)
    assert headers["Content-Disposition"] == "attachment; filename=\"Caf_ __.csv\"; filename*=UTF-8''Caf%C3%A9%20%E6%9D%B1%E4%BA%AC.csv"

    unnamed = await finished(api, await create(api, {"collection": "tasks", "format": "ndjson", "limit": 5}))
    assert re.fullmatch(r"tasks-\d{8}-\d{6}\.ndjson", unnamed["file_name"])
    _, headers = await download(api, unnamed)
    assert headers["Content-Disposition"] == f'attachment; filename="{unnamed["file_name"]}"'
