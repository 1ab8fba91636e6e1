"""JSON (an array, or an envelope with exportInfo) and NDJSON (one document a line), as relaxed or
canonical Extended JSON."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .base import Writer
from .values import encoder_for, project, projection_tree



class _DocumentWriter(Writer):
    """Shared by JSON and NDJSON: documents projected client-side, encoded as Extended JSON, one orjson
    call and one buffered write per document (small buffers, reused: cheaper than one big batch buffer)."""

    resumable = True

    def _prepare(self) -> None:
        self.encode = encoder_for(self.spec.json.mode)
        self.tree = projection_tree(self.columns) if self.columns else None

    def _write_documents(self, docs: list[dict[str, Any]], lead: bytes, between: bytes, tail: bytes) -> None:
        """Each document preceded by lead (the first) or between (the others), tail after the last."""
        encode, write, tree = self.encode, self.out.write, self.tree
        for doc in docs:
            write(lead)
            write(encode(doc if tree is None else project(doc, tree)))
            lead = between
        write(tail)


class NdjsonWriter(_DocumentWriter):
    def write_header(self) -> None:
        self._prepare()

    def resume(self, rows: int) -> None:
        self._prepare()

    def write_batch(self, docs: list[dict[str, Any]]) -> int:
        if docs:
            self._write_documents(docs, b"", b"\n", b"\n")
        return len(docs)

    def write_footer(self) -> None:
        """NDJSON has no footer: every line is a whole document."""


class JsonWriter(_DocumentWriter):
    """A JSON array of documents (mongoexport --jsonArray), or {"exportInfo": ..., "documents": [...]}."""

    def resume(self, rows: int) -> None:
        self._prepare()
        self.first = rows == 0  # the next document is the array's first, or follows one

    def write_header(self) -> None:
        self._prepare()
        self.first = True
        if self.spec.json.envelope:
            info = dict(self.info)
            info.setdefault("exported_at", datetime.now(timezone.utc))
            self.out.write(b'{"exportInfo": ' + self.encode(info) + b', "documents": [')
        else:
            self.out.write(b"[")

    def write_batch(self, docs: list[dict[str, Any]]) -> int:
        if docs:
            self._write_documents(docs, b"\n" if self.first else b",\n", b",\n", b"")
            self.first = False
        return len(docs)

    def write_footer(self) -> None:
        self.out.write(b"\n]}\n" if self.spec.json.envelope else b"\n]\n")
