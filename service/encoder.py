"""Encoder processes: each running export gets one, fed raw BSON batches through a socket pair.

Decoding and formatting are CPU work; doing them here keeps the event loop free for the API and
Socket.IO, and lets several exports use several cores. The server process only moves bytes, with the event
loop's own non-blocking socket calls: no thread waits on an encoder, and one that dies is an end of stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import signal
import socket
import struct
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

from bson.errors import BSONError

from .files import CheckpointGone, PipelineResult, ResumePoint
from .query import ExportSpec

if TYPE_CHECKING:  # imported for real in the encoder process only (see _serve)
    from .pipeline import ExportPipeline

log = logging.getLogger(__name__)

# Encoders run at a lower priority: when the cores are busy, the event loop (and a database on the same host)
# still gets the CPU at once, so the API and progress events stay prompt; idle cores still go to the encoders.
ENCODER_NICE = 5
# Batches handed to an encoder and not yet acknowledged: one being encoded and the next one waiting, so the
# encoder never waits for a round trip through the event loop, and the server holds at most that many.
MAX_IN_FLIGHT = 2
# The message that asks for a checkpoint; a batch is whole BSON documents, at least 5 bytes, and b"" ends the export.
CHECKPOINT = b"C"
# Frames are those of multiprocessing.connection, which the encoder side uses: a 4-byte big-endian signed
# length (-1 and then an 8-byte length past 2 GiB), then the bytes. Replies are pickled tuples.
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
_LONG_FRAME = 0x7FFFFFFF
# Small frames go out in one write with their header; a batch is sent after its header rather than copied.
_JOIN_UP_TO = 16384
# Replies are tens of bytes: one read brings every one that is back.
_READ_SIZE = 65536
# After its end of the socket closes, how long to wait for the fork server to report the encoder's exit.
_EXIT_WAIT_SECONDS = 2.0
_FINISH_EXIT_WAIT_SECONDS = 10.0
# The longest wait for the encoder's answer to a batch or a checkpoint. A batch takes milliseconds, and the
# longest answer, a Parquet column widened to text, a copy of the file so far; an encoder silent this long is
# hung (stopped, deadlocked), and its job fails rather than hold a worker until its time limit. Closing the file
# (finish) has no such limit: a large XLSX or Parquet file takes as long as it takes.
REPLY_SECONDS = 900.0


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


def _disk_error(exc: OSError) -> tuple[str, str, str]:
    return ("error", "disk_error", f"cannot write export file: {exc.strerror or exc}")


def _answer(pipeline: ExportPipeline, raw: bytes) -> tuple[Any, ...]:
    """The encoder's reply to one message; a "done" or "error" reply ends the export."""
    try:
        if raw == CHECKPOINT:
            return ("checkpoint", pipeline.checkpoint())
        if raw:
            return ("ok", pipeline.feed(raw))
        return ("done", asdict(pipeline.finish()))
    except OSError as exc:
        pipeline.discard()
        return _disk_error(exc)
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        log.exception("encoding failed")
        pipeline.discard()
        return ("error", "encode_error", f"cannot encode a document: {exc}")


def _serve(sock: socket.socket, spec_doc: dict[str, Any], part_path: str, info: dict[str, Any], resume: ResumePoint | None) -> None:
    """The encoder process: open the .part file, then answer each message until the export ends."""
    _lower_priority()
    # Ctrl-C at a terminal reaches the whole process group: the service stops its encoders in order (writing
    # their checkpoints first), where a KeyboardInterrupt here would crash them mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with multiprocessing.connection.Connection(sock.detach()) as conn:
        try:
            from .pipeline import ExportPipeline  # the encoder's own import: the server process never loads the writers

            pipeline = ExportPipeline(ExportSpec.from_doc(spec_doc), Path(part_path), info, resume)
        except CheckpointGone as exc:
            conn.send(("error", CheckpointGone.code, str(exc)))
            return
        except OSError as exc:
            conn.send(_disk_error(exc))
            return
        try:
            conn.send(("ready",))
            while True:
                reply = _answer(pipeline, conn.recv_bytes())
                conn.send(reply)
                if reply[0] in ("done", "error"):
                    return
        except (EOFError, ConnectionError):
            # The server process died (a cancel kills this process instead): the partial file stays for the run
            # that takes the job over, which may go on from its last checkpoint, or for the stale-file clean-up.
            pipeline.abandon()


