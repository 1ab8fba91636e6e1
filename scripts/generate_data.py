"""Fill a MongoDB collection with realistic, reproducible "tasks" documents.

The documents carry what an exporter has to get right: commas, double quotes, newlines, tabs and non-ASCII
text in strings, nested documents and arrays, null next to missing fields, datetimes, ints and floats.
The same seed always yields the same documents, `_id` included, so tests can compute expected rows without
a database (`make_documents`).

    python scripts/generate_data.py --count 100000 --drop
    python scripts/generate_data.py --url mongodb://mongo:27017 --if-empty
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from itertools import accumulate
from typing import Any, Iterable, Iterator, Sequence, TextIO

from bson import ObjectId
from pymongo import ASCENDING, MongoClient
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, PyMongoError, ServerSelectionTimeoutError
from pymongo.uri_parser import parse_uri

DEFAULT_URL = "mongodb://127.0.0.1:27017/?directConnection=true"
DEFAULT_DB = "exports"
DUPLICATE_KEY = 11000

# Fixed, never "now": the same seed must give the same documents on every run.
BASE_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
CREATED_SPAN_MS = 366 * 24 * 3600 * 1000  # 2024 is a leap year; createdAt covers all of it
MAX_COMPLETION_MS = 60 * 24 * 3600 * 1000

IRREGULAR_SHARE = 0.05  # documents with null and/or missing optional fields
EMPTY_DESCRIPTION_SHARE = 0.02  # "" is a third state next to null and missing

STATUSES = ("open", "in_progress", "blocked", "done")
STATUS_CUM_WEIGHTS = tuple(accumulate((35, 25, 10, 30)))  # cumulative: choices() skips summing per call
PRIORITIES = ("low", "medium", "high", "urgent")
PRIORITY_CUM_WEIGHTS = tuple(accumulate((30, 40, 22, 8)))
POINTS = (1, 2, 3, 5, 8, 13)
TAGS = ("bug", "feature", "backend", "frontend", "ux", "security", "performance", "docs",
        "tech-debt", "customer", "i18n", "ops")
PROJECTS = ("apollo", "billing-v2", "mobile-app", "data-platform", "website", "infra", "Café POS")
EMAIL_DOMAINS = ("example.com", "example.org", "corp.example.net")

# (display name, ASCII mailbox): accents, apostrophes and CJK appear in real names; mailboxes stay ASCII.
PEOPLE = (
    ("Alice Martin", "alice.martin"),
    ("José Álvarez", "jose.alvarez"),
    ("Zoë Lefèvre", "zoe.lefevre"),
    ("Łukasz Nowak", "lukasz.nowak"),
    ("Søren Madsen", "soren.madsen"),
    ("Nguyễn Thị Ngọc", "ngoc.nguyen"),
    ("田中 花子", "hanako.tanaka"),
    ("Seán O'Brien", "sean.obrien"),
    ("Priya Raman", "priya.raman"),
    ("Mohammed Al-Farsi", "mohammed.alfarsi"),
    ("Olga Ivanova", "olga.ivanova"),
    ("Chen Wei", "wei.chen"),
    ("Emily Johnson", "emily.johnson"),
    ("Björn Andersson", "bjorn.andersson"),
)

TITLE_VERBS = ("Fix", "Add", "Refactor", "Investigate", "Update", "Remove", "Document", "Migrate",
               "Test", "Review")
TITLE_OBJECTS = ("login flow", "CSV export", "invoice PDF", "search index", "payment webhook",
                 "user settings page", "nightly backup", "rate limiter", "onboarding email",
                 "dashboard charts", "API pagination", "push notifications", "Café menu sync",
                 "東京 office VPN", "naïve date parsing")
TITLE_CUSTOMERS = ("ACME, Inc.", "Müller GmbH", "Globex", "Initech", "東京 Trading Co.")

SENTENCES_PLAIN = (
    "Steps to reproduce are in the linked ticket.",
    "Needs a review before the release.",
    "Blocked on the upstream fix.",
    "Customer reported this twice this week.",
    "Low risk change.",
    "See the runbook for details.",
)
SENTENCES_COMMAS = (
    "Affects Chrome, Firefox, and Safari.",
    "Check logs, metrics, and traces, in that order.",
    "Owner: platform team, backup: data team.",
    "Amounts like 1,000,000.50 are rendered wrong.",
)
SENTENCES_QUOTES = (
    'The user wrote: "it just stops after login".',
    'Error says "Invalid token", not "Expired token".',
    'Rename the "Save & close" button.',
    'Header shows ""quoted"" twice.',
    "It's the 12\" display only.",
)
SENTENCES_UNICODE = (
    "Meet at Café Müller to discuss the naïve approach.",
    "Sync with the 東京 team before Friday.",
    "Shipped! 🚀🎉",
    "Résumé uploads lose their accents.",
    "Straße and Zürich addresses fail validation.",
    "Подтвердить с командой.",
    "Works on the São Paulo servers 👍🏽",
    "Price shown as 9,99 € instead of €9.99.",
)
# Real descriptions start with bullets, "+1" and @mentions; spreadsheets read those as formulas.
SENTENCES_LEADING_SIGN = (
    "- check the config\n- restart the worker",
    "+1 from support",
    "@oncall please take a look",
    '=HYPERLINK("http://example.com") was pasted by a user',
)
SENTENCES_WHITESPACE = (
    "Columns:\tname\temail",
    "  Indented note with trailing spaces  ",
)
SENTENCE_POOLS = (SENTENCES_PLAIN, SENTENCES_COMMAS, SENTENCES_QUOTES, SENTENCES_UNICODE,
                  SENTENCES_LEADING_SIGN, SENTENCES_WHITESPACE)
SENTENCE_POOL_CUM_WEIGHTS = tuple(accumulate((40, 20, 15, 15, 5, 5)))
SENTENCE_SEPARATORS = (" ", " ", " ", "\n", "\n\n", "\r\n")

# The fields an irregular document may have set to null or left out.
OPTIONAL_FIELDS = ("description", "assignee", "tags", "estimate", "project", "completedAt")

_MISSING = object()


def make_documents(count: int, seed: int, start: int = 0) -> Iterator[dict[str, Any]]:
    """Yield the documents with seq start .. start+count-1 for this seed.

    Each document depends only on (seed, seq), so any slice can be generated on its own.
    """
    oid_prefix = _oid_prefix(seed)
    for index in range(start, start + count):
        yield make_document(index, seed, oid_prefix)


def make_document(index: int, seed: int, oid_prefix: int | None = None) -> dict[str, Any]:
    """The document with seq == index for this seed."""
    # Shifting the seed keeps the streams of different seeds apart for any realistic count.
    rng = random.Random((seed << 32) + index)
    if oid_prefix is None:
        oid_prefix = _oid_prefix(seed)

    status = rng.choices(STATUSES, cum_weights=STATUS_CUM_WEIGHTS)[0]
    created_at = BASE_DATE + timedelta(milliseconds=rng.randrange(CREATED_SPAN_MS))
    completed_at: Any = _MISSING
    if status == "done":
        completed_at = created_at + timedelta(milliseconds=rng.randrange(3_600_000, MAX_COMPLETION_MS))

    fields: list[tuple[str, Any]] = [
        ("_id", _object_id(created_at, oid_prefix, index)),
        ("seq", index),
        ("title", _title(rng)),
        ("description", _description(rng)),
        ("status", status),
        ("priority", rng.choices(PRIORITIES, cum_weights=PRIORITY_CUM_WEIGHTS)[0]),
        ("assignee", _assignee(rng)),
        ("tags", rng.sample(TAGS, rng.randint(0, 4))),
        ("createdAt", created_at),
        ("completedAt", completed_at),
        ("estimate", rng.randint(1, 160) * 0.25),  # hours, in quarter-hour steps
        ("points", rng.choice(POINTS)),
        ("archived", rng.random() < (0.3 if status == "done" else 0.03)),
        ("items", [_item(rng) for _ in range(rng.randint(0, 3))]),
        ("project", rng.choice(PROJECTS)),
    ]
    if rng.random() < IRREGULAR_SHARE:
        fields = _make_irregular(rng, fields, status)
    # Building from an ordered list keeps the key order fixed whichever fields are left out.
    return {key: value for key, value in fields if value is not _MISSING}


def _oid_prefix(seed: int) -> int:
    # A string seed hashes deterministically (unlike hash()), and cannot collide with a document's int seed.
    return random.Random(f"objectid:{seed}").getrandbits(40)


def _object_id(created_at: datetime, prefix: int, index: int) -> ObjectId:
    # Laid out like a real ObjectId (time, 5 "process" bytes, 3-byte counter) so generation_time matches
    # createdAt; the index is split over the counter and the prefix, which keeps _ids unique per seed.
    seconds = int(created_at.timestamp())
    middle = (prefix ^ (index >> 24)) & 0xFF_FFFF_FFFF
    return ObjectId(seconds.to_bytes(4, "big") + middle.to_bytes(5, "big") + (index & 0xFFFFFF).to_bytes(3, "big"))


def _title(rng: random.Random) -> str:
    title = f"{rng.choice(TITLE_VERBS)} {rng.choice(TITLE_OBJECTS)}"
    if rng.random() < 0.15:
        title += f" for {rng.choice(TITLE_CUSTOMERS)}"
    return title


def _description(rng: random.Random) -> str:
    if rng.random() < EMPTY_DESCRIPTION_SHARE:
        return ""
    parts = [rng.choice(rng.choices(SENTENCE_POOLS, cum_weights=SENTENCE_POOL_CUM_WEIGHTS)[0])]
    for _ in range(rng.randint(0, 3)):
        parts.append(rng.choice(SENTENCE_SEPARATORS))
        parts.append(rng.choice(rng.choices(SENTENCE_POOLS, cum_weights=SENTENCE_POOL_CUM_WEIGHTS)[0]))
    return "".join(parts)


def _assignee(rng: random.Random) -> dict[str, str]:
    name, mailbox = rng.choice(PEOPLE)
    return {"name": name, "email": f"{mailbox}@{rng.choice(EMAIL_DOMAINS)}"}


def _item(rng: random.Random) -> dict[str, Any]:
    return {
        "sku": f"{rng.choice(('HW', 'SW', 'SVC'))}-{rng.randint(1000, 9999)}",
        "qty": rng.randint(1, 20),
        "price": round(rng.uniform(0.5, 999.99), 2),
    }


def _make_irregular(rng: random.Random, fields: list[tuple[str, Any]], status: str) -> list[tuple[str, Any]]:
    """Set one to three optional fields to null or drop them, as older or hand-edited records do."""
    # A done task always keeps its completion date; an unfinished one may carry an explicit null instead.
    candidates = [name for name in OPTIONAL_FIELDS if not (name == "completedAt" and status == "done")]
    changes = {name: (None if rng.random() < 0.5 else _MISSING)
               for name in rng.sample(candidates, rng.randint(1, 3))}
    return [(key, changes.get(key, value)) for key, value in fields]


# --- writing to MongoDB ---------------------------------------------------------------------------------

INDEX_FIELDS = ("status", "priority", "createdAt", "assignee.name", "tags", "seq")


class Progress:
    """A one-line progress bar; redrawn in place on a terminal, printed as occasional lines in a log."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.interactive = stream.isatty()
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.last_done = -1

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        # Redrawing every batch would cost more than the inserts on a fast server; logs need far fewer lines.
        interval = 0.1 if self.interactive else 5.0
        if not final and now - self.last_draw < interval:
            return
        if final and not self.interactive and done == self.last_done:
            return  # a log already has this exact line
        self.last_draw = now
        self.last_done = done
        line = self.render(done, now - self.started)
        if self.interactive:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def render(self, done: int, elapsed: float) -> str:
        fraction = done / self.total if self.total else 1.0
        filled = min(self.width, int(fraction * self.width))
        rate = done / elapsed if elapsed > 0 else 0.0
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {done:,}/{self.total:,} rows  {rate:,.0f} rows/s"


