"""Raw BSON batches in, one export file out: decoding, column discovery and the format writer.

Runs inside an encoder process (see encoder.py), so none of this touches the event loop.
"""
from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from bson import decode_all
from bson.errors import InvalidBSON
from bson.codec_options import CodecOptions, DatetimeConversion

from .files import CheckpointGone, PipelineResult, ResumePoint, discard_partial, scratch_dir
from .query import ExportSpec
from .writers import Writer, make_writer, writer_class
from .writers.values import discover_columns, dotted_keys, mark_non_finite, non_finite_suspects, paths_of

log = logging.getLogger(__name__)
# BSON datetimes are UTC. Decoding them naive (and treating naive as UTC everywhere in the writers)
# spares a Python-level utcoffset() call per date in every isoformat; out-of-range dates come as DatetimeMS.
DECODE_OPTIONS: CodecOptions = CodecOptions(tz_aware=False, datetime_conversion=DatetimeConversion.DATETIME_AUTO)
# The plain conversion decodes faster; a batch holding a date outside years 1-9999 is decoded again with AUTO.
FAST_DECODE_OPTIONS: CodecOptions = CodecOptions(tz_aware=False)
MAX_WARNED_PATHS = 20


class GzipMembers(io.RawIOBase):
    """A gzip stream that can end its current member (a checkpoint) and go on in a new one: the file is a
    whole gzip file at every member's end, which a resumed export appends to. Readers take the members as one
    stream (RFC 1952)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.member: gzip.GzipFile | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.member is None:
            # No name and no time in the header: the same export compresses to the same bytes.
            self.member = gzip.GzipFile(filename="", fileobj=self.file, mode="wb", compresslevel=6, mtime=0)
        return self.member.write(data)

    def end_member(self) -> None:
        if self.member is not None:
            self.member.close()  # writes the trailer; the file itself stays open
            self.member = None

    def close(self) -> None:
        self.end_member()
        super().close()


class ExportPipeline:
    def __init__(self, spec: ExportSpec, part_path: Path, info: Mapping[str, Any], resume: ResumePoint | None = None) -> None:
        self.spec = spec
        self.part_path = Path(part_path)
        self.info = info
        self.rows = 0
        self.writer: Writer | None = None
        self.discovered: set[str] | None = None  # columns found by sampling, when fields were not given
        self.leaf_keys: frozenset[str] = frozenset()  # top-level keys that are columns themselves
        self.missed: dict[str, None] = {}
        self.dotted: dict[str, None] = {}  # keys with a dot in their name, which no path names
        self.scratch = scratch_dir(self.part_path)
        self.scratch.mkdir(exist_ok=True)
        self.file: BinaryIO = _open_part(self.part_path, resume)
        self.gzip = GzipMembers(self.file) if spec.compress == "gzip" else None
        # GzipFile.write is Python code, so small writes are gathered first.
        self.stream: BinaryIO = io.BufferedWriter(self.gzip, 1 << 20) if self.gzip is not None else self.file  # type: ignore[assignment]
        if resume is not None:
            self._continue(resume)

    def _continue(self, resume: ResumePoint) -> None:
        """Go on from a checkpoint: the header and the first rows are in the file already."""
        self.rows = resume.rows
        columns = resume.columns
        if columns is not None and not self.spec.fields:
            self.discovered = set(columns)
            self.leaf_keys = frozenset(c for c in columns if "." not in c)
        # Capped as they are noted: a checkpoint written before there was a cap may carry thousands.
        self.missed = dict.fromkeys(resume.missed[:MAX_WARNED_PATHS])
        self.dotted = dict.fromkeys(resume.dotted[:MAX_WARNED_PATHS])
        self.writer = make_writer(self.stream, self.spec, columns, self.info, self.scratch)
        self.writer.resume(resume.rows)

    def checkpoint(self) -> dict[str, Any]:
        """Make the file whole up to the last row written (a gzip member ends here) and durable; returns where
        a resumed export may go on from."""
        if self.writer is not None:
            self.writer.flush()
        if self.stream is not self.file:
            self.stream.flush()
        if self.gzip is not None:
            self.gzip.end_member()
        self.file.flush()
        os.fsync(self.file.fileno())
        return {"bytes": self.file.tell(), "rows": self.rows, "columns": self.writer.columns if self.writer else None,
                "missed": list(self.missed), "dotted": list(self.dotted)}

    def _start(self, first_docs: list[dict[str, Any]]) -> None:
        columns: list[str] | None = list(self.spec.fields) if self.spec.fields else None
        if columns is None and writer_class(self.spec.format).tabular:
            # The first batch is the sample; later documents are checked against it.
            columns = discover_columns(first_docs)
            for doc in first_docs:
                for key in dotted_keys(doc):
                    _note(self.dotted, key)
            self.discovered = set(columns)
            self.leaf_keys = frozenset(c for c in columns if "." not in c)
        self.writer = make_writer(self.stream, self.spec, columns, self.info, self.scratch)
        self.writer.write_header()

    def feed(self, raw: bytes) -> int:
        """Write one raw batch: decoded, or as it is to a writer that reads raw batches itself."""
        if self.writer is not None and self.writer.raw_input:
            return self._write_raw(raw)
        return self._write(decode_batch(raw))

    def _write_raw(self, raw: bytes) -> int:
        decoded: list[list[dict[str, Any]]] = []

        def decode() -> list[dict[str, Any]]:
            # At most once per batch, and only if the column check or the writer needs documents.
            if not decoded:
                decoded.append(decode_batch(raw))
            return decoded[0]

        assert self.writer is not None
        written = self.writer.write_raw(raw, decode)
        # Fields the first documents missed: looked for in the documents when the writer decoded them, else
        # in those the writer cannot tell hold none.
        if self.discovered is not None and len(self.missed) < MAX_WARNED_PATHS:
            suspects = None if decoded else self.writer.raw_suspects()
            if suspects is None:
                self._note_missed(decode())
            elif suspects:
                self._note_missed(decode_batch(b"".join(suspects)))
        self.rows += written
        return written

    def _write(self, docs: list[dict[str, Any]]) -> int:
        if self.writer is None:
            if not docs:  # an empty batch is no sample: wait for the first documents
                return 0
            self._start(docs)
        elif self.discovered is not None and len(self.missed) < MAX_WARNED_PATHS:
            self._note_missed(docs)
        assert self.writer is not None
        written = self.writer.write_batch(docs)
        self.rows += written
        return written

    def _note_missed(self, docs: list[dict[str, Any]]) -> None:
        known, leaf_keys, missed = self.discovered, self.leaf_keys, self.missed
        assert known is not None
        for doc in docs:
            for key, value in doc.items():
                if key in leaf_keys:  # the whole value is in that column, however deep it goes
                    continue
                if "." in key:
                    _note(self.dotted, key)
                elif type(value) is dict and value:
                    for path in paths_of(value, key + "."):
                        if not _covered(path, known):
                            _note(missed, path)
                elif key not in known:
                    _note(missed, key)

    def finish(self) -> PipelineResult:
        if self.writer is None:
            self._start([])
        assert self.writer is not None
        self.writer.write_footer()
        self.writer.close()
        if self.stream is not self.file:
            self.stream.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
        warnings = self.writer.warnings()
        if self.dotted:
            warnings.append(
                "keys with a dot in their name are in no column, since a path cannot name them: "
                + _listed(self.dotted)
                + " (rename them in a pipeline, with $getField)"
            )
        if self.missed:
            warnings.append(
                "columns were chosen from the first documents; later documents also have "
                + _listed(self.missed)
                + " (pass fields to export them)"
            )
        return PipelineResult(self.rows, self.part_path.stat().st_size, self.writer.columns, warnings)

    def abandon(self) -> None:
        """Close the partial file and leave it where it is."""
        try:
            self.file.close()
        except OSError as exc:
            log.debug("closing an abandoned export file failed: %s", exc)

    def discard(self) -> None:
        """Discard the partial file and the writer's temporary files. Closing flushes the buffer, which
        fails again on a full disk: that cannot matter for a file about to be removed."""
        try:
            self.file.close()
        except OSError as exc:
            log.debug("closing a discarded export file failed: %s", exc)
        finally:
            discard_partial(self.part_path)


def _open_part(part_path: Path, resume: ResumePoint | None) -> BinaryIO:
    """The partial file, new, or holding the first resume.bytes of the resumed run's file (copied when that
    file is another run's: the run that lost the job may still hold it open and write to it)."""
    if resume is None:
        return open(part_path, "wb", buffering=1 << 20)
    if resume.source != part_path:
        try:
            src = open(resume.source, "rb")
        except FileNotFoundError:
            raise CheckpointGone(f"the checkpoint's file {resume.source.name} is gone") from None
        with src, open(part_path, "wb") as dst:
            _copy_prefix(src, dst, resume.bytes)
    file = open(part_path, "r+b", buffering=1 << 20)
    file.truncate(resume.bytes)
    file.seek(resume.bytes)
    if file.tell() != resume.bytes or os.fstat(file.fileno()).st_size != resume.bytes:
        file.close()
        raise CheckpointGone(f"the partial file holds fewer than the checkpoint's {resume.bytes} bytes")
    return file


