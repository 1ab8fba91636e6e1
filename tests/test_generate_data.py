"""The test-data generator, without a database: reproducibility, slicing, and the shape of the documents."""
from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Any

import bson
import pytest
from bson import ObjectId
from bson.codec_options import CodecOptions
from pymongo.errors import BulkWriteError

from scripts.generate_data import (
    BASE_DATE,
    OPTIONAL_FIELDS,
    PRIORITIES,
    STATUSES,
    Progress,
    batched,
    insert_batch,
    make_documents,
    parse_args,
)

KEY_ORDER = ["_id", "seq", "title", "description", "status", "priority", "assignee", "tags", "createdAt",
             "completedAt", "estimate", "points", "archived", "items", "project"]
REQUIRED = {"_id", "seq", "title", "status", "priority", "createdAt", "points", "archived", "items"}
SAMPLE_SIZE = 2000


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return list(make_documents(SAMPLE_SIZE, 42))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- reproducibility -------------------------------------------------------------------------------------

def test_same_seed_gives_the_same_documents_ids_included() -> None:
    first = list(make_documents(300, 7))
    second = list(make_documents(300, 7))
    assert first == second
    assert [doc["_id"] for doc in first] == [doc["_id"] for doc in second]


def test_different_seeds_give_different_documents() -> None:
    a = list(make_documents(300, 1))
    b = list(make_documents(300, 2))
    assert {doc["_id"] for doc in a}.isdisjoint(doc["_id"] for doc in b)
    without_ids = lambda docs: [{k: v for k, v in doc.items() if k != "_id"} for doc in docs]  # noqa: E731
    assert without_ids(a) != without_ids(b)
    assert sum(x["title"] != y["title"] for x, y in zip(a, b)) > 200


def test_a_slice_equals_the_same_range_of_a_longer_run() -> None:
    assert list(make_documents(10, 42, start=5)) == list(make_documents(15, 42))[5:]
    assert list(make_documents(3, 42, start=1998)) == list(make_documents(SAMPLE_SIZE + 1, 42))[1998:2001]


def test_count_zero_yields_nothing() -> None:
    assert list(make_documents(0, 42)) == []


def test_seq_is_the_index_and_ids_are_unique(docs: list[dict[str, Any]]) -> None:
    assert [doc["seq"] for doc in docs] == list(range(SAMPLE_SIZE))
    assert len({doc["_id"] for doc in docs}) == SAMPLE_SIZE


def test_ids_stay_unique_past_the_three_byte_counter() -> None:
    ids = {doc["_id"] for doc in make_documents(50, 42, start=(1 << 24) - 25)}
    ids |= {doc["_id"] for doc in make_documents(50, 42, start=0)}
    assert len(ids) == 100


def test_object_id_time_matches_created_at(docs: list[dict[str, Any]]) -> None:
    for doc in docs[:200]:
        assert doc["_id"].generation_time == doc["createdAt"].replace(microsecond=0)


# --- schema ----------------------------------------------------------------------------------------------

