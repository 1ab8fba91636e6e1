"""Encoder processes: each running export gets one, fed raw BSON batches through a pipe.

Decoding and formatting are CPU work; doing them here keeps the event loop free for the API and
Socket.IO, and lets several exports use several cores. The server process only moves bytes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

from bson.errors import BSONError

from .files import PipelineResult, ResumePoint
from .query import ExportSpec

log = logging.getLogger(__name__)

# Encoders run at a lower priority: when the cores are busy, the event loop (and a database on the same host)
# still gets the CPU at once, so the API and progress events stay prompt; idle cores still go to the encoders.
ENCODER_NICE = 5
# Batches handed to an encoder and not yet acknowledged: one being encoded and the next one waiting, so the
# encoder never waits for a round trip through the event loop, and the server holds at most that many.
MAX_IN_FLIGHT = 2
# The message that asks for a checkpoint; a batch is whole BSON documents, at least 5 bytes, and b"" ends the export.
CHECKPOINT = b"C"


class EncoderError(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _lower_priority() -> None:
    try:
        os.nice(ENCODER_NICE)
    except OSError as exc:  # a sandbox may forbid it; encoding at normal priority is still correct
        log.debug("could not lower the encoder's priority: %s", exc)


def _serve(
    conn: multiprocessing.connection.Connection, spec_doc: dict[str, Any], part_path: str, info: dict[str, Any], resume: dict[str, Any] | None
) -> None:
    """The encoder process: open the .part file, then answer each batch with its row count."""
    _lower_priority()
    try:
        point = ResumePoint(Path(resume["source"]), resume["bytes"], resume["rows"], resume["columns"]) if resume else None
        from .pipeline import ExportPipeline  # the encoder's own import: the server process never loads the writers

        pipeline = ExportPipeline(ExportSpec.from_doc(spec_doc), Path(part_path), info, point)
    except OSError as exc:
        conn.send(("error", "disk_error", f"cannot write export file: {exc.strerror or exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            raw = conn.recv_bytes()
        except EOFError:
            # The server process died (a cancel kills this process instead): the partial file stays for the run
            # that takes the job over, which may go on from its last checkpoint, or for the stale-file clean-up.
            pipeline.abandon()
            return
        try:
            if raw == CHECKPOINT:
                conn.send(("checkpoint", pipeline.checkpoint()))
                continue
            if raw:
                conn.send(("ok", pipeline.feed(raw)))
                continue
            conn.send(("done", asdict(pipeline.finish())))
            return
        except OSError as exc:
            pipeline.discard()
            conn.send(("error", "disk_error", f"cannot write export file: {exc.strerror or exc}"))
            return
        except (BSONError, ValueError, TypeError, OverflowError) as exc:
            log.exception("encoding failed")
            pipeline.discard()
            conn.send(("error", "encode_error", f"cannot encode a document: {exc}"))
            return


class EncoderPool:
    """Starts encoder processes from a fork server that has the writers imported already."""

    def __init__(self, max_workers: int) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["service.pipeline"])
        # Blocking pipe I/O happens on these threads: one call at a time per running export, plus starts and joins.
        self.executor = ThreadPoolExecutor(max_workers=max(4, 2 * max_workers), thread_name_prefix="encoder-io")
        # The fork server is a fresh interpreter importing the writers (a few hundred ms): start it now, in the
        # background, instead of in the first export's time.
        self.executor.submit(multiprocessing.forkserver.ensure_running)
        self.closed = False

    def usable(self) -> bool:
        return not self.closed

    async def open(
        self, spec: ExportSpec, part_path: Path, info: Mapping[str, Any], resume: Mapping[str, Any] | None = None
    ) -> "EncoderSession":
        """An encoder writing part_path; with resume ({source, bytes, rows, columns}), going on from a checkpoint."""
        session = EncoderSession(self, spec, part_path, info, resume)
        await session.start()
        return session

    def close(self) -> None:
        self.closed = True
        self.executor.shutdown(wait=False, cancel_futures=True)


class EncoderSession:
    """The server's side of one encoder process. Calls are made one at a time (the runner awaits each)."""

    def __init__(
        self, pool: EncoderPool, spec: ExportSpec, part_path: Path, info: Mapping[str, Any], resume: Mapping[str, Any] | None = None
    ) -> None:
        self.pool = pool
        self.spec = spec
        self.part_path = part_path
        self.info = dict(info)
        self.resume = dict(resume) if resume else None
        self.conn: multiprocessing.connection.Connection | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
        self.in_flight = 0  # batches sent and not acknowledged yet
        self.pending: concurrent.futures.Future[Any] | None = None  # the pool thread working for us, if any

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.pending = self.pool.executor.submit(fn, *args)
        return await asyncio.wrap_future(self.pending)

    def _start_blocking(self) -> tuple[Any, ...]:
        parent, child = self.pool.ctx.Pipe(duplex=True)
        self.process = self.pool.ctx.Process(
            target=_serve, args=(child, self.spec.to_doc(), str(self.part_path), self.info, self.resume), daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        return self._receive(parent)

    # The blocking helpers below run on a pool thread and take the pipe as an argument: kill() may drop
    # self.conn from the event loop while one of them is still inside a call.
    def _receive(self, conn: multiprocessing.connection.Connection) -> tuple[Any, ...]:
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            code = self.process.exitcode if self.process else None
            raise EncoderError("encoder_crashed", f"the encoder process ended unexpectedly (exit code {code})") from None
        if reply[0] == "error":
            raise EncoderError(reply[1], reply[2])
        return reply

    def _send(self, conn: multiprocessing.connection.Connection, raw: bytes) -> None:
        try:
            conn.send_bytes(raw)
        except OSError:  # BrokenPipeError: the process died; its last reply, or EOF, says why
            while True:
                self._receive(conn)
        self.in_flight += 1

    def _collect(self, conn: multiprocessing.connection.Connection, keep: int) -> int:
        """Read acknowledgements until at most keep batches are unacknowledged, and then those already
        back; returns the rows they count."""
        rows = 0
        while self.in_flight and (self.in_flight > keep or conn.poll()):
            reply = self._receive(conn)
            self.in_flight -= 1
            rows += int(reply[1])
        return rows

    def _feed_blocking(self, conn: multiprocessing.connection.Connection, raw: bytes) -> int:
        # A batch larger than the pipe's buffer is sent only as the encoder reads it, that is once it has
        # finished the one before; smaller ones are bounded by MAX_IN_FLIGHT.
        self._send(conn, raw)
        return self._collect(conn, MAX_IN_FLIGHT)

    def _finish_blocking(self, conn: multiprocessing.connection.Connection) -> tuple[Any, ...]:
        self._collect(conn, 0)
        self._send(conn, b"")
        reply = self._receive(conn)
        self.in_flight = 0
        if self.process is not None:
            self.process.join(timeout=10)
        return reply

    def _checkpoint_blocking(self, conn: multiprocessing.connection.Connection) -> tuple[int, dict[str, Any]]:
        rows = self._collect(conn, 0)
        conn.send_bytes(CHECKPOINT)
        return rows, self._receive(conn)[1]

    def _pipe(self) -> multiprocessing.connection.Connection:
        if self.conn is None:
            raise EncoderError("encoder_crashed", "the encoder process was stopped")
        return self.conn

    async def start(self) -> None:
        await self._call(self._start_blocking)

    async def feed(self, raw: bytes) -> int:
        """Hand raw to the encoder; returns once the encoder holds it, with the rows of the batches it has
        finished meanwhile (the encoder works on raw while the caller fetches the next batch)."""
        return int(await self._call(self._feed_blocking, self._pipe(), raw))

    async def drain(self) -> int:
        """Wait until every batch handed over is encoded; returns the rows not reported by feed() yet."""
        return int(await self._call(self._collect, self._pipe(), 0))

    async def checkpoint(self) -> tuple[int, dict[str, Any]]:
        """Wait until every batch handed over is written, then make the file whole and durable there; returns
        the rows not reported by feed() yet, and {bytes, rows, columns} of the file at that point."""
        rows, state = await self._call(self._checkpoint_blocking, self._pipe())
        return int(rows), state

    async def finish(self) -> PipelineResult:
        reply = await self._call(self._finish_blocking, self._pipe())
        return PipelineResult(**reply[1])

    def kill(self) -> None:
        """Stop the process now; the caller removes the .part file."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.pending is not None and not self.pending.done():
            # A pool thread is still inside a send or receive on this pipe (it fails at once now that the
            # process is gone): closing the descriptor under it could hand its number to another file.
            self.pending.add_done_callback(lambda _: conn.close())
        else:
            conn.close()
