"""Listings that stay cheap: GET /api/exports costs the same database round trips for any number of jobs,
and GET /api/collections counts and samples every collection at once, each within a time limit. The
service talks to the server through a proxy that notes every command, so the round trips are counted on
the wire, whichever driver sends them."""
from __future__ import annotations

import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import orjson
import pytest
from mongomock_motor import AsyncMongoMockClient

from service import catalog
from service.app import create_app
from service.db import Database, DatabaseError
from service.settings import settings_from_env

from conftest import DATA_DB, Gate, hold_queue, make_settings, replace_collection, wait_status
from wire_proxy import WireProxy

ALICE = {"Authorization": "Bearer tok-alice"}
BOB = {"Authorization": "Bearer tok-bob"}
TOKENS = settings_from_env({"EXPORT_API_TOKENS": "tok-alice:alice,tok-bob:bob"}).api_tokens
SMALL = {"collection": "tasks", "format": "csv", "limit": 5}
READS = {"find", "getMore", "aggregate", "count"}


async def create(api: Any, headers: dict[str, str]) -> dict[str, Any]:
    resp = await api.post("/api/exports", json=SMALL, headers=headers)
    assert resp.status == 202, await resp.text()
    return await resp.json()


async def listing(api: Any, proxy: WireProxy, jobs: str, headers: dict[str, str], query: str = "") -> tuple[list[Any], list[str]]:
    """The positions GET /api/exports gives, newest first, and the reads of the jobs collection it cost."""
    since = len(proxy.commands)
    resp = await api.get("/api/exports" + query, headers=headers)
    assert resp.status == 200, await resp.text()
    reads = [name for name in proxy.commands_on(jobs, since) if name in READS]
    return [job.get("queue_position") for job in (await resp.json())["exports"]], reads


async def test_queue_positions_cost_the_same_round_trips_for_any_number_of_jobs(
    proxy: WireProxy, aiohttp_client: Any, tmp_path: Path, driver: str, tasks: Any, gate: Gate
) -> None:
    # The proxy comes first, so it is closed last: the app, stopping, puts the held job back through it.
    # No maintenance during the test: the only reads of the jobs collection are the requests'. (The gate reads
    # the rows straight from the server, past the proxy.)
    settings = make_settings(proxy.url(), tmp_path, driver, api_tokens=TOKENS, max_concurrent=1, lease_seconds=3600.0, sweep_interval_seconds=3600.0)
    api = await aiohttp_client(create_app(settings, source=gate))
    jobs = settings.jobs_collection
    gate.open()
    done = await create(api, ALICE)
    assert (await wait_status(api, done["id"], headers=ALICE))["status"] == "completed"
    await hold_queue(api, gate, BOB)  # from here on, every new job stays queued; bob's holder is running

    bob_first = await create(api, BOB)  # one queue for all users: bob's job is ahead of alice's
    for _ in range(2):
        await create(api, ALICE)
    positions, few_reads = await listing(api, proxy, jobs, ALICE)
    assert positions == [3, 2, None]

    alice_jobs = [await create(api, ALICE) for _ in range(5)]
    assert [job["queue_position"] for job in alice_jobs] == [4, 5, 6, 7, 8]
    positions, many_reads = await listing(api, proxy, jobs, ALICE)
    assert positions == [8, 7, 6, 5, 4, 3, 2, None]
    assert len(many_reads) == len(few_reads) <= 2, (few_reads, many_reads)  # the listing and the queue, once each

    positions, _ = await listing(api, proxy, jobs, ALICE, "?status=queued&limit=3")
    assert positions == [8, 7, 6]
    positions, _ = await listing(api, proxy, jobs, BOB)
    assert positions == [1, None]
    # One job's own snapshot agrees with the listing.
    for job, expected in ((alice_jobs[0], 4), (alice_jobs[-1], 8)):
        assert (await (await api.get(f"/api/exports/{job['id']}", headers=ALICE)).json())["queue_position"] == expected
    # A cancelled job leaves the queue: everyone behind it moves up.
    assert (await api.delete(f"/api/exports/{bob_first['id']}", headers=BOB)).status == 200
    positions, _ = await listing(api, proxy, jobs, ALICE)
    assert positions == [7, 6, 5, 4, 3, 2, 1, None]


