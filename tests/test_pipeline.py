"""Aggregation pipeline exports: validation through HTTP, then exports through the real app on the wire-protocol
server with both drivers, read back with csv/json parsers and compared with the same computation done here,
in Python, on the source documents."""
from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest
from bson import decode_all, json_util
from hypothesis import HealthCheck, example, given, settings as hyp_settings, strategies as st

from service.app import create_app
from service.db import Database, FindSpec, make_client
from service.settings import MANAGER_KEY

from conftest import DATA_DB, Gate, assert_refused, export_files, hold_queue, make_settings, release_queue, subscribe, until, wait_status
from expected import csv_text
from test_responsive import CommandLog

VALID = {"collection": "tasks", "format": "ndjson"}
EMBEDDED = not os.environ.get("EXPORT_MONGO_URL")  # the suite's own embedded server, not a real MongoDB
JSON_OPTIONS = json_util.JSONOptions(tz_aware=True)
STATUSES = ["open", "in_progress", "done"]


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth):
        doc = {"a": doc}
    return doc


def pipeline(*stages: dict[str, Any]) -> dict[str, Any]:
    return {**VALID, "pipeline": list(stages)}


def facets(depth: int) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = [{"$match": {}}]
    for _ in range(depth):
        stages = [{"$facet": {"x": stages}}]
    return stages


