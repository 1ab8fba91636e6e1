"""Counters for /metrics, in Prometheus text format."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    jobs_created: Counter[str] = field(default_factory=Counter)  # by format
    jobs_completed: Counter[str] = field(default_factory=Counter)  # by format
    jobs_ended: Counter[str] = field(default_factory=Counter)  # failed/cancelled, by code
    rows: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)
    running: int = 0

    def job_created(self, fmt: str) -> None:
        self.jobs_created[fmt] += 1

    def job_completed(self, fmt: str, rows: int, size: int, seconds: float) -> None:
        self.jobs_completed[fmt] += 1
        self.rows[fmt] += rows
        self.bytes[fmt] += size
        self.seconds[fmt] += seconds

    def job_ended(self, code: str) -> None:
        self.jobs_ended[code] += 1

    def render(self, queued: int | None) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, values: Counter[str], label: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for key, value in sorted(values.items()):
                lines.append(f'{name}{{{label}="{key}"}} {value}')

        family("export_jobs_created_total", "counter", "Export jobs created.", self.jobs_created, "format")
        family("export_jobs_completed_total", "counter", "Export jobs completed.", self.jobs_completed, "format")
        family("export_jobs_ended_total", "counter", "Export jobs failed or cancelled, by reason.", self.jobs_ended, "reason")
        family("export_rows_total", "counter", "Rows written to completed exports.", self.rows, "format")
        family("export_bytes_total", "counter", "Bytes of completed export files.", self.bytes, "format")
        family("export_seconds_total", "counter", "Wall seconds spent on completed exports.", self.seconds, "format")
        lines.append("# HELP export_jobs_running Export jobs running in this process.")
        lines.append("# TYPE export_jobs_running gauge")
        lines.append(f"export_jobs_running {self.running}")
        if queued is not None:
            lines.append("# HELP export_jobs_queued Export jobs waiting, across all instances.")
            lines.append("# TYPE export_jobs_queued gauge")
            lines.append(f"export_jobs_queued {queued}")
        return "\n".join(lines) + "\n"
