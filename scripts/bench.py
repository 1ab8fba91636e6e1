"""Benchmark of the export service, printed as one markdown report (and written to var/bench.md).

    make bench                          # everything, about twelve minutes on two cores
    .venv/bin/python scripts/bench.py --quick            # smaller sizes, for a smoke run
    .venv/bin/python scripts/bench.py --only writers,rss # a subset of the stages

Stages:
- writers: the writer pipeline (ExportPipeline.feed per pre-encoded BSON batch, then finish) against a floor
  measured in the same run: bson.decode_all plus the bare library call.
- e2e: end-to-end exports against the embedded server, with the service's own CPU seconds (server process
  plus encoder processes, never the database) per 100,000 rows.
- rss: peak RSS of the service process and of its encoder process for 100,000 and 1,000,000 rows, each case
  in a fresh process (`bench.py --rss-case FORMAT ROWS`).
- live: /healthz latency and Socket.IO progress-event gaps while four exports run at once (rows from memory).
- busy: the same with the rows from the embedded server, which answers nothing while it builds a batch.
- scale: aggregate throughput of one export against two at once.
- instructions (only with --only): the writer stage's work counted in instructions under valgrind, a figure
  that does not move with the machine's load.
The rss, live and scale stages feed the real runner from an in-process source of raw BSON batches, so the
database is not the bottleneck; the embedded server then only stores the jobs.

The script reports and exits 0 whether or not a target is met; a crash exits non-zero. Linux only: process
figures come from /proc.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import functools
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
from typing import Any, AsyncGenerator, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, the project root is not on the path
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import bson  # noqa: E402
import orjson  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import socketio  # noqa: E402
import xlsxwriter  # noqa: E402
from aiohttp import web  # noqa: E402
from pymongo import MongoClient  # noqa: E402

from scripts.generate_data import make_documents  # noqa: E402
from service.app import EMBEDDED_CONNECT_TIMEOUT_MS, create_app  # noqa: E402
from service.db import FindSpec  # noqa: E402
from service.embedded_db import EmbeddedMongo, free_port  # noqa: E402
from service.pipeline import ExportPipeline  # noqa: E402
from service.query import ROW_GROUP_DEFAULT, ExportSpec  # noqa: E402
from service.settings import Settings, settings_from_env  # noqa: E402

SEED = 42
BATCH_ROWS = 1000
FORMATS = ("csv", "json", "ndjson", "xlsx")
# The writer stage's cases: each format, and Parquet once more with only the top-level fields whose values are
# scalars, which PyMongoArrow reads without decoding documents. Parquet is measured in this stage only.
SCALAR_CASES = {"parquet-scalars": "parquet"}
WRITER_FORMATS = (*FORMATS, "parquet", *SCALAR_CASES)
DB_NAME = "bench"
DATA_COLLECTION = "tasks"
E2E_ROWS = 100_000
BENCH_DIR = ROOT / "var" / "bench"
REPORT = ROOT / "var" / "bench.md"
END_EVENTS = ("export-completed", "export-failed", "export-cancelled")
END_STATUSES = ("completed", "failed", "cancelled")
EVENTS = ("export-fetching", "export-processing", "export-finalizing") + END_EVENTS
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Targets each figure is judged against.
FLOOR_TARGETS = {"csv": 0.7, "json": 0.8, "ndjson": 0.8, "xlsx": 0.9, "parquet": 0.6, "parquet-scalars": 1.0}
RSS_GROWTH_LIMIT_MIB = 50
HEALTH_P99_LIMIT_MS = 50
EVENT_GAP_LIMIT_S = 1.0  # the README's promise: a job is never quiet for more than a second
BUSY_ROWS = 40_000  # each of the four exports the embedded server serves at once
SCALE_TARGET = 1.6
SCALE_REPEATS = 5


@dataclass(frozen=True)
class Sizes:
    """How much work each stage does; --quick shrinks everything for a smoke run."""

    writer_rows: dict[str, int]
    writer_repeats: int
    rss_rows: tuple[int, int]
    live_rows: dict[str, int]
    busy_rows: dict[str, int]
    scale_rows: int
    e2e_rows: int


FULL = Sizes(
    writer_rows={"csv": 50_000, "json": 50_000, "ndjson": 50_000, "xlsx": 20_000, "parquet": 50_000, "parquet-scalars": 50_000},
    writer_repeats=5,
    rss_rows=(100_000, 1_000_000),
    live_rows={"csv": 250_000, "xlsx": 60_000},
    busy_rows={"csv": BUSY_ROWS, "xlsx": BUSY_ROWS},
    scale_rows=100_000,
    e2e_rows=E2E_ROWS,
)
QUICK = Sizes(
    writer_rows={"csv": 10_000, "json": 10_000, "ndjson": 10_000, "xlsx": 5_000, "parquet": 10_000, "parquet-scalars": 10_000},
    writer_repeats=2,
    rss_rows=(10_000, 50_000),
    live_rows={"csv": 50_000, "xlsx": 10_000},
    busy_rows={"csv": 10_000, "xlsx": 5_000},
    scale_rows=30_000,
    e2e_rows=10_000,
)


# --- data -----------------------------------------------------------------------------------------------
def raw_batches(rows: int, seed: int = SEED) -> list[bytes]:
    """The generator's documents as pre-encoded BSON batches of BATCH_ROWS, as a cursor delivers them.
    One batch of documents at a time, so making them does not set a service process's peak."""
    return [
        b"".join(bson.encode(doc) for doc in make_documents(min(BATCH_ROWS, rows - start), seed, start))
        for start in range(0, rows, BATCH_ROWS)
    ]


@functools.cache
def replay_batches() -> list[bytes]:
    """The batches the in-process source and the floor processes cycle through."""
    return raw_batches(10 * BATCH_ROWS)


def top_level_columns(batches: Sequence[bytes]) -> list[str]:
    """The generator's top-level keys in first-seen order: the columns of the tabular floors."""
    seen: dict[str, None] = {}
    for doc in bson.decode_all(batches[0]):
        seen.update(dict.fromkeys(doc))
    return list(seen)


def scalar_columns(batches: Sequence[bytes]) -> list[str]:
    """The top-level keys whose values in the first batch are never documents or arrays."""
    docs = bson.decode_all(batches[0])
    nested = {key for doc in docs for key, value in doc.items() if isinstance(value, (dict, list))}
    return [key for key in top_level_columns(batches) if key not in nested]


def request_fields(fmt: str, columns: Sequence[str]) -> list[str] | None:
    """The same columns the floors write: top-level keys for tables, whole documents for JSON."""
    return list(columns) if fmt in ("csv", "xlsx", "parquet") else None


