"""Where an export's files live, and how unfinished ones are discarded: light enough for the server process,
which never imports the writers (they run in the encoder processes).

<id>.<ext> is a finished export; <id>.<ext>.<instance>.part the file an instance is writing (one per instance,
so a job taken over never shares a file); <that>.tmp its writer's scratch directory.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .query import ExportSpec

log = logging.getLogger(__name__)


def final_path(export_dir: Path, job_id: str, spec: ExportSpec) -> Path:
    return Path(export_dir) / f"{job_id}.{spec.extension}"


def part_path(final: Path, instance_id: str) -> Path:
    return final.with_name(f"{final.name}.{instance_id}.part")


def scratch_dir(part_path: Path) -> Path:
    """The directory for the writer's temporary files of an export (xlsxwriter keeps each sheet's rows in
    one until the workbook is closed): beside the partial file, on the export volume."""
    return part_path.with_name(part_path.name + ".tmp")


def discard_partial(part_path: Path) -> bool:
    """Remove an unfinished export: its partial file and its scratch directory, whichever exist. Whether the
    partial file is gone."""
    shutil.rmtree(scratch_dir(part_path), ignore_errors=True)
    return remove_file(part_path)


def remove_file(path: Path) -> bool:
    """Remove path if it is there; whether it is gone. A file that cannot be removed (its directory gone or
    unreadable, a read-only or failing filesystem) is logged, not a second failure on top of the first."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror or exc)
        return False
    return True


class CheckpointGone(OSError):
    """The file a checkpoint names is gone, or shorter than the checkpoint says: the run that wrote it discarded it
    after this run planned to go on from it (it had lost the job, and noticed). Starting again loses nothing."""

    code = "checkpoint_gone"


@dataclass(frozen=True)
class ResumePoint:
    """Where an earlier run's file is whole: its first bytes hold the header and rows rows (a checkpoint)."""

    source: Path  # that run's partial file (another instance's, or this one's)
    bytes: int
    rows: int
    columns: list[str] | None
    missed: tuple[str, ...] = ()  # paths later documents had that the columns lack, for the end's warning
    dotted: tuple[str, ...] = ()  # keys with a dot in their name met so far, for the end's warning


@dataclass
class PipelineResult:
    rows: int
    bytes: int
    columns: list[str] | None
    warnings: list[str] = field(default_factory=list)
