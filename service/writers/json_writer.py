"""JSON (an array, or an envelope with exportInfo) and NDJSON (one document a line), as relaxed or
canonical Extended JSON."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .base import Writer
from .values import batch_encoder_for, encoder_for, project, projection_tree

# Settings for other writers that travel in the same info mapping; they are not about the export.
NOT_EXPORT_INFO = frozenset({"xlsx_max_rows_per_sheet"})


class _DocumentWriter(Writer):
    """Shared by JSON and NDJSON: documents projected client-side, encoded as Extended JSON."""

    def _prepare(self) -> None:
        self.encode = encoder_for(self.spec.json.mode)
        self.encode_many = batch_encoder_for(self.spec.json.mode)
        self.tree = projection_tree(self.columns) if self.columns else None

    def _encoded(self, docs: list[dict[str, Any]]) -> list[bytes]:
        tree = self.tree
        if tree is not None:
            docs = [project(doc, tree) for doc in docs]
        return self.encode_many(docs)


class NdjsonWriter(_DocumentWriter):
    def write_header(self) -> None:
        self._prepare()

    def write_batch(self, docs: list[dict[str, Any]]) -> int:
        if docs:
            encoded = self._encoded(docs)
            encoded.append(b"")
            self.out.write(b"\n".join(encoded))
        return len(docs)

    def write_footer(self) -> None:
        """NDJSON has no footer: every line is a whole document."""


class JsonWriter(_DocumentWriter):
    """A JSON array of documents (mongoexport --jsonArray), or {"exportInfo": ..., "documents": [...]}."""

    def write_header(self) -> None:
        self._prepare()
        self.first = True
        if self.spec.json.envelope:
            info = {key: value for key, value in self.info.items() if key not in NOT_EXPORT_INFO}
            info.setdefault("exported_at", datetime.now(timezone.utc))
            self.out.write(b'{"exportInfo": ' + self.encode(info) + b', "documents": [')
        else:
            self.out.write(b"[")

    def write_batch(self, docs: list[dict[str, Any]]) -> int:
        if not docs:
            return 0
        body = b",\n".join(self._encoded(docs))
        self.out.write((b"\n" if self.first else b",\n") + body)
        self.first = False
        return len(docs)

    def write_footer(self) -> None:
        self.out.write(b"\n]}\n" if self.spec.json.envelope else b"\n]\n")
