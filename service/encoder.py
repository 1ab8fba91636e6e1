"""Encoder processes: each running export gets one, fed raw BSON batches through a pipe.

Decoding and formatting are CPU work; doing them here keeps the event loop free for the API and
Socket.IO, and lets several exports use several cores. The server process only moves bytes.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from bson.errors import BSONError

from .pipeline import ExportPipeline, PipelineResult
from .query import ExportSpec

log = logging.getLogger(__name__)


class EncoderError(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _serve(conn: multiprocessing.connection.Connection, spec_doc: dict[str, Any], part_path: str, info: dict[str, Any]) -> None:
    """The encoder process: open the .part file, then answer each batch with its row count."""
    try:
        pipeline = ExportPipeline(ExportSpec.from_doc(spec_doc), Path(part_path), info)
    except OSError as exc:
        conn.send(("error", "disk_error", f"cannot write export file: {exc.strerror or exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            raw = conn.recv_bytes()
        except EOFError:  # the server went away or cancelled: leave no partial file
            pipeline.abort()
            return
        try:
            if raw:
                conn.send(("ok", pipeline.feed(raw)))
                continue
            conn.send(("done", asdict(pipeline.finish())))
            return
        except OSError as exc:
            pipeline.abort()
            conn.send(("error", "disk_error", f"cannot write export file: {exc.strerror or exc}"))
            return
        except (BSONError, ValueError, TypeError, OverflowError) as exc:
            log.exception("encoding failed")
            pipeline.abort()
            conn.send(("error", "encode_error", f"cannot encode a document: {exc}"))
            return


class EncoderPool:
    """Starts encoder processes from a fork server that has the writers imported already."""

    def __init__(self, max_workers: int) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["service.pipeline"])
        # Blocking pipe I/O happens on these threads: two per running export (send and receive overlap).
        self.executor = ThreadPoolExecutor(max_workers=max(4, 2 * max_workers), thread_name_prefix="encoder-io")

    async def open(self, spec: ExportSpec, part_path: Path, info: Mapping[str, Any]) -> "EncoderSession":
        session = EncoderSession(self, spec, part_path, info)
        await session.start()
        return session

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class EncoderSession:
    def __init__(self, pool: EncoderPool, spec: ExportSpec, part_path: Path, info: Mapping[str, Any]) -> None:
        self.pool = pool
        self.spec = spec
        self.part_path = part_path
        self.info = dict(info)
        self.conn: multiprocessing.connection.Connection | None = None
        self.process: multiprocessing.process.BaseProcess | None = None

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool.executor, fn, *args)

    def _start_blocking(self) -> tuple[Any, ...]:
        parent, child = self.pool.ctx.Pipe(duplex=True)
        self.process = self.pool.ctx.Process(
            target=_serve, args=(child, self.spec.to_doc(), str(self.part_path), self.info), daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        return self._receive()

    def _receive(self) -> tuple[Any, ...]:
        assert self.conn is not None
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            code = self.process.exitcode if self.process else None
            raise EncoderError("encoder_crashed", f"the encoder process ended unexpectedly (exit code {code})") from None
        if reply[0] == "error":
            raise EncoderError(reply[1], reply[2])
        return reply

    def _roundtrip(self, raw: bytes) -> tuple[Any, ...]:
        assert self.conn is not None
        try:
            self.conn.send_bytes(raw)
        except (BrokenPipeError, OSError):
            pass  # the process died; _receive reports why
        return self._receive()

    async def start(self) -> None:
        await self._call(self._start_blocking)

    async def feed(self, raw: bytes) -> int:
        reply = await self._call(self._roundtrip, raw)
        return int(reply[1])

    async def finish(self) -> PipelineResult:
        reply = await self._call(self._roundtrip, b"")
        await self._call(self._join)
        return PipelineResult(**reply[1])

    def _join(self) -> None:
        if self.process is not None:
            self.process.join(timeout=10)

    def kill(self) -> None:
        """Stop the process now; the caller removes the .part file."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