LOOKUP = {"localField": "a", "foreignField": "b", "as": "c"}
# (case, body, code, field)
REJECTIONS: list[tuple[str, dict[str, Any], str, str]] = [
    ("not a list", {**VALID, "pipeline": {"$match": {}}}, "invalid_pipeline", "pipeline"),
    ("stage not an object", pipeline({"$match": {}}, "$limit"), "invalid_pipeline", "pipeline.1"),
    ("two keys in a stage", pipeline({"$match": {}, "$limit": 1}), "invalid_pipeline", "pipeline.0"),
    ("$out", pipeline({"$match": {}}, {"$project": {"a": 1}}, {"$out": "copy"}), "forbidden_stage", "pipeline.2.$out"),
    ("$merge", pipeline({"$merge": {"into": "copy"}}), "forbidden_stage", "pipeline.0.$merge"),
    ("unknown stage", pipeline({"$match": {}}, {"$frobnicate": {}}), "forbidden_stage", "pipeline.1.$frobnicate"),
    ("$unionWith", pipeline({"$unionWith": "tasks"}), "forbidden_stage", "pipeline.0.$unionWith"),
    ("$graphLookup", pipeline({"$graphLookup": {"from": "tasks"}}), "forbidden_stage", "pipeline.0.$graphLookup"),
    ("$where in $match", pipeline({"$match": {"a": {"$where": "sleep(100)"}}}), "forbidden_operator", "pipeline.0.$match.a.$where"),
    ("$where at the top of $match", pipeline({"$sort": {"a": 1}}, {"$match": {"$where": "1"}}), "forbidden_operator", "pipeline.1.$match.$where"),
    ("$function in $addFields", pipeline({"$addFields": {"x": {"$cond": [True, {"$function": {"body": "f", "args": [], "lang": "js"}}, 0]}}}),
     "forbidden_operator", "pipeline.0.$addFields.x.$cond.1.$function"),
    ("$accumulator in $group", pipeline({"$group": {"_id": "$status", "x": {"$accumulator": {}}}}), "forbidden_operator", "pipeline.0.$group.x.$accumulator"),
    ("$where in a $facet", pipeline({"$facet": {"all": [{"$match": {}}], "odd": [{"$limit": 5}, {"$match": {"$or": [{"a": 1}, {"$where": "1"}]}}]}}),
     "forbidden_operator", "pipeline.0.$facet.odd.1.$match.$or.1.$where"),
    ("$out in a $facet", pipeline({"$facet": {"x": [{"$out": "copy"}]}}), "forbidden_stage", "pipeline.0.$facet.x.0.$out"),
    ("$facet not a list", pipeline({"$facet": {"x": {"$match": {}}}}), "invalid_pipeline", "pipeline.0.$facet.x"),
    ("$facet a list, not an object", pipeline({"$facet": [{"$match": {}}]}), "invalid_pipeline", "pipeline.0.$facet"),
    ("$merge in a $lookup pipeline", pipeline({"$lookup": {"from": "tasks", "pipeline": [{"$merge": "copy"}], "as": "c"}}),
     "forbidden_stage", "pipeline.0.$lookup.pipeline.0.$merge"),
    ("$function in a $lookup pipeline", pipeline({"$match": {}}, {"$lookup": {"from": "tasks", "as": "c", "pipeline": [{"$project": {"x": {"$function": {}}}}]}}),
     "forbidden_operator", "pipeline.1.$lookup.pipeline.0.$project.x.$function"),
    ("$where in $lookup let", pipeline({"$lookup": {"from": "tasks", "let": {"v": {"$where": "1"}}, "pipeline": [], "as": "c"}}),
     "forbidden_operator", "pipeline.0.$lookup.let.v.$where"),
    ("$lookup from a system collection", pipeline({"$lookup": {"from": "system.users", **LOOKUP}}), "collection_not_exportable", "pipeline.0.$lookup.from"),
    ("$lookup from nothing", pipeline({"$lookup": {**LOOKUP}}), "invalid_collection", "pipeline.0.$lookup.from"),
    ("$lookup from a non-string", pipeline({"$lookup": {"from": {"db": "admin", "coll": "x"}, **LOOKUP}}), "invalid_collection", "pipeline.0.$lookup.from"),
    ("$lookup not an object", pipeline({"$lookup": "tasks"}), "invalid_pipeline", "pipeline.0.$lookup"),
    ("too deep", pipeline({"$match": nested(40)}), "invalid_pipeline", "pipeline.0.$match" + ".a" * 33),
    ("$facet in $facet too deep", {**VALID, "pipeline": facets(40)}, "invalid_pipeline", "pipeline" + ".0.$facet.x" * 11),
    ("101 stages", pipeline(*[{"$match": {}}] * 101), "invalid_pipeline", "pipeline"),
    ("bad extended json", pipeline({"$match": {"createdAt": {"$date": "not a date"}}}), "invalid_pipeline", "pipeline"),
    ("with filter", {**pipeline({"$match": {}}), "filter": {"status": "open"}}, "conflicting_fields", "filter"),
    ("with fields", {**pipeline({"$match": {}}), "fields": ["title"]}, "conflicting_fields", "fields"),
    ("with sort", {**pipeline({"$match": {}}), "sort": {"seq": 1}}, "conflicting_fields", "sort"),
    ("count without a pipeline", {**VALID, "count": True}, "conflicting_fields", "count"),
    ("count not a boolean", {**pipeline({"$match": {}}), "count": "yes"}, "invalid_count", "count"),
]


@pytest.fixture
async def api(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: list[dict[str, Any]]) -> Any:
    return await aiohttp_client(create_app(make_settings(mongo_url, tmp_path)))


@pytest.mark.parametrize("case,body,code,field", REJECTIONS, ids=[r[0] for r in REJECTIONS])
async def test_rejections_name_the_stage_path(api: Any, case: str, body: dict[str, Any], code: str, field: str) -> None:
    await assert_refused(api, await api.post("/api/exports", json=body), case, code, field)


async def test_lookup_from_outside_the_allow_list_or_the_jobs_collection_is_rejected(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any
) -> None:
    settings = make_settings(mongo_url, tmp_path, collections=("tasks", "people"))
    api = await aiohttp_client(create_app(settings))
    for index, source in enumerate(("tasks_other", settings.jobs_collection)):
        stages = [{"$match": {}}] * index + [{"$lookup": {"from": source, **LOOKUP}}]
        resp = await api.post("/api/exports", json=pipeline(*stages))
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert (error["code"], error["field"]) == ("collection_not_exportable", f"pipeline.{index}.$lookup.from"), error
    resp = await api.post("/api/exports", json=pipeline({"$lookup": {"from": "people", **LOOKUP}}))
    assert resp.status == 202, await resp.text()


