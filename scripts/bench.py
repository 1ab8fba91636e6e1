"""Benchmark of the export service: a markdown report, printed and written to var/bench.md.

    make bench            # every stage (scripts/bench.py run), about twelve minutes on two cores
    make bench-quick      # every stage at small sizes, under two minutes: a smoke run
    .venv/bin/python scripts/bench.py run --only writers,instructions --writer-formats csv,parquet

Floors (the bare libraries) run in the same run, beside the service, so both meet the same neighbours. The
service runs as a child process driven over HTTP and Socket.IO; rss, live and scale give it an in-process
source of raw BSON batches (create_app's `source`), e2e and busy read the embedded server. Exits 0 whether or
not a target is met.
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
import pickle
import platform
import re
import secrets
import shutil
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
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, NamedTuple, Sequence

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

# pyarrow, xlsxwriter and the writers are imported where they are used: the service child imports this module,
# and its RSS is measured.

SEED, BATCH_ROWS, DB_NAME = 42, 1000, "bench"
FORMATS = ("csv", "json", "ndjson", "xlsx")
TABULAR = ("csv", "xlsx", "parquet")  # requests name the generator's top-level keys as fields; JSON writes documents
# Parquet once more with only the top-level keys whose values are scalars, which PyMongoArrow reads undecoded.
SCALAR_CASES = {"parquet-scalars": "parquet"}
WRITER_FORMATS = (*FORMATS, "parquet", *SCALAR_CASES)
REPORT = ROOT / "var" / "bench.md"
END_EVENTS = ("export-completed", "export-failed", "export-cancelled")
EVENTS = ("export-fetching", "export-processing", "export-finalizing", *END_EVENTS)
# Targets each figure is judged against.
FLOOR_TARGETS = {"csv": 0.7, "json": 0.8, "ndjson": 0.8, "xlsx": 0.9, "parquet": 0.6, "parquet-scalars": 1.0}
RSS_GROWTH_LIMIT_MIB = 50
HEALTH_P99_LIMIT_MS = 50
EVENT_GAP_LIMIT_S = 1.0  # the README's promise: a job is never quiet for more than a second
SCALE_TARGET = 1.6
LIVE_PLAN = ("xlsx", "xlsx", "csv", "csv")


@dataclass(frozen=True)
class Sizes:
    writer_rows: dict[str, int]
    writer_repeats: int
    instruction_rows: dict[str, int]
    rss_rows: tuple[int, int]
    live_rows: dict[str, int]
    busy_rows: dict[str, int]  # each of the four exports the embedded server serves at once
    scale_rows: int
    scale_pairs: int
    e2e_rows: int  # also the size of the seeded collection


FULL = Sizes({**dict.fromkeys(WRITER_FORMATS, 50_000), "xlsx": 20_000}, 5, {**dict.fromkeys(FORMATS, 5_000), "xlsx": 2_000},
             (100_000, 1_000_000), {"csv": 250_000, "xlsx": 60_000}, {"csv": 40_000, "xlsx": 40_000}, 100_000, 5, 100_000)
QUICK = Sizes({**dict.fromkeys(WRITER_FORMATS, 10_000), "xlsx": 4_000}, 2, {**dict.fromkeys(FORMATS, 1_000)},
              (5_000, 20_000), {"csv": 30_000, "xlsx": 6_000}, {"csv": 6_000, "xlsx": 3_000}, 16_000, 3, 6_000)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


# Floors: bson.decode_all plus the bare library call, each a (feed(raw), finish()) pair like the service's
# pipeline, the file made durable as the service does.
Side = tuple[Callable[[bytes], None], Callable[[], None]]


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

    def finish() -> None:
        book.close()
        durable(fh)
    return feed, finish


def parquet_floor(path: Path, columns: Sequence[str]) -> Side:
    """A pa.array per column with pyarrow's own types (str() where it has none, settled by the first batch),
    written by pq.ParquetWriter with zstd in row groups of the service's default size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def typed(values: list[Any]) -> bool:
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return False
        return True
    group, pending, as_text, sink = validate_request(job_body("parquet")).parquet.row_group_size, [], [], None

    def feed(raw: bytes) -> None:
        nonlocal as_text, sink
        docs = bson.decode_all(raw)
        values = [[doc.get(key) for doc in docs] for key in columns]
        as_text = as_text or [not typed(column) for column in values]
        values = [[None if v is None else str(v) for v in column] if text else column for column, text in zip(values, as_text)]
        if sink is None:
            sink = pq.ParquetWriter(path, pa.Table.from_arrays([pa.array(v) for v in values], names=list(columns)).schema, compression="zstd")
        pending.append(pa.Table.from_arrays([pa.array(v, f.type) for v, f in zip(values, sink.schema)], schema=sink.schema))
        if sum(t.num_rows for t in pending) >= group:
            flush()

    def flush() -> None:
        sink.write_table(pa.concat_tables(pending), row_group_size=group)
        pending.clear()

    def finish() -> None:
        if pending:
            flush()
        sink.close()
        durable(open(path, "rb+"))
    return feed, finish