# --- /api/collections ------------------------------------------------------------------------------------
def leaf_paths(doc: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """The test's own walk: every path to a value that is not a non-empty document."""
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, f"{prefix}{key}.")
        else:
            yield prefix + key


SHAPES: list[dict[str, Any]] = [
    {"_id": 1, "a": 1, "b": {"c": "x", "d": {"e": 2.5}}, "empty": {}, "arr": [{"x": 1}], "text": "v" * 5000},
    # five levels of path at most: a deeper document is one path, its values never sent
    {"_id": 2, "a": None, "deep": {"l2": {"l3": {"l4": {"l5": {"l6": 1, "l6b": "x"}}}}}},
]
SHAPE_FIELDS = {"_id", "a", "b.c", "b.d.e", "empty", "arr", "text", "deep.l2.l3.l4.l5"}


@pytest.fixture
def catalog_collections(sync_db: Any, tasks: Any) -> Iterator[tuple[str, str]]:
    """Two collections of this test's own: one of known shapes (fewer documents than a sample, so the sample
    sees them all), and one holding a single document with more keys than a sample keeps."""
    shapes, wide = f"catalog_{secrets.token_hex(3)}", f"catalog_wide_{secrets.token_hex(3)}"
    replace_collection(sync_db, shapes, SHAPES + [{"_id": 3 + n, "a": n} for n in range(38)])
    replace_collection(sync_db, wide, [{"_id": 1, **{f"k{n:03}": n for n in range(250)}}])
    yield shapes, wide
    sync_db.drop_collection(shapes)
    sync_db.drop_collection(wide)


async def collections(api: Any) -> dict[str, dict[str, Any]]:
    resp = await api.get("/api/collections")
    assert resp.status == 200, await resp.text()
    return {c["name"]: c for c in (await resp.json())["collections"]}


async def test_collections_have_estimated_counts_and_the_paths_of_a_sample(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, driver: str, tasks: list[dict[str, Any]], catalog_collections: tuple[str, str]
) -> None:
    shapes, wide = catalog_collections
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, driver, collections=("tasks", shapes, wide))))
    listed = await collections(api)
    assert sorted(listed) == sorted(["tasks", shapes, wide])

    assert listed[shapes]["estimated_count"] == 40
    assert set(listed[shapes]["fields"]) == SHAPE_FIELDS and len(listed[shapes]["fields"]) == len(SHAPE_FIELDS)
    assert (listed[shapes]["fields_truncated"], listed[shapes]["sample_timed_out"]) == (False, False)

    # A random 100 of the 3,000 tasks: a path half the tasks have is missed with a chance of 2^-100, and no
    # path comes from nowhere.
    seen = Counter(path for doc in tasks for path in set(leaf_paths(doc)))
    common = {path for path, count in seen.items() if count >= len(tasks) / 2}
    assert listed["tasks"]["estimated_count"] == len(tasks)
    assert common <= set(listed["tasks"]["fields"]) <= set(seen)
    assert {"assignee.name", "assignee.email", "items", "title"} <= common

    # The server sends back paths, never values (the 5,000-character text stays where it is).
    db = Database.connect(mongo_url, DATA_DB, driver)
    try:
        rows = await db.aggregate(shapes, catalog.sample_pipeline())
    finally:
        await db.close()
    assert len(rows) == 40 and all(list(row) == ["paths"] for row in rows)
    assert max(len(orjson.dumps(row)) for row in rows) < 200

    # A level keeps its first 200 keys, and the listing says the fields were cut.
    assert listed[wide]["estimated_count"] == 1
    assert listed[wide]["fields"] == ["_id"] + [f"k{n:03}" for n in range(199)]
    assert listed[wide]["fields_truncated"] is True


