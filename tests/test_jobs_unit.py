"""Small, fast unit tests of the job store and the queue on mongomock-motor (no server)."""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from bson import Regex
from mongomock_motor import AsyncMongoMockClient

from service.db import SERVER_SELECTION_TIMEOUT_MS, SOCKET_TIMEOUT_MS, Database, make_client
from service.events import EventHub
from service.jobs import eta, percent, snapshot
from service.manager import JobManager, JobNotFound, TooManyJobs
from service.metrics import Metrics
from service.query import validate_request
from service.settings import settings_from_env
from service.signing import SignatureError, UrlSigner, load_key


class RecordingHub(EventHub):
    def __init__(self, settings: Any) -> None:
        super().__init__(settings, lookup=self._no_lookup)
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def _no_lookup(self, user: str, job_id: str) -> None:
        """These tests subscribe no client."""

    async def emit(self, event: str, snap: Any, **extra: Any) -> None:
        self.sent.append((event, {**snap, **extra}))


@pytest.fixture
def manager(tmp_path: Path) -> JobManager:
    settings = settings_from_env({}, export_dir=tmp_path, max_active_per_user=3)
    db = Database(AsyncMongoMockClient(), "unit")
    return JobManager(settings, db, RecordingHub(settings), Metrics())


def spec(**body: Any) -> Any:
    return validate_request({"collection": "tasks", "format": "csv", **body})


def test_percent_and_eta() -> None:
    assert percent(0, None) is None
    assert percent(0, 0) == 100.0
    assert percent(250, 1000) == 25.0
    assert percent(1001, 1000) == 100.0
    assert eta(250, 1000, 50.0) == 15.0
    assert eta(250, None, 50.0) is None


async def test_queue_positions_count_older_jobs(manager: JobManager) -> None:
    # Claiming in this order, and the positions that move up, are shown through the app in test_reliability.
    created = [await manager.create(spec(limit=n + 1), "alice") for n in range(3)]
    assert [c["queue_position"] for c in created] == [1, 2, 3]
    assert [(await manager.get("alice", c["id"]))["queue_position"] for c in created] == [1, 2, 3]


async def test_per_user_limit_and_isolation(manager: JobManager) -> None:
    for _ in range(3):
        await manager.create(spec(), "alice")
    with pytest.raises(TooManyJobs):
        await manager.create(spec(), "alice")
    bob_job = await manager.create(spec(), "bob")  # limits are per user
    with pytest.raises(JobNotFound):
        await manager.get("alice", bob_job["id"])
    assert [j["id"] for j in await manager.list("bob", None, 10)] == [bob_job["id"]]


async def test_cancelling_a_queued_job_emits_and_frees_the_slot(manager: JobManager) -> None:
    jobs = [await manager.create(spec(), "alice") for _ in range(3)]
    result = await manager.cancel_or_delete("alice", jobs[0]["id"])
    assert result["status"] == "cancelled"
    event, payload = manager.events.sent[-1]  # type: ignore[attr-defined]
    assert (event, payload["phase"], payload["waiting_seconds"]) == ("export-cancelled", "done", None), payload
    await manager.create(spec(), "alice")  # the cancelled job no longer counts
    deleted = await manager.cancel_or_delete("alice", jobs[0]["id"])
    assert deleted["deleted"] is True
    with pytest.raises(JobNotFound):
        await manager.get("alice", jobs[0]["id"])


def test_file_names_are_sanitized_and_keep_one_extension(manager: JobManager) -> None:
    doc = {"created_at": 1_700_000_000_000}
    assert manager.file_name(spec(), doc) == "tasks-20231114-221320.csv"
    assert manager.file_name(spec(filename="report.csv", options={"compress": "gzip"}), doc) == "report.csv.gz"
    assert manager.file_name(spec(filename="../../etc/passwd"), doc) == "etc-passwd.csv"
    assert manager.file_name(spec(filename="Café 東京"), doc) == "Café 東京.csv"
    assert manager.file_name(spec(filename="con"), doc) == "_con.csv"
    created = {"created_at": 1709214330123}  # 2024-02-29T13:45:30.123Z
    assert manager.file_name(spec(), created) == "tasks-20240229-134530.csv"
    assert manager.file_name(spec(options={"compress": "gzip"}), created) == "tasks-20240229-134530.csv.gz"
    assert manager.file_name(spec(format="xlsx", filename="Q1/report"), created) == "Q1-report.xlsx"
    assert manager.file_name(spec(filename="done.csv"), created) == "done.csv"
    # Invisible characters: a right-to-left override shows "\u202etxt.exe.csv" as "vsc.exe.txt".
    assert manager.file_name(spec(filename="\u202etxt.exe"), created) == "txt.exe.csv"
    assert manager.file_name(spec(filename="a\u200bb\ufeffc\u2028d\u0085e--f"), created) == "a-b-c-d-e--f.csv"


