"""The writer interface: one small class per format, batch-wise, after mongoexport's ExportOutput."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

from ..query import ExportSpec


class Writer(ABC):
    """write_header() once, write_batch() per batch of decoded documents, write_footer() once, close().

    tabular writers need columns; document writers take them as the projection (None = whole documents).
    """

    tabular = False
    # True: after the first batch, the pipeline hands each batch over raw, through write_raw(), so a writer
    # that reads BSON itself does not pay for decoding it into Python objects first.
    raw_input = False
    # True: a file this writer left at a checkpoint (after flush()) can be continued by another writer's resume().
    resumable = False

    def __init__(
        self,
        out: BinaryIO,
        spec: ExportSpec,
        columns: Sequence[str] | None,
        info: Mapping[str, Any],
        scratch_dir: Path | None = None,
    ) -> None:
        self.out = out
        self.spec = spec
        self.columns = list(columns) if columns is not None else None
        self.info = info
        # For a writer's own temporary files; whoever made the writer creates and removes it.
        self.scratch_dir = scratch_dir

    @abstractmethod
    def write_header(self) -> None: ...

    @abstractmethod
    def write_batch(self, docs: list[dict[str, Any]]) -> int:
        """Write docs; return how many rows were written."""

    def write_raw(self, raw: bytes, decode: Callable[[], list[dict[str, Any]]]) -> int:
        """Write one raw BSON batch; decode() gives its documents (decoded once, however often it is called).
        Only called when raw_input is True, never for the first batch."""
        return self.write_batch(decode())

    def raw_suspects(self) -> list[bytes] | None:
        """Of the batch write_raw() last took without decoding it, the documents (raw) that may hold a
        top-level field other than the columns; None when the writer cannot tell. The pipeline decodes only
        these to look for fields the first documents missed."""
        return None

    @abstractmethod
    def write_footer(self) -> None: ...

    def resume(self, rows: int) -> None:
        """Continue a file whose header and first rows (rows of them) were written by an earlier writer: get
        ready as write_header() does, writing nothing. Only called when resumable is True."""
        raise NotImplementedError(f"{type(self).__name__} cannot continue a file")

    def flush(self) -> None:
        """Push what the writer buffers itself into out, so the file is whole up to here (a checkpoint)."""

    def warnings(self) -> list[str]:
        """Anything the user should know about the file, for the job's warnings; called after write_footer()."""
        return []

    def close(self) -> None:
        """Flush what the writer buffers itself; the caller owns and closes out."""
