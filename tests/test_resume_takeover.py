"""A job taken over from a dead instance's checkpoint, through the real app and driver: the rows after the
checkpoint are all found (sort keys with nulls, several types, a server that compares otherwise than it sorts),
or the export starts again from its first row; never a row lost."""
from __future__ import annotations

import asyncio
import csv
import io
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncGenerator

import bson
import pytest
from pymongo import MongoClient

from service import runner as runner_module
from service.app import create_app
from service.db import Database, FindSpec
from service.files import discard_partial, final_path, part_path
from service.jobs import new_job_doc
from service.pipeline import ExportPipeline
from service.query import validate_request
from service.resume import after, export_order, last_key

from conftest import DATA_DB, Gate, make_settings, replace_collection, until, wait_status

BATCH, EVERY = 10, 2
ORDERS = {
    "desc": (("done", -1), ("_id", -1)),
    "asc": (("done", 1), ("_id", 1)),
    "desc-asc": (("done", -1), ("_id", 1)),
    "two-nullable": (("done", -1), ("team", 1), ("_id", -1)),
}


def nullable_rows(count: int) -> list[dict[str, Any]]:
    """A third of the rows with the key, a third with it null, a third without it; string _ids, which every
    server sorts and compares alike."""
    rows = []
    for i in range(count):
        row: dict[str, Any] = {"_id": f"r{i:03d}", "n": i}
        if i % 3 == 0:
            row["done"] = 1000 + i % 7
        elif i % 3 == 1:
            row["done"] = None
        if i % 4:
            row["team"] = None if i % 4 == 1 else f"t{i % 2}"
        rows.append(row)
    return rows


@pytest.mark.parametrize("order_name", sorted(ORDERS))
def test_the_rows_after_any_row_are_exactly_those_that_follow_it(sync_db: Any, order_name: str) -> None:
    order = ORDERS[order_name]
    replace_collection(sync_db, "resume_nulls", nullable_rows(45))
    coll = sync_db["resume_nulls"]
    ordered = [row["_id"] for row in coll.find({}, sort=list(order))]
    assert len(ordered) == 45
    for index, row in enumerate(coll.find({}, sort=list(order))):
        key = last_key(bson.encode(row), order)
        rest = [r["_id"] for r in coll.find(after(order, key), sort=list(order))]
        assert rest == ordered[index + 1:], (order_name, index, key)


def seed_checkpointed_job(db: Any, settings: Any, body: dict[str, Any], checkpoint_after: int) -> dict[str, Any]:
    """A queued job as an instance that died after checkpoint_after batches leaves it: its checkpoint (made by
    the pipeline code a run uses) and its partial file, with a batch past the checkpoint in it."""
    spec = validate_request(body)
    doc = new_job_doc(spec, "anonymous", "x." + spec.extension, 1)
    Path(settings.export_dir).mkdir(parents=True, exist_ok=True)
    part = part_path(final_path(settings.export_dir, doc["_id"], spec), "deadbeef0000")
    order = export_order(spec)
    cursor = db[spec.collection].find_raw_batches({}, spec.projection(), batch_size=BATCH, sort=list(order))
    pipeline = ExportPipeline(spec, part, {"collection": spec.collection}, None)
    point: dict[str, Any] = {}
    for index, raw in enumerate(cursor, 1):
        pipeline.feed(raw)
        if index == checkpoint_after:
            point = {"part": part.name, **pipeline.checkpoint(), "key": last_key(raw, order)}
        if index == checkpoint_after + 1:
            pipeline.stream.flush()
            break
    cursor.close()
    doc.update(checkpoint=point, processed=point["rows"] + BATCH, attempts=1)
    db[settings.jobs_collection].insert_one(doc)
    return doc


async def export_bytes(api: Any, job_id: str) -> tuple[dict[str, Any], bytes]:
    final = await wait_status(api, job_id, timeout=60)
    assert final["status"] == "completed", final
    async with api.get(final["download_url"]) as resp:
        return final, await resp.read()


TAKEOVERS = {
    # The checkpoint falls among keyed rows; the null and missing ones come after it.
    "nulls-last": ("resume_nulls", nullable_rows(60), {"sort": {"done": -1, "_id": -1}}, True),
    # Numbers and text under one key: MongoDB's $lt on a text key matches no number.
    "mixed-types": ("resume_mixed", [{"_id": f"m{i:03d}", "done": i if i % 2 else f"v{i:03d}"} for i in range(60)],
                    {"sort": {"done": -1, "_id": 1}}, None),
    # The embedded server sorts integer _id as text and compares them as numbers.
    "integer-ids": ("resume_ints", [{"_id": i, "n": i} for i in range(60)], {}, None),
}