@contextlib.asynccontextmanager
async def _answered() -> AsyncIterator[None]:
    """Within REPLY_SECONDS, or the encoder is hung: an EncoderError, after which the caller kills it."""
    try:
        async with asyncio.timeout(REPLY_SECONDS):
            yield
    except TimeoutError:
        raise EncoderError("encoder_hung", f"the encoder process gave no answer within {REPLY_SECONDS:g} s") from None


def _frame_header(size: int) -> bytes:
    if size > _LONG_FRAME:
        return _LENGTH.pack(-1) + _LONG_LENGTH.pack(size)
    return _LENGTH.pack(size)


def _launch(process: multiprocessing.process.BaseProcess, child: socket.socket) -> None:
    # The child's end is closed here, once the fork server has its copy, even if the caller stopped waiting.
    try:
        process.start()
    finally:
        child.close()


class _Channel:
    """Frames over the server's end of the socket pair, sent and received by the event loop itself."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.ended = False  # the encoder's end is closed: what is buffered is all there will be

    async def send(self, payload: bytes) -> None:
        """Returns once payload is in the socket, that is held by the encoder's side; OSError if it is gone."""
        header = _frame_header(len(payload))
        if len(payload) <= _JOIN_UP_TO:
            await self.loop.sock_sendall(self.sock, header + payload)
        else:
            await self.loop.sock_sendall(self.sock, header)
            await self.loop.sock_sendall(self.sock, payload)

    async def receive(self) -> bytes:
        """The next frame; EOFError once the encoder's end is closed."""
        (size,) = _LENGTH.unpack(await self._take(_LENGTH.size))
        if size == -1:
            (size,) = _LONG_LENGTH.unpack(await self._take(_LONG_LENGTH.size))
        return await self._take(size)

    def ready(self) -> bool:
        """Whether receive() would return or fail without waiting."""
        self._read_available()
        return self.ended or self._complete()

    def close(self) -> None:
        # The loop forgets the descriptor before it is closed, so a reused number is never watched for us.
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        self.sock.close()

    def _complete(self) -> bool:
        if len(self.buffer) < _LENGTH.size:
            return False
        (size,) = _LENGTH.unpack_from(self.buffer)
        if size != -1:
            return len(self.buffer) >= _LENGTH.size + size
        head = _LENGTH.size + _LONG_LENGTH.size
        return len(self.buffer) >= head and len(self.buffer) >= head + _LONG_LENGTH.unpack_from(self.buffer, _LENGTH.size)[0]

    def _read_available(self) -> None:
        while not self.ended:
            try:
                self._received(self.sock.recv(_READ_SIZE))
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionError:  # reset by a dying encoder: what was read before still counts
                self.ended = True

    async def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if self.ended:
                raise EOFError
            try:
                self._received(await self.loop.sock_recv(self.sock, _READ_SIZE))
            except ConnectionError:
                self.ended = True
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def _received(self, data: bytes) -> None:
        if data:
            self.buffer += data
        else:
            self.ended = True


class EncoderPool:
    """Starts encoder processes from a fork server that has the writers imported already."""

    def __init__(self, max_workers: int) -> None:
        # max_workers, the exports running at once, sizes nothing here: each has its own process and socket.
        self.max_workers = max_workers
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["service.pipeline"])
        # The fork server is a fresh interpreter importing the writers (a few hundred ms): start it now, so it
        # is ready, or nearly, for the first export. Spawning it does not wait for the imports.
        multiprocessing.forkserver.ensure_running()
        self.closed = False

    def usable(self) -> bool:
        return not self.closed

    async def open(
        self, spec: ExportSpec, part_path: Path, info: Mapping[str, Any], resume: ResumePoint | None = None
    ) -> "EncoderSession":
        """An encoder writing part_path; with resume, going on from a checkpoint."""
        session = EncoderSession(self, spec, part_path, info, resume)
        await session.start()
        return session

    def close(self) -> None:
        self.closed = True


