"""Resume, not restart: an export taken over after a crash goes on from its last checkpoint, and the file it
finishes is byte for byte the one an uninterrupted export writes."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import aiohttp
import bson
import pytest
from pymongo import MongoClient

from scripts.generate_data import make_documents
from service.pipeline import ExportPipeline, ResumePoint
from service.query import validate_request
from service.resume import after, last_key, plan, resumable

from conftest import DATA_DB, new_jobs_collection, until, wait_status
from service_process import ServiceProcess

BATCH = 40
CHECKPOINT_EVERY = 3
DOCS = list(make_documents(25 * BATCH, 77))
BATCHES = [b"".join(bson.encode(doc) for doc in DOCS[i:i + BATCH]) for i in range(0, len(DOCS), BATCH)]
CASES = {
    "csv": {"format": "csv", "options": {"csv": {"bom": True}}},
    "csv-gzip": {"format": "csv", "options": {"compress": "gzip"}},
    "json": {"format": "json"},
    "json-envelope": {"format": "json", "options": {"json": {"envelope": True}}},
    "ndjson-gzip": {"format": "ndjson", "options": {"compress": "gzip"}},
    "ndjson-fields": {"format": "ndjson", "fields": ["title", "assignee.name"]},
}
INFO = {"collection": "tasks", "filter": {}, "fields": None, "sort": {}, "limit": 0, "total": None, "exported_at": 0}


def run_pipeline(spec: Any, path: Path, batches: list[bytes], resume: ResumePoint | None = None, stop_after: int | None = None,
                 first_index: int = 0) -> list[dict[str, Any]]:
    """Feed batches (numbered from first_index), a checkpoint every CHECKPOINT_EVERY; finish, or stop dead after
    stop_after batches as a killed process would. Returns the checkpoints."""
    pipeline = ExportPipeline(spec, path, INFO, resume)
    points = []
    for index, raw in enumerate(batches, first_index + 1):
        pipeline.feed(raw)
        if index % CHECKPOINT_EVERY == 0:
            points.append(pipeline.checkpoint())
        if stop_after is not None and index == stop_after:
            pipeline.stream.flush()  # some rows past the checkpoint reach the file, as they may before a kill
            return points
    pipeline.finish()
    return points


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("killed_after", [4, 13, 20])
def test_a_resumed_file_is_byte_identical_to_an_uninterrupted_one(tmp_path: Path, case: str, killed_after: int) -> None:
    spec = validate_request({"collection": "tasks", **CASES[case]})
    whole = tmp_path / "whole.part"
    run_pipeline(spec, whole, BATCHES)
    dead = tmp_path / "dead.part"
    points = run_pipeline(spec, dead, BATCHES, stop_after=killed_after)
    point = points[-1]
    assert dead.stat().st_size > point["bytes"], "the crash left bytes past the checkpoint, which must go"
    done = point["rows"] // BATCH
    resumed = tmp_path / "resumed.part"
    run_pipeline(spec, resumed, BATCHES[done:], ResumePoint(dead, point["bytes"], point["rows"], point["columns"]), first_index=done)
    assert resumed.read_bytes() == whole.read_bytes()
    if spec.compress == "gzip":
        assert gzip.decompress(resumed.read_bytes()).count(b"\n") >= len(BATCHES) * BATCH


def test_which_exports_resume_and_the_bound_that_follows_a_checkpoint(tmp_path: Path) -> None:
    assert resumable(validate_request({"collection": "t", "format": "csv"}))  # _id order by default
    assert resumable(validate_request({"collection": "t", "format": "ndjson", "sort": {"createdAt": -1, "_id": -1}}))
    assert not resumable(validate_request({"collection": "t", "format": "csv", "sort": {"createdAt": -1}}))
    assert not resumable(validate_request({"collection": "t", "format": "xlsx"}))
    assert not resumable(validate_request({"collection": "t", "format": "parquet"}))
    # With a limit, rows a resume left out (a key of several types) would be made up for by later ones unseen.
    assert not resumable(validate_request({"collection": "t", "format": "csv", "limit": 100}))
    oid = bson.ObjectId()
    key = bson.json_util.dumps([7, oid], json_options=bson.json_util.CANONICAL_JSON_OPTIONS)
    assert after((("points", -1), ("_id", 1)), key) == {"$or": [
        {"points": {"$lt": 7}}, {"points": {"$eq": None}}, {"points": {"$eq": 7}, "_id": {"$gt": oid}}]}
    part = tmp_path / "x.csv.a.part"
    part.write_bytes(b"0123456789")
    job = {"_id": "j", "checkpoint": {"part": part.name, "bytes": 8, "rows": 80, "columns": ["a"], "key": key}}
    found = plan(job, validate_request({"collection": "t", "format": "csv", "sort": {"points": -1, "_id": 1}}), tmp_path)
    assert found is not None and (found.point.bytes, found.rows, found.point.columns) == (8, 80, ["a"])
    assert plan(job, validate_request({"collection": "t", "format": "xlsx", "sort": {"points": -1, "_id": 1}}), tmp_path) is None
    assert plan({**job, "checkpoint": {**job["checkpoint"], "bytes": 11}}, validate_request({"collection": "t", "format": "csv"}), tmp_path) is None
    assert plan(job, validate_request({"collection": "t", "format": "csv", "limit": 200}), tmp_path) is None


def test_a_sort_key_through_an_array_is_never_resumed_after_and_any_date_can_be_a_key() -> None:
    order = (("items.p", 1), ("_id", 1))
    key = last_key(bson.encode({"_id": 1, "items": [{"p": 3}, {"p": 1}]}), order)
    assert bson.json_util.loads(key)[0] == [{"p": 3}, {"p": 1}]  # the array itself, which plan() refuses
    far = bson.encode({"_id": 2, "due": bson.DatetimeMS(2**62)})  # past year 9999: no Python datetime holds it
    key = last_key(far, (("due", -1), ("_id", -1)))
    assert after((("due", -1), ("_id", -1)), key)["$or"][0] == {"due": {"$lt": bson.DatetimeMS(2**62)}}


# --- the service, killed or stopped -----------------------------------------------------------------------
KILL_CASES = {
    "csv-early": ({"format": "csv", "fields": ["seq", "title", "description", "createdAt"]}, 1),
    "ndjson-late": ({"format": "ndjson"}, 6),
    "csv-gzip-mid-member": ({"format": "csv", "options": {"compress": "gzip"}}, 3),
}


def job_doc(mongo_url: str, jobs: str, job_id: str) -> dict[str, Any]:
    with MongoClient(mongo_url) as client:
        return client[DATA_DB][jobs].find_one({"_id": job_id}) or {}


# A stop (SIGTERM) puts the job back in the queue at once and keeps its checkpoint's file, as a kill leaves it.
ENDINGS = [*((case, "kill") for case in sorted(KILL_CASES)), ("ndjson-late", "stop")]


@pytest.mark.parametrize(("case", "ending"), ENDINGS)
async def test_an_export_killed_or_stopped_mid_way_resumes_at_the_checkpoint_and_the_file_is_whole(
    mongo_url: str, tmp_path: Path, big_tasks: Any, case: str, ending: str
) -> None:
    body, checkpoints = KILL_CASES[case]
    body = {"collection": "tasks_big", **body}
    env = {
        "EXPORT_MONGO_URL": mongo_url, "EXPORT_DB": DATA_DB, "EXPORT_DIR": str(tmp_path / "exports"),
        "EXPORT_BATCH_SIZE": "50", "EXPORT_CHECKPOINT_BATCHES": "4", "EXPORT_MAX_CONCURRENT": "1",
        "EXPORT_LEASE_SECONDS": "2", "EXPORT_API_TOKENS": "", "EXPORT_JOBS_COLLECTION": new_jobs_collection(),
    }
    service = await ServiceProcess(env).start()
    try:
        async with aiohttp.ClientSession() as http:
            job = await (await http.post(service.url + "/api/exports", json=body)).json()
            def checkpointed() -> bool:
                doc = job_doc(mongo_url, env["EXPORT_JOBS_COLLECTION"], job["id"])
                assert doc.get("status") != "completed", "the export finished before it could be killed"
                return (doc.get("checkpoint") or {}).get("rows", 0) >= checkpoints * 200

            # The run goes on past the wanted checkpoint meanwhile.
            await until(checkpointed, f"checkpoint {checkpoints} on record", timeout=30)
            service.kill() if ending == "kill" else service.stop()
            at_kill = job_doc(mongo_url, env["EXPORT_JOBS_COLLECTION"], job["id"])
            assert at_kill["status"] == ("queued" if ending == "stop" else "processing"), at_kill["status"]

            service = await ServiceProcess(env).start()
            final = await wait_status(http, job["id"], timeout=90, base=service.url)
            assert final["status"] == "completed", final
            resumed = final["resumed_from"]
            assert resumed is not None and resumed["rows"] >= at_kill["checkpoint"]["rows"] > 0, (resumed, at_kill["checkpoint"])
            assert resumed["reread_rows"] == max(0, at_kill["processed"] - resumed["rows"]), (resumed, at_kill["processed"])
            async with http.get(service.url + final["download_url"]) as resp:
                recovered = await resp.read()
            clean_job = await (await http.post(service.url + "/api/exports", json=body)).json()
            clean = await wait_status(http, clean_job["id"], timeout=90, base=service.url)
            assert clean["resumed_from"] is None
            async with http.get(service.url + clean["download_url"]) as resp:
                assert recovered == await resp.read()
            assert final["processed"] == clean["processed"] == len(big_tasks)
            assert not list(Path(env["EXPORT_DIR"]).glob("*.part*"))
    finally:
        service.stop()


def test_a_resumed_csv_keeps_the_warnings_about_fields_found_before_its_checkpoint(tmp_path: Path) -> None:
    """Columns come from the first batch; a later document's extra field is warned about at the end, also when
    that document came before the checkpoint the export resumed from."""
    docs = [{"_id": i, "a": i, **({"late": True} if i == BATCH + 5 else {}), **({"d.k": 1} if i == 7 else {})} for i in range(6 * BATCH)]
    batches = [b"".join(bson.encode(doc) for doc in docs[i:i + BATCH]) for i in range(0, len(docs), BATCH)]
    spec = validate_request({"collection": "t", "format": "csv"})
    whole = ExportPipeline(spec, tmp_path / "whole.part", INFO)
    for raw in batches:
        whole.feed(raw)
    expected = whole.finish().warnings
    assert any("late" in warning for warning in expected) and any("d.k" in warning for warning in expected), expected
    dead = ExportPipeline(spec, tmp_path / "dead.part", INFO)
    for raw in batches[:3]:
        dead.feed(raw)
    point = dead.checkpoint()
    dead.abandon()
    resumed = ExportPipeline(spec, tmp_path / "resumed.part", INFO, ResumePoint(
        tmp_path / "dead.part", point["bytes"], point["rows"], point["columns"], tuple(point["missed"]), tuple(point["dotted"])))
    for raw in batches[3:]:
        resumed.feed(raw)
    assert resumed.finish().warnings == expected
    assert (tmp_path / "resumed.part").read_bytes() == (tmp_path / "whole.part").read_bytes()


def test_a_checkpoint_from_before_the_cap_is_capped_when_resumed(tmp_path: Path) -> None:
    """A checkpoint written before warned paths were capped may carry thousands: the resumed run keeps as many as
    it would have noted itself, and its later checkpoints stay small."""
    spec = validate_request({"collection": "t", "format": "csv"})
    dead = ExportPipeline(spec, tmp_path / "dead.part", INFO)
    dead.feed(b"".join(bson.encode({"_id": i, "a": i}) for i in range(BATCH)))
    point = dead.checkpoint()
    dead.abandon()
    old = tuple(f"f{i}" for i in range(5000))
    resumed = ExportPipeline(spec, tmp_path / "resumed.part", INFO, ResumePoint(
        tmp_path / "dead.part", point["bytes"], point["rows"], point["columns"], old, tuple(f"k.{i}" for i in range(5000))))
    resumed.feed(b"".join(bson.encode({"_id": i, "a": i}) for i in range(BATCH, 2 * BATCH)))
    later = resumed.checkpoint()
    assert (later["missed"], later["dotted"]) == ([f"f{i}" for i in range(20)], [f"k.{i}" for i in range(20)])
    missed = [w for w in resumed.finish().warnings if "later documents" in w]
    assert missed and missed[0].count(", ") == 19, missed