@pytest.mark.parametrize("case", sorted(TAKEOVERS))
async def test_a_taken_over_job_loses_no_row(aiohttp_client: Any, mongo_url: str, sync_db: Any, tmp_path: Path, case: str) -> None:
    collection, rows, extra, resumes = TAKEOVERS[case]
    replace_collection(sync_db, collection, rows)
    body = {"collection": collection, "format": "ndjson", **extra}
    settings = make_settings(mongo_url, tmp_path, batch_size=BATCH, checkpoint_batches=EVERY, max_concurrent=1)
    doc = seed_checkpointed_job(sync_db, settings, body, checkpoint_after=2)
    api = await aiohttp_client(create_app(settings))
    resumed, resumed_bytes = await export_bytes(api, doc["_id"])
    clean = await (await api.post("/api/exports", json=body)).json()
    clean, clean_bytes = await export_bytes(api, clean["id"])
    assert clean["resumed_from"] is None and clean["processed"] == len(rows)
    assert resumed_bytes == clean_bytes, (resumed["resumed_from"], resumed["processed"], len(resumed_bytes.splitlines()))
    assert sorted(bson.json_util.loads(line)["_id"] for line in resumed_bytes.splitlines()) == sorted(r["_id"] for r in rows)
    if resumes is not None:
        assert (resumed["resumed_from"] is not None) == resumes, resumed["resumed_from"]
    else:  # whether it resumed depends on the server; when it did, its filter found every row left
        with MongoClient(mongo_url) as client:
            coll = client[DATA_DB][collection]
            point = sync_db[settings.jobs_collection].find_one({"_id": doc["_id"]})["resumed_from"]
            if point is not None:
                order = export_order(validate_request(body))
                key = last_key(bson.encode(list(coll.find({}, sort=list(order)))[point["rows"] - 1]), order)
                assert coll.count_documents(after(order, key)) == len(rows) - point["rows"]


async def test_a_job_stopped_again_before_its_first_checkpoint_still_resumes(
    aiohttp_client: Any, mongo_url: str, sync_db: Any, tmp_path: Path, gate: Gate
) -> None:
    """The run that takes a job over copies the checkpoint's rows into its own partial file and removes the dead
    instance's one; stopped before a checkpoint of its own, it leaves a checkpoint that names a file still there."""
    collection, rows, extra, _ = TAKEOVERS["nulls-last"]
    replace_collection(sync_db, collection, rows)
    body = {"collection": collection, "format": "csv", **extra}
    settings = make_settings(mongo_url, tmp_path, batch_size=BATCH, checkpoint_batches=EVERY, max_concurrent=1)
    doc = seed_checkpointed_job(sync_db, settings, body, checkpoint_after=2)
    jobs = sync_db[settings.jobs_collection]
    gate.shut()
    api = await aiohttp_client(create_app(settings, source=gate))
    await until(lambda: gate.held == 1, "the run that took the job over, held before its first row")
    await api.close()  # a graceful stop, before this run's first checkpoint
    stopped = jobs.find_one({"_id": doc["_id"]})
    assert stopped["status"] == "queued" and stopped["checkpoint"]["rows"] == doc["checkpoint"]["rows"], stopped
    assert stopped["checkpoint"]["part"] != doc["checkpoint"]["part"], "the stopped run's own file carries the checkpoint"
    assert (Path(settings.export_dir) / stopped["checkpoint"]["part"]).stat().st_size == doc["checkpoint"]["bytes"]
    gate.open()
    api = await aiohttp_client(create_app(settings, source=gate))
    resumed, resumed_bytes = await export_bytes(api, doc["_id"])
    assert resumed["resumed_from"] is not None and resumed["resumed_from"]["rows"] == doc["checkpoint"]["rows"], resumed
    clean = await (await api.post("/api/exports", json=body)).json()
    _, clean_bytes = await export_bytes(api, clean["id"])
    assert resumed_bytes == clean_bytes
    assert not list(Path(settings.export_dir).glob("*.part*"))


