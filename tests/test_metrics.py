"""GET /metrics: Prometheus text that Prometheus's own parser reads, line by line in the exposition format, with
counters that follow the jobs (created, cancelled, completed with their rows and bytes) and gauges for the
running and the queued ones."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app

from conftest import Gate, hold_queue, make_settings, release_queue, until, wait_status

FAMILIES = {
    "export_jobs_created": "counter", "export_jobs_completed": "counter", "export_jobs_ended": "counter",
    "export_rows": "counter", "export_bytes": "counter", "export_seconds": "counter",
    "export_jobs_running": "gauge", "export_jobs_queued": "gauge",
}
# The text format, strictly: comments of two kinds, and samples `name{label="value",...} number`.
COMMENT = re.compile(r'# (HELP [a-z_]+ \S.*|TYPE [a-z_]+ (counter|gauge))')
SAMPLE = re.compile(r'[a-z_]+(\{[a-z_]+="[^"\\\n]*"(,[a-z_]+="[^"\\\n]*")*\})? -?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(api: Any) -> Samples:
    resp = await api.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain", resp.headers
    text = await resp.text()
    assert text.endswith("\n")
    for line in text.splitlines():
        assert COMMENT.fullmatch(line) or SAMPLE.fullmatch(line), f"not in the text format: {line!r}"
    families = list(text_string_to_metric_families(text))
    assert {family.name: family.type for family in families} == FAMILIES
    assert all(family.documentation for family in families)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; a labelled counter not yet seen is 0 (the service writes no zero samples)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_are_prometheus_text_and_follow_the_jobs(aiohttp_client: Any, mongo_url: str, tmp_path: Path, tasks: Any, gate: Gate) -> None:
    api = await aiohttp_client(create_app(make_settings(mongo_url, tmp_path, max_concurrent=1), source=gate))
    before = await scrape(api)
    assert value(before, "export_jobs_running") == value(before, "export_jobs_queued") == 0

    holders = await hold_queue(api, gate)
    queued = [await (await api.post("/api/exports", json={"collection": "tasks", "format": fmt, "limit": 120})).json() for fmt in ("csv", "ndjson")]
    held = await scrape(api)
    assert value(held, "export_jobs_running") == 1 and value(held, "export_jobs_queued") == 2
    assert value(held, "export_jobs_created_total", format="ndjson") == 2  # the holder and one queued
    assert value(held, "export_jobs_created_total", format="csv") == 1

    assert (await api.delete(f"/api/exports/{queued[1]['id']}")).status == 200
    await release_queue(api, gate, holders)
    done = await wait_status(api, queued[0]["id"])
    assert done["status"] == "completed", done
    after = await until(lambda: scrape_when_idle(api), "no export running in /metrics", timeout=10)
    assert value(after, "export_jobs_ended_total", reason="cancelled") == 2  # the queued ndjson job and the holder
    assert value(after, "export_jobs_completed_total", format="csv") == 1
    assert value(after, "export_rows_total", format="csv") == 120
    size = len(await (await api.get(done["download_url"])).read())
    assert value(after, "export_bytes_total", format="csv") == size == done["bytes"]
    assert value(after, "export_seconds_total", format="csv") > 0
    assert value(after, "export_jobs_queued") == 0
    assert value(after, "export_jobs_completed_total", format="ndjson") == value(after, "export_rows_total", format="ndjson") == 0


async def scrape_when_idle(api: Any) -> Samples | None:
    samples = await scrape(api)
    return samples if value(samples, "export_jobs_running") == 0 else None