async def test_snapshot_shows_the_pipeline_in_relaxed_extended_json(api: Any) -> None:
    stages = [{"$match": {"createdAt": {"$gte": {"$date": "2024-06-01T00:00:00Z"}}, "points": {"$numberLong": "5"}}}, {"$limit": 3}]
    resp = await api.post("/api/exports", json={**VALID, "pipeline": stages, "count": True, "limit": 2})
    assert resp.status == 202, await resp.text()
    snap = await resp.json()
    assert snap["pipeline"] == [{"$match": {"createdAt": {"$gte": {"$date": "2024-06-01T00:00:00Z"}}, "points": 5}}, {"$limit": 3}]
    assert (snap["count"], snap["limit"], snap["filter"], snap["fields"], snap["sort"]) == (True, 2, None, None, None)
    find = await (await api.post("/api/exports", json={**VALID, "filter": {"status": "open"}})).json()
    assert (find["pipeline"], find["filter"], find["count"]) == (None, {"status": "open"}, True)


# --- exports on the server ----------------------------------------------------------------------


def read_ndjson(payload: bytes) -> list[dict[str, Any]]:
    return [json_util.loads(line, json_options=JSON_OPTIONS) for line in payload.decode("utf-8").splitlines()]


def read_csv(payload: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(payload.decode("utf-8"), newline="")))


async def export(api: Any, body: dict[str, Any], timeout: float = 120) -> tuple[dict[str, Any], bytes]:
    resp = await api.post("/api/exports", json=body)
    assert resp.status == 202, await resp.text()
    snap = await wait_status(api, (await resp.json())["id"], timeout=timeout)
    assert snap["status"] == "completed", snap
    resp = await api.get(snap["download_url"])
    assert resp.status == 200
    return snap, await resp.read()


def by_status(tasks: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in tasks if d.get("status") in STATUSES)


async def test_match_project_sort_spans_several_batches(client: Any, tasks: list[dict[str, Any]]) -> None:
    stages = [
        {"$match": {"status": {"$in": STATUSES}}},
        {"$project": {"_id": 0, "seq": 1, "title": 1, "createdAt": 1, "points": 1, "assignee": 1}},
        {"$sort": {"createdAt": -1, "seq": 1}},
    ]
    snap, payload = await export(client, {**VALID, "pipeline": stages})
    expected = sorted(by_status(tasks), key=lambda d: d["seq"])
    expected.sort(key=lambda d: d["createdAt"], reverse=True)
    keep = ("seq", "title", "createdAt", "points", "assignee")
    expected = [{k: d[k] for k in keep if k in d} for d in expected]
    assert len(expected) > 2000  # more than two batches of 1,000
    assert read_ndjson(payload) == expected
    assert snap["processed"] == snap["total"] == len(expected)


async def test_group_to_csv(client: Any, tasks: list[dict[str, Any]]) -> None:
    stages = [{"$group": {"_id": "$status", "n": {"$sum": 1}, "points": {"$sum": "$points"}, "estimate": {"$avg": "$estimate"}}}]
    _, payload = await export(client, {**VALID, "format": "csv", "pipeline": stages})
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for doc in tasks:
        groups[doc.get("status")].append(doc)
    rows = {row["_id"]: row for row in read_csv(payload)}
    assert set(rows) == {csv_text(status) for status in groups}
    for status, docs in groups.items():
        row = rows[csv_text(status)]
        estimates = [d["estimate"] for d in docs if isinstance(d.get("estimate"), (int, float))]
        assert (int(row["n"]), int(row["points"])) == (len(docs), sum(d.get("points") or 0 for d in docs))
        assert float(row["estimate"]) == pytest.approx(sum(estimates) / len(estimates), rel=1e-12)


