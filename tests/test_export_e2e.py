"""End to end: create exports over HTTP in every format, follow them over Socket.IO, download, read back
with independent parsers and compare with the same query evaluated here, in Python, on the source documents."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from typing import Any

import openpyxl
from openpyxl.utils.escape import unescape
from bson import json_util

import socketio

from conftest import EVENTS, Gate, hold_queue, release_queue, until
from expected import csv_text, lookup

FILTER = {"status": {"$in": ["open", "in_progress", "done"]}}
SORT = {"createdAt": -1, "seq": 1}
TABLE_FIELDS = ["seq", "title", "description", "assignee.name", "tags", "createdAt", "estimate", "points", "archived", "items.0.sku"]
DOC_FIELDS = ["seq", "title", "assignee.name", "createdAt", "estimate", "tags"]


def expected_docs(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [d for d in tasks if d.get("status") in FILTER["status"]["$in"]]
    rows.sort(key=lambda d: d["seq"])
    rows.sort(key=lambda d: d["createdAt"], reverse=True)  # stable: seq ascending within equal dates
    return rows


def projected(doc: dict[str, Any]) -> dict[str, Any]:
    """MongoDB's projection of DOC_FIELDS (with _id), built by hand."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "assignee":
            if isinstance(value, dict):
                out[key] = {k: v for k, v in value.items() if k == "name"}
        elif key == "_id" or key in DOC_FIELDS:
            out[key] = value
    return out


async def run_export(client: Any, sio: Any, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/api/exports", json=body)
    assert resp.status == 202, await resp.text()
    job = await resp.json()
    assert resp.headers["Location"] == f"/api/exports/{job['id']}"
    ack = await sio.call("subscribe", {"id": job["id"]})
    assert ack["ok"] is True and ack["job"]["id"] == job["id"]
    return job


async def test_export_all_formats_end_to_end(gated_client: Any, gate: Gate, tasks: list[dict[str, Any]]) -> None:
    client = gated_client
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    sio_client = socketio.AsyncClient(reconnection=False)
    for name in EVENTS:
        sio_client.on(name, lambda data, _n=name: seen.setdefault(data["id"], []).append((_n, data)))
    await sio_client.connect(str(client.make_url("/")), transports=["websocket"])
    try:
        # Hold the queue while subscribing, so every event of every job is seen from the first.
        holders = await hold_queue(client, gate)
        jobs = {}
        for fmt in ("csv", "json", "ndjson", "xlsx"):
            fields = DOC_FIELDS if fmt in ("json", "ndjson") else TABLE_FIELDS
            body = {"collection": "tasks", "format": fmt, "filter": FILTER, "sort": SORT, "fields": fields, "filename": f"tasks {fmt}"}
            job = await run_export(client, sio_client, body)
            assert job["status"] == "queued" and job["queue_position"] >= 1
            jobs[fmt] = job
        await release_queue(client, gate, holders)
        await until(
            lambda: all(seen.get(j["id"]) and seen[j["id"]][-1][0] in ("export-completed", "export-failed") for j in jobs.values()),
            "the last event of every job", timeout=60,
        )
    finally:
        await sio_client.disconnect()

    expected = expected_docs(tasks)
    assert len(expected) >= 2500
    for fmt, job in jobs.items():
        events = seen[job["id"]]
        names = [n for n, _ in events]
        # The same state may be sent again while the run waits (a heartbeat); the order of states is fixed.
        states = [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name]
        assert states == ["export-fetching", "export-processing", "export-finalizing", "export-completed"], names
        processed = [d["processed"] for _, d in events]
        assert processed == sorted(processed), "progress went backwards"
        # The count runs beside the cursor: the total is unknown at first, then known for good.
        totals = [d["total"] for _, d in events]
        assert totals[0] is None and set(totals) <= {None, len(expected)}, totals
        assert None not in totals[totals.index(len(expected)):], totals
        done = events[-1][1]
        assert done["processed"] == done["total"] == len(expected) and done["percent"] == 100.0
        assert done["download_url"].startswith(f"/api/exports/{job['id']}/download?exp=") and done["bytes"] > 0
        assert done["file_name"] == f"tasks {fmt}.{fmt}" and isinstance(done["duration_seconds"], float), done
        assert 0 < done["duration_seconds"] < 60, done
        for _, data in events:
            assert {"id", "status", "processed", "total", "percent", "ts"} <= set(data)

        resp = await client.get(done["download_url"])
        assert resp.status == 200
        assert resp.headers["Content-Disposition"] == f'attachment; filename="tasks {fmt}.{fmt}"'
        payload = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(payload) == done["bytes"]
        CHECKS[fmt](payload, expected)

        snap = await (await client.get(f"/api/exports/{job['id']}")).json()
        assert snap["status"] == "completed" and snap["processed"] == len(expected)


def check_csv(payload: bytes, expected: list[dict[str, Any]]) -> None:
    rows = list(csv.reader(io.StringIO(payload.decode("utf-8"), newline="")))
    assert rows[0] == TABLE_FIELDS
    assert len(rows) - 1 == len(expected)
    for row, doc in zip(rows[1:], expected):
        assert row == [csv_text(lookup(doc, f)) for f in TABLE_FIELDS]


def check_json(payload: bytes, expected: list[dict[str, Any]]) -> None:
    docs = json_util.loads(payload.decode("utf-8"), json_options=json_util.JSONOptions(tz_aware=True))
    assert docs == [projected(d) for d in expected]


def check_ndjson(payload: bytes, expected: list[dict[str, Any]]) -> None:
    lines = payload.decode("utf-8").splitlines()
    docs = [json_util.loads(line, json_options=json_util.JSONOptions(tz_aware=True)) for line in lines]
    assert docs == [projected(d) for d in expected]


def check_xlsx(payload: bytes, expected: list[dict[str, Any]]) -> None:
    book = openpyxl.load_workbook(io.BytesIO(payload), read_only=True)
    rows = list(book.worksheets[0].iter_rows(values_only=True))
    assert list(rows[0]) == TABLE_FIELDS
    assert len(rows) - 1 == len(expected)
    for row, doc in zip(rows[1:], expected):
        for field, cell in zip(TABLE_FIELDS, row):
            value = lookup(doc, field)
            if isinstance(cell, str):
                cell = unescape(cell)  # OOXML writes a CR as _x000D_, which Excel reads back as a CR
            if isinstance(value, datetime):
                assert cell == value.astimezone(timezone.utc).replace(tzinfo=None)
            elif isinstance(value, (list, dict)):
                assert cell == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert cell == value and isinstance(cell, (int, float)) and not isinstance(cell, bool)  # Excel has one number type
            elif value == "":
                assert cell in ("", None)  # an empty string cell reads back as empty
            else:
                assert cell == value and type(cell) is type(value), (field, cell, value)


CHECKS = {"csv": check_csv, "json": check_json, "ndjson": check_ndjson, "xlsx": check_xlsx}