def test_keys_follow_one_fixed_order(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        keys = list(doc)
        assert keys == [key for key in KEY_ORDER if key in doc]
        assert REQUIRED <= set(keys)


def test_required_fields_have_their_types(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        assert isinstance(doc["_id"], ObjectId)
        assert is_int(doc["seq"])
        assert isinstance(doc["title"], str) and doc["title"]
        assert doc["status"] in STATUSES
        assert doc["priority"] in PRIORITIES
        assert isinstance(doc["createdAt"], datetime)
        assert is_int(doc["points"]) and doc["points"] > 0
        assert isinstance(doc["archived"], bool)
        assert isinstance(doc["items"], list) and 0 <= len(doc["items"]) <= 3
        for item in doc["items"]:
            assert list(item) == ["sku", "qty", "price"]
            assert isinstance(item["sku"], str)
            assert is_int(item["qty"]) and item["qty"] > 0
            assert isinstance(item["price"], float) and item["price"] > 0


def test_optional_fields_have_their_types_when_set(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc.get("description") is not None:
            assert isinstance(doc["description"], str)
        if doc.get("assignee") is not None:
            assert list(doc["assignee"]) == ["name", "email"]
            assert isinstance(doc["assignee"]["name"], str)
            assert "@" in doc["assignee"]["email"] and doc["assignee"]["email"].isascii()
        if doc.get("tags") is not None:
            assert 0 <= len(doc["tags"]) <= 4
            assert all(isinstance(tag, str) for tag in doc["tags"])
            assert len(set(doc["tags"])) == len(doc["tags"])
        if doc.get("estimate") is not None:
            assert isinstance(doc["estimate"], float) and doc["estimate"] > 0
        if doc.get("project") is not None:
            assert isinstance(doc["project"], str)


def test_every_value_of_the_enums_occurs(docs: list[dict[str, Any]]) -> None:
    assert {doc["status"] for doc in docs} == set(STATUSES)
    assert {doc["priority"] for doc in docs} == set(PRIORITIES)
    assert {len(doc["items"]) for doc in docs} == {0, 1, 2, 3}
    assert {len(doc["tags"]) for doc in docs if doc.get("tags") is not None} == {0, 1, 2, 3, 4}
    assert {doc["archived"] for doc in docs} == {True, False}


def test_some_documents_have_null_and_some_missing_fields(docs: list[dict[str, Any]]) -> None:
    with_null = [doc for doc in docs if any(doc.get(name, ...) is None for name in OPTIONAL_FIELDS)]
    # completedAt is absent from every unfinished task by design, so it does not count as irregular
    with_missing = [doc for doc in docs if any(name not in doc for name in OPTIONAL_FIELDS if name != "completedAt")]
    assert with_null and with_missing
    irregular = {doc["seq"] for doc in with_null} | {doc["seq"] for doc in with_missing}
    assert 0.02 * SAMPLE_SIZE < len(irregular) < 0.09 * SAMPLE_SIZE  # "roughly 5%"
    for field in ("assignee", "estimate", "description"):
        assert any(field in doc and doc[field] is None for doc in docs), f"no null {field}"
        assert any(field not in doc for doc in docs), f"no missing {field}"


def test_descriptions_mix_csv_hostile_and_non_ascii_text(docs: list[dict[str, Any]]) -> None:
    texts = [doc["description"] for doc in docs if isinstance(doc.get("description"), str)]

    def share(predicate: Any) -> float:
        return sum(1 for text in texts if predicate(text)) / len(texts)

    for needle in (",", '"', "\n", "\r\n", "\t", "Café", "naïve", "東京"):
        assert share(lambda text: needle in text) > 0.005, needle
    assert share(lambda text: any(ord(ch) > 0xFFFF for ch in text)) > 0.005  # emoji, beyond the BMP
    assert share(lambda text: text[:1] in ("=", "+", "-", "@")) > 0.005  # spreadsheet formula triggers
    assert share(str.isascii) > 0.2  # and plenty of plain text in between
    assert "" in texts


def test_completed_at_only_on_done_tasks(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["status"] == "done":
            assert isinstance(doc["completedAt"], datetime)
            assert doc["completedAt"] > doc["createdAt"]
        else:
            assert doc.get("completedAt") is None
    assert any("completedAt" in doc and doc["completedAt"] is None for doc in docs)


def test_datetimes_are_utc_with_millisecond_precision(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        for field in ("createdAt", "completedAt"):
            value = doc.get(field)
            if value is None:
                continue
            assert value.tzinfo is not None and value.utcoffset().total_seconds() == 0
            assert value.microsecond % 1000 == 0
            assert value >= BASE_DATE
        assert doc["createdAt"] < datetime(2025, 1, 1, tzinfo=timezone.utc)


def test_documents_round_trip_through_bson_unchanged(docs: list[dict[str, Any]]) -> None:
    options = CodecOptions(tz_aware=True)
    for doc in docs:
        decoded = bson.decode(bson.encode(doc), codec_options=options)
        assert decoded == doc
        assert list(decoded) == list(doc)


# --- command-line helpers --------------------------------------------------------------------------------

def test_batched_splits_and_keeps_the_tail() -> None:
    sizes = [len(batch) for batch in batched(make_documents(2500, 42), 1000)]
    assert sizes == [1000, 1000, 500]


def test_progress_renders_a_bar_counts_and_rate() -> None:
    progress = Progress(100_000, stream=io.StringIO(), width=10)
    assert progress.render(45_000, 5.0) == "[####......] 45,000/100,000 rows  9,000 rows/s"
    assert progress.render(100_000, 10.0).startswith("[##########] 100,000/100,000 rows")


def test_progress_in_a_log_writes_whole_lines() -> None:
    stream = io.StringIO()
    progress = Progress(2000, stream=stream)
    progress.update(1000)
    progress.update(2000, final=True)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[-1].startswith("[" + "#" * 30 + "] 2,000/2,000 rows")


class FakeCollection:
    def __init__(self, error: BulkWriteError) -> None:
        self.error = error

    def insert_many(self, documents: Any, ordered: bool = True) -> Any:
        assert ordered is False
        raise self.error


def test_insert_batch_counts_documents_that_already_exist() -> None:
    error = BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}, {"index": 2, "code": 11000}],
                            "nInserted": 1})
    assert insert_batch(FakeCollection(error), [{}, {}, {}]) == (1, 2)  # type: ignore[arg-type]


def test_insert_batch_raises_other_write_errors() -> None:
    error = BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}, {"index": 1, "code": 2}],
                            "nInserted": 0})
    with pytest.raises(BulkWriteError):
        insert_batch(FakeCollection(error), [{}, {}])  # type: ignore[arg-type]


def test_arguments_default_to_the_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORT_MONGO_URL", "mongodb://db.example:27017")
    monkeypatch.setenv("EXPORT_DB", "staging")
    args = parse_args([])
    assert (args.url, args.db, args.count, args.collection, args.seed, args.batch) == (
        "mongodb://db.example:27017", "staging", 100_000, "tasks", 42, 1000)
    assert not args.drop and not args.if_empty


def test_bad_option_combinations_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--drop", "--if-empty"])
    with pytest.raises(SystemExit):
        parse_args(["--batch", "0"])


def test_if_empty_finishes_a_run_cut_short_and_leaves_other_data_alone(mongo_url: str) -> None:
    from pymongo import MongoClient

    from conftest import DATA_DB
    from scripts.generate_data import run

    args = ["--url", mongo_url, "--db", DATA_DB, "--count", "50", "--seed", "7"]
    with MongoClient(mongo_url) as client:
        seeded, other = client[DATA_DB]["seed_cut_short"], client[DATA_DB]["seed_other_data"]
        try:
            assert run(parse_args([*args, "--collection", seeded.name, "--drop"])) == 0
            seeded.delete_many({"seq": {"$gte": 30}})  # as a run stopped part way leaves it
            assert run(parse_args([*args, "--collection", seeded.name, "--if-empty"])) == 0
            assert sorted(doc["seq"] for doc in seeded.find({}, {"seq": 1})) == list(range(50))
            other.insert_one({"_id": 1, "mine": True})
            assert run(parse_args([*args, "--collection", other.name, "--if-empty"])) == 0
            assert list(other.find()) == [{"_id": 1, "mine": True}]
        finally:
            client[DATA_DB].drop_collection(seeded.name)
            client[DATA_DB].drop_collection(other.name)
