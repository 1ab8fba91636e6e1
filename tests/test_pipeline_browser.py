"""The page's Pipeline tab in headless Chromium: live validation with the server's paths, keyboard tabs, a
grouped export with a pre-count, and a server-side rejection pointing back at the pipeline box."""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect

from service.app import create_app

from conftest import make_settings
from expected import csv_text
from test_browser import job_item, open_page, output_dir  # noqa: F401 - output_dir is a fixture

pytestmark = pytest.mark.browser

GROUP = [{"$group": {"_id": "$status", "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}]


async def test_pipeline_tab_validates_exports_and_reports_server_errors(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, browser: Any, output_dir: Path, tasks: list[dict[str, Any]]  # noqa: F811
) -> None:
    settings = make_settings(mongo_url, tmp_path, "pymongo", collections=("tasks",))
    client = await aiohttp_client(create_app(settings))
    page, errors = await open_page(browser, str(client.make_url("/")), collection="tasks")

    pipeline_tab, find_tab = page.get_by_role("tab", name="Pipeline"), page.get_by_role("tab", name="Find")
    box = page.get_by_label("Aggregation pipeline")
    status = page.locator("#pipeline-status")
    await expect(box).to_be_hidden()
    await pipeline_tab.click()
    await expect(pipeline_tab).to_have_attribute("aria-selected", "true")
    await expect(box).to_be_visible()
    await expect(page.locator("#filter")).to_be_hidden()

    await check_live_validation(page, box, status, settings.jobs_collection)

    # Arrow keys move between the tabs, and the pipeline survives the trip.
    await pipeline_tab.focus()
    await page.keyboard.press("ArrowLeft")
    await expect(find_tab).to_be_focused()
    await expect(find_tab).to_have_attribute("aria-selected", "true")
    await expect(box).to_be_hidden()
    await page.keyboard.press("ArrowRight")
    await expect(pipeline_tab).to_have_attribute("aria-selected", "true")
    await expect(box).to_have_value(json.dumps(GROUP))

    await export_with_count(page, client, tasks)
    errors.check()

    # A pipeline only the server can judge (a bad date): its 400 names the pipeline, and focus goes to the box.
    await box.fill('[{"$match": {"createdAt": {"$date": "not a date"}}}]')
    await expect(status).to_have_attribute("data-kind", "ok")
    await find_tab.click()
    await pipeline_tab.click()
    async with page.expect_response(lambda r: r.url.endswith("/api/exports") and r.request.method == "POST") as info:
        await page.get_by_role("button", name="Start export").click()
    assert (await (await info.value).json())["error"]["field"] == "pipeline"
    await expect(page.locator("#form-error")).to_contain_text("The export could not start: pipeline is not valid Extended JSON")
    await expect(box).to_be_focused()
    await page.screenshot(path=str(output_dir / "export-page-pipeline.png"), full_page=True, animations="disabled")
    assert errors == ["console: Failed to load resource: the server responded with a status of 400 (Bad Request)"], errors


async def check_live_validation(page: Any, box: Any, status: Any, jobs_collection: str) -> None:
    """Live validation names the culprit as the server would."""
    cases = [
        ('[{"$match": {}}, {"$out": "copy"}]', "pipeline.1.$out"),
        ('[{"$match": {"a": {"$where": "1"}}}]', "pipeline.0.$match.a.$where"),
        ('[{"$facet": {"x": [{"$group": {"_id": 1, "y": {"$accumulator": {}}}}]}}]', "pipeline.0.$facet.x.0.$group.y.$accumulator"),
        (f'[{{"$lookup": {{"from": "{jobs_collection}", "localField": "a", "foreignField": "b", "as": "c"}}}}]', "pipeline.0.$lookup.from"),
        ('[{"$match": {}', "Not valid JSON"),
        ('{"$match": {}}', "must be a list of stages"),
    ]
    for text, culprit in cases:
        await box.fill(text)
        await expect(status).to_have_attribute("data-kind", "error")
        await expect(status).to_contain_text(culprit)
        await expect(box).to_have_attribute("aria-invalid", "true")
    await box.fill(json.dumps(GROUP))
    await expect(status).to_have_attribute("data-kind", "ok")
    await expect(status).to_have_text("Valid pipeline of 2 stages.")
    await expect(box).not_to_have_attribute("aria-invalid", "true")


async def export_with_count(page: Any, client: Any, tasks: list[dict[str, Any]]) -> None:
    """Count first, CSV, start: the request carries the pipeline, and the file holds the groups."""
    await page.get_by_label("Count first").check()
    async with page.expect_response(lambda r: r.url.endswith("/api/exports") and r.request.method == "POST") as info:
        await page.get_by_role("button", name="Start export").click()
    response = await info.value
    assert response.status == 202, await response.text()
    sent = response.request.post_data_json
    assert (sent["pipeline"], sent["count"]) == (GROUP, True) and not {"filter", "fields", "sort"} & set(sent)
    job_id = (await response.json())["id"]
    item = job_item(page, job_id)
    await expect(item).to_have_attribute("data-status", "completed", timeout=60_000)
    await expect(item.locator(".job-meta")).to_contain_text('pipeline [{"$group"')
    counts = Counter(d.get("status") for d in tasks)
    await expect(item.locator(".progress-text")).to_contain_text(f"{len(counts)} rows")
    snap = await (await client.get(f"/api/exports/{job_id}")).json()
    assert snap["total"] == len(counts) and snap["count"] is True
    rows = list(csv.DictReader(io.StringIO((await (await client.get(snap["download_url"])).read()).decode(), newline="")))
    assert {row["_id"]: int(row["n"]) for row in rows} == {csv_text(k): v for k, v in counts.items()}
