"""Benchmark of the export service: a markdown report, printed and written to var/bench.md.

    make bench          # every stage (scripts/bench.py run), about ten minutes on two cores
    make bench-quick    # every stage at small sizes, under two minutes: a smoke run
    .venv/bin/python scripts/bench.py run --only writers,scale --writer-formats csv,parquet

Floors (the bare libraries) run in the same run as the service, so both meet the same neighbours. The service runs
as a child process driven over HTTP and Socket.IO: rss, live and scale feed it an in-process source of raw BSON
batches (create_app's `source`), busy and e2e read the embedded server. The README's Benchmark section says how each
stage measures. Exits 0 whether or not a target is met.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import functools
import itertools
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, the project root is not on the path
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import bson  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
import socketio  # noqa: E402
from aiohttp import web  # noqa: E402
from pymongo import MongoClient  # noqa: E402

from scripts.generate_data import make_documents  # noqa: E402
from service.app import EMBEDDED_CONNECT_TIMEOUT_MS, create_app  # noqa: E402
from service.embedded_db import EmbeddedMongo  # noqa: E402
from service.query import validate_request  # noqa: E402
from service.settings import settings_from_env  # noqa: E402

# pyarrow, xlsxwriter and the pipeline are imported where they are used: the service child imports this module, and
# its RSS is measured.
SEED, BATCH_ROWS, DB_NAME = 42, 1000, "bench"
FORMATS = ("csv", "json", "ndjson", "xlsx")
TABULAR = ("csv", "xlsx", "parquet")  # requests name the generator's top-level keys as fields; JSON writes documents
SCALAR_CASES = {"parquet-scalars": "parquet"}  # only the keys never nested, which PyMongoArrow reads undecoded
WRITER_FORMATS = (*FORMATS, "parquet", *SCALAR_CASES)
END_EVENTS = ("export-completed", "export-failed", "export-cancelled")
EVENTS = ("export-fetching", "export-processing", "export-finalizing", *END_EVENTS)
FLOOR_TARGETS = {"csv": 0.7, "json": 0.8, "ndjson": 0.8, "xlsx": 0.9, "parquet": 0.6, "parquet-scalars": 1.0}
RSS_GROWTH_LIMIT_MIB, HEALTH_P99_LIMIT_MS, SCALE_TARGET = 50, 50, 1.6
EVENT_GAP_LIMIT_S = 1.0  # the README's promise: a job is never quiet for more than a second
LIVE_PLAN = ("xlsx", "xlsx", "csv", "csv")
REPORT = ROOT / "var" / "bench.md"


@dataclass(frozen=True)
class Sizes:
    writer_rows: dict[str, int]
    writer_repeats: int
    rss_rows: tuple[int, int]
    live_rows: dict[str, int]
    busy_rows: dict[str, int]  # each of the four exports the embedded server serves at once
    scale_rows: int
    scale_pairs: int
    e2e_rows: int  # also the size of the seeded collection


FULL = Sizes({**dict.fromkeys(WRITER_FORMATS, 50_000), "xlsx": 20_000}, 5, (100_000, 1_000_000),
             {"csv": 250_000, "xlsx": 60_000}, {"csv": 40_000, "xlsx": 40_000}, 100_000, 5, 100_000)
QUICK = Sizes({**dict.fromkeys(WRITER_FORMATS, 10_000), "xlsx": 4_000}, 2, (5_000, 20_000),
              {"csv": 30_000, "xlsx": 6_000}, {"csv": 6_000, "xlsx": 3_000}, 16_000, 3, 6_000)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Section:
    """One stage's part of the report: a table, a note under it, and its figures judged against their targets."""
    title: str
    head: list[str]
    note: str = ""
    rows: list[list[str]] = field(default_factory=list)
    accept: list[str] = field(default_factory=list)

    def judge(self, what: str, value: str, target: str, ok: bool) -> str:
        """The target cell of a row; the figure goes to the acceptance list too."""
        self.accept.append(f"{what}: {value} (target {target}) — {'PASS' if ok else 'FAIL'}")
        return f"{target} {'PASS' if ok else 'FAIL'}"

    def render(self) -> list[str]:
        return [f"### {self.title}", "", "| " + " | ".join(self.head) + " |", "|---" + "|---:" * (len(self.head) - 1) + "|",
                *("| " + " | ".join(row) + " |" for row in self.rows), "", *([self.note, ""] if self.note else [])]