class EncoderSession:
    """The server's side of one encoder process. Calls are made one at a time (the runner awaits each), and
    kill() only when none is under way (the runner calls it once its await was cancelled or failed)."""

    def __init__(
        self, pool: EncoderPool, spec: ExportSpec, part_path: Path, info: Mapping[str, Any], resume: ResumePoint | None = None
    ) -> None:
        self.pool = pool
        self.spec = spec
        self.part_path = part_path
        self.info = dict(info)
        self.resume = resume
        self.channel: _Channel | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
        self.in_flight = 0  # batches sent and not acknowledged yet

    async def start(self) -> None:
        parent, child = socket.socketpair()
        self.channel = _Channel(parent)
        self.process = self.pool.ctx.Process(
            target=_serve, args=(child, self.spec.to_doc(), str(self.part_path), self.info, self.resume), daemon=True
        )
        try:
            # Starting asks the fork server for a process and waits for its answer: a few ms, or the fork
            # server's whole start-up for the first export, which the event loop must not wait out.
            await asyncio.to_thread(_launch, self.process, child)
            await self._receive()
        except BaseException:
            # Without the server's end, an encoder that did start reads the end of the stream and stops.
            self.channel.close()
            self.channel = None
            raise

    async def feed(self, raw: bytes) -> int:
        """Hand raw to the encoder; returns once the encoder holds it, with the rows of the batches it has
        finished meanwhile (the encoder works on raw while the caller fetches the next batch)."""
        # A batch larger than the socket's buffer is sent only as the encoder reads it, that is once it has
        # finished the one before; smaller ones are bounded by MAX_IN_FLIGHT.
        async with _answered():
            await self._send(raw)
            self.in_flight += 1
            return await self._collect(MAX_IN_FLIGHT)

    async def drain(self) -> int:
        """Wait until every batch handed over is encoded; returns the rows not reported by feed() yet."""
        async with _answered():
            return await self._collect(0)

    async def checkpoint(self) -> tuple[int, dict[str, Any]]:
        """Wait until every batch handed over is written, then make the file whole and durable there; returns
        the rows not reported by feed() yet, and {bytes, rows, columns} of the file at that point."""
        async with _answered():
            rows = await self._collect(0)
            await self._send(CHECKPOINT)
            return rows, (await self._receive())[1]

    async def finish(self) -> PipelineResult:
        await self._collect(0)
        await self._send(b"")
        reply = await self._receive()
        await self._exit_code(_FINISH_EXIT_WAIT_SECONDS)  # reaped, not left for the next start to collect
        self._channel().close()
        self.channel = None
        return PipelineResult(**reply[1])

    def kill(self) -> None:
        """Stop the process now; the caller removes the .part file."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            # Dead before the caller removes its files: a write still under way cannot recreate one.
            self.process.join(timeout=5)
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _channel(self) -> _Channel:
        if self.channel is None:
            raise EncoderError("encoder_crashed", "the encoder process was stopped")
        return self.channel

    async def _send(self, payload: bytes) -> None:
        try:
            await self._channel().send(payload)
        except ConnectionError:
            # The encoder is gone: the replies it sent first end with the error that stopped it, or with
            # the end of the stream, and _receive raises either.
            for _ in range(self.in_flight + 1):
                await self._receive()
            raise await self._crashed() from None

    async def _collect(self, keep: int) -> int:
        """Read acknowledgements until at most keep batches are unacknowledged, and then those already
        back; returns the rows they count."""
        rows = 0
        while self.in_flight and (self.in_flight > keep or self._channel().ready()):
            reply = await self._receive()
            self.in_flight -= 1
            rows += int(reply[1])
        return rows

    async def _receive(self) -> tuple[Any, ...]:
        try:
            reply = pickle.loads(await self._channel().receive())
        except EOFError:
            raise await self._crashed() from None
        if reply[0] == "error":
            raise EncoderError(reply[1], reply[2])
        return reply

    async def _crashed(self) -> EncoderError:
        code = await self._exit_code(_EXIT_WAIT_SECONDS)
        return EncoderError("encoder_crashed", f"the encoder process ended unexpectedly (exit code {code})")

    async def _exit_code(self, timeout: float) -> int | None:
        """The process's exit code, waiting up to timeout for the fork server to report it (the socket
        closes as the process dies, a moment before that report)."""
        process = self.process
        if process is None or process.exitcode is not None:
            return process.exitcode if process is not None else None
        loop = asyncio.get_running_loop()
        reported = loop.create_future()
        loop.add_reader(process.sentinel, lambda: reported.done() or reported.set_result(None))
        try:
            async with asyncio.timeout(timeout):
                await reported
        except TimeoutError:
            log.warning("encoder process %s did not report its exit within %g s", process.pid, timeout)
        finally:
            loop.remove_reader(process.sentinel)
        return process.exitcode