@pytest.fixture
def people(sync_db: Any, tasks: list[dict[str, Any]]) -> Iterator[dict[str, dict[str, Any]]]:
    """One person per assignee name, with a team, in a second exportable collection."""
    names = sorted({d["assignee"]["name"] for d in tasks if isinstance(d.get("assignee"), dict)})
    docs = [{"name": name, "team": f"team-{index % 3}"} for index, name in enumerate(names[:-2])]  # two names left unmatched
    sync_db.drop_collection("people")
    sync_db.people.insert_many(docs)
    yield {d["name"]: d for d in docs}
    sync_db.drop_collection("people")


async def test_lookup_into_another_collection(client: Any, tasks: list[dict[str, Any]], people: dict[str, dict[str, Any]]) -> None:
    stages = [
        {"$match": {"status": "open"}},
        {"$lookup": {"from": "people", "localField": "assignee.name", "foreignField": "name", "as": "people"}},
        {"$project": {"seq": 1, "people": 1}},  # not _id: 0, after which the embedded server gives the array as text
        {"$sort": {"seq": 1}},
    ]
    _, payload = await export(client, {**VALID, "pipeline": stages})
    expected = []
    for doc in sorted((d for d in tasks if d.get("status") == "open"), key=lambda d: d["seq"]):
        name = (doc.get("assignee") or {}).get("name")
        expected.append({"_id": doc["_id"], "seq": doc["seq"], "people": [people[name]] if name in people else []})
    assert any(not row["people"] for row in expected) and any(row["people"] for row in expected)
    # The embedded server returns ObjectIds that went through $lookup or $project as hex text: compared as text.
    assert [text_ids(row) for row in read_ndjson(payload)] == [text_ids(row) for row in expected]


def text_ids(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "_id": str(row["_id"]), "people": [{**person, "_id": str(person["_id"])} for person in row["people"]]}


async def test_count_true_gives_total_and_percent(gated_client: Any, gate: Gate, tasks: list[dict[str, Any]]) -> None:
    client = gated_client
    expected = sum(1 for d in tasks if d.get("status") in STATUSES)
    stages = [{"$match": {"status": {"$in": STATUSES}}}, {"$project": {"_id": 0, "seq": 1}}]
    for count in (True, False):
        # The count runs beside the cursor; a JSON envelope names the total, so its rows wait for the count.
        body = {**VALID, "format": "json", "options": {"json": {"envelope": True}}, "pipeline": stages, "count": count}
        holders = await hold_queue(client, gate)  # subscribed before the first event
        job = await (await client.post("/api/exports", json=body)).json()
        seen: list[tuple[float, str, dict[str, Any]]] = []
        sio = await subscribe(client, job["id"], seen)
        await release_queue(client, gate, holders)
        snap = await wait_status(client, job["id"], timeout=120)
        # The end event may trail the state written before it.
        await until(lambda: "export-completed" in [name for _, name, _ in seen], "the export-completed event", timeout=5)
        await sio.disconnect()
        assert snap["status"] == "completed" and snap["total"] == snap["processed"] == expected and snap["count"] is count
        envelope = json_util.loads((await (await client.get(snap["download_url"])).read()).decode("utf-8"), json_options=JSON_OPTIONS)
        assert len(envelope["documents"]) == expected
        processing = [data for _, name, data in seen if name == "export-processing" and data["processed"]]
        assert processing and "export-completed" in [name for _, name, _ in seen]
        if count:
            assert envelope["exportInfo"]["total"] == expected
            assert all(d["total"] == expected and d["percent"] == round(100 * d["processed"] / expected, 1) for d in processing), processing
        else:
            assert envelope["exportInfo"]["total"] is None
            assert all(d["total"] is None and d["percent"] is None for d in processing), processing