# --- rows and floors -------------------------------------------------------------------------------------------
def raw_batches(rows: int) -> list[bytes]:
    """The generator's documents as pre-encoded BSON batches of BATCH_ROWS, as a cursor delivers them."""
    return [b"".join(map(bson.encode, make_documents(min(BATCH_ROWS, rows - start), SEED, start)))
            for start in range(0, rows, BATCH_ROWS)]


@functools.cache
def replay_batches() -> list[bytes]:
    """What the in-process source and the floor processes cycle through."""
    return raw_batches(10 * BATCH_ROWS)


def columns_of(batches: Sequence[bytes], scalars_only: bool = False) -> list[str]:
    """The top-level keys of the first batch in first-seen order; with scalars_only, those never nested."""
    docs = bson.decode_all(batches[0])
    nested = {k for doc in docs for k, v in doc.items() if isinstance(v, (dict, list))} if scalars_only else set()
    return [key for key in dict.fromkeys(k for doc in docs for k in doc) if key not in nested]


def job_body(fmt: str, columns: Sequence[str] = (), limit: int = 0, collection: str = "tasks") -> dict[str, Any]:
    """The request every stage makes: tables name the columns (none: they discover theirs), JSON writes documents."""
    body: dict[str, Any] = {"collection": collection, "format": fmt, **({"limit": limit} if limit else {})}
    return {**body, "fields": list(columns)} if fmt in TABULAR and columns else body