def batched(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def insert_batch(collection: Collection, batch: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Insert one batch; returns (inserted, already present).

    The _ids are deterministic, so a rerun without --drop meets its own earlier documents: those
    duplicate-key errors are counted, anything else is raised.
    """
    try:
        result = collection.insert_many(batch, ordered=False)
        return len(result.inserted_ids), 0
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if not errors or any(error.get("code") != DUPLICATE_KEY for error in errors):
            raise
        return exc.details.get("nInserted", len(batch) - len(errors)), len(errors)


def insert_documents(collection: Collection, count: int, seed: int, batch_size: int,
                     progress: Progress | None = None) -> tuple[int, int]:
    inserted = skipped = 0
    for batch in batched(make_documents(count, seed), batch_size):
        added, present = insert_batch(collection, batch)
        inserted += added
        skipped += present
        if progress:
            progress.update(inserted + skipped)
    if progress:
        progress.update(inserted + skipped, final=True)
    return inserted, skipped


def create_indexes(collection: Collection) -> None:
    for field in INDEX_FIELDS:
        collection.create_index([(field, ASCENDING)])


def cut_short(collection: Collection, count: int, seed: int) -> bool:
    """This seed's first document is there and its last is not: a run like this one stopped part way (Ctrl-C,
    a container stopped). A collection of other documents is not that."""
    if count == 0:
        return False
    first, last = make_document(0, seed)["_id"], make_document(count - 1, seed)["_id"]
    return collection.find_one({"_id": first}, projection={"_id": 1}) is not None and \
        collection.find_one({"_id": last}, projection={"_id": 1}) is None


def has_documents(collection: Collection) -> bool:
    # find_one instead of a count: cheap on any collection size and on any server.
    return collection.find_one({}, projection={"_id": 1}) is not None


# --- command line -----------------------------------------------------------------------------------------

def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fill a MongoDB collection with reproducible test tasks.")
    parser.add_argument("--count", type=_non_negative, default=100_000, help="documents to insert (default 100000)")
    parser.add_argument("--collection", default="tasks", help="collection name (default tasks)")
    parser.add_argument("--seed", type=int, default=42, help="random seed; same seed, same documents (default 42)")
    parser.add_argument("--url", default=os.environ.get("EXPORT_MONGO_URL") or DEFAULT_URL,
                        help=f"MongoDB URL (default: $EXPORT_MONGO_URL or {DEFAULT_URL})")
    parser.add_argument("--db", default=os.environ.get("EXPORT_DB") or DEFAULT_DB,
                        help=f"database name (default: $EXPORT_DB or {DEFAULT_DB})")
    parser.add_argument("--batch", type=_positive, default=1000, help="documents per insert_many (default 1000)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--drop", action="store_true", help="drop the collection first")
    mode.add_argument("--if-empty", action="store_true",
                      help="do nothing when the collection already holds documents (but finish a run of the same "
                           "seed that stopped part way)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    client: MongoClient = MongoClient(args.url, serverSelectionTimeoutMS=15_000)
    try:
        collection = client[args.db][args.collection]
        target = f"{args.db}.{args.collection}"
        if args.if_empty and has_documents(collection):
            if not cut_short(collection, args.count, args.seed):
                print(f"{target} already holds documents; nothing inserted")
                return 0
            print(f"{target} holds part of an earlier run's documents; adding the rest", file=sys.stderr)
        if args.drop:
            collection.drop()
        started = time.monotonic()
        inserted, skipped = insert_documents(collection, args.count, args.seed, args.batch, Progress(args.count))
        create_indexes(collection)
        elapsed = time.monotonic() - started
        if skipped:
            print(f"skipped {skipped} documents already in {target} (use --drop to start over)", file=sys.stderr)
        print(f"inserted {inserted} documents into {target} in {elapsed:.1f} s")
        return 0
    finally:
        client.close()


def _hosts(url: str) -> str:
    # Only host:port, so a password in the URL never reaches a log.
    try:
        return ", ".join(f"{host}:{port}" for host, port in parse_uri(url)["nodelist"])
    except (PyMongoError, ValueError):
        return "the given URL"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ServerSelectionTimeoutError:
        print(f"error: no MongoDB server answered at {_hosts(args.url)}", file=sys.stderr)
        return 1
    except PyMongoError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