async def test_a_stage_the_server_refuses_fails_the_job_with_its_message(client: Any) -> None:
    body = {**VALID, "pipeline": [{"$project": {"x": {"$noSuchOperator": 1}}}]}
    resp = await client.post("/api/exports", json=body)
    assert resp.status == 202
    snap = await wait_status(client, (await resp.json())["id"], timeout=60)
    assert snap["status"] == "failed" and snap["error"]["code"] == "database_error", snap
    assert "$noSuchOperator" in snap["error"]["message"]


def without_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "_id"} for row in rows]


def assignees(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["assignee"] for d in sorted(tasks, key=lambda d: d["seq"]) if isinstance(d.get("assignee"), dict)]


BY_SEQ = {"$sort": {"seq": 1}}
# Each remaining stage through the service, against the same computation in Python (the README's table).
STAGES: dict[str, tuple[list[dict[str, Any]], Any]] = {
    "$addFields": ([BY_SEQ, {"$addFields": {"twice": {"$multiply": ["$points", 2]}}}, {"$project": {"_id": 0, "seq": 1, "twice": 1}}],
                   lambda t: [{"seq": d["seq"], "twice": 2 * d["points"]} for d in sorted(t, key=lambda d: d["seq"])]),
    "$unset": ([BY_SEQ, {"$unset": ["_id", "description", "items", "tags", "assignee", "title"]}],
               lambda t: [{k: v for k, v in d.items() if k not in ("_id", "description", "items", "tags", "assignee", "title")}
                          for d in sorted(t, key=lambda d: d["seq"])]),
    "$skip": ([BY_SEQ, {"$skip": 2995}, {"$project": {"_id": 0, "seq": 1}}], lambda t: [{"seq": s} for s in sorted(d["seq"] for d in t)[2995:]]),
    "$unwind": ([BY_SEQ, {"$unwind": "$tags"}, {"$project": {"_id": 0, "seq": 1, "tags": 1}}],
                lambda t: [{"seq": d["seq"], "tags": tag} for d in sorted(t, key=lambda d: d["seq"]) for tag in d.get("tags") or []]),
    "$count": ([{"$match": {"status": "open"}}, {"$count": "open"}], lambda t: [{"open": sum(d.get("status") == "open" for d in t)}]),
    "$bucket": ([{"$bucket": {"groupBy": "$points", "boundaries": [0, 3, 1000]}}],
                lambda t: [{"_id": 0, "count": sum(d["points"] < 3 for d in t)}, {"_id": 3, "count": sum(d["points"] >= 3 for d in t)}]),
    "$facet": ([{"$facet": {"n": [{"$count": "n"}], "first": [BY_SEQ, {"$limit": 1}, {"$project": {"_id": 0, "seq": 1}}]}}],
               lambda t: [{"n": [{"n": len(t)}], "first": [{"seq": min(d["seq"] for d in t)}]}]),
    "$replaceRoot": ([{"$match": {"assignee": {"$type": "object"}}}, BY_SEQ, {"$replaceRoot": {"newRoot": "$assignee"}}], assignees),
    "$replaceWith": ([{"$match": {"assignee": {"$type": "object"}}}, BY_SEQ, {"$replaceWith": "$assignee"}], assignees),
}


@pytest.mark.parametrize("stage", list(STAGES))
async def test_each_stage_against_python(client: Any, tasks: list[dict[str, Any]], stage: str) -> None:
    stages, compute = STAGES[stage]
    _, payload = await export(client, {**VALID, "pipeline": stages})
    rows = read_ndjson(payload)
    expected = compute(tasks)
    assert expected  # the comparison below is not between two empty lists
    if stage in ("$facet", "$replaceRoot", "$replaceWith"):
        rows = without_id(rows)  # the embedded server adds an _id there (see the README)
    assert rows == expected


