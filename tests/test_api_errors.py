"""Every rejection the design lists answers 400 naming the field; unknown ids 404; unfinished downloads 409."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.app import create_app

from conftest import Gate, assert_refused, hold_queue, make_settings, release_queue, wait_status

VALID = {"collection": "tasks", "format": "csv"}


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth):
        doc = {"a": doc}
    return doc


# (case, body, code, field)
REJECTIONS: list[tuple[str, Any, str, str]] = [
    ("not json", b"{nope", "invalid_body", "body"),
    ("not an object", [1, 2], "invalid_body", "body"),
    ("unknown top-level field", {**VALID, "colour": "red"}, "unknown_field", "colour"),
    ("unknown format", {**VALID, "format": "xml"}, "invalid_format", "format"),
    ("missing format", {"collection": "tasks"}, "invalid_format", "format"),
    ("missing collection", {"format": "csv"}, "invalid_collection", "collection"),
    ("collection not a string", {**VALID, "collection": 7}, "invalid_collection", "collection"),
    ("collection does not exist", {**VALID, "collection": "nope"}, "collection_not_found", "collection"),
    ("system collection", {**VALID, "collection": "system.users"}, "collection_not_exportable", "collection"),
    ("filter not an object", {**VALID, "filter": "status = open"}, "invalid_filter", "filter"),
    ("filter a list", {**VALID, "filter": [{"a": 1}]}, "invalid_filter", "filter"),
    ("$where", {**VALID, "filter": {"$where": "sleep(100)"}}, "forbidden_operator", "filter.$where"),
    ("$function deep", {**VALID, "filter": {"$expr": {"$and": [{"$function": {"body": "x", "args": [], "lang": "js"}}]}}}, "forbidden_operator", "filter.$expr.$and.0.$function"),
    ("$accumulator deep", {**VALID, "filter": {"a": {"$elemMatch": {"b": {"$accumulator": {}}}}}}, "forbidden_operator", "filter.a.$elemMatch.b.$accumulator"),
    ("bad extended json", {**VALID, "filter": {"createdAt": {"$date": "not a date"}}}, "invalid_filter", "filter"),
    ("bad $oid", {**VALID, "filter": {"_id": {"$oid": "zz"}}}, "invalid_filter", "filter"),
    ("bad $numberDecimal", {**VALID, "filter": {"price": {"$numberDecimal": "1,5"}}}, "invalid_filter", "filter"),
    ("$date out of range", {**VALID, "filter": {"at": {"$date": {"$numberLong": "999999999999999999"}}}}, "invalid_filter", "filter"),
    ("integer beyond 64 bits", {**VALID, "filter": {"n": 2**63}}, "invalid_filter", "filter"),
    ("bad $oid in a pipeline", {**VALID, "pipeline": [{"$match": {"_id": {"$oid": "zz"}}}]}, "invalid_pipeline", "pipeline"),
    ("too deep", {**VALID, "filter": nested(40)}, "invalid_filter", "filter" + ".a" * 33),
    ("fields not a list", {**VALID, "fields": "title"}, "invalid_fields", "fields"),
    ("fields empty path part", {**VALID, "fields": ["assignee..name"]}, "invalid_fields", "fields.0"),
    ("fields operator", {**VALID, "fields": ["$title"]}, "invalid_fields", "fields.0"),
    ("fields not strings", {**VALID, "fields": ["title", 1]}, "invalid_fields", "fields.1"),
    ("sort not an object", {**VALID, "sort": ["createdAt"]}, "invalid_sort", "sort"),
    ("sort value 2", {**VALID, "sort": {"createdAt": 2}}, "invalid_sort", "sort.createdAt"),
    ("sort value string", {**VALID, "sort": {"seq": 1, "createdAt": "desc"}}, "invalid_sort", "sort.createdAt"),
    ("sort value true", {**VALID, "sort": {"createdAt": True}}, "invalid_sort", "sort.createdAt"),
    ("negative limit", {**VALID, "limit": -1}, "invalid_limit", "limit"),
    ("fractional limit", {**VALID, "limit": 1.5}, "invalid_limit", "limit"),
    ("string limit", {**VALID, "limit": "10"}, "invalid_limit", "limit"),
    ("limit beyond 64 bits", {**VALID, "limit": 2**63}, "invalid_limit", "limit"),
    ("unknown option", {**VALID, "options": {"zip": True}}, "unknown_option", "options.zip"),
    ("unknown csv option", {**VALID, "options": {"csv": {"quote": "'"}}}, "unknown_option", "options.csv.quote"),
    ("unknown json option", {**VALID, "options": {"json": {"pretty": True}}}, "unknown_option", "options.json.pretty"),
    ("bad delimiter", {**VALID, "options": {"csv": {"delimiter": ";;"}}}, "invalid_option", "options.csv.delimiter"),
    ("bad json mode", {**VALID, "options": {"json": {"mode": "strict"}}}, "invalid_option", "options.json.mode"),
    ("bad compression", {**VALID, "options": {"compress": "zip"}}, "invalid_option", "options.compress"),
    ("gzip xlsx", {**VALID, "format": "xlsx", "options": {"compress": "gzip"}}, "invalid_option", "options.compress"),
    ("body over 256 KiB", {**VALID, "filter": {"title": "x" * (256 * 1024)}}, "body_too_large", "body"),
    ("$in not a list", {**VALID, "filter": {"status": {"$in": 5}}}, "invalid_filter", "filter.status.$in"),
    ("$and not a list", {**VALID, "filter": {"$and": {"a": 1}}}, "invalid_filter", "filter.$and"),
    ("$nor in $or not a list", {**VALID, "filter": {"$or": [{"a": 1}, {"$nor": {"b": 1}}]}}, "invalid_filter", "filter.$or.1.$nor"),
    # Extended JSON that json_util would read with a loss: the other keys dropped, bad base64 read as b"".
    ("$undefined with an operator", {**VALID, "filter": {"a": {"$undefined": True, "$ne": 1}}}, "invalid_filter", "filter"),
    ("legacy $binary with an operator", {**VALID, "filter": {"a": {"$binary": "AA==", "$type": "00", "$ne": 1}}}, "invalid_filter", "filter"),
    ("$binary not base64", {**VALID, "filter": {"a": {"$binary": {"base64": "!!", "subType": "00"}}}}, "invalid_filter", "filter"),
    ("$regex with $options not a string", {**VALID, "filter": {"a": {"$regex": "^a", "$options": 1, "$ne": "ab"}}}, "invalid_filter", "filter"),
    ("$regex with an unknown option", {**VALID, "filter": {"a": {"$regex": "^a", "$options": "iq"}}}, "invalid_filter", "filter"),
]


@pytest.fixture
async def api(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: list[dict[str, Any]]) -> Any:
    return await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, max_concurrent=1)))


@pytest.mark.parametrize("case,body,code,field", REJECTIONS, ids=[r[0] for r in REJECTIONS])
async def test_rejections_answer_400_naming_the_field(api: Any, case: str, body: Any, code: str, field: str) -> None:
    if isinstance(body, bytes):
        resp = await api.post("/api/exports", data=body, headers={"Content-Type": "application/json"})
    else:
        resp = await api.post("/api/exports", json=body)
    await assert_refused(api, resp, case, code, field)  # and nothing was created
    assert (await api.get("/healthz")).status == 200


async def test_jobs_collection_and_collections_outside_the_allow_list_are_rejected(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any) -> None:
    settings = make_settings(mongo_url, tmp_path, collections=("tasks",))
    api = await aiohttp_client(create_app(settings))
    for collection in (settings.jobs_collection, "tasks_other"):
        resp = await api.post("/api/exports", json={"collection": collection, "format": "csv"})
        assert resp.status == 400
        assert (await resp.json())["error"]["field"] == "collection"
    names = [c["name"] for c in (await (await api.get("/api/collections")).json())["collections"]]
    assert names == ["tasks"]


async def test_unknown_id_404_and_unfinished_download_409(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate) -> None:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, max_concurrent=1), source=gate))
    for path in ("/api/exports/0123456789abcdef01234567", "/api/exports/../../etc/passwd", "/api/exports/nope/download"):
        resp = await api.get(path)
        assert resp.status == 404, path
    assert (await api.delete("/api/exports/0123456789abcdef01234567")).status == 404

    holders = await hold_queue(api, gate)  # keep the job queued
    job = await (await api.post("/api/exports", json=VALID)).json()
    resp = await api.get(f"/api/exports/{job['id']}/download")
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "not_ready"
    cancelled = await (await api.post("/api/exports", json=VALID)).json()
    assert (await (await api.delete(f"/api/exports/{cancelled['id']}")).json())["status"] == "cancelled"
    resp = await api.get(f"/api/exports/{cancelled['id']}/download")
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "not_completed"  # no file will come
    await release_queue(api, gate, holders)
    snap = await wait_status(api, job["id"])
    assert snap["status"] == "completed"
    assert (await api.get(f"/api/exports/{job['id']}/download")).status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/nope", 404, "not_found"),
        ("GET", "/api/exports/0123456789abcdef01234567/download/", 404, "not_found"),
        ("PUT", "/api/exports", 405, "method_not_allowed"),
        ("PATCH", "/api/exports/0123456789abcdef01234567", 405, "method_not_allowed"),
        ("POST", "/api/exports/0123456789abcdef01234567/download", 405, "method_not_allowed"),
    ],
)
async def test_unknown_paths_and_methods_under_api_answer_json(api: Any, method: str, path: str, status: int, code: str) -> None:
    resp = await api.request(method, path)
    assert resp.status == status and resp.content_type == "application/json", (resp.status, await resp.text())
    assert (await resp.json())["error"]["code"] == code
    if status == 405:
        assert resp.headers["Allow"], resp.headers


async def test_list_filters_and_validates(api: Any) -> None:
    assert (await api.get("/api/exports?status=bogus")).status == 400
    assert (await api.get("/api/exports?limit=0")).status == 400
    for limit in ("%C2%B2", "9" * 5000):  # a superscript two is a digit to str.isdigit, not to int()
        resp = await api.get(f"/api/exports?limit={limit}")
        assert resp.status == 400 and (await resp.json())["error"]["field"] == "limit", limit
    listing = await (await api.get("/api/exports?status=completed&limit=5")).json()
    assert listing == {"exports": []}