class InProcessSource:
    """A BatchSource that replays pre-encoded batches: the database is out of the measurement."""

    def __init__(self, batches: Sequence[bytes], default_rows: int) -> None:
        self.batches = list(batches)
        self.default_rows = default_rows
        # Offsets of every document in each batch, so a limit can cut a batch at a document boundary.
        self.offsets = [_doc_offsets(raw) for raw in self.batches]

    async def count(self, spec: FindSpec) -> int:
        return spec.limit or self.default_rows

    async def raw_batches(self, spec: FindSpec) -> AsyncGenerator[bytes, None]:
        remaining = spec.limit or self.default_rows
        index = 0
        while remaining > 0:
            raw, offsets = self.batches[index % len(self.batches)], self.offsets[index % len(self.batches)]
            if remaining < len(offsets):
                raw = raw[: offsets[remaining]]
            remaining -= min(remaining, len(offsets))
            index += 1
            yield raw
            await asyncio.sleep(0)  # a cursor gives the loop a turn between batches; so does this source


def _doc_offsets(raw: bytes) -> list[int]:
    """Start offset of each document in raw, then its length: offsets[n] is where n documents end."""
    offsets, pos = [], 0
    while pos < len(raw):
        offsets.append(pos)
        pos += int.from_bytes(raw[pos:pos + 4], "little")
    return offsets + [pos]


# --- machine --------------------------------------------------------------------------------------------
def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "cpu": model,
        "nproc": str(os.cpu_count()),
        "python": platform.python_version(),
        "load": load_average(),
    }


# --- stage: writer pipeline against its floor -----------------------------------------------------------
def _fsync_close(fh: Any) -> None:
    # The service makes its file durable before calling it complete; the floor does the same work.
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


class CsvFloor:
    """bson.decode_all plus csv.writer on str() values."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.fh = open(path, "w", newline="", encoding="utf-8", buffering=1 << 20)
        self.writer = csv.writer(self.fh)
        self.writer.writerow(self.columns)

    def feed(self, raw: bytes) -> None:
        columns, writerow = self.columns, self.writer.writerow
        for doc in bson.decode_all(raw):
            writerow([str(doc.get(key, "")) for key in columns])

    def finish(self) -> None:
        _fsync_close(self.fh)


class JsonFloor:
    """bson.decode_all plus orjson.dumps(default=str) and a newline per document."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.fh = open(path, "wb", buffering=1 << 20)

    def feed(self, raw: bytes) -> None:
        write = self.fh.write
        for doc in bson.decode_all(raw):
            write(orjson.dumps(doc, default=str))
            write(b"\n")

    def finish(self) -> None:
        _fsync_close(self.fh)


class XlsxFloor:
    """bson.decode_all plus xlsxwriter in constant_memory mode, write_row of str() values."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.fh = open(path, "wb", buffering=1 << 20)
        self.book = xlsxwriter.Workbook(self.fh, {"constant_memory": True, "in_memory": False})
        self.sheet = self.book.add_worksheet()
        self.sheet.write_row(0, 0, self.columns)
        self.row = 1

    def feed(self, raw: bytes) -> None:
        columns, write_row = self.columns, self.sheet.write_row
        row = self.row
        for doc in bson.decode_all(raw):
            write_row(row, 0, [str(doc.get(key, "")) for key in columns])
            row += 1
        self.row = row

    def finish(self) -> None:
        self.book.close()
        _fsync_close(self.fh)


class ParquetFloor:
    """bson.decode_all plus one pa.array per column with pyarrow's own type inference (str() of the values
    for a column it cannot type, such as ObjectId or documents), written by pq.ParquetWriter with zstd in row
    groups of the service's default size."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.path = path
        self.as_text: list[bool] | None = None
        self.schema: pa.Schema | None = None
        self.sink: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def _typed(self, values: list[Any]) -> bool:
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return False
        return True

    def feed(self, raw: bytes) -> None:
        docs = bson.decode_all(raw)
        columns = [[doc.get(key) for doc in docs] for key in self.columns]
        if self.as_text is None:  # the first batch settles the types, as the service's sample does
            self.as_text = [not self._typed(values) for values in columns]
        columns = [[None if v is None else str(v) for v in values] if text else values for values, text in zip(columns, self.as_text)]
        if self.schema is None:
            self.schema = pa.Table.from_arrays([pa.array(v) for v in columns], names=self.columns).schema
            self.sink = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        self.pending.append(pa.Table.from_arrays([pa.array(v, f.type) for v, f in zip(columns, self.schema)], schema=self.schema))
        self.pending_rows += len(docs)
        if self.pending_rows >= ROW_GROUP_DEFAULT:
            self._flush()

    def _flush(self) -> None:
        assert self.sink is not None
        self.sink.write_table(pa.concat_tables(self.pending), row_group_size=ROW_GROUP_DEFAULT)
        self.pending, self.pending_rows = [], 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        assert self.sink is not None
        self.sink.close()
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())


FLOORS: dict[str, Callable[[Path, Sequence[str]], Any]] = {
    "csv": CsvFloor, "json": JsonFloor, "ndjson": JsonFloor, "xlsx": XlsxFloor, "parquet": ParquetFloor,
}


def service_pipeline(fmt: str, path: Path, columns: Sequence[str]) -> ExportPipeline:
    fields = request_fields(fmt, columns)
    spec = ExportSpec(collection=DATA_COLLECTION, format=fmt, fields=tuple(fields) if fields else None)
    return ExportPipeline(spec, path, {"collection": DATA_COLLECTION, "xlsx_max_rows_per_sheet": 1_048_575})


def cpu_timed(fn: Callable[[], Any]) -> float:
    """CPU seconds of this process: both sides are single-threaded, and CPU time does not charge a
    neighbour's load to whichever side ran with it, as wall time would."""
    started = time.process_time()
    fn()
    return time.process_time() - started


@dataclass
class WriterFigure:
    fmt: str
    rows: int
    service: float  # rows/s
    floor: float

    @property
    def ratio(self) -> float:
        return self.service / self.floor