def _copy_prefix(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    left = size
    while left:
        chunk = src.read(min(left, 1 << 20))
        if not chunk:
            raise CheckpointGone(f"the checkpoint's file holds fewer than its {size} bytes")
        dst.write(chunk)
        left -= len(chunk)


def decode_batch(raw: bytes) -> list[dict[str, Any]]:
    """The documents of a raw batch; NaN and infinite doubles come out as NonFiniteDouble."""
    try:
        docs = decode_all(raw, FAST_DECODE_OPTIONS)
    except InvalidBSON:
        docs = decode_all(raw, DECODE_OPTIONS)
    for index in non_finite_suspects(raw):
        docs[index] = mark_non_finite(docs[index])
    return docs


def _covered(path: str, known: set[str]) -> bool:
    """True when path or one of its parents is a column (a parent column holds it as JSON text)."""
    while path not in known:
        cut = path.rfind(".")
        if cut < 0:
            return False
        path = path[:cut]
    return True


def _note(found: dict[str, None], path: str) -> None:
    """Up to MAX_WARNED_PATHS: a warning names no more, and a checkpoint carries them all (keys that differ in
    every document grew it past MongoDB's 16 MB document limit)."""
    if len(found) < MAX_WARNED_PATHS:
        found.setdefault(path, None)


def _listed(found: dict[str, None]) -> str:
    return ", ".join(found) + (f" and perhaps more (the first {MAX_WARNED_PATHS} are named)" if len(found) >= MAX_WARNED_PATHS else "")