FLOORS = {"csv": csv_floor, "json": json_floor, "ndjson": json_floor, "xlsx": xlsx_floor, "parquet": parquet_floor}


def service_side(fmt: str, path: Path, columns: Sequence[str]) -> Side:
    """What an encoder process runs for the same request: the thing the writer stages measure."""
    from service.pipeline import ExportPipeline
    pipeline = ExportPipeline(validate_request(job_body(fmt, columns)), path, {"collection": "tasks"})
    return pipeline.feed, pipeline.finish


# --- writer stages --------------------------------------------------------------------------------------------
class Versus(NamedTuple):
    fmt: str
    rows: int
    service: float  # rows per CPU second, or instructions per row
    floor: float


def cpu_timed(fn: Callable[[], Any]) -> float:
    """CPU seconds of this process: both sides are single-threaded, and CPU time does not charge a
    neighbour's load to whichever side ran with it, as wall time would."""
    started = time.process_time()
    fn()
    return time.process_time() - started


def stage_writers(bench: Bench) -> list[Versus]:
    """Service and floor write their files side by side, batch by batch, alternating which goes first; each batch
    (and the finish) counts with its best time over the repeats: noise comes in bursts longer than a batch, so
    both sides meet the same bursts and the best times shed them."""
    sizes, figures = bench.sizes, []
    batches = raw_batches(max(sizes.writer_rows[fmt] for fmt in bench.writer_formats))
    for fmt in bench.writer_formats:
        rows, base = sizes.writer_rows[fmt], SCALAR_CASES.get(fmt, fmt)
        columns = columns_of(batches, scalars_only=fmt in SCALAR_CASES)
        best = {side: [float("inf")] * (rows // BATCH_ROWS + 1) for side in ("service", "floor")}
        for repeat in range(sizes.writer_repeats):
            sides = {"service": service_side(base, bench.work / f"service.{fmt}", columns),
                     "floor": FLOORS[base](bench.work / f"floor.{fmt}", columns)}
            for index, raw in enumerate(batches[: rows // BATCH_ROWS]):
                for side in sorted(sides, reverse=(index + repeat) % 2 == 1):
                    best[side][index] = min(best[side][index], cpu_timed(lambda: sides[side][0](raw)))
            for side, (_, finish) in sides.items():
                best[side][-1] = min(best[side][-1], cpu_timed(finish))
        figures.append(Versus(fmt, rows, rows / sum(best["service"]), rows / sum(best["floor"])))
        log(f"writers {fmt}: service {figures[-1].service:,.0f} rows/s, floor {figures[-1].floor:,.0f}")
    return figures


def instructions_case(args: argparse.Namespace) -> None:
    """The pickled batches through one side, once; side 'none' only loads them: what the other two share."""
    batches = pickle.loads(Path(args.batches).read_bytes())
    if args.side != "none":
        path, columns = Path(args.export_dir) / f"{args.side}.{args.format}", columns_of(batches)
        feed, finish = service_side(args.format, path, columns) if args.side == "service" else FLOORS[args.format](path, columns)
        for raw in batches:
            feed(raw)
        finish()


def count_instructions(fmt: str, side: str, batches: Path) -> int:
    # A fixed hash seed: dict and set layouts, and so the count, are then the same from one run to the next.
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *child_command(),
               "instructions-case", fmt, side, str(batches), "--export-dir", str(batches.parent)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"})
    return int(re.search(r"Collected : (\d+)", done.stderr).group(1))  # type: ignore[union-attr]


def stage_instructions(bench: Bench) -> list[Versus]:
    """The writer stage's work in instructions executed: a figure that does not move with the machine's load."""
    if shutil.which("valgrind") is None:
        log("instructions: valgrind is not installed (Debian package valgrind); stage skipped")
        return []
    figures = []
    for fmt in FORMATS:
        rows, batches = bench.sizes.instruction_rows[fmt], bench.work / f"batches-{fmt}.pickle"
        batches.write_bytes(pickle.dumps(replay_batches()[: rows // BATCH_ROWS]))
        base = count_instructions(fmt, "none", batches)
        figures.append(Versus(fmt, rows, *((count_instructions(fmt, side, batches) - base) / rows for side in ("service", "floor"))))
        log(f"instructions {fmt}: service {figures[-1].service:,.0f} a row, floor {figures[-1].floor:,.0f}")
    return figures


# --- the service as a child process, driven over HTTP and Socket.IO ---------------------------------------------
def child_command() -> list[str]:
    """Through -c, not this file's path: encoder processes re-import a main module that has a path, which
    would charge them this script's imports."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from scripts.bench import main; sys.exit(main())"]


async def serve(args: argparse.Namespace) -> None:
    """The service in this process, settings from the environment, until stdin closes."""
    source = InProcessSource() if args.inproc else None
    runner = web.AppRunner(create_app(settings_from_env(), source=source), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(json.dumps({"pid": os.getpid(), "port": runner.addresses[0][1]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


class JobFailed(RuntimeError):
    def __init__(self, event: str, data: dict[str, Any]) -> None:
        error = data.get("error") or {}
        super().__init__(f"job {data['id']} ended with {event}: {error.get('code')}: {error.get('message')}")
        self.code = str(error.get("code") or event)


class Run(NamedTuple):
    seconds: float  # from the first request to the last end event
    server_cpu: float  # CPU seconds of the service process meanwhile
    encoder_cpu: float  # of every process under it
    ends: list[dict[str, Any]]  # each job's export-completed data
    events: list[list[tuple[float, str]]]  # each job's events from its subscription, the first at that time


def tree_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of pid, of everything under it): a process counts its own time and its reaped children's,
    so an encoder counts once whether or not its parent has waited for it."""
    top = psutil.Process(pid)
    own, below = top.cpu_times(), 0.0
    for child in top.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            below += sum(child.cpu_times()[:4])
    return own.user + own.system, below + own.children_user + own.children_system


@dataclass
class Service:
    url: str
    pid: int
    http: aiohttp.ClientSession
    sio: socketio.AsyncClient
    events: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    ended: dict[str, asyncio.Future[tuple[str, dict[str, Any]]]] = field(default_factory=dict)

    def on(self, name: str, data: dict[str, Any]) -> None:
        self.events.setdefault(data["id"], []).append((time.monotonic(), name))
        if name in END_EVENTS and not self.ended.setdefault(data["id"], asyncio.Future()).done():
            self.ended[data["id"]].set_result((name, data))

    async def run(self, bodies: Sequence[dict[str, Any]]) -> Run:
        """Every job created (and followed) before any is waited for, so they run at once; all are deleted after
        the measurement. Raises JobFailed when one does not complete."""
        cpu, started, ids = tree_cpu(self.pid), time.monotonic(), []
        for body in bodies:
            async with self.http.post(f"{self.url}/api/exports", json=body) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"creating an export failed: {resp.status} {await resp.text()}")
                ids.append((await resp.json())["id"])
            self.events[ids[-1]] = [(time.monotonic(), "subscribe")]
            ack = await self.sio.call("subscribe", {"id": ids[-1]}, timeout=30)
            if not ack.get("ok"):
                raise RuntimeError(f"cannot follow job {ids[-1]}: {ack}")
            if ack["job"]["status"] in ("completed", "failed", "cancelled"):  # it ended before the subscription
                self.on(f"export-{ack['job']['status']}", ack["job"])
        try:
            ends = [await asyncio.wait_for(self.ended.setdefault(job_id, asyncio.Future()), 900) for job_id in ids]
            seconds, after = time.monotonic() - started, tree_cpu(self.pid)
        finally:
            for job_id in ids:
                async with self.http.delete(f"{self.url}/api/exports/{job_id}") as resp:
                    await resp.read()
        for name, data in ends:
            if name != "export-completed":
                raise JobFailed(name, data)
        return Run(seconds, after[0] - cpu[0], after[1] - cpu[1], [d for _, d in ends], [self.events[i] for i in ids])


@contextlib.asynccontextmanager
async def service_child(bench: Bench, max_concurrent: int, inproc: bool) -> AsyncIterator[Service]:
    # A directory of its own: a service sweeps its export directory of files it does not know.
    env = {**os.environ, "EXPORT_MONGO_URL": bench.mongo_url, "EXPORT_DB": DB_NAME, "EXPORT_DIR": tempfile.mkdtemp(dir=bench.work),
           "EXPORT_JOBS_COLLECTION": f"bench_jobs_{secrets.token_hex(4)}", "EXPORT_MAX_CONCURRENT": str(max_concurrent),
           "EXPORT_MAX_ACTIVE_PER_USER": "100", "EXPORT_PORT": "0"}
    proc = await asyncio.create_subprocess_exec(*child_command(), "serve", *(["--inproc"] if inproc else []), cwd=ROOT, env=env,
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 120) or b'{"error": "the service child did not start"}')
        async with aiohttp.ClientSession() as http:
            service = Service(f"http://127.0.0.1:{ready['port']}", ready["pid"], http, socketio.AsyncClient(reconnection=False))
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
def encoders(top: psutil.Process) -> list[psutil.Process]:
    """The processes that run exports: the fork server's children (a fork keeps its parent's command line, so
    the fork server is told by its own), or the service's own children without one; never the resource tracker."""
    named = [(child, " ".join(child.cmdline())) for child in top.children()]
    servers = [child for child, line in named if "forkserver" in line]
    return [e for server in servers for e in server.children()] or [c for c, line in named if "resource_tracker" not in line]


async def sample_peaks(pid: int, peaks: list[float]) -> None:
    """RSS of pid and of its largest encoder, every 20 ms: psutil has no high-water mark, and an encoder lives
    only as long as its export."""
    top = psutil.Process(pid)
    while True:
        with contextlib.suppress(psutil.NoSuchProcess):  # an encoder may end between listing and reading
            below = [e.memory_info().rss for e in encoders(top)]
            peaks[:] = max(peaks[0], top.memory_info().rss / 2**20), max([peaks[1], *(rss / 2**20 for rss in below)])
        await asyncio.sleep(0.02)


async def stage_rss(bench: Bench) -> list[tuple[str, int, float, float]]:
    """One fresh service process per case, two cases at a time (peaks are per process), the longest first."""
    gate, cases = asyncio.Semaphore(2), sorted(((f, r) for r in bench.sizes.rss_rows for f in FORMATS), key=lambda c: (c[0] != "xlsx", -c[1]))

    async def one(fmt: str, rows: int) -> tuple[str, int, float, float]:  # format, rows, peak MiB of service, of encoder
        async with gate, service_child(bench, 1, inproc=True) as service:
            peaks = [0.0, 0.0]
            sampler = asyncio.create_task(sample_peaks(service.pid, peaks))
            await service.run([bench.body(fmt, rows)])
            sampler.cancel()
            log(f"rss {fmt} {rows:,}: service {peaks[0]:.1f} MiB, encoder {peaks[1]:.1f} MiB")
            return fmt, rows, peaks[0], peaks[1]

    return list(await asyncio.gather(*(one(fmt, rows) for fmt, rows in cases)))


async def probe_health(service: Service, latencies: list[float], errors: list[int]) -> None:
    while True:
        started = time.perf_counter()
        try:
            async with service.http.get(f"{service.url}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                await resp.read()
                errors += [resp.status] if resp.status != 200 else []
        except (aiohttp.ClientError, asyncio.TimeoutError):
            errors.append(0)
        latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.05)


async def live(bench: Bench, rows: dict[str, int], inproc: bool) -> list[tuple[list[float], list[int], Run]]:
    """Four exports at once (2 xlsx, 2 csv) while /healthz is probed every 50 ms: (latencies, errors, the run)."""
    async with service_child(bench, 4, inproc) as service:
        latencies: list[float] = []
        errors: list[int] = []
        prober = asyncio.create_task(probe_health(service, latencies, errors))
        await asyncio.sleep(1.0)  # a baseline before the exports start
        run = await service.run([bench.body(fmt, rows[fmt]) for fmt in LIVE_PLAN])
        prober.cancel()
    log(f"live: /healthz p99 {p(latencies, 99):.1f} ms; longest quiet {max(quiet(run)[0]):.2f} s")
    return [(latencies, errors, run)]


def quiet(run: Run) -> tuple[list[float], list[float]]:
    """Each job's longest time without an event, from its subscription to its end (repeated events count), and
    its wait for the first export-processing event."""
    return ([max(b[0] - a[0] for a, b in zip(events, events[1:])) for events in run.events],
            [next((t for t, name in events if name == "export-processing"), events[-1][0]) - events[0][0] for events in run.events])


class Scale(NamedTuple):
    fmt: str
    rows: int
    ones: list[Run]
    twos: list[Run]
    floor_pairs: list[float]  # the floor's ratio in each pair, one process against two over the same rows


def floor_export(fmt: str, columns: Sequence[str], rows: int, path: Path) -> int:
    """One export by the floor alone, in a pool process; returns the process id."""
    (feed, finish), batches = FLOORS[fmt](path, columns), replay_batches()
    for index in range(rows // BATCH_ROWS):
        feed(batches[index % len(batches)])
    finish()
    return os.getpid()


async def floor_seconds(pool: ProcessPoolExecutor, bench: Bench, fmt: str, exports: list[int]) -> tuple[float, list[int]]:
    loop, started = asyncio.get_running_loop(), time.monotonic()
    pids = await asyncio.gather(*(loop.run_in_executor(pool, floor_export, fmt, bench.columns, rows, bench.work / f"floor-{n}.{fmt}")
                                  for n, rows in enumerate(exports)))
    return time.monotonic() - started, list(pids)


async def stage_scale(bench: Bench) -> list[Scale]:
    """Pairs of one export then two at once, back to back, and the floor's pair between them: the speed of a core
    here drifts over tens of seconds, and a pair meets one speed."""
    figures = []
    with ProcessPoolExecutor(max_workers=2, initializer=replay_batches) as pool:
        while len(set((await floor_seconds(pool, bench, "csv", [BATCH_ROWS, BATCH_ROWS]))[1])) < 2:
            pass  # until both pool processes have their batches made: none of that is timed later
        async with service_child(bench, 2, inproc=True) as service:
            for fmt in bench.scale_formats:
                rows = bench.sizes.scale_rows // (4 if fmt == "xlsx" else 1)
                body = bench.body(fmt, rows)
                await service.run([bench.body(fmt, 2 * BATCH_ROWS)])  # warm-up
                figure = Scale(fmt, rows, [], [], [])
                for _ in range(bench.sizes.scale_pairs):
                    figure.ones.append(await service.run([body]))
                    figure.twos.append(await service.run([body, body]))
                    one, _ = await floor_seconds(pool, bench, fmt, [rows])
                    two, _ = await floor_seconds(pool, bench, fmt, [rows, rows])
                    figure.floor_pairs.append(2 * one / two)
                log(f"scale {fmt}: ratio {pair_ratios(figure)}; floor {figure.floor_pairs}")
                figures.append(figure)
    return figures


def pair_ratios(s: Scale) -> list[float]:
    """Aggregate throughput of two exports against one, in each pair."""
    return [2 * one.seconds / two.seconds for one, two in zip(s.ones, s.twos)]


async def stage_e2e(bench: Bench) -> list[tuple[str, Run | None, list[str]]]:
    """The request a user makes first: the whole collection, whole documents (tables discover their columns).
    Each: (format, the run, error codes of failed attempts); an export gets two."""
    figures = []
    async with service_child(bench, 1, inproc=False) as service:
        await service.run([bench.body("json", 2 * BATCH_ROWS)])  # starts the encoders' fork server
        for fmt in FORMATS:
            run, failures = None, []
            while run is None and len(failures) < 2:
                try:
                    run = await service.run([bench.body(fmt, fields=False)])
                except JobFailed as exc:
                    log(f"e2e {fmt}: {exc}")
                    failures.append(exc.code)
            figures.append((fmt, run, failures))
    return figures


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


# --- report: one renderer per section, each adding its acceptance lines ----------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|",
            *("| " + " | ".join(map(str, row)) + " |" for row in rows), ""]


def p(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def render_writers(figures: list[Versus], bench: Bench, accept: list[str]) -> list[str]:
    rows = []
    for fmt, n, service, floor in figures:
        target, ratio = FLOOR_TARGETS[fmt], service / floor
        rows.append([fmt, f"{n:,}", f"{service:,.0f}", f"{floor:,.0f}", f"{1e6 / service:.1f} / {1e6 / floor:.1f}", f"{ratio:.2f}",
                     f"≥ {target} {verdict(ratio >= target)}"])
        accept.append(f"writer pipeline {fmt}: {ratio:.2f}× the floor (target ≥ {target}) — {verdict(ratio >= target)}")
    return [f"### Writer pipeline against the bare libraries (rows per CPU second, batches of {BATCH_ROWS:,} generated "
            f"documents, each batch's best of {bench.sizes.writer_repeats})", "",
            *table(["format", "rows", "service pipeline", "floor", "CPU µs a row, service / floor", "ratio", "target"], rows),
            "Service: `ExportPipeline(validate_request(body), ...)`: `feed(raw)` per batch, then `finish()` (decode, render, "
            "write, fsync); tables name the top-level keys as `fields` (parquet-scalars only those never nested), JSON "
            "writes whole documents. Floor: `bson.decode_all` plus `csv.writer` or xlsxwriter `constant_memory` `write_row` "
            "on `str()` values, `orjson.dumps(doc, default=str)`, or a pyarrow Table (its own types, `str()` where it has "
            "none) by `pq.ParquetWriter` with zstd in row groups of the service's default size; flushed and fsynced.", ""]


def render_instructions(figures: list[Versus], bench: Bench, accept: list[str]) -> list[str]:
    rows = [[fmt, f"{n:,}", f"{service:,.0f}", f"{floor:,.0f}", f"{floor / service:.2f}"] for fmt, n, service, floor in figures]
    return ["### Instructions per row, writer pipeline against the bare libraries (valgrind callgrind)", "",
            *table(["format", "rows", "service pipeline", "floor", "ratio"], rows),
            "The same work counted in instructions: a figure the machine's load does not move, but blind to caches and "
            "memory; the targets are judged on the timed table.", ""]


def render_rss(figures: list[tuple[str, int, float, float]], bench: Bench, accept: list[str]) -> list[str]:
    (small, large), peaks, rows = bench.sizes.rss_rows, {(f[0], f[1]): f[2:] for f in figures}, []
    for fmt in FORMATS:
        (s1, e1), (s2, e2) = peaks[fmt, small], peaks[fmt, large]
        ok = max(s2 - s1, e2 - e1) <= RSS_GROWTH_LIMIT_MIB
        rows.append([fmt, f"{s1:.1f}", f"{s2:.1f}", f"{s2 - s1:+.1f}", f"{e1:.1f}", f"{e2:.1f}", f"{e2 - e1:+.1f}",
                     f"≤ {RSS_GROWTH_LIMIT_MIB} {verdict(ok)}"])
        accept.append(f"peak RSS {fmt}: {large:,} rows vs {small:,}: service {s2 - s1:+.1f} MiB, encoder {e2 - e1:+.1f} MiB "
                      f"(limit {RSS_GROWTH_LIMIT_MIB}) — {verdict(ok)}")
    return ["### Peak RSS (MiB), one fresh service process per case, rows from an in-process source", "",
            *table(["format", f"service {small:,}", f"service {large:,}", "Δ", f"encoder {small:,}", f"encoder {large:,}", "Δ",
                    "limit"], rows),
            "RSS sampled every 20 ms with psutil: of the service process, and of its encoder (the fork server's child).", ""]


def render_live(figures: list[tuple[list[float], list[int], Run]], bench: Bench, accept: list[str], source: str = "an in-process source") -> list[str]:
    [(latencies, errors, run)] = figures
    (gaps, first), p99 = quiet(run), p(latencies, 99)
    rows = [["/healthz p50", f"{p(latencies, 50):.1f} ms", ""],
            ["/healthz p99", f"{p99:.1f} ms", f"< {HEALTH_P99_LIMIT_MS} ms {verdict(p99 < HEALTH_P99_LIMIT_MS)}"],
            ["/healthz max", f"{max(latencies):.1f} ms ({len(latencies)} probes every 50 ms, {len(errors)} errors)", ""],
            *([f"longest time without an event, {fmt}-{n}", f"{gap:.2f} s", f"≤ {EVENT_GAP_LIMIT_S} s {verdict(gap <= EVENT_GAP_LIMIT_S)}"]
              for n, (fmt, gap) in enumerate(zip(LIVE_PLAN, gaps), 1)),
            ["wait for the first `export-processing` event, worst", f"{max(first):.2f} s", ""]]
    accept.append(f"/healthz p99 with 4 exports, rows from {source}: {p99:.1f} ms (limit < {HEALTH_P99_LIMIT_MS}) — "
                  f"{verdict(p99 < HEALTH_P99_LIMIT_MS)}")
    accept.append(f"longest time without a progress event with 4 exports, rows from {source}: {max(gaps):.2f} s "
                  f"(limit {EVENT_GAP_LIMIT_S}) — {verdict(max(gaps) <= EVENT_GAP_LIMIT_S)}")
    return [f"### Responsiveness with 4 exports at once (2 xlsx, 2 csv; rows from {source})", "",
            *table(["figure", "value", "limit"], rows), f"All four took {run.seconds:.1f} s. Gaps are measured at the "
            "Socket.IO client, from the subscription to the job's end event; events a waiting job sends again count.", ""]


def render_scale(figures: list[Scale], bench: Bench, accept: list[str]) -> list[str]:
    rows, notes = [], []
    for s in figures:
        ratio, floor = statistics.median(pair_ratios(s)), statistics.median(s.floor_pairs)
        cores = [f"{sum(r.server_cpu for r in runs) / sum(r.seconds for r in runs):.2f} + "
                 f"{sum(r.encoder_cpu for r in runs) / sum(r.seconds for r in runs):.2f}" for runs in (s.ones, s.twos)]
        rows.append([s.fmt, f"{s.rows:,}", f"{s.rows / statistics.median(r.seconds for r in s.ones):,.0f}",
                     f"{2 * s.rows / statistics.median(r.seconds for r in s.twos):,.0f}", *cores, f"{ratio:.2f}", f"{floor:.2f}",
                     f"≥ {SCALE_TARGET} {verdict(ratio >= SCALE_TARGET)}"])
        notes.append(f"- {s.fmt} pairs: service {', '.join(f'{r:.2f}' for r in pair_ratios(s))}; "
                     f"floor {', '.join(f'{r:.2f}' for r in s.floor_pairs)}")
        accept.append(f"two concurrent {s.fmt} exports: {ratio:.2f}× one (target ≥ {SCALE_TARGET}; the floor's own ratio "
                      f"in this run {floor:.2f}) — {verdict(ratio >= SCALE_TARGET)}")
    return ["### One export against two at once (rows from an in-process source)", "",
            *table(["format", "rows per export", "1 export (rows/s)", "2 exports (aggregate rows/s)", "cores used, 1 export",
                    "cores used, 2 exports", "ratio", "floor's ratio", "target"], rows), *notes, "",
            f"{bench.sizes.scale_pairs} pairs of one export then two at once, back to back, wall time from the first "
            "request to the last end event; rows/s are medians, the ratio is the median of the pairs' ratios. Cores used: "
            "CPU seconds a wall second of the service process + the processes under it. The floor's ratio: the writer "
            "floor as one process against two over the same rows, between the service's runs.", ""]


def render_e2e(figures: list[tuple[str, Run | None, list[str]]], bench: Bench, accept: list[str]) -> list[str]:
    rows = []
    for fmt, run, failures in figures:
        failed = f" ({len(failures)} failed attempt(s): {', '.join(failures)})" if failures else ""
        if run is None:
            rows.append([fmt, f"failed{failed}", "", "", ""])
            continue
        n, seconds = run.ends[0]["processed"], run.ends[0].get("duration_seconds") or run.seconds
        per = 100_000 / n
        rows.append([fmt + failed, f"{n:,}", f"{seconds:.1f}", f"{n / seconds:,.0f}", f"{(run.server_cpu + run.encoder_cpu) * per:.2f} "
                     f"({run.server_cpu * per:.2f} + {run.encoder_cpu * per:.2f})"])
    return ["### End to end against the embedded server", "",
            *table(["format", "rows", "seconds", "rows/s", "service CPU s per 100k rows (server + encoder)"], rows),
            f"Request: the whole `{bench.collection}` collection as whole documents (csv/xlsx discover their columns). The "
            "embedded server is the bottleneck; its CPU is not counted. A failed export is run once more.", ""]


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


STAGES: dict[str, tuple[Callable[[Bench], Awaitable[list[Any]]], Callable[..., list[str]]]] = {  # in report order
    "writers": (lambda bench: asyncio.to_thread(stage_writers, bench), render_writers),
    # Only when named: valgrind takes minutes more.
    "instructions": (lambda bench: asyncio.to_thread(stage_instructions, bench), render_instructions),
    "rss": (stage_rss, render_rss),
    "live": (lambda bench: live(bench, bench.sizes.live_rows, inproc=True), render_live),
    "busy": (lambda bench: live(bench, bench.sizes.busy_rows, inproc=False), functools.partial(render_live, source="the embedded server")),
    "scale": (stage_scale, render_scale),
    "e2e": (stage_e2e, render_e2e),
}


async def run_stages(bench: Bench, stages: Sequence[str], db_dir: Path) -> dict[str, list[Any]]:
    results, server = {}, None
    with contextlib.ExitStack() as stack:
        for name in stages:
            if name not in ("writers", "instructions") and server is None:
                server = stack.enter_context(EmbeddedMongo(db_dir, db_file="bench.db"))
                stack.callback(drop_jobs_collections, server.url)
                bench.collection = await asyncio.to_thread(seed, server.url, bench.sizes.e2e_rows)
                # The timeout the service chooses for an embedded server of its own, given as a user would give it.
                bench.mongo_url = f"{server.url}&connectTimeoutMS={EMBEDDED_CONNECT_TIMEOUT_MS}"
            log(name)
            results[name] = await STAGES[name][0](bench)
    return results


async def run(args: argparse.Namespace) -> None:
    started, load = datetime.now(timezone.utc), " ".join(f"{x:.2f}" for x in os.getloadavg())
    stages = [s for s in STAGES if s in args.only.split(",")] if args.only else [s for s in STAGES if s != "instructions"]
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        bench = Bench(QUICK if args.quick else FULL, Path(tmp), args.writer_formats.split(","), args.scale_formats.split(","))
        results = await run_stages(bench, stages, Path(args.db_dir))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    out, accept = ["## Benchmark", "", f"{started:%Y-%m-%d %H:%M} UTC · {platform.machine()} · {cpu} · {os.cpu_count()} cores · "
                   f"Python {platform.python_version()} · load average {load} at start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
                   f"at end · run took {(datetime.now(timezone.utc) - started).total_seconds() / 60:.1f} min" + (" · quick sizes" if args.quick else ""),
                   "", "Rerun: `make bench` (`make bench-quick` for a smoke run); the report is also written to `var/bench.md`.", ""], []
    for name, figures in results.items():
        out += STAGES[name][1](figures, bench, accept) if figures else []
    report = "\n".join(out + ["### Acceptance", "", *(f"- {line}" for line in accept), ""])
    print(report)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(report)
    log(f"report written to {REPORT.relative_to(ROOT)}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the export service and print a markdown report.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("run", help="run the benchmark (the other commands are its child processes)")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    bench.add_argument("--only", default="", help=f"comma-separated stages among {', '.join(STAGES)} (instructions only when named)")
    bench.add_argument("--writer-formats", default=",".join(WRITER_FORMATS), help="formats of the writer stage")
    bench.add_argument("--scale-formats", default="csv,xlsx", help="formats of the one-against-two stage")
    bench.add_argument("--db-dir", default=str(ROOT / "var" / "bench" / "db"), help="where the embedded database keeps its file")
    serve_ = commands.add_parser("serve", help="the service until stdin closes, settings from EXPORT_* variables")
    serve_.add_argument("--inproc", action="store_true", help="rows from the in-process source instead of the database")
    case = commands.add_parser("instructions-case", help="one side of the writer stage once, for valgrind")
    case.add_argument("format", choices=FORMATS)
    case.add_argument("side", choices=("service", "floor", "none"))
    case.add_argument("batches", help="a pickled list of raw BSON batches")
    case.add_argument("--export-dir", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the embedded database is stopped and temporary files removed; a service
    # child exits by itself when its stdin closes with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.command == "instructions-case":
        instructions_case(args)
    else:
        asyncio.run(run(args) if args.command == "run" else serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