async def test_sample_gives_that_many_distinct_source_documents(client: Any, tasks: list[dict[str, Any]]) -> None:
    _, payload = await export(client, {**VALID, "pipeline": [{"$sample": {"size": 25}}, {"$project": {"_id": 0, "seq": 1, "title": 1}}]})
    rows = read_ndjson(payload)
    by_seq = {d["seq"]: d for d in tasks}
    assert len(rows) == len({row["seq"] for row in rows}) == 25
    assert all(row == {"seq": row["seq"], "title": by_seq[row["seq"]]["title"]} for row in rows)


# Stages the embedded server lacks, each with what its error message says and what MongoDB answers instead.
LACKING: dict[str, tuple[list[dict[str, Any]], str]] = {
    "$sortByCount": ([{"$sortByCount": "$status"}], "$sortByCount"),
    "$set": ([{"$set": {"twice": {"$multiply": ["$points", 2]}}}, {"$project": {"_id": 0, "seq": 1, "twice": 1}}, {"$sort": {"seq": 1}}], "$set"),
    "$lookup with a pipeline": (
        [{"$sort": {"seq": 1}}, {"$limit": 3}, {"$project": {"_id": 0, "seq": 1}},
         {"$lookup": {"from": "tasks", "pipeline": [{"$match": {"seq": 0}}, {"$project": {"_id": 0, "title": 1}}], "as": "first"}}],
        "localField",
    ),
}


def lacking_expected(case: str, tasks: list[dict[str, Any]]) -> Any:
    ordered = sorted(tasks, key=lambda d: d["seq"])
    if case == "$set":
        return [{"seq": d["seq"], "twice": d["points"] * 2} for d in ordered]
    if case == "$lookup with a pipeline":
        return [{"seq": d["seq"], "first": [{"title": ordered[0]["title"]}]} for d in ordered[:3]]
    counts: dict[Any, int] = defaultdict(int)
    for doc in tasks:
        counts[doc.get("status")] += 1
    return sorted(({"_id": k, "count": v} for k, v in counts.items()), key=lambda row: -row["count"])


@pytest.mark.parametrize("case", list(LACKING))
async def test_stages_the_embedded_server_lacks(client: Any, tasks: list[dict[str, Any]], case: str) -> None:
    stages, message = LACKING[case]
    resp = await client.post("/api/exports", json={**VALID, "pipeline": stages})
    assert resp.status == 202
    snap = await wait_status(client, (await resp.json())["id"], timeout=60)
    if EMBEDDED:
        assert snap["status"] == "failed", snap
        assert snap["error"]["code"] == "database_error" and message in snap["error"]["message"], snap
        return
    assert snap["status"] == "completed", snap
    assert read_ndjson(await (await client.get(snap["download_url"])).read()) == lacking_expected(case, tasks)


async def test_limit_is_a_final_limit(client: Any, tasks: list[dict[str, Any]]) -> None:
    stages = [{"$project": {"_id": 0, "seq": 1}}, {"$sort": {"seq": -1}}]
    snap, payload = await export(client, {**VALID, "pipeline": stages, "limit": 7, "count": True})
    top = sorted((d["seq"] for d in tasks), reverse=True)[:7]
    assert read_ndjson(payload) == [{"seq": seq} for seq in top]
    assert snap["total"] == 7