async def test_a_collection_that_does_not_answer_does_not_hold_up_the_listing(
    aiohttp_client: Any, proxy: WireProxy, tmp_path: Path, tasks: Any, catalog_collections: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes, wide = catalog_collections
    monkeypatch.setattr(catalog, "LISTING_SECONDS", 1.5)
    # A short socket timeout ends the lost round trips after the test, whichever way the driver waits.
    settings = make_settings(proxy.url(socketTimeoutMS="8000"), tmp_path, "pymongo", collections=("tasks", shapes, wide))
    api = await aiohttp_client(create_app(settings))
    proxy.lose_replies_to(["aggregate", "count"], collection=shapes)  # its sample and its count never answer
    started = time.monotonic()
    listed = await collections(api)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 1.0, elapsed
    assert sorted(proxy.lost) == ["aggregate", "count"]
    assert listed[shapes] == {"name": shapes, "estimated_count": None, "fields": [], "fields_truncated": False, "sample_timed_out": True,
                              "error": None}
    for name in ("tasks", wide):  # looked at meanwhile, and complete
        assert listed[name]["sample_timed_out"] is False and listed[name]["fields"] and listed[name]["estimated_count"] >= 1

    proxy.lose_replies_to([])
    again = await collections(api)
    assert set(again[shapes]["fields"]) == SHAPE_FIELDS and again[shapes]["estimated_count"] == 40


async def test_sampled_documents_give_the_same_paths_as_the_paths_pipeline(
    mongo_url: str, driver: str, catalog_collections: tuple[str, str]
) -> None:
    """What the service does with the embedded server it starts itself: $sample of whole documents, the paths
    found here within the same limits."""
    shapes, wide = catalog_collections
    db = Database.connect(mongo_url, DATA_DB, driver)
    try:
        listed = {c["name"]: c for c in await catalog.list_collections(db, "export_jobs", (shapes, wide), paths_on_server=False)}
    finally:
        await db.close()
    assert set(listed[shapes]["fields"]) == SHAPE_FIELDS and len(listed[shapes]["fields"]) == len(SHAPE_FIELDS)
    assert listed[shapes]["estimated_count"] == 40 and listed[shapes]["fields_truncated"] is False
    assert listed[wide]["fields"] == ["_id"] + [f"k{n:03}" for n in range(199)] and listed[wide]["fields_truncated"] is True


class MockDatabase(Database):
    def collection(self, name: str) -> Any:
        return self.db[name]  # mongomock takes no codec options with a time zone: these documents hold no dates


async def test_a_server_without_the_sampling_pipeline_gets_a_plain_find() -> None:
    """mongomock knows $sample but not $type in expressions: the sample falls back to the first documents,
    cut to the same depth and width as the pipeline's."""
    db = MockDatabase(AsyncMongoMockClient(), "unit")
    await db.db["shapes"].insert_many([dict(doc) for doc in SHAPES])
    await db.db["wide"].insert_one({"_id": 1, **{f"k{n:03}": n for n in range(250)}})
    listed = {c["name"]: c for c in await catalog.list_collections(db, "export_jobs", ())}
    assert listed["shapes"]["fields"] == ["_id", "a", "b.c", "b.d.e", "empty", "arr", "text", "deep.l2.l3.l4.l5"]
    assert listed["shapes"]["estimated_count"] == 2 and listed["shapes"]["fields_truncated"] is False
    assert listed["wide"]["fields"] == ["_id"] + [f"k{n:03}" for n in range(199)] and listed["wide"]["fields_truncated"] is True


class RefusingDatabase(MockDatabase):
    """A server that refuses to count or sample one collection, as for a view whose pipeline fails."""

    async def estimated_count(self, name: str, max_time_ms: int = 0) -> int:
        if name == "broken":
            raise DatabaseError("database error: can't $divide by zero")
        return await super().estimated_count(name, max_time_ms)

    async def aggregate(self, name: str, pipeline: Any, max_time_ms: int = 0) -> list[dict[str, Any]]:
        if name == "broken":
            raise DatabaseError("database error: can't $divide by zero")
        return await super().aggregate(name, pipeline, max_time_ms)

    async def sample(self, name: str, size: int = 100, max_time_ms: int = 0) -> list[dict[str, Any]]:
        if name == "broken":
            raise DatabaseError("database error: can't $divide by zero")
        return await super().sample(name, size, max_time_ms)


async def test_a_collection_the_server_refuses_is_listed_with_its_error_and_the_others_whole() -> None:
    db = RefusingDatabase(AsyncMongoMockClient(), "unit")
    await db.db["shapes"].insert_many([dict(doc) for doc in SHAPES])
    await db.db["broken"].insert_one({"_id": 1})
    listed = {c["name"]: c for c in await catalog.list_collections(db, "export_jobs", ())}
    assert listed["broken"] == {"name": "broken", "estimated_count": None, "fields": [], "fields_truncated": False,
                                "sample_timed_out": False, "error": "database error: can't $divide by zero"}
    assert listed["shapes"]["estimated_count"] == 2 and listed["shapes"]["fields"] and listed["shapes"]["error"] is None