def test_snapshot_of_a_completed_job_has_a_signed_download_url_bound_to_job_owner_and_time() -> None:
    doc = {"_id": "a" * 24, "status": "completed", "spec": spec().to_doc(), "processed": 10, "total": 10,
           "created_at": 0, "finished_at": 1000, "file_name": "x.csv", "user": "alice"}
    signer = UrlSigner(b"k" * 32, ttl_seconds=300)
    snap = snapshot(doc, sign=lambda job_id, user: signer.download_url(job_id, user, now=1_000_000))
    assert snap["percent"] == 100.0 and snap["finished_at"] == "1970-01-01T00:00:01.000Z"
    url = urlsplit(snap["download_url"])
    assert url.path == f"/api/exports/{'a' * 24}/download"
    query = dict(parse_qsl(url.query))
    assert set(query) == {"exp", "sig"} and query["exp"] == "1000300"
    signer.verify("a" * 24, "alice", query["exp"], query["sig"], now=1_000_299)
    refused = [
        ("b" * 24, "alice", query["exp"], query["sig"], 1_000_000, "invalid_signature"),  # another job
        ("a" * 24, "bob", query["exp"], query["sig"], 1_000_000, "invalid_signature"),  # another owner
        ("a" * 24, "alice", "1000999", query["sig"], 1_000_000, "invalid_signature"),  # a longer life
        ("a" * 24, "alice", query["exp"], query["sig"], 1_000_301, "link_expired"),
        ("a" * 24, "alice", "soon", query["sig"], 1_000_000, "invalid_signature"),
        ("a" * 24, "alice", "\u00b2", query["sig"], 1_000_000, "invalid_signature"),  # a digit to isdigit, not to int
        ("a" * 24, "alice", "9" * 5000, query["sig"], 1_000_000, "invalid_signature"),  # past int()'s digit limit
    ]
    for job_id, user, exp, sig, now, code in refused:
        with pytest.raises(SignatureError) as caught:
            UrlSigner(b"k" * 32, 300).verify(job_id, user, exp, sig, now=now)
        assert caught.value.code == code
    with pytest.raises(SignatureError):
        UrlSigner(b"another key", 300).verify("a" * 24, "alice", query["exp"], query["sig"], now=1_000_000)
    assert snapshot({**doc, "status": "failed"}, sign=lambda *_: "/x")["download_url"] is None


def test_the_signing_key_is_generated_once_and_shared_through_the_export_dir(tmp_path: Path) -> None:
    first = load_key(None, tmp_path)
    assert len(first) == 64 and load_key(None, tmp_path) == first
    assert (tmp_path / ".signing-key").stat().st_mode & 0o077 == 0  # readable by the service alone
    assert load_key("configured", tmp_path) == b"configured"


@pytest.mark.parametrize("driver", ["pymongo", "motor"])
async def test_timeouts_in_the_connection_string_win_over_the_defaults(driver: str) -> None:
    given = make_client("mongodb://127.0.0.1:1/?connectTimeoutMS=30000&serverSelectionTimeoutMS=45000&socketTimeoutMS=0", driver)
    default = make_client("mongodb://127.0.0.1:1/", driver, connect_timeout_ms=7000)
    long_queries = make_client("mongodb://127.0.0.1:1/", driver, query_max_time_ms=15 * 60_000)
    try:
        assert given.options.pool_options.connect_timeout == 30
        assert given.options.server_selection_timeout == 45
        assert given.options.pool_options.socket_timeout is None  # 0: no limit
        assert default.options.pool_options.connect_timeout == 7
        assert default.options.server_selection_timeout == SERVER_SELECTION_TIMEOUT_MS / 1000
        assert default.options.pool_options.socket_timeout == SOCKET_TIMEOUT_MS / 1000
        # A query allowed 15 minutes of server time may wait that long for its first reply, and a minute more.
        assert long_queries.options.pool_options.socket_timeout == 16 * 60
    finally:
        for client in (given, default, long_queries):
            await Database(client, "unit").close()


def test_a_regex_is_an_operator_beside_others_and_a_value_in_a_list() -> None:
    """{"$regex": ...} beside other operators keeps them (json_util dropped them); in the list of $in, $nin or $all
    a regular expression value is what the server needs, and what is sent; stored and read back the same."""
    spec = validate_request({"collection": "tasks", "format": "csv", "filter": {
        "title": {"$regex": "^T", "$options": "i", "$ne": "Tea"},
        "tag": {"$in": [{"$regex": "^a"}, "b"], "$nin": [{"$regex": "z$", "$options": "m"}]},
        "$or": [{"owner": {"$regex": "x"}}], "code": {"$not": {"$regex": "^0"}}, "tags": {"$elemMatch": {"$regex": "^b"}},
        "$expr": {"$regexMatch": {"input": "$title", "regex": {"$regex": "e$"}}},
    }})
    assert spec.filter == {
        "title": {"$regex": "^T", "$options": "i", "$ne": "Tea"},
        "tag": {"$in": [Regex("^a"), "b"], "$nin": [Regex("z$", "m")]},
        "$or": [{"owner": {"$regex": "x"}}], "code": {"$not": {"$regex": "^0"}}, "tags": {"$elemMatch": {"$regex": "^b"}},
        "$expr": {"$regexMatch": {"input": "$title", "regex": Regex("e$")}},  # an expression's argument: a value
    }
    pipeline = validate_request({"collection": "tasks", "format": "csv", "pipeline": [
        {"$match": {"t": {"$all": [{"$regex": "q"}]}, "u": {"$regex": "v", "$ne": "vw"}}},
        {"$addFields": {"m": {"$regexMatch": {"input": "$t", "regex": {"$regex": "^q"}}}}},
    ]})
    assert pipeline.pipeline == [
        {"$match": {"t": {"$all": [Regex("q")]}, "u": {"$regex": "v", "$ne": "vw"}}},
        {"$addFields": {"m": {"$regexMatch": {"input": "$t", "regex": Regex("^q")}}}},
    ]