async def test_database_yields_raw_batches_of_the_batch_size(mongo_url: str, driver: str, sync_db: Any, tasks: list[dict[str, Any]]) -> None:
    db = Database.connect(mongo_url, DATA_DB, driver)
    try:
        sync_db.drop_collection("empty_for_pipeline")
        sync_db.create_collection("empty_for_pipeline")
        empty = FindSpec("empty_for_pipeline", {}, None, (), 0, batch_size=500, pipeline=[{"$match": {}}])
        assert [batch async for batch in db.raw_batches(empty)] == []
        assert db.raw_aggregate is None  # an empty collection does not tell how the server answers batchSize 0

        spec = FindSpec("tasks", {}, None, (), 0, batch_size=500, pipeline=[{"$project": {"_id": 0, "seq": 1}}, {"$sort": {"seq": 1}}])
        sizes, rows = [], []
        async for batch in db.raw_batches(spec):
            assert isinstance(batch, bytes)
            docs = decode_all(batch)
            sizes.append(len(docs))
            rows += docs
        assert db.raw_aggregate is (not EMBEDDED)  # MongoDB sends an empty first batch; the embedded server does not
        assert rows == [{"seq": d["seq"]} for d in sorted(tasks, key=lambda d: d["seq"])]
        assert max(sizes) <= 500 and len(sizes) >= len(tasks) // 500
        assert await db.count(spec) == len(tasks)
        assert await db.count(FindSpec("tasks", {}, None, (), 25, pipeline=spec.pipeline)) == 25
    finally:
        sync_db.drop_collection("empty_for_pipeline")
        await db.close()


async def test_cancel_a_running_pipeline_export(aiohttp_client: Any, mongo_url: str, tmp_path: Path, driver: str, tasks: Any) -> None:
    # Batches of ten make the export take hundreds of round trips, so it is still running when cancelled.
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, driver, batch_size=10)))
    body = {**VALID, "format": "csv", "pipeline": [{"$project": {"_id": 0, "seq": 1, "title": 1}}, {"$sort": {"seq": 1}}]}
    job = await (await api.post("/api/exports", json=body)).json()
    snap = await wait_status(api, job["id"], ("processing", "completed", "failed", "cancelled"))
    assert snap["status"] == "processing" and snap["total"] is None, snap
    export_dir = Path(api.server.app[MANAGER_KEY].settings.export_dir)
    assert [name for name in export_files(export_dir) if name.endswith(".part")]
    resp = await api.delete(f"/api/exports/{job['id']}")
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    assert (await wait_status(api, job["id"]))["status"] == "cancelled"
    assert export_files(export_dir) == []  # the partial file is gone


async def test_json_envelope_names_the_pipeline(client: Any, tasks: list[dict[str, Any]]) -> None:
    stages = [{"$match": {"createdAt": {"$lt": {"$date": "2024-03-01T00:00:00Z"}}}}, {"$project": {"_id": 0, "seq": 1}}, {"$sort": {"seq": 1}}]
    body = {**VALID, "format": "json", "options": {"json": {"envelope": True}}, "pipeline": stages}
    _, payload = await export(client, body)
    envelope = json_util.loads(payload.decode("utf-8"), json_options=JSON_OPTIONS)
    assert envelope["exportInfo"]["pipeline"] == json_util.loads(json_util.dumps(stages), json_options=JSON_OPTIONS) == [
        {"$match": {"createdAt": {"$lt": datetime(2024, 3, 1, tzinfo=timezone.utc)}}}, *stages[1:]
    ]
    assert envelope["exportInfo"]["total"] is None
    cutoff = datetime(2024, 3, 1, tzinfo=timezone.utc)
    expected = [{"seq": d["seq"]} for d in sorted(tasks, key=lambda d: d["seq"]) if d["createdAt"] < cutoff]
    assert expected and envelope["documents"] == expected


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=15,
)
STAGE_NAMES = st.sampled_from(["$match", "$project", "$group", "$lookup", "$facet", "$unwind", "$out", "$merge", "$unionWith", "$bogus", "match"])
OPERATOR_NAMES = st.sampled_from(["$where", "$function", "$accumulator", "$date", "$oid", "$numberLong", "$expr", "$sum", "from", "pipeline"])
STAGES_ST = st.lists(
    st.one_of(
        st.dictionaries(STAGE_NAMES, JSON_VALUES, min_size=1, max_size=2),
        st.builds(lambda name, op, value: {name: {op: value}}, STAGE_NAMES, OPERATOR_NAMES, JSON_VALUES),
        st.builds(lambda name, op, value: {"$facet": {"x": [{name: {op: value}}]}}, STAGE_NAMES, OPERATOR_NAMES, JSON_VALUES),
        JSON_VALUES,
    ),
    max_size=4,
)