def stage_writers(sizes: Sizes, work: Path, formats: Sequence[str] = WRITER_FORMATS) -> list[WriterFigure]:
    """Service and floor write their files side by side, batch by batch, alternating which goes first; each
    batch (and the finish) counts with its best time over the repeats. On a shared machine, noise comes in
    bursts longer than a batch, so both sides meet the same bursts and the best times shed them."""
    most = max(sizes.writer_rows[fmt] for fmt in formats)
    all_batches = raw_batches(most)
    figures = []
    for fmt in formats:
        rows = sizes.writer_rows[fmt]
        batches = all_batches[: rows // BATCH_ROWS]
        columns = scalar_columns(all_batches) if fmt in SCALAR_CASES else top_level_columns(all_batches)
        best = {"service": [float("inf")] * (len(batches) + 1), "floor": [float("inf")] * (len(batches) + 1)}
        for repeat in range(sizes.writer_repeats):
            sides = {
                "service": service_pipeline(SCALAR_CASES.get(fmt, fmt), work / f"service.{fmt}", columns),
                "floor": FLOORS[SCALAR_CASES.get(fmt, fmt)](work / f"floor.{fmt}", columns),
            }
            order = ["service", "floor"]
            for index, raw in enumerate(batches):
                for name in order if (index + repeat) % 2 == 0 else reversed(order):
                    seconds = cpu_timed(lambda: sides[name].feed(raw))
                    best[name][index] = min(best[name][index], seconds)
            for name in order:
                best[name][-1] = min(best[name][-1], cpu_timed(sides[name].finish))
        for leftover in work.glob("*"):
            leftover.unlink()
        figure = WriterFigure(fmt, rows, rows / sum(best["service"]), rows / sum(best["floor"]))
        log(
            f"writers {fmt}: service {figure.service:,.0f} rows/s ({1e6 / figure.service:.1f} µs CPU a row), "
            f"floor {figure.floor:,.0f} rows/s ({1e6 / figure.floor:.1f} µs), ratio {figure.ratio:.2f}"
        )
        figures.append(figure)
    return figures


# --- stage on request: instructions of the writer pipeline against its floor ----------------------------
INSTRUCTION_ROWS = {"csv": 5_000, "json": 5_000, "ndjson": 5_000, "xlsx": 2_000}


@dataclass
class InstructionFigure:
    fmt: str
    rows: int
    service: float  # instructions per row
    floor: float

    @property
    def ratio(self) -> float:
        """As a rows/s ratio would be, were instructions all that took time."""
        return self.floor / self.service


def instructions_case_main(args: argparse.Namespace) -> None:
    """--instructions-case FORMAT SIDE BATCHES: the batches pickled in BATCHES through one side, once; the
    side 'none' only loads them, so its count is what the other two have in common."""
    fmt, side, batches_file = args.instructions_case
    batches: list[bytes] = pickle.loads(Path(batches_file).read_bytes())
    columns = top_level_columns(batches)
    path = Path(args.export_dir) / f"{side}.{fmt}"
    if side == "none":
        return
    target = service_pipeline(fmt, path, columns) if side == "service" else FLOORS[fmt](path, columns)
    for raw in batches:
        target.feed(raw)
    target.finish()


def count_instructions(fmt: str, side: str, batches_file: Path, work: Path) -> int:
    # A fixed hash seed: dict and set layouts, and so the count, are then the same from one run to the next.
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *child_command(),
               "--instructions-case", fmt, side, str(batches_file), "--export-dir", str(work)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind: {done.stderr[-500:]}")
    return int(found.group(1))


def stage_instructions(work: Path) -> list[InstructionFigure]:
    """Instructions the service's writer pipeline and its floor execute per row, counted by valgrind: the same
    figure in every run, whatever else the machine is doing. Time also depends on caches and memory, which
    this does not weigh; the writer stage measures time."""
    if shutil.which("valgrind") is None:
        log("instructions: valgrind is not installed (Debian package valgrind); stage skipped")
        return []
    figures = []
    baselines: dict[int, int] = {}  # by rows: loading the batches is the same work whatever the format
    for fmt in FORMATS:
        rows = INSTRUCTION_ROWS[fmt]
        batches_file = work / f"batches-{rows}.pickle"
        if rows not in baselines:
            batches_file.write_bytes(pickle.dumps(replay_batches()[: rows // BATCH_ROWS]))
            baselines[rows] = count_instructions(fmt, "none", batches_file, work)
        service, floor = (count_instructions(fmt, side, batches_file, work) - baselines[rows] for side in ("service", "floor"))
        figure = InstructionFigure(fmt, rows, service / rows, floor / rows)
        log(f"instructions {fmt}: service {figure.service:,.0f} per row, floor {figure.floor:,.0f} per row, ratio {figure.ratio:.2f}")
        figures.append(figure)
    return figures


# --- processes ------------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Child processes of pid, whichever of its threads started them (encoders start from a pool thread)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def forkserver_of(pid: int) -> int | None:
    for child in children(pid):
        if "forkserver" in cmdline(child):
            return child
    return None


def vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int | None, with_children: bool) -> float:
    """utime+stime of pid, plus the reaped children's when asked (an encoder's CPU lands in its fork server's
    cutime once the fork server has waited for it)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[11..14] are utime, stime, cutime, cstime (stat fields 14..17)
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


class EncoderPeakWatcher:
    """Samples VmHWM of every encoder process (the fork server's children) under a service process."""

    def __init__(self, service_pid: int, interval: float = 0.02) -> None:
        self.service_pid = service_pid
        self.interval = interval
        self.peak_kib = 0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            server = forkserver_of(self.service_pid)
            if server is not None:
                for pid in children(server):
                    self.peak_kib = max(self.peak_kib, vm_hwm_kib(pid))
            await asyncio.sleep(self.interval)

    def __enter__(self) -> "EncoderPeakWatcher":
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()


# --- the service, in this process (rss cases) or as a child (live, scale, e2e) --------------------------
def bench_settings(mongo_url: str, export_dir: Path, jobs_collection: str, max_concurrent: int, port: int = 0) -> Settings:
    return settings_from_env(
        {},
        mongo_url=mongo_url,
        db_name=DB_NAME,
        export_dir=export_dir,
        jobs_collection=jobs_collection,
        max_concurrent=max_concurrent,
        max_active_per_user=100,
        port=port,
    )


async def start_site(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def serve_main(args: argparse.Namespace) -> None:
    """--serve: the service in this process until stdin closes; prints one JSON line when ready."""
    source = InProcessSource(replay_batches(), BATCH_ROWS) if args.inproc else None
    settings = bench_settings(args.mongo_url, Path(args.export_dir), args.jobs_collection, args.max_concurrent, args.port)
    runner = await start_site(create_app(settings, source=source), args.port)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


def child_command() -> list[str]:
    """How the benchmark starts a service process of its own. Through -c, not this file's path: the encoder
    processes re-import a main module that has a path (python -m service has none to re-import), which would
    charge them this script's imports."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from scripts.bench import main; sys.exit(main())"
    return [sys.executable, "-c", code]


class ServiceChild:
    """The service as a child process of the benchmark, driven over HTTP and Socket.IO like a user would."""

    def __init__(self, mongo_url: str, export_dir: Path, max_concurrent: int, inproc: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.jobs_collection = f"bench_jobs_{secrets.token_hex(4)}"
        self.args = [
            *child_command(), "--serve",
            "--mongo-url", mongo_url, "--export-dir", str(export_dir), "--port", str(self.port),
            "--jobs-collection", self.jobs_collection, "--max-concurrent", str(max_concurrent),
        ] + (["--inproc"] if inproc else [])
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0

    async def __aenter__(self) -> "ServiceChild":
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=120)
        if not line:
            raise RuntimeError("the service child did not start")
        self.pid = json.loads(line)["pid"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            # Read to EOF, not just wait: the child cannot then block on a full pipe while it shuts down.
            await asyncio.wait_for(self.proc.stdout.read(), timeout=60)
            await asyncio.wait_for(self.proc.wait(), timeout=30)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class JobFailed(RuntimeError):
    def __init__(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        error = data.get("error") or {}
        super().__init__(f"job {job_id} ended with {event}: {error.get('code')}: {error.get('message')}")
        self.job_id = job_id
        self.code = str(error.get("code") or event)


class Watcher:
    """One Socket.IO client following jobs: every event with its arrival time, and an Event per job end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: dict[str, list[tuple[float, str, dict[str, Any]]]] = {}
        self.done: dict[str, asyncio.Event] = {}
        self.subscribed_at: dict[str, float] = {}
        for name in EVENTS:
            self.sio.on(name, lambda data, _n=name: self._on(_n, data))

    def _on(self, name: str, data: dict[str, Any]) -> None:
        job_id = data["id"]
        self.events.setdefault(job_id, []).append((time.monotonic(), name, data))
        if name in END_EVENTS:
            self.done.setdefault(job_id, asyncio.Event()).set()

    async def __aenter__(self) -> "Watcher":
        await self.sio.connect(self.url, transports=["websocket"], socketio_path="socket.io")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sio.disconnect()

    async def follow(self, job_id: str) -> None:
        self.done.setdefault(job_id, asyncio.Event())
        self.subscribed_at[job_id] = time.monotonic()
        ack = await self.sio.call("subscribe", {"id": job_id}, timeout=30)
        if not ack.get("ok"):
            raise RuntimeError(f"cannot follow job {job_id}: {ack}")
        if ack["job"]["status"] in END_STATUSES:
            self.done[job_id].set()

    async def wait(self, job_id: str, timeout: float = 900) -> dict[str, Any]:
        await asyncio.wait_for(self.done[job_id].wait(), timeout)
        for _, name, data in reversed(self.events.get(job_id, [])):
            if name in END_EVENTS:
                if name != "export-completed":
                    raise JobFailed(job_id, name, data)
                return data
        return {}


async def create_job(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"{url}/api/exports", json=body) as resp:
        if resp.status != 202:
            raise RuntimeError(f"creating an export failed: {resp.status} {await resp.text()}")
        return await resp.json()


async def delete_job(http: aiohttp.ClientSession, url: str, job_id: str) -> None:
    async with http.delete(f"{url}/api/exports/{job_id}") as resp:
        await resp.read()


async def run_jobs(http: aiohttp.ClientSession, url: str, watcher: Watcher, bodies: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(job id, end-event data) of each body, in order. Every job is created before any is waited for, so they
    run at once; the caller deletes them, after whatever it measures. Raises JobFailed on a failed job."""
    ids = []
    for body in bodies:
        job = await create_job(http, url, body)
        await watcher.follow(job["id"])
        ids.append(job["id"])
    return [(job_id, await watcher.wait(job_id)) for job_id in ids]


def job_body(fmt: str, columns: Sequence[str], limit: int = 0, collection: str = DATA_COLLECTION) -> dict[str, Any]:
    body: dict[str, Any] = {"collection": collection, "format": fmt}
    fields = request_fields(fmt, columns)
    if fields:
        body["fields"] = fields
    if limit:
        body["limit"] = limit
    return body


# --- stage: peak RSS, one fresh process per case ----------------------------------------------------------
async def rss_case_main(args: argparse.Namespace) -> None:
    """--rss-case FORMAT ROWS: the service in this process, one export over HTTP, then the peaks as JSON."""
    fmt, rows = args.rss_case[0], int(args.rss_case[1])
    batches = raw_batches(10 * BATCH_ROWS)
    columns = top_level_columns(batches)
    export_dir = Path(args.export_dir)
    settings = bench_settings(args.mongo_url, export_dir, f"bench_jobs_{secrets.token_hex(4)}", 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    runner = await start_site(create_app(settings, source=InProcessSource(batches, rows)), port)
    started = time.monotonic()
    try:
        with EncoderPeakWatcher(os.getpid()) as watcher:
            async with aiohttp.ClientSession() as http:
                job = await create_job(http, url, job_body(fmt, columns, rows))
                while True:
                    async with http.get(f"{url}/api/exports/{job['id']}") as resp:
                        snap = await resp.json()
                    if snap["status"] in END_STATUSES:
                        break
                    await asyncio.sleep(0.2)
                seconds = time.monotonic() - started
                if snap["status"] != "completed":
                    raise RuntimeError(f"the export ended {snap['status']}: {snap.get('error')}")
                await delete_job(http, url, job["id"])
    finally:
        await runner.cleanup()
    print(json.dumps({
        "format": fmt, "rows": snap["processed"], "seconds": seconds,
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report the
        # benchmark's own size whenever that is larger.
        "service_kib": vm_hwm_kib(os.getpid()),
        "encoder_kib": watcher.peak_kib,
    }), flush=True)


@dataclass
class RssFigure:
    fmt: str
    rows: int
    service_kib: int
    encoder_kib: int
    seconds: float


async def run_rss_case(mongo_url: str, export_dir: Path, fmt: str, rows: int) -> RssFigure:
    proc = await asyncio.create_subprocess_exec(
        *child_command(), "--rss-case", fmt, str(rows),
        "--mongo-url", mongo_url, "--export-dir", str(export_dir),
        cwd=ROOT, stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rss case {fmt} {rows} exited with {proc.returncode}")
    data = json.loads(out.strip().splitlines()[-1])
    figure = RssFigure(fmt, rows, data["service_kib"], data["encoder_kib"], data["seconds"])
    log(f"rss {fmt} {rows:,}: service {figure.service_kib / 1024:.1f} MiB, encoder {figure.encoder_kib / 1024:.1f} MiB, {figure.seconds:.1f} s")
    return figure


async def stage_rss(sizes: Sizes, mongo_url: str, work: Path) -> list[RssFigure]:
    # Two cases at a time, one per core: peaks are per process, so running side by side does not change them.
    cases = [(fmt, rows) for rows in sizes.rss_rows for fmt in FORMATS]
    cases.sort(key=lambda case: (case[0] != "xlsx", -case[1]))  # the longest first, so the pair ends together
    gate = asyncio.Semaphore(2)

    async def one(fmt: str, rows: int) -> RssFigure:
        async with gate:
            case_dir = work / f"rss-{fmt}-{rows}"
            case_dir.mkdir()
            try:
                return await run_rss_case(mongo_url, case_dir, fmt, rows)
            finally:
                shutil.rmtree(case_dir, ignore_errors=True)

    return list(await asyncio.gather(*(one(fmt, rows) for fmt, rows in cases)))


# --- stage: responsiveness while four exports run --------------------------------------------------------
@dataclass
class LiveFigure:
    source: str  # where the rows came from
    health_ms: list[float]
    health_errors: int
    gaps: dict[str, float]  # job label -> the longest time without an event while its rows flowed
    first_gaps: dict[str, float]  # job label -> from subscription to its first export-processing event
    seconds: float

    def health(self, q: float) -> float:
        return percentile(self.health_ms, q)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def quiet_gaps(events: list[tuple[float, str, dict[str, Any]]], since: float) -> tuple[float, float]:
    """(longest time without any event from subscription to the job's end, wait for the first
    export-processing event). Every event counts, the repeated ones a waiting job sends included."""
    times = [since] + [t for t, _, _ in events]
    processing = [t for t, name, _ in events if name == "export-processing"]
    first = (processing[0] - since) if processing else float("nan")
    return max(b - a for a, b in zip(times, times[1:])), first


async def poll_health(url: str, stop: asyncio.Event, latencies: list[float], errors: list[int]) -> None:
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                async with http.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors.append(resp.status)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors.append(0)
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.05)


async def stage_live(mongo_url: str, work: Path, columns: Sequence[str], rows: dict[str, int], inproc: bool) -> LiveFigure:
    """Four exports at once (2 xlsx, 2 csv) while /healthz is probed every 50 ms: rows from an in-process
    source (the service's own limits) or from the embedded server (a database busy building batches)."""
    plan = [("xlsx", rows["xlsx"]), ("xlsx", rows["xlsx"]), ("csv", rows["csv"]), ("csv", rows["csv"])]
    async with ServiceChild(mongo_url, work, max_concurrent=4, inproc=inproc) as service:
        async with Watcher(service.url) as watcher, aiohttp.ClientSession() as http:
            stop = asyncio.Event()
            latencies: list[float] = []
            errors: list[int] = []
            poller = asyncio.create_task(poll_health(service.url, stop, latencies, errors))
            await asyncio.sleep(1.0)  # a baseline before the exports start
            started = time.monotonic()
            done = await run_jobs(http, service.url, watcher, [job_body(fmt, columns, rows) for fmt, rows in plan])
            seconds = time.monotonic() - started
            stop.set()
            await poller
            gaps, first_gaps = {}, {}
            labels = [f"{fmt}-{number}" for number, (fmt, _) in enumerate(plan, 1)]
            for label, (job_id, _) in zip(labels, done):
                gaps[label], first_gaps[label] = quiet_gaps(watcher.events.get(job_id, []), watcher.subscribed_at[job_id])
                await delete_job(http, service.url, job_id)
    figure = LiveFigure("an in-process source" if inproc else "the embedded server", latencies, len(errors), gaps, first_gaps, seconds)
    log(f"live ({figure.source}): /healthz p50 {figure.health(50):.1f} ms p99 {figure.health(99):.1f} ms max {max(latencies):.1f} ms "
        f"({len(latencies)} probes, {len(errors)} errors); gaps " + ", ".join(f"{k} {v:.2f}s" for k, v in gaps.items()))
    return figure


# --- stage: one export against two at once ---------------------------------------------------------------
@dataclass
class ScaleFigure:
    """Each pair is one export, then two at once, back to back; the figures are medians over the pairs."""

    fmt: str
    rows: int
    one: float  # rows/s of one export alone
    two: float  # aggregate rows/s of two at once
    pairs: list[float]  # each pair's ratio of two to one
    one_cores: tuple[float, float]  # CPU seconds of the service process and of its encoders per wall second
    two_cores: tuple[float, float]
    floor_pairs: list[float]  # the floor's own: one process against two, same rows, between the service's pairs

    @property
    def ratio(self) -> float:
        return statistics.median(self.pairs)

    @property
    def floor_ratio(self) -> float:
        return statistics.median(self.floor_pairs)


Timed = tuple[float, tuple[float, float]]  # wall seconds, (CPU seconds of the service process, of its encoders)


def pair_ratio(one_seconds: float, two_seconds: float) -> float:
    """Aggregate throughput of two exports against one, each export of the same rows."""
    return 2 * one_seconds / two_seconds


def per_second(runs: Sequence[Timed]) -> tuple[float, float]:
    seconds = sum(run[0] for run in runs)
    return sum(run[1][0] for run in runs) / seconds, sum(run[1][1] for run in runs) / seconds


def ratios_text(ratios: Sequence[float]) -> str:
    return ", ".join(f"{r:.2f}" for r in ratios)


def cores_text(cores: tuple[float, float]) -> str:
    return f"{cores[0]:.2f} + {cores[1]:.2f}"


async def timed_exports(service: ServiceChild, watcher: Watcher, http: aiohttp.ClientSession, bodies: list[dict[str, Any]]) -> Timed:
    """(seconds from the first request to the last completion, (CPU seconds of the service process, of its
    encoders) meanwhile)."""
    server_before, encoders_before = service_cpu(service.pid)
    started = time.monotonic()
    done = await run_jobs(http, service.url, watcher, bodies)
    seconds = time.monotonic() - started
    server_after, encoders_after = service_cpu(service.pid)
    for job_id, _ in done:
        await delete_job(http, service.url, job_id)
    return seconds, (server_after - server_before, encoders_after - encoders_before)


def floor_export(fmt: str, columns: Sequence[str], rows: int, path: Path) -> int:
    """One export by the floor alone, in a pool process, from the batches the service replays; returns the
    process id, so the caller can tell which processes did the work."""
    batches = replay_batches()
    floor = FLOORS[fmt](path, columns)
    for index in range(rows // BATCH_ROWS):
        floor.feed(batches[index % len(batches)])
    floor.finish()
    return os.getpid()


class FloorPool:
    """Two processes that run the floor: what the bare libraries gain from a second core on this machine,
    measured beside the service so that both meet the same neighbours."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.pool = ProcessPoolExecutor(max_workers=2, initializer=replay_batches)

    async def __aenter__(self) -> "FloorPool":
        # Until two processes have answered, each with its batches made: none of that is timed later.
        seen: set[int] = set()
        while len(seen) < 2:
            seen.update(await self._run("csv", [], [BATCH_ROWS, BATCH_ROWS]))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=True)

    async def _run(self, fmt: str, columns: Sequence[str], exports: list[int]) -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(
            loop.run_in_executor(self.pool, floor_export, fmt, columns, rows, self.work / f"floor-{n}.{fmt}")
            for n, rows in enumerate(exports)
        )))

    async def timed(self, fmt: str, columns: Sequence[str], exports: list[int]) -> float:
        started = time.monotonic()
        await self._run(fmt, columns, exports)
        return time.monotonic() - started


async def stage_scale(sizes: Sizes, mongo_url: str, work: Path, columns: Sequence[str], formats: Sequence[str]) -> list[ScaleFigure]:
    figures = []
    rows = sizes.scale_rows
    async with ServiceChild(mongo_url, work, max_concurrent=2, inproc=True) as service, FloorPool(work) as floor:
        async with Watcher(service.url) as watcher, aiohttp.ClientSession() as http:
            for fmt in formats:
                n = rows if fmt != "xlsx" else rows // 4
                body = job_body(fmt, columns, n)
                await timed_exports(service, watcher, http, [job_body(fmt, columns, 2 * BATCH_ROWS)])  # warm-up
                ones: list[Timed] = []
                twos: list[Timed] = []
                floor_ratios: list[float] = []
                # On a shared machine the speed of a core drifts over tens of seconds: a pair run back to back
                # meets one speed, so the ratio is taken within each pair, and the median over the pairs.
                for _ in range(SCALE_REPEATS):
                    ones.append(await timed_exports(service, watcher, http, [body]))
                    twos.append(await timed_exports(service, watcher, http, [body, body]))
                    floor_ratios.append(pair_ratio(await floor.timed(fmt, columns, [n]), await floor.timed(fmt, columns, [n, n])))
                figure = ScaleFigure(
                    fmt, n,
                    one=n / statistics.median(run[0] for run in ones),
                    two=2 * n / statistics.median(run[0] for run in twos),
                    pairs=[pair_ratio(a[0], b[0]) for a, b in zip(ones, twos)],
                    one_cores=per_second(ones),
                    two_cores=per_second(twos),
                    floor_pairs=floor_ratios,
                )
                log(f"scale {fmt}: one {figure.one:,.0f} rows/s ({cores_text(figure.one_cores)} cores), "
                    f"two {figure.two:,.0f} rows/s ({cores_text(figure.two_cores)} cores), ratio {figure.ratio:.2f} "
                    f"(pairs {ratios_text(figure.pairs)}); floor ratio {figure.floor_ratio:.2f} (pairs {ratios_text(figure.floor_pairs)})")
                figures.append(figure)
    return figures


# --- stage: end to end against the embedded server -------------------------------------------------------
@dataclass
class E2eFigure:
    fmt: str
    rows: int
    seconds: float
    server_cpu: float  # CPU seconds of the service process
    encoder_cpu: float  # CPU seconds of its encoder processes
    failures: list[str] = field(default_factory=list)  # error codes of attempts that failed

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    @property
    def cpu_per_100k(self) -> float:
        return (self.server_cpu + self.encoder_cpu) * 100_000 / self.rows


def seeded_count(url: str) -> int:
    client: MongoClient[Any] = MongoClient(url)
    try:
        rows = list(client[DB_NAME][DATA_COLLECTION].aggregate([{"$count": "n"}]))
        return int(rows[0]["n"]) if rows else 0
    finally:
        client.close()


def drop_jobs_collections(url: str) -> None:
    client: MongoClient[Any] = MongoClient(url)
    try:
        db = client[DB_NAME]
        for name in db.list_collection_names():
            if name.startswith("bench_jobs_"):
                db.drop_collection(name)
    finally:
        client.close()


def seed(url: str, rows: int) -> float:
    """Fill the bench collection once; later runs reuse it. Returns the seconds spent."""
    if seeded_count(url) == rows:
        return 0.0
    log(f"seeding {rows:,} documents into the bench database (once)")
    started = time.monotonic()
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_data.py"), "--url", url, "--db", DB_NAME,
         "--collection", DATA_COLLECTION, "--count", str(rows), "--seed", str(SEED), "--drop"],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def service_cpu(service_pid: int) -> tuple[float, float]:
    """(service process CPU, encoder CPU so far): the fork server's own time plus its reaped children."""
    return cpu_seconds(service_pid, with_children=False), cpu_seconds(forkserver_of(service_pid), with_children=True)


E2E_ATTEMPTS = 2


async def stage_e2e(mongo_url: str, work: Path, rows: int) -> list[E2eFigure]:
    """The request a user makes first: a whole collection, whole documents (tables discover their columns)."""
    figures = []
    async with ServiceChild(mongo_url, work, max_concurrent=1) as service:
        async with Watcher(service.url) as watcher, aiohttp.ClientSession() as http:
            # Starts the fork server, so its start-up is not charged to the first format.
            await timed_exports(service, watcher, http, [job_body("json", [], 2 * BATCH_ROWS)])
            for fmt in FORMATS:
                failures: list[str] = []
                figure: E2eFigure | None = None
                while figure is None and len(failures) < E2E_ATTEMPTS:
                    server_before, encoder_before = service_cpu(service.pid)
                    try:
                        [(job_id, done)] = await run_jobs(http, service.url, watcher, [job_body(fmt, [], 0 if rows == E2E_ROWS else rows)])
                    except JobFailed as exc:
                        await delete_job(http, service.url, exc.job_id)
                        log(f"e2e {fmt}: {exc}")
                        failures.append(exc.code)
                        continue
                    # Read before the deletion, whose request, unlink and database delete are no part of the export.
                    server_after, encoder_after = service_cpu(service.pid)
                    await delete_job(http, service.url, job_id)
                    figure = E2eFigure(fmt, done.get("processed") or rows, float(done["duration_seconds"]),
                                       server_after - server_before, encoder_after - encoder_before, failures)
                    log(f"e2e {fmt}: {figure.rate:,.0f} rows/s, CPU {figure.server_cpu:.2f} s server + "
                        f"{figure.encoder_cpu:.2f} s encoder for {figure.rows:,} rows")
                figures.append(figure or E2eFigure(fmt, 0, 0.0, 0.0, 0.0, failures))
    return figures


# --- report -----------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@dataclass
class Results:
    info: dict[str, str]
    sizes: Sizes
    writers: list[WriterFigure] = field(default_factory=list)
    instructions: list[InstructionFigure] = field(default_factory=list)
    rss: list[RssFigure] = field(default_factory=list)
    live: list[LiveFigure] = field(default_factory=list)
    scale: list[ScaleFigure] = field(default_factory=list)
    e2e: list[E2eFigure] = field(default_factory=list)
    seconds: float = 0.0
    load_at_end: str = ""


def render_live(live: LiveFigure, accept: list[str]) -> list[str]:
    p99 = live.health(99)
    worst = max(live.gaps.values()) if live.gaps else float("nan")
    out = [
        f"### Responsiveness with 4 exports at once (2 xlsx, 2 csv; rows from {live.source})",
        "",
        "| figure | value | limit |",
        "|---|---:|---:|",
        f"| /healthz p50 | {live.health(50):.1f} ms | |",
        f"| /healthz p99 | {p99:.1f} ms | < {HEALTH_P99_LIMIT_MS} ms {verdict(p99 < HEALTH_P99_LIMIT_MS)} |",
        f"| /healthz max | {max(live.health_ms):.1f} ms ({len(live.health_ms)} probes every 50 ms, {live.health_errors} errors) | |",
    ]
    for label, gap in live.gaps.items():
        out.append(f"| longest time without an event, {label} | {gap:.2f} s | ≤ {EVENT_GAP_LIMIT_S} s {verdict(gap <= EVENT_GAP_LIMIT_S)} |")
    out.append(f"| wait for the first `export-processing` event, worst | {max(live.first_gaps.values()):.2f} s | |")
    out += ["", f"All four took {live.seconds:.1f} s. Gaps are measured at the Socket.IO client, from the subscription "
            "to the job's end event; events a waiting job sends again count.", ""]
    accept.append(f"/healthz p99 with 4 exports, rows from {live.source}: {p99:.1f} ms (limit < {HEALTH_P99_LIMIT_MS}) — "
                  f"{verdict(p99 < HEALTH_P99_LIMIT_MS)}")
    accept.append(f"longest time without a progress event with 4 exports, rows from {live.source}: {worst:.2f} s "
                  f"(limit {EVENT_GAP_LIMIT_S}) — {verdict(worst <= EVENT_GAP_LIMIT_S)}")
    return out


def render(results: Results) -> str:
    info = results.info
    out = [
        "## Benchmark",
        "",
        f"{info['date']} · {info['machine']} · {info['cpu']} · {info['nproc']} cores · Python {info['python']} · "
        f"load average {info['load']} at start, {results.load_at_end} at end · run took {results.seconds / 60:.1f} min",
        "",
        "Rerun: `make bench` (or `.venv/bin/python scripts/bench.py`); the report is also written to `var/bench.md`.",
        "",
    ]
    accept: list[str] = []
    if results.writers:
        out += [
            "### Writer pipeline against the bare libraries (rows per CPU second, batches of "
            f"{BATCH_ROWS:,} generated documents, each batch's best of {results.sizes.writer_repeats})",
            "",
            "| format | rows | service pipeline | floor | CPU µs a row, service / floor | ratio | target |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for w in results.writers:
            target = FLOOR_TARGETS[w.fmt]
            out.append(
                f"| {w.fmt} | {w.rows:,} | {w.service:,.0f} | {w.floor:,.0f} | {1e6 / w.service:.1f} / {1e6 / w.floor:.1f} | "
                f"{w.ratio:.2f} | ≥ {target} {verdict(w.ratio >= target)} |"
            )
            accept.append(f"writer pipeline {w.fmt}: {w.ratio:.2f}× the floor (target ≥ {target}) — {verdict(w.ratio >= target)}")
        out += [
            "",
            "Service: `ExportPipeline(spec, path, info).feed(raw)` per batch, then `finish()` (decode, render, write, "
            "fsync); csv/xlsx/parquet with the generator's top-level keys as `fields`, json/ndjson whole documents, "
            "parquet-scalars only the top-level keys whose values are never documents or arrays (PyMongoArrow reads every batch). "
            "Floor: `bson.decode_all(raw)` plus `csv.writer.writerow(str(...))`, `orjson.dumps(doc, default=str)` + newline, "
            "xlsxwriter `constant_memory` `write_row(str(...))`, a pyarrow Table of each column's values (pyarrow's own type "
            "inference, `str()` where it has none) written by `pq.ParquetWriter` with zstd in row groups of the same size, "
            "with the file flushed and fsynced as the service does.",
            "",
        ]
    if results.instructions:
        out += [
            "### Instructions per row, writer pipeline against the bare libraries (valgrind callgrind)",
            "",
            "| format | rows | service pipeline | floor | ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        out += [f"| {i.fmt} | {i.rows:,} | {i.service:,.0f} | {i.floor:,.0f} | {i.ratio:.2f} |" for i in results.instructions]
        out += [
            "",
            "The same work as the table above, counted in instructions executed rather than timed: the same figure in "
            "every run, whatever else the machine does. Time also depends on caches and memory, which this does not "
            "weigh; the targets are judged on the timed table.",
            "",
        ]
    if results.rss:
        out += [
            "### Peak RSS (MiB), one fresh service process per case, rows from an in-process source",
            "",
            "| format | service " + " | service ".join(f"{r:,}" for r in results.sizes.rss_rows) + " | Δ | encoder "
            + " | encoder ".join(f"{r:,}" for r in results.sizes.rss_rows) + " | Δ | limit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        small, large = results.sizes.rss_rows
        by_case = {(f.fmt, f.rows): f for f in results.rss}
        for fmt in FORMATS:
            a, b = by_case.get((fmt, small)), by_case.get((fmt, large))
            if a is None or b is None:
                continue
            ds = (b.service_kib - a.service_kib) / 1024
            de = (b.encoder_kib - a.encoder_kib) / 1024
            ok = ds <= RSS_GROWTH_LIMIT_MIB and de <= RSS_GROWTH_LIMIT_MIB
            out.append(
                f"| {fmt} | {a.service_kib / 1024:.1f} | {b.service_kib / 1024:.1f} | {ds:+.1f} | {a.encoder_kib / 1024:.1f} | "
                f"{b.encoder_kib / 1024:.1f} | {de:+.1f} | ≤ {RSS_GROWTH_LIMIT_MIB} {verdict(ok)} |"
            )
            accept.append(f"peak RSS {fmt}: {large:,} rows vs {small:,}: service {ds:+.1f} MiB, encoder {de:+.1f} MiB "
                          f"(limit {RSS_GROWTH_LIMIT_MIB}) — {verdict(ok)}")
        out += ["", "Peak RSS is `VmHWM` from /proc: of the service process at the end of its export, and of its encoder "
                "process sampled every 20 ms (not `ru_maxrss`, which Linux carries over fork and exec from the parent).", ""]
    for live in results.live:
        out += render_live(live, accept)
    if results.scale:
        out += [
            "### One export against two at once (rows from an in-process source)",
            "",
            "| format | rows per export | 1 export (rows/s) | 2 exports (aggregate rows/s) | cores used, 1 export | cores used, 2 exports | ratio | floor's ratio | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in results.scale:
            out.append(f"| {s.fmt} | {s.rows:,} | {s.one:,.0f} | {s.two:,.0f} | {cores_text(s.one_cores)} | {cores_text(s.two_cores)} | {s.ratio:.2f} | "
                       f"{s.floor_ratio:.2f} | ≥ {SCALE_TARGET} {verdict(s.ratio >= SCALE_TARGET)} |")
            accept.append(f"two concurrent {s.fmt} exports: {s.ratio:.2f}× one (target ≥ {SCALE_TARGET}; the floor's own ratio "
                          f"in this run {s.floor_ratio:.2f}) — {verdict(s.ratio >= SCALE_TARGET)}")
        out += [""] + [f"- {s.fmt} pairs: service {ratios_text(s.pairs)}; floor {ratios_text(s.floor_pairs)}" for s in results.scale]
        out += ["", f"Wall time from the first request to the last `export-completed` event. {SCALE_REPEATS} pairs, each one export "
                "then two at once, back to back; rows/s are medians, the ratio is the median of the pairs' ratios (the "
                "speed of this machine's cores drifts over tens of seconds; a pair meets one speed). Cores used = CPU "
                "seconds per wall second of the service process + of its encoders. The floor's ratio: the writer floor "
                "(the bare libraries, as in the first table) run as one process against two, over the same rows, "
                "between the service's runs: what a second core gives on this machine at the time.", ""]
    if results.e2e:
        out += [
            "### End to end against the embedded server",
            "",
            "| format | rows | seconds | rows/s | service CPU s per 100k rows (server + encoder) |",
            "|---|---:|---:|---:|---:|",
        ]
        for e in results.e2e:
            failed = f" ({len(e.failures)} failed attempt(s): {', '.join(e.failures)})" if e.failures else ""
            if not e.rows:
                out.append(f"| {e.fmt} | failed{failed} | | | |")
                continue
            per = 100_000 / e.rows
            out.append(f"| {e.fmt}{failed} | {e.rows:,} | {e.seconds:.1f} | {e.rate:,.0f} | {e.cpu_per_100k:.2f} "
                       f"({e.server_cpu * per:.2f} + {e.encoder_cpu * per:.2f}) |")
        out += ["", "Request: the whole collection as whole documents (`{\"collection\": \"tasks\", \"format\": ...}`; "
                "csv/xlsx discover their columns). The embedded server (nx-27017 on SQLite) is the bottleneck here; "
                "its CPU is not counted.", ""]
    if accept:
        out += ["### Acceptance", ""] + [f"- {line}" for line in accept] + [""]
    return "\n".join(out)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- main -------------------------------------------------------------------------------------------------
STAGES = ("writers", "e2e", "rss", "live", "busy", "scale")
ON_REQUEST = ("instructions",)  # run by --only, not by default: it needs valgrind and takes minutes more


async def run_stages(args: argparse.Namespace, results: Results, work: Path) -> None:
    sizes = results.sizes
    stages = set(args.only.split(",")) if args.only else set(STAGES)
    if "writers" in stages:
        log("writer pipeline against the floors")
        results.writers = await asyncio.to_thread(stage_writers, sizes, work / "writers", args.writer_formats.split(","))
    if "instructions" in stages:
        log("instructions of the writer pipeline against the floors, under valgrind")
        results.instructions = await asyncio.to_thread(stage_instructions, work / "writers")
    if not stages & {"e2e", "rss", "live", "busy", "scale"}:
        return
    columns = top_level_columns(raw_batches(BATCH_ROWS))
    db_dir = Path(args.db_dir)
    with EmbeddedMongo(db_dir, db_file="bench.db") as server:
        try:
            seeded = await asyncio.to_thread(seed, server.url, E2E_ROWS)
            if seeded:
                log(f"seeded in {seeded:.0f} s")
            # The service is given the server's address as a user would give it; the timeout it would choose for
            # an embedded server of its own goes in the connection string.
            url = f"{server.url}&connectTimeoutMS={EMBEDDED_CONNECT_TIMEOUT_MS}"
            if "e2e" in stages:
                log("end to end against the embedded server")
                results.e2e = await stage_e2e(url, work / "exports", sizes.e2e_rows)
            if "rss" in stages:
                log("peak RSS, one process per case")
                results.rss = await stage_rss(sizes, url, work / "exports")
            if "live" in stages:
                log("responsiveness with four exports at once, rows from an in-process source")
                results.live.append(await stage_live(url, work / "exports", columns, sizes.live_rows, inproc=True))
            if "busy" in stages:
                log("responsiveness with four exports at once, rows from the embedded server")
                results.live.append(await stage_live(url, work / "exports", columns, sizes.busy_rows, inproc=False))
            if "scale" in stages:
                log("one export against two")
                results.scale = await stage_scale(sizes, url, work / "exports", columns, args.scale_formats.split(","))
        finally:
            await asyncio.to_thread(drop_jobs_collections, server.url)


async def main_async(args: argparse.Namespace) -> int:
    if args.serve:
        await serve_main(args)
        return 0
    if args.rss_case:
        await rss_case_main(args)
        return 0
    if args.instructions_case:
        instructions_case_main(args)
        return 0
    started = time.monotonic()
    results = Results(machine_info(), QUICK if args.quick else FULL)
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        work = Path(tmp)
        (work / "writers").mkdir()
        (work / "exports").mkdir()
        await run_stages(args, results, work)
    results.seconds = time.monotonic() - started
    results.load_at_end = load_average()
    report = render(results)
    print(report)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(report + "\n")
    log(f"report written to {REPORT.relative_to(ROOT)}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the export service and print a markdown report.")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default="", help=f"comma-separated stages among {', '.join(STAGES + ON_REQUEST)} "
                        f"({', '.join(ON_REQUEST)} only when asked for)")
    parser.add_argument("--scale-formats", default="csv,xlsx", help="formats of the one-against-two stage")
    parser.add_argument("--writer-formats", default=",".join(WRITER_FORMATS), help="formats of the writer stage")
    parser.add_argument("--db-dir", default=str(BENCH_DIR / "db"), help="where the bench's embedded database keeps its file")
    # Internal modes: the benchmark starts itself in these.
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-case", nargs=2, metavar=("FORMAT", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--instructions-case", nargs=3, metavar=("FORMAT", "SIDE", "BATCHES"), help=argparse.SUPPRESS)
    parser.add_argument("--mongo-url", help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--jobs-collection", default="bench_jobs", help=argparse.SUPPRESS)
    parser.add_argument("--max-concurrent", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--inproc", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the embedded database is stopped and the temporary files removed;
    # a service child exits by itself when its standard input closes with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