class InProcessSource:
    """The service's BatchSource shape (count, raw_batches): spec.limit rows in whole replay batches."""

    async def count(self, spec: Any) -> int:
        if spec.limit <= 0 or spec.limit % BATCH_ROWS:
            raise ValueError(f"the in-process source sends whole batches of {BATCH_ROWS}, not {spec.limit} rows")
        return spec.limit

    async def raw_batches(self, spec: Any) -> AsyncGenerator[bytes, None]:
        for index in range(spec.limit // BATCH_ROWS):
            yield replay_batches()[index % len(replay_batches())]
            await asyncio.sleep(0)  # a cursor gives the loop a turn between batches; so does this source


# Floors: bson.decode_all plus the bare library call, the file made durable as the service makes it.
Side = tuple[Callable[[bytes], None], Callable[[], None]]  # feed(raw batch), finish(): the service pipeline's shape


def durable(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


def csv_floor(path: Path, columns: Sequence[str]) -> Side:
    fh = open(path, "w", newline="", encoding="utf-8", buffering=1 << 20)
    writerow = csv.writer(fh).writerow
    writerow(columns)

    def feed(raw: bytes) -> None:
        for doc in bson.decode_all(raw):
            writerow([str(doc.get(key, "")) for key in columns])
    return feed, lambda: durable(fh)


def json_floor(path: Path, columns: Sequence[str]) -> Side:
    fh = open(path, "wb", buffering=1 << 20)
    write = fh.write

    def feed(raw: bytes) -> None:
        for doc in bson.decode_all(raw):
            write(orjson.dumps(doc, default=str))
            write(b"\n")
    return feed, lambda: durable(fh)


def xlsx_floor(path: Path, columns: Sequence[str]) -> Side:
    import xlsxwriter
    fh = open(path, "wb", buffering=1 << 20)
    book = xlsxwriter.Workbook(fh, {"constant_memory": True, "in_memory": False})
    sheet, rows = book.add_worksheet(), itertools.count(1)
    sheet.write_row(0, 0, columns)

    def feed(raw: bytes) -> None:
        for doc in bson.decode_all(raw):
            sheet.write_row(next(rows), 0, [str(doc.get(key, "")) for key in columns])
    return feed, lambda: (book.close(), durable(fh))


def parquet_floor(path: Path, columns: Sequence[str]) -> Side:
    """A pa.array per column with pyarrow's own types (str() where it has none, settled by the first batch), written by
    pq.ParquetWriter with zstd in row groups of the service's default size."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    group, pending, text, sink = validate_request(job_body("parquet")).parquet.row_group_size, [], [], []

    def typed(values: list[Any]) -> bool:
        with contextlib.suppress(pa.ArrowInvalid, pa.ArrowTypeError):
            return pa.array(values) is not None
        return False

    def table(values: list[list[Any]], types: Sequence[Any]) -> Any:
        return pa.Table.from_arrays([pa.array([None if v is None else str(v) for v in column] if as_text else column, type_)
                                     for column, as_text, type_ in zip(values, text, types)], names=list(columns))

    def feed(raw: bytes) -> None:
        docs = bson.decode_all(raw)
        values = [[doc.get(key) for doc in docs] for key in columns]
        if not sink:
            text.extend(not typed(column) for column in values)
            sink.append(pq.ParquetWriter(path, table(values, [None] * len(columns)).schema, compression="zstd"))
        pending.append(table(values, sink[0].schema.types))
        if sum(t.num_rows for t in pending) >= group:
            flush()

    def flush() -> None:
        sink[0].write_table(pa.concat_tables(pending), row_group_size=group)
        pending.clear()

    def finish() -> None:
        if pending:
            flush()
        sink[0].close()
        durable(open(path, "rb+"))
    return feed, finish


FLOORS = {"csv": csv_floor, "json": json_floor, "ndjson": json_floor, "xlsx": xlsx_floor, "parquet": parquet_floor}


def service_side(fmt: str, path: Path, columns: Sequence[str]) -> Side:
    """What an encoder process runs for the same request: the thing the writer stage measures."""
    from service.pipeline import ExportPipeline
    pipeline = ExportPipeline(validate_request(job_body(fmt, columns)), path, {"collection": "tasks"})
    return pipeline.feed, pipeline.finish


def cpu_timed(fn: Callable[[], Any]) -> float:
    """CPU seconds of this process: both sides are single-threaded, and CPU time does not charge a neighbour's load
    to whichever side ran with it, as wall time would."""
    started = time.process_time()
    fn()
    return time.process_time() - started


async def stage_writers(bench: Bench) -> Section:
    """Service and floor write side by side, batch by batch, alternating which goes first; each batch (and the finish)
    counts with its best time over the repeats: noise comes in bursts longer than a batch, so both sides meet the same
    bursts and the best times shed them. Nothing else runs meanwhile, so this may block the loop."""
    section = Section(f"Writer pipeline against the bare libraries (rows per CPU second, batches of {BATCH_ROWS:,} "
                      f"generated documents, each batch's best of {bench.sizes.writer_repeats})",
                      ["format", "rows", "service pipeline", "floor", "CPU µs a row, service / floor", "ratio", "target"])
    batches = raw_batches(max(bench.sizes.writer_rows[fmt] for fmt in bench.writer_formats))
    for fmt in bench.writer_formats:
        rows, base, columns = bench.sizes.writer_rows[fmt], SCALAR_CASES.get(fmt, fmt), columns_of(batches, fmt in SCALAR_CASES)
        best = {side: [float("inf")] * (rows // BATCH_ROWS + 1) for side in ("service", "floor")}
        for repeat in range(bench.sizes.writer_repeats):
            sides = {"service": service_side(base, bench.work / f"service.{fmt}", columns),
                     "floor": FLOORS[base](bench.work / f"floor.{fmt}", columns)}
            for index, raw in enumerate(batches[: rows // BATCH_ROWS]):
                for side in sorted(sides, reverse=(index + repeat) % 2 == 1):
                    best[side][index] = min(best[side][index], cpu_timed(lambda: sides[side][0](raw)))
            for side, (_, finish) in sides.items():
                best[side][-1] = min(best[side][-1], cpu_timed(finish))
        service, floor = rows / sum(best["service"]), rows / sum(best["floor"])
        ratio, target = service / floor, FLOOR_TARGETS[fmt]
        verdict = section.judge(f"writer pipeline {fmt} against the floor", f"{ratio:.2f}×", f"≥ {target}", ratio >= target)
        section.rows.append([fmt, f"{rows:,}", f"{service:,.0f}", f"{floor:,.0f}", f"{1e6 / service:.1f} / {1e6 / floor:.1f}",
                             f"{ratio:.2f}", verdict])
        log(f"writers {fmt}: service {service:,.0f} rows/s, floor {floor:,.0f}")
    return section


# --- the service as a child process, driven over HTTP and Socket.IO ---------------------------------------------
def child_command() -> list[str]:
    """Through -c, not this file's path: encoder processes re-import a main module that has a path, which would
    charge them this script's imports."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from scripts.bench import main; sys.exit(main())"]


async def serve(args: argparse.Namespace) -> None:
    """The service in this process, settings from the environment, until stdin closes."""
    if args.inproc:
        replay_batches()  # made before the service starts: made on its loop, they would stall the first export's probes
    runner = web.AppRunner(create_app(settings_from_env(), source=InProcessSource() if args.inproc else None), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(json.dumps({"pid": os.getpid(), "port": runner.addresses[0][1]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


@dataclass
class Run:
    seconds: float  # from the first request to the last end event
    ends: list[tuple[str, dict[str, Any]]]  # each job's end event and its data
    events: list[list[tuple[float, str]]]  # each job's events from its subscription, the first at that time

    def failure(self) -> str | None:
        """The error code of the first job that did not complete."""
        return next((str((data.get("error") or {}).get("code") or name) for name, data in self.ends if name != "export-completed"), None)


@dataclass
class Service:
    url: str
    pid: int
    http: aiohttp.ClientSession
    sio: socketio.AsyncClient = field(default_factory=lambda: socketio.AsyncClient(reconnection=False))
    events: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    ended: dict[str, asyncio.Future[tuple[str, dict[str, Any]]]] = field(default_factory=dict)

    def on(self, name: str, data: dict[str, Any]) -> None:
        self.events.setdefault(data["id"], []).append((time.monotonic(), name))
        if name in END_EVENTS and not self.ended.setdefault(data["id"], asyncio.Future()).done():
            self.ended[data["id"]].set_result((name, data))

    async def create(self, body: dict[str, Any]) -> str:
        async with self.http.post(f"{self.url}/api/exports", json=body) as resp:
            if resp.status != 202:
                raise RuntimeError(f"creating an export failed: {resp.status} {await resp.text()}")
            job_id: str = (await resp.json())["id"]
        self.events[job_id] = [(time.monotonic(), "subscribe")]
        ack = await self.sio.call("subscribe", {"id": job_id}, timeout=30)
        if not ack.get("ok"):
            raise RuntimeError(f"cannot follow job {job_id}: {ack}")
        if ack["job"]["status"] in ("completed", "failed", "cancelled"):  # it ended before the subscription
            self.on(f"export-{ack['job']['status']}", ack["job"])
        return job_id

    async def run(self, bodies: Sequence[dict[str, Any]], check: bool = True) -> Run:
        """Every job created (and followed) before any is waited for, so they run at once; deleted after. With check,
        raises when one did not complete."""
        started, ids = time.monotonic(), []
        try:
            for body in bodies:
                ids.append(await self.create(body))
            ends = await asyncio.wait_for(asyncio.gather(*(self.ended.setdefault(job_id, asyncio.Future()) for job_id in ids)), 900)
            run = Run(time.monotonic() - started, ends, [self.events[job_id] for job_id in ids])
        finally:
            for job_id in ids:
                async with self.http.delete(f"{self.url}/api/exports/{job_id}") as resp:
                    await resp.read()
        if check and run.failure():
            raise RuntimeError(f"an export of {bodies} did not complete: {run.failure()}")
        return run


@contextlib.asynccontextmanager
async def service_child(bench: Bench, max_concurrent: int, inproc: bool) -> AsyncIterator[Service]:
    # A directory of its own: a service sweeps its export directory of files it does not know.
    env = {**os.environ, "EXPORT_MONGO_URL": bench.mongo_url, "EXPORT_DB": DB_NAME, "EXPORT_DIR": tempfile.mkdtemp(dir=bench.work),
           "EXPORT_JOBS_COLLECTION": f"bench_jobs_{secrets.token_hex(4)}", "EXPORT_MAX_CONCURRENT": str(max_concurrent),
           "EXPORT_MAX_ACTIVE_PER_USER": "100", "EXPORT_PORT": "0"}
    proc = await asyncio.create_subprocess_exec(*child_command(), "serve", *(["--inproc"] if inproc else []), cwd=ROOT,
                                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 120) or b'{"error": "the service did not start"}')
        async with aiohttp.ClientSession() as http:
            service = Service(f"http://127.0.0.1:{ready['port']}", ready["pid"], http)
            for name in EVENTS:
                service.sio.on(name, functools.partial(service.on, name))
            await service.sio.connect(service.url, transports=["websocket"])
            try:
                yield service
            finally:
                await service.sio.disconnect()
    finally:
        proc.stdin.close()  # the child ends when its stdin closes; read to EOF so it cannot block on a full pipe
        try:
            await asyncio.wait_for(proc.stdout.read(), 60)
            await asyncio.wait_for(proc.wait(), 30)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


# --- stages against the service ---------------------------------------------------------------------------------
async def peak_rss(service: Service, body: dict[str, Any]) -> tuple[float, float]:
    """Peak RSS (MiB) of the service and of its largest encoder during one export, sampled every 20 ms: psutil has no
    high-water mark, and an encoder (a child of the fork server, whose children keep its command line) lives only as
    long as its export."""
    top, peaks = psutil.Process(service.pid), [0.0, 0.0]

    async def sample() -> None:
        while True:
            with contextlib.suppress(psutil.NoSuchProcess):  # an encoder may end between listing and reading
                servers = [child for child in top.children() if "forkserver" in " ".join(child.cmdline())]
                below = [e.memory_info().rss / 2**20 for server in servers for e in server.children()]
                peaks[:] = max(peaks[0], top.memory_info().rss / 2**20), max([peaks[1], *below])
            await asyncio.sleep(0.02)
    sampler = asyncio.create_task(sample())
    try:
        await service.run([body])
    finally:
        sampler.cancel()
    return peaks[0], peaks[1]


async def stage_rss(bench: Bench) -> Section:
    """Per format, in a service process of its own, an export of the small size then one of the large size: what an
    earlier format's large export left in the service's heap would hide a later format's growth."""
    small, large = bench.sizes.rss_rows
    section = Section("Peak RSS (MiB) during one export, rows from an in-process source",
                      ["format", f"service {small:,}", f"service {large:,}", "Δ", f"encoder {small:,}", f"encoder {large:,}",
                       "Δ", "limit"], "Sampled every 20 ms with psutil: the service process (one per format, the small export first) "
                                      "and the export's encoder process (one per export).")
    for fmt in FORMATS:
        async with service_child(bench, 1, inproc=True) as service:
            (s1, e1), (s2, e2) = [await peak_rss(service, bench.body(fmt, rows)) for rows in (small, large)]
        growth = max(s2 - s1, e2 - e1)
        verdict = section.judge(f"peak RSS growth {fmt}, {large:,} rows against {small:,}", f"{growth:+.1f} MiB",
                                f"≤ {RSS_GROWTH_LIMIT_MIB}", growth <= RSS_GROWTH_LIMIT_MIB)
        section.rows.append([fmt, f"{s1:.1f}", f"{s2:.1f}", f"{s2 - s1:+.1f}", f"{e1:.1f}", f"{e2:.1f}", f"{e2 - e1:+.1f}", verdict])
        log(f"rss {fmt}: service {s1:.1f} → {s2:.1f} MiB, encoder {e1:.1f} → {e2:.1f} MiB")
    return section


def p(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def stage_live(bench: Bench, rows: dict[str, int], inproc: bool) -> Section:
    """Four exports at once (2 xlsx, 2 csv) while /healthz is probed every 50 ms, after a second of baseline."""
    latencies: list[float] = []
    errors: list[int] = []

    async def probe(service: Service) -> None:
        while True:
            started = time.perf_counter()
            try:
                async with service.http.get(f"{service.url}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.read()
                    errors.extend([resp.status] if resp.status != 200 else [])
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors.append(0)
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.05)
    async with service_child(bench, 4, inproc) as service:
        prober = asyncio.create_task(probe(service))
        try:
            await asyncio.sleep(1.0)
            run = await service.run([bench.body(fmt, rows[fmt]) for fmt in LIVE_PLAN])
        finally:
            prober.cancel()
    source, p99 = "an in-process source" if inproc else "the embedded server", p(latencies, 99)
    section = Section(f"Responsiveness with 4 exports at once (2 xlsx, 2 csv; rows from {source})", ["figure", "value", "limit"],
                      f"All four took {run.seconds:.1f} s. Gaps are measured at the Socket.IO client, from the subscription "
                      "to the job's end event; events a waiting job sends again count.")
    section.rows += [["/healthz p50", f"{p(latencies, 50):.1f} ms", ""],
                     ["/healthz p99", f"{p99:.1f} ms", section.judge(f"/healthz p99 with 4 exports, rows from {source}",
                                                                     f"{p99:.1f} ms", f"< {HEALTH_P99_LIMIT_MS} ms", p99 < HEALTH_P99_LIMIT_MS)],
                     ["/healthz max", f"{max(latencies):.1f} ms ({len(latencies)} probes every 50 ms, {len(errors)} errors)", ""]]
    for n, (fmt, events) in enumerate(zip(LIVE_PLAN, run.events), 1):
        gap = max(b[0] - a[0] for a, b in zip(events, events[1:]))
        section.rows.append([f"longest time without an event, {fmt}-{n}", f"{gap:.2f} s", section.judge(
            f"longest time without an event, {fmt}-{n} of 4, rows from {source}", f"{gap:.2f} s", f"≤ {EVENT_GAP_LIMIT_S} s",
            gap <= EVENT_GAP_LIMIT_S)])
    first = max(next((t for t, name in e if name == "export-processing"), e[-1][0]) - e[0][0] for e in run.events)
    section.rows.append(["wait for the first `export-processing` event, worst", f"{first:.2f} s", ""])
    log(f"live ({source}): /healthz p99 {p99:.1f} ms; all four done in {run.seconds:.1f} s")
    return section


def floor_export(fmt: str, columns: Sequence[str], rows: int, path: Path) -> int:
    """One export by the floor alone, in a pool process; returns the process id."""
    (feed, finish), batches = FLOORS[fmt](path, columns), replay_batches()
    for index in range(rows // BATCH_ROWS):
        feed(batches[index % len(batches)])
    finish()
    return os.getpid()


async def floor_seconds(pool: ProcessPoolExecutor, bench: Bench, fmt: str, exports: list[int]) -> tuple[float, set[int]]:
    loop, started = asyncio.get_running_loop(), time.monotonic()
    pids = await asyncio.gather(*(loop.run_in_executor(pool, floor_export, fmt, bench.columns, rows, bench.work / f"floor-{n}.{fmt}")
                                  for n, rows in enumerate(exports)))
    return time.monotonic() - started, set(pids)


async def stage_scale(bench: Bench) -> Section:
    """Pairs of one export then two at once, back to back, and the floor's pair between them: the speed of a core here
    drifts over tens of seconds, and a pair meets one speed."""
    section = Section("One export against two at once (rows from an in-process source)",
                      ["format", "rows per export", "1 export (rows/s)", "2 exports (aggregate rows/s)", "pairs: service; floor",
                       "ratio", "floor's ratio", "target"], f"{bench.sizes.scale_pairs} pairs, wall time from the first request "
                      "to the last end event; rows/s are medians, a ratio is the median of its pairs'. The floor's ratio: the "
                      "writer floor as one process against two over the same rows, run between the service's.")
    with ProcessPoolExecutor(max_workers=2, initializer=replay_batches) as pool:
        while len((await floor_seconds(pool, bench, "csv", [BATCH_ROWS, BATCH_ROWS]))[1]) < 2:
            pass  # until both pool processes have their batches made: none of that is timed later
        async with service_child(bench, 2, inproc=True) as service:
            for fmt in bench.scale_formats:
                rows = bench.sizes.scale_rows // (4 if fmt == "xlsx" else 1)
                body, ones, twos, floors = bench.body(fmt, rows), [], [], []
                await service.run([bench.body(fmt, 2 * BATCH_ROWS)])  # warm-up
                for _ in range(bench.sizes.scale_pairs):
                    ones.append((await service.run([body])).seconds)
                    twos.append((await service.run([body, body])).seconds)
                    one, _ = await floor_seconds(pool, bench, fmt, [rows])
                    two, _ = await floor_seconds(pool, bench, fmt, [rows, rows])
                    floors.append(2 * one / two)
                pairs = [2 * one / two for one, two in zip(ones, twos)]
                ratio, floor = statistics.median(pairs), statistics.median(floors)
                verdict = section.judge(f"two concurrent {fmt} exports against one (the floor's own ratio {floor:.2f})",
                                        f"{ratio:.2f}×", f"≥ {SCALE_TARGET}", ratio >= SCALE_TARGET)
                section.rows.append([fmt, f"{rows:,}", f"{rows / statistics.median(ones):,.0f}", f"{2 * rows / statistics.median(twos):,.0f}",
                                     f"{', '.join(f'{r:.2f}' for r in pairs)}; {', '.join(f'{r:.2f}' for r in floors)}",
                                     f"{ratio:.2f}", f"{floor:.2f}", verdict])
                log(f"scale {fmt}: ratio {ratio:.2f}, floor {floor:.2f}")
    return section


async def stage_e2e(bench: Bench) -> Section:
    """The request a user makes first: the whole collection, whole documents (tables discover their columns)."""
    section = Section("End to end against the embedded server", ["format", "rows", "seconds", "rows/s"],
                      f"Request: the whole `{bench.collection}` collection as whole documents (csv/xlsx discover their "
                      "columns); seconds from the job's snapshot. The embedded server is the bottleneck.")
    async with service_child(bench, 1, inproc=False) as service:
        await service.run([bench.body("json", 2 * BATCH_ROWS)])  # starts the encoders' fork server
        for fmt in FORMATS:
            run = await service.run([bench.body(fmt, fields=False)], check=False)
            if run.failure():
                section.rows.append([fmt, f"failed: {run.failure()}", "", ""])
                continue
            end = run.ends[0][1]
            seconds = end.get("duration_seconds") or run.seconds
            section.rows.append([fmt, f"{end['processed']:,}", f"{seconds:.1f}", f"{end['processed'] / seconds:,.0f}"])
            log(f"e2e {fmt}: {end['processed'] / seconds:,.0f} rows/s")
    return section


def seed(url: str, rows: int) -> str:
    """A collection of rows generated documents, filled once and reused by later runs; returns its name."""
    name = f"tasks_{rows}"
    with contextlib.closing(MongoClient(url)) as client:
        counted = list(client[DB_NAME][name].aggregate([{"$count": "n"}]))
    if not counted or counted[0]["n"] != rows:
        log(f"seeding {rows:,} documents into {DB_NAME}.{name} (once)")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_data.py"), "--url", url, "--db", DB_NAME, "--collection",
                        name, "--count", str(rows), "--seed", str(SEED), "--drop"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return name


def drop_jobs_collections(url: str) -> None:
    with contextlib.closing(MongoClient(url)) as client:
        for name in client[DB_NAME].list_collection_names():
            if name.startswith("bench_jobs_"):
                client[DB_NAME].drop_collection(name)


# --- the run ------------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    sizes: Sizes
    work: Path
    writer_formats: list[str]
    scale_formats: list[str]
    mongo_url: str = ""
    collection: str = ""
    columns: list[str] = field(default_factory=lambda: columns_of(replay_batches()))

    def body(self, fmt: str, limit: int = 0, fields: bool = True) -> dict[str, Any]:
        return job_body(fmt, self.columns if fields else (), limit, self.collection)


STAGES: dict[str, Callable[[Bench], Awaitable[Section]]] = {  # in report order
    "writers": stage_writers,
    "rss": stage_rss,
    "live": lambda bench: stage_live(bench, bench.sizes.live_rows, inproc=True),
    "busy": lambda bench: stage_live(bench, bench.sizes.busy_rows, inproc=False),
    "scale": stage_scale,
    "e2e": stage_e2e,
}


async def run(args: argparse.Namespace) -> None:
    started, load = datetime.now(timezone.utc), " ".join(f"{x:.2f}" for x in os.getloadavg())
    sections = []
    stages = [name for name in STAGES if name in args.only.split(",")] if args.only else list(STAGES)
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp, contextlib.ExitStack() as stack:
        bench = Bench(QUICK if args.quick else FULL, Path(tmp), args.writer_formats.split(","), args.scale_formats.split(","))
        for name in stages:
            if name != "writers" and not bench.mongo_url:
                server = stack.enter_context(EmbeddedMongo(Path(args.db_dir), db_file="bench.db"))
                stack.callback(drop_jobs_collections, server.url)
                bench.collection = await asyncio.to_thread(seed, server.url, bench.sizes.e2e_rows)
                # The connect timeout the service gives an embedded server of its own: a busy one is slow to accept.
                bench.mongo_url = f"{server.url}&connectTimeoutMS={EMBEDDED_CONNECT_TIMEOUT_MS}"
            log(name)
            sections.append(await STAGES[name](bench))
    took = (datetime.now(timezone.utc) - started).total_seconds() / 60
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    out = ["## Benchmark", "", f"{started:%Y-%m-%d %H:%M} UTC · {platform.machine()} · {cpu} · {psutil.cpu_count()} cores · Python "
           f"{platform.python_version()} · load average {load} at start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end"
           f" · run took {took:.1f} min" + (" · quick sizes" if args.quick else ""), "",
           "Rerun: `make bench` (`make bench-quick` for a smoke run); the report is also written to `var/bench.md`.", "",
           *(line for section in sections for line in section.render()),
           "### Acceptance", "", *(f"- {line}" for section in sections for line in section.accept), ""]
    print("\n".join(out))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(out))
    log(f"report written to {REPORT.relative_to(ROOT)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the export service and print a markdown report.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("run", help="run the benchmark")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    bench.add_argument("--only", default="", help=f"comma-separated stages among {', '.join(STAGES)}")
    bench.add_argument("--writer-formats", default=",".join(WRITER_FORMATS), help="formats of the writer stage")
    bench.add_argument("--scale-formats", default="csv,xlsx", help="formats of the one-against-two stage")
    bench.add_argument("--db-dir", default=str(ROOT / "var" / "bench" / "db"), help="where the embedded database keeps its file")
    commands.add_parser("serve", help="the service until stdin closes, settings from EXPORT_* (run's child)").add_argument(
        "--inproc", action="store_true", help="rows from the in-process source instead of the database")
    args = parser.parse_args(argv)
    if args.command == "run" and set(filter(None, args.only.split(","))) - set(STAGES):
        parser.error(f"--only: stages are {', '.join(STAGES)}")
    # SIGTERM unwinds like Ctrl-C, so the embedded database is stopped and temporary files removed; a service child
    # exits by itself when its stdin closes with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(run(args) if args.command == "run" else serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