@hyp_settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None, derandomize=True)
@given(stages=STAGES_ST, count=st.sampled_from([None, True, "x"]))
@example(stages=[{"$match": {}}], count=None)  # accepted
@example(stages=[{"$out": "elsewhere"}], count=True)  # refused
async def test_hostile_pipelines_never_cause_a_5xx(idle_client: Any, stages: Any, count: Any) -> None:
    await post_answers_202_or_400(idle_client, {**VALID, "pipeline": stages, **({} if count is None else {"count": count})})


async def test_a_pipeline_as_deep_as_the_json_parser_goes_never_causes_a_5xx(idle_client: Any) -> None:
    await post_answers_202_or_400(idle_client, {**VALID, "pipeline": facets(240)})  # too deep for hypothesis to print


async def post_answers_202_or_400(api: Any, body: dict[str, Any]) -> None:
    resp = await api.post("/api/exports", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert resp.status in (202, 400), (str(body)[:300], resp.status, await resp.text())
    if resp.status == 400:
        error = (await resp.json())["error"]
        assert error["message"] and error["field"].split(".")[0] in ("pipeline", "count", "body"), (str(body)[:300], error)


async def test_pipeline_commands_carry_the_time_limits_and_allow_disk_use(mongo_url: str, driver: str, tasks: list[dict[str, Any]]) -> None:
    listener = CommandLog()
    client = make_client(mongo_url, driver)
    watched = type(client)(mongo_url, event_listeners=[listener], tz_aware=True)  # the service's calls, seen on the wire
    db = Database(watched, DATA_DB)
    try:
        stages = [{"$match": {"status": "open"}}, {"$project": {"_id": 0, "seq": 1}}]
        spec = FindSpec("tasks", {}, None, (), 0, batch_size=300, max_time_ms=600_000, count_max_time_ms=30_000, pipeline=stages)
        total = await db.count(spec)
        rows = sum([len(decode_all(raw)) async for raw in db.raw_batches(spec)])
        assert rows == total == sum(1 for doc in tasks if doc.get("status") == "open") > 300
        aggregates = [c for c in listener.commands if c["name"] == "aggregate" and c["pipeline"][:1] == stages[:1]]
        counted, exported = aggregates  # the count, then the export (the server probe is neither)
        assert counted["pipeline"] == [*stages, {"$count": "n"}]
        assert (counted["maxTimeMS"], counted["allowDiskUse"]) == (30_000, True)
        assert exported["pipeline"] == stages
        assert (exported["maxTimeMS"], exported["allowDiskUse"]) == (600_000, True)
        assert exported["cursor"]["batchSize"] == (300 if EMBEDDED else 0)  # 0: aggregate_raw_batches' empty first batch
        assert {c["batchSize"] for c in listener.commands if c["name"] == "getMore"} == {300}
    finally:
        await Database(client, DATA_DB).close()
        await db.close()


async def test_group_to_parquet(client: Any, tasks: list[dict[str, Any]]) -> None:
    stages = [{"$group": {"_id": "$priority", "n": {"$sum": 1}, "points": {"$sum": "$points"}}}]
    _, payload = await export(client, {**VALID, "format": "parquet", "pipeline": stages})
    table = pq.read_table(io.BytesIO(payload))
    rows = {row["_id"]: (row["n"], row["points"]) for row in table.to_pylist()}
    expected: dict[Any, tuple[int, int]] = defaultdict(lambda: (0, 0))
    for doc in tasks:
        n, points = expected[doc.get("priority")]
        expected[doc.get("priority")] = (n + 1, points + doc["points"])
    assert rows == expected