async def test_a_checkpoint_file_that_goes_away_before_it_is_copied_starts_the_export_again(
    aiohttp_client: Any, mongo_url: str, sync_db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance that lost the job may discard its partial file right after the run taking over planned to go on
    from it: the export starts again from its first row rather than failing."""
    collection, rows, extra, _ = TAKEOVERS["nulls-last"]
    replace_collection(sync_db, collection, rows)
    body = {"collection": collection, "format": "csv", **extra}
    settings = make_settings(mongo_url, tmp_path, batch_size=BATCH, checkpoint_batches=EVERY, max_concurrent=1)
    doc = seed_checkpointed_job(sync_db, settings, body, checkpoint_after=2)
    planned: list[Any] = []

    def plan_then_discard(*args: Any) -> Any:
        found = real_plan(*args)
        if found is not None:
            planned.append(found)
            discard_partial(found.point.source)  # as the old instance does, between the plan and the copy
        return found

    real_plan = runner_module.plan
    monkeypatch.setattr(runner_module, "plan", plan_then_discard)
    api = await aiohttp_client(create_app(settings))
    again, again_bytes = await export_bytes(api, doc["_id"])
    assert planned and again["resumed_from"] is None and again["processed"] == len(rows), again
    clean = await (await api.post("/api/exports", json=body)).json()
    _, clean_bytes = await export_bytes(api, clean["id"])
    assert again_bytes == clean_bytes
    assert not list(Path(settings.export_dir).glob("*.part*"))


class SlowSource:
    """The test database, a batch every DELAY seconds: a run reading n batches lasts at least n * DELAY."""

    DELAY = 0.4

    def __init__(self, mongo_url: str) -> None:
        self.db = Database.connect(mongo_url, DATA_DB)

    async def count(self, spec: FindSpec) -> int:
        return await self.db.count(spec)

    async def raw_batches(self, spec: FindSpec) -> AsyncGenerator[bytes, None]:
        async with aclosing(self.db.raw_batches(spec)) as batches:
            async for batch in batches:
                await asyncio.sleep(self.DELAY)
                yield batch


async def test_a_resumed_jobs_rate_counts_only_the_rows_it_read(aiohttp_client: Any, mongo_url: str, sync_db: Any, tmp_path: Path) -> None:
    """200 rows come from the checkpoint and 20 are read, in two batches that take 2 * DELAY at least: the rate
    (and the ETA drawn from it) is of those 20 rows."""
    replace_collection(sync_db, "resume_rate", [{"_id": f"r{i:03d}", "n": i} for i in range(220)])
    settings = make_settings(mongo_url, tmp_path, batch_size=BATCH, checkpoint_batches=EVERY, max_concurrent=1)
    doc = seed_checkpointed_job(sync_db, settings, {"collection": "resume_rate", "format": "ndjson"}, checkpoint_after=20)
    source = SlowSource(mongo_url)
    try:
        api = await aiohttp_client(create_app(settings, source=source))
        final = await wait_status(api, doc["_id"], timeout=60)
    finally:
        await source.db.close()
    assert final["status"] == "completed" and final["resumed_from"]["rows"] == 200, final
    read = final["processed"] - final["resumed_from"]["rows"]
    assert read == 20
    assert 0 < final["rate"] <= read / (2 * SlowSource.DELAY), final["rate"]


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
async def test_a_sort_on_a_field_not_exported_resumes_and_the_output_keeps_to_fields(
    aiohttp_client: Any, mongo_url: str, sync_db: Any, tmp_path: Path, fmt: str
) -> None:
    """The sort key is read from the database (for the checkpoint's key) but never written."""
    collection, rows, extra, _ = TAKEOVERS["nulls-last"]
    replace_collection(sync_db, collection, rows)
    body = {"collection": collection, "format": fmt, "fields": ["n"], **extra}
    settings = make_settings(mongo_url, tmp_path, batch_size=BATCH, checkpoint_batches=EVERY, max_concurrent=1)
    doc = seed_checkpointed_job(sync_db, settings, body, checkpoint_after=2)
    assert bson.json_util.loads(doc["checkpoint"]["key"])[0] is not None
    api = await aiohttp_client(create_app(settings))
    resumed, resumed_bytes = await export_bytes(api, doc["_id"])
    assert resumed["resumed_from"] is not None and resumed["resumed_from"]["rows"] == 2 * BATCH, resumed
    clean = await (await api.post("/api/exports", json=body)).json()
    _, clean_bytes = await export_bytes(api, clean["id"])
    assert resumed_bytes == clean_bytes
    order = list(sync_db[collection].find({}, sort=list(export_order(validate_request(body)))))
    if fmt == "csv":
        assert list(csv.reader(io.StringIO(clean_bytes.decode()))) == [["n"], *([str(row["n"])] for row in order)]
    else:
        assert [bson.json_util.loads(line) for line in clean_bytes.splitlines()] == [{"_id": row["_id"], "n": row["n"]} for row in order]
