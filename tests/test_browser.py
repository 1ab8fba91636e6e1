"""The export page in a real browser: Playwright drives Debian's headless Chromium against the real app.

One 20,000-row collection is inserted once for the module. Each test runs its own app (its own jobs
collection) on a random port through pytest-aiohttp, in the same event loop as Playwright's async API.
Screenshots go to test-output/ at the project root.
"""
from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import re
import time
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from aiohttp.test_utils import TestServer
from pymongo import MongoClient

from service.app import create_app
from service.db import FindSpec
from service.jobs import JobStatus, now_ms, transition
from service.settings import MANAGER_KEY, Settings

from expected import csv_text, lookup
from conftest import BIG_ROWS, DATA_DB, Gate, HoldAfterTwoBatches, export_files, make_settings, until

from playwright.async_api import expect

pytestmark = pytest.mark.browser

COLLECTION = "tasks_big"
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
FIELDS = ["seq", "title", "assignee.name", "createdAt", "estimate"]  # the column order the test builds in the page
TOKEN = "browser+test/token="  # the characters of a base64 token, "+" among them
RECONNECT_ROWS = 6000  # XLSX at about a thousand rows a second: still running when the socket is killed

# Kills the page's Socket.IO connection (its engine) and says what state the job showed at that moment.
KILL_SOCKET = """(id) => {
  const status = document.querySelector(`li.job[data-job-id="${id}"]`).dataset.status;
  window.__exportSocket.io.engine.close();
  return status;
}"""

# Visible form controls and buttons with no accessible name.
UNLABELLED_CONTROLS = """() => [...document.querySelectorAll("input, select, textarea, button, a[href]")]
  .filter((el) => el.getClientRects().length && getComputedStyle(el).visibility !== "hidden" && el.type !== "hidden")
  .filter((el) => {
    const byLabel = el.labels && [...el.labels].some((l) => l.textContent.trim());
    const byAria = (el.getAttribute("aria-label") || "").trim();
    const byRef = (el.getAttribute("aria-labelledby") || "").split(/\\s+/).some((id) => id && document.getElementById(id)?.textContent.trim());
    const byText = (el.tagName === "BUTTON" || el.tagName === "A") && el.textContent.trim();
    return !(byLabel || byAria || byRef || byText);
  })
  .map((el) => el.outerHTML.slice(0, 120))"""

# Installed before the page's own scripts: every value the progress bars take, per job, in order.
PROGRESS_RECORDER = """
(() => {
  window.__progress = {};
  const record = (bar, value) => {
    const li = bar.closest && bar.closest("li.job");
    if (!li) return;
    (window.__progress[li.dataset.jobId] ||= []).push(value);
  };
  new MutationObserver((records) => {
    for (const r of records) record(r.target, r.target.getAttribute("aria-valuenow"));
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ["aria-valuenow"] });
})();
"""


class MiscountingGate(Gate):
    """An open gate whose count is one row over: a resumed export's file comes out short of it, as when a row
    was added after the checkpoint, and the run writes the file again from its first row."""

    def __init__(self, mongo_url: str) -> None:
        super().__init__(mongo_url)
        self.open()

    async def count(self, spec: FindSpec) -> int:
        return await super().count(spec) + 1


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def browser_settings(mongo_url: str, tmp_path: Path, big_tasks: list[dict[str, Any]]) -> Settings:
    # One worker: an export started while another runs stays queued, as the screenshot wants one.
    return make_settings(mongo_url, tmp_path, "pymongo", collections=(COLLECTION,), max_concurrent=1)


@pytest.fixture(scope="module")
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT


# --- helpers ---------------------------------------------------------------------------------------
class PageErrors(list):
    def check(self, answered: tuple[int, ...] = ()) -> None:
        """No error in the page, but the browser's own line for each expected error answer (answered)."""
        expected = {f"console: Failed to load resource: the server responded with a status of {status}" for status in answered}
        left = [error for error in self if not any(error.startswith(line) for line in expected)]
        assert not left, f"errors in the page: {left}"


async def open_page(
    browser: Any, url: str, width: int = 1280, height: int = 900, wait_live: bool = True, collection: str = COLLECTION
) -> tuple[Any, PageErrors]:
    context = await browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    page = await context.new_page()
    errors = PageErrors()
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    await page.add_init_script(PROGRESS_RECORDER)
    await page.goto(url)
    if wait_live:
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
        await expect(page.get_by_label("Collection", exact=True)).to_have_value(collection)
    return page, errors


def job_item(page: Any, job_id: str) -> Any:
    return page.locator(f'li.job[data-job-id="{job_id}"]')


async def start_export(page: Any, fmt: str) -> str:
    """Choose the format, press Start export, and return the new job's id."""
    await page.locator(f'label[for="format-{fmt}"]').click()
    async with page.expect_response(lambda r: r.url.endswith("/api/exports") and r.request.method == "POST") as info:
        await page.get_by_role("button", name="Start export").click()
    response = await info.value
    assert response.status == 202, await response.text()
    job_id = (await response.json())["id"]
    await expect(job_item(page, job_id)).to_be_visible()
    return job_id


async def finished_export(client: Any, browser: Any) -> tuple[Any, PageErrors, str, Any]:
    """The page, and a 300-row CSV export started in it and completed: (page, its errors, the job's id, its row)."""
    page, errors = await open_page(browser, str(client.make_url("/")))
    await page.get_by_label("Limit", exact=True).fill("300")
    job_id = await start_export(page, "csv")
    item = job_item(page, job_id)
    await expect(item).to_have_attribute("data-status", "completed", timeout=30_000)
    return page, errors, job_id, item


async def wait_running(page: Any, job_id: str, timeout: float = 30.0) -> str:
    """Wait until the job's bar shows a value strictly between 0 and 100; return the status then."""
    bar = job_item(page, job_id).get_by_role("progressbar")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await bar.get_attribute("aria-valuenow")
        if value is not None and 0 < float(value) < 100:
            return await job_item(page, job_id).get_attribute("data-status")
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} never showed intermediate progress")


async def progress_values(page: Any, job_id: str) -> list[float]:
    values = await page.evaluate("(id) => window.__progress[id] || []", job_id)
    return [float(v) for v in values if v is not None]


async def choose_fields(page: Any) -> None:
    """Pick FIELDS in the page's field picker: tick them out of order, then move seq to the front."""
    await page.get_by_label("Choose fields and their order").check()
    available = page.get_by_role("list", name="Sampled fields")
    for path in ["title", "seq", "assignee.name", "createdAt", "estimate"]:
        await available.get_by_label(path, exact=True).check()
    await page.get_by_role("button", name="Move seq up").click()  # keyboard focus stays on the moved field
    chosen = page.locator("#field-chosen li .path")
    await expect(chosen).to_have_text(FIELDS)


# --- tests -----------------------------------------------------------------------------------------
async def test_export_progress_download_cancel_and_screenshot(
    aiohttp_client: Any, browser_settings: Settings, browser: Any, big_tasks: list[dict[str, Any]], tmp_path: Path, output_dir: Path
) -> None:
    client = await aiohttp_client(create_app(browser_settings))
    page, errors = await open_page(browser, str(client.make_url("/")))
    await expect(page.get_by_text("No exports yet")).to_be_visible()
    await expect(page.locator("#collection-hint")).to_contain_text("About 20,000 documents")

    # The form: fields in a chosen order, a filter typed with live feedback, a sort, CSV.
    await choose_fields(page)
    filter_box = page.get_by_label(re.compile("^Filter"))
    await filter_box.fill('{"seq": {"$gte": 0}')
    await expect(filter_box).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#filter-status")).to_contain_text("Not valid JSON")
    await filter_box.fill('{"seq": {"$where": "1"}}')
    await expect(page.locator("#filter-status")).to_contain_text("$where is not allowed")
    await filter_box.fill('{"seq": {"$gte": 0}}')
    await expect(filter_box).not_to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#filter-status")).to_contain_text("Valid filter")
    await page.get_by_role("button", name="Add sort key").click()
    await page.get_by_label("Sort field").fill("seq")
    await page.get_by_label("Direction").select_option("-1")
    await page.get_by_label("File name").fill("browser tasks")

    # 1. A 20,000-row export: the bar passes through intermediate values to 100%, then the download.
    job_id = await start_export(page, "csv")
    item = job_item(page, job_id)
    await expect(item).to_have_attribute("data-status", "completed", timeout=60_000)
    bar = item.get_by_role("progressbar")
    await expect(bar).to_have_attribute("aria-valuenow", "100")
    await expect(item.locator(".badge")).to_have_text("Completed")
    await expect(item.locator(".progress-text")).to_contain_text("20,000 rows")
    values = await progress_values(page, job_id)
    assert any(0 < v < 100 for v in values), f"no intermediate progress value in {values}"
    assert values == sorted(values), f"progress went backwards: {values}"
    assert values[-1] == 100

    async with page.expect_download() as download_info:
        await item.get_by_role("link", name=re.compile("^Download browser tasks.csv")).click()
    download = await download_info.value
    assert download.suggested_filename == "browser tasks.csv"
    saved = tmp_path / "download.csv"
    await download.save_as(saved)
    rows = list(csv.reader(io.StringIO(saved.read_text("utf-8"), newline="")))
    expected = sorted(big_tasks, key=lambda d: d["seq"], reverse=True)
    assert rows[0] == FIELDS
    assert len(rows) - 1 == BIG_ROWS
    assert rows[1:] == [[csv_text(lookup(doc, f)) for f in FIELDS] for doc in expected]

    # 2. A second export, cancelled from the page while it runs.
    await page.get_by_label("All fields").check()
    await filter_box.fill("")
    await page.get_by_role("button", name="Remove this sort key").click()
    await page.get_by_label("File name").fill("")
    cancel_id = await start_export(page, "xlsx")
    status = await wait_running(page, cancel_id)
    assert status in ("fetching", "processing"), status
    cancel_item = job_item(page, cancel_id)
    await cancel_item.get_by_role("button", name=re.compile("^Cancel export")).click()
    await expect(cancel_item).to_have_attribute("data-status", "cancelled", timeout=15_000)
    await expect(cancel_item.locator(".badge")).to_have_text("Cancelled")
    await expect(cancel_item.get_by_role("button", name=re.compile("^Cancel"))).to_be_hidden()
    await expect(cancel_item.get_by_role("button", name=re.compile("^Remove"))).to_be_focused()  # not the page's body
    snap = await (await client.get(f"/api/exports/{cancel_id}")).json()
    assert snap["status"] == "cancelled" and 0 < snap["processed"] < BIG_ROWS, snap

    # 4. A screenshot with a running, a queued and finished jobs.
    running_id = await start_export(page, "xlsx")
    await wait_running(page, running_id)
    queued_id = await start_export(page, "ndjson")
    await expect(job_item(page, queued_id)).to_have_attribute("data-status", "queued")
    await expect(job_item(page, queued_id).locator(".progress-text")).to_contain_text("Waiting in queue")
    assert await job_item(page, running_id).get_attribute("data-status") in ("processing", "finalizing")
    await page.screenshot(path=str(output_dir / "export-page.png"), full_page=True, animations="disabled")
    # The running one is cancelled too (no need to wait for it); the queued one runs and completes.
    await job_item(page, running_id).get_by_role("button", name=re.compile("^Cancel export")).click()
    await expect(job_item(page, running_id)).to_have_attribute("data-status", "cancelled", timeout=15_000)
    await expect(job_item(page, queued_id)).to_have_attribute("data-status", "completed", timeout=60_000)
    await expect(job_item(page, queued_id).get_by_role("link", name=re.compile("^Download"))).to_be_visible()

    # Newest first, and a finished job can be removed from the list.
    order = await page.locator("li.job").evaluate_all("items => items.map(li => li.dataset.jobId)")
    assert order == [queued_id, running_id, cancel_id, job_id]
    await job_item(page, cancel_id).get_by_role("button", name=re.compile("^Remove export")).click()
    await expect(job_item(page, cancel_id)).to_have_count(0)
    assert (await client.get(f"/api/exports/{cancel_id}")).status == 404
    errors.check()


async def test_page_recovers_when_the_socket_is_killed_mid_export(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: list[dict[str, Any]], browser: Any
) -> None:
    """With API tokens: the page authenticates over HTTP and Socket.IO, survives a killed connection
    (reconnects, subscribes again, takes the state from the ack), and falls back to polling."""
    settings = make_settings(mongo_url, tmp_path, "pymongo", collections=(COLLECTION,), api_tokens={TOKEN: "alice"})
    client = await aiohttp_client(create_app(settings))
    url = str(client.make_url("/"))

    # Without a token the page says what is missing; a token typed in the token field fixes it.
    page, _ = await open_page(browser, url, wait_live=False)
    await expect(page.get_by_role("alert").filter(has_text="token")).to_be_visible()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "offline")
    await page.get_by_label("API token", exact=True).fill(TOKEN)
    await page.get_by_role("button", name="Save token").click()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    await expect(page.get_by_label("Collection", exact=True)).to_have_value(COLLECTION)
    await page.context.close()

    # The token from #token= (a fragment, never sent to the server) is kept, and removed from the address bar.
    page, errors = await open_page(browser, f"{url}#token={TOKEN}")
    assert "token" not in page.url
    await page.get_by_label("Limit", exact=True).fill(str(RECONNECT_ROWS))
    await page.get_by_role("button", name="Add sort key").click()
    await page.get_by_label("Sort field").fill("seq")
    job_id = await start_export(page, "xlsx")
    await wait_running(page, job_id)
    status_at_kill = await page.evaluate(KILL_SOCKET, job_id)
    assert status_at_kill in ("fetching", "processing"), status_at_kill
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
    item = job_item(page, job_id)
    await expect(item).to_have_attribute("data-status", "completed", timeout=60_000)
    await expect(item.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    debug = await page.evaluate("window.__exportDebug")
    assert debug["connects"] >= 2 and debug["disconnects"] >= 1, debug
    resubscribed = [a for a in debug["acks"] if a["id"] == job_id and a["connection"] >= 2]
    assert resubscribed, f"the page did not subscribe again after reconnecting: {debug}"
    values = await progress_values(page, job_id)
    assert values == sorted(values) and values[-1] == 100, values
    assert any(0 < v < 100 for v in values), values

    # A signed link that has run out (the page was left open) is asked for again before it is followed.
    link = item.get_by_role("link", name=re.compile("^Download"))
    await link.evaluate("a => { const u = new URL(a.href); u.searchParams.set('exp', '1'); a.href = u.toString(); }")
    async with page.expect_download() as download_info:
        await link.click()
    assert "exp=1&" not in (await download_info.value).url
    saved = tmp_path / "reconnect.xlsx"
    await (await download_info.value).save_as(saved)
    sheet = openpyxl.load_workbook(saved, read_only=True).worksheets[0]
    rows = list(sheet.iter_rows(values_only=True))
    seq_column = list(rows[0]).index("seq")
    assert [row[seq_column] for row in rows[1:]] == list(range(RECONNECT_ROWS))

    # Events stop for good (no reconnection): the page still follows the next export, over HTTP.
    polls_before = debug["polls"]
    await page.evaluate("() => { const s = window.__exportSocket; s.io.reconnection(false); s.io.engine.close(); }")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting")
    job2 = await start_export(page, "csv")
    await expect(job_item(page, job2)).to_have_attribute("data-status", "completed", timeout=60_000)
    await expect(job_item(page, job2).get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    assert (await page.evaluate("window.__exportDebug.polls")) > polls_before
    errors.check()


async def test_a_link_with_another_token_does_not_replace_the_saved_one(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: Any, browser: Any
) -> None:
    """A link to /#token=... made by another user must not swap the saved token silently: exports started after
    it would be theirs, for them to list and download."""
    tokens = {TOKEN: "alice", "tok-mallory": "mallory"}
    settings = make_settings(mongo_url, tmp_path, "pymongo", collections=(COLLECTION,), api_tokens=tokens)
    client = await aiohttp_client(create_app(settings))
    url = str(client.make_url("/"))
    page, errors = await open_page(browser, f"{url}#token={TOKEN}")  # alice's, saved in this browser
    await page.goto("about:blank")
    await page.goto(f"{url}#token=tok-mallory")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
    await expect(page.get_by_role("alert").filter(has_text="another API token")).to_be_visible()
    assert "token" not in page.url
    assert await page.evaluate("localStorage.getItem('export-service.token')") == TOKEN
    await expect(page.get_by_label("API token", exact=True)).to_have_value("tok-mallory")  # there to save, if trusted
    await page.get_by_label("Limit", exact=True).fill("10")
    job_id = await start_export(page, "csv")
    for token, status in ((TOKEN, 200), ("tok-mallory", 404)):
        resp = await client.get(f"/api/exports/{job_id}", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == status, (token, await resp.text())
    errors.check()


async def test_a_cancel_that_arrives_after_the_end_keeps_the_file(aiohttp_client: Any, browser_settings: Settings, browser: Any) -> None:
    """A page that has not heard yet that its job completed (a slow socket) sends a cancel: the job stays completed
    with its file, where a plain DELETE removed both."""
    client = await aiohttp_client(create_app(browser_settings))
    page, errors, job_id, item = await finished_export(client, browser)
    await item.locator(".cancel").evaluate("button => { button.hidden = false; }")  # as a page that is behind shows it
    await item.locator(".cancel").click()
    await expect(page.locator("#announcer")).to_have_text(re.compile("had already completed; nothing was cancelled"))
    await expect(item).to_have_attribute("data-status", "completed")
    assert (await client.get(f"/api/exports/{job_id}/download")).status == 200
    # An export started elsewhere (another tab, mexport) shows once this page is seen again.
    other = await (await client.post("/api/exports", json={"collection": COLLECTION, "format": "ndjson", "limit": 5})).json()
    await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    await expect(job_item(page, other["id"])).to_be_visible()
    errors.check(answered=(409,))  # the cancel's answer: not_active


async def test_download_of_a_job_retention_expired_shows_it_expired(
    aiohttp_client: Any, browser_settings: Settings, browser: Any
) -> None:
    """Retention expires a completed job without an event: the row still says Completed. A click on its Download
    asks for the snapshot, which says expired; the row takes it instead of keeping a link to no file."""
    client = await aiohttp_client(create_app(browser_settings))
    page, errors, job_id, item = await finished_export(client, browser)
    link = item.get_by_role("link", name=re.compile("^Download"))
    await expect(link).to_be_visible()

    # The file gone from the disk under a job still completed: the page says so and stays, rather than showing
    # the download's error answer in place of itself.
    kept = Path(browser_settings.export_dir) / f"{job_id}.csv"
    kept.rename(kept.with_suffix(".away"))
    await link.click()
    await expect(page.get_by_role("alert")).to_contain_text("its file is gone from the service")
    assert page.url == str(client.make_url("/"))
    kept.with_suffix(".away").rename(kept)

    # What the sweep does to a job whose expires_at has passed: the state, then the file, and no event.
    manager = client.server.app[MANAGER_KEY]
    assert await transition(manager.db, [JobStatus.COMPLETED], job_id=job_id, fields={"expires_at": now_ms() - 1})
    assert await manager.sweep() == 1
    assert export_files(browser_settings.export_dir) == []
    await expect(item).to_have_attribute("data-status", "completed")  # the page has not heard of it

    await link.click()
    await expect(page.get_by_role("alert")).to_contain_text("The export is expired")
    await expect(item).to_have_attribute("data-status", "expired")
    await expect(item.locator(".badge")).to_have_text("Expired")
    await expect(item.get_by_role("link", name=re.compile("^Download"))).to_have_count(0)
    assert (await (await client.get(f"/api/exports/{job_id}")).json())["status"] == "expired"
    errors.check(answered=(410,))  # the probe of the link to the file that was gone


async def test_a_job_a_stop_puts_back_in_the_queue_shows_queued_then_its_next_run(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: Any, browser: Any
) -> None:
    """A stop puts running jobs back in the queue with their progress; the page, which heard them running, must
    take the queued snapshot it gets when it reconnects (to the service started again at the same address), and
    then the next run's news, though its row counts start lower."""
    settings = make_settings(mongo_url, tmp_path, "pymongo", collections=(COLLECTION,), max_concurrent=2)
    source = HoldAfterTwoBatches(mongo_url)
    try:
        first = await aiohttp_client(create_app(settings, source=source))
        page, errors = await open_page(browser, str(first.make_url("/")))
        await page.get_by_label("Limit", exact=True).fill("4000")  # four batches: held at the third
        ids = [await start_export(page, "csv") for _ in range(2)]
        for job_id in ids:
            assert await wait_running(page, job_id) == "processing"
        await until(lambda: source.held == 2, "both exports held after two batches")

        port = first.port
        stopping = time.monotonic()
        await first.close()  # the service stops: both jobs go back to the queue, the page loses its connection
        assert time.monotonic() - stopping < 10, "the stop waited on the page's WebSocket"  # a container's grace period
        await expect(page.locator("#conn")).not_to_have_attribute("data-state", "live")
        with MongoClient(mongo_url) as sync:
            docs = list(sync[DATA_DB][settings.jobs_collection].find({"_id": {"$in": ids}}))
        assert [(d["status"], d["stops"]) for d in docs] == [("queued", 1)] * 2 and all(d["processed"] > 0 for d in docs), docs
        # Started again at the same address with one worker: the older job runs (held again), the other waits.
        server = TestServer(create_app(dataclasses.replace(settings, max_concurrent=1), source=source), port=port)
        second = await aiohttp_client(server)
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
        running, waiting = job_item(page, ids[0]), job_item(page, ids[1])
        await expect(waiting).to_have_attribute("data-status", "queued", timeout=10_000)
        await expect(waiting.locator(".badge")).to_have_text("Queued")
        await expect(waiting.locator(".progress-text")).to_contain_text("Waiting in queue, position 1")
        await expect(running).to_have_attribute("data-status", "processing")
        snap = await (await second.get(f"/api/exports/{ids[1]}")).json()
        assert snap["status"] == "queued" and snap["run"] == 1, snap  # the run it was put back from

        source.open()
        for item in (running, waiting):
            await expect(item).to_have_attribute("data-status", "completed", timeout=60_000)
            await expect(item.get_by_role("link", name=re.compile("^Download"))).to_be_visible()
        snap = await (await second.get(f"/api/exports/{ids[1]}")).json()
        assert snap["processed"] == 4000 and snap["run"] == 2, snap
        # While the service was down the page's polls could not connect; nothing else went wrong.
        assert [e for e in errors if "ERR_CONNECTION_REFUSED" not in e] == []
    finally:
        await source.db.close()


async def test_a_resumed_export_written_again_from_its_first_row_shows_its_count_start_over(
    aiohttp_client: Any, mongo_url: str, tmp_path: Path, big_tasks: Any, browser: Any
) -> None:
    """The run after a stop resumes from the checkpoint, finds its file short and writes it again from row 0 in the
    same run: its export-fetching event counts from 0 again, and the page must follow it down, not stay at the
    end until the rows counted again pass what it saw."""
    settings = make_settings(mongo_url, tmp_path, "pymongo", collections=(COLLECTION,), checkpoint_batches=1)
    held, miscounting = HoldAfterTwoBatches(mongo_url), MiscountingGate(mongo_url)
    try:
        first = await aiohttp_client(create_app(settings, source=held))
        page, _ = await open_page(browser, str(first.make_url("/")))
        job_id = await start_export(page, "csv")
        await wait_running(page, job_id)
        await until(lambda: held.held == 1, "the export held after two batches (and their checkpoints)")
        port = first.port
        await first.close()
        second = await aiohttp_client(TestServer(create_app(settings, source=miscounting), port=port))
        item = job_item(page, job_id)
        await expect(item).to_have_attribute("data-status", "completed", timeout=90_000)
        snap = await (await second.get(f"/api/exports/{job_id}")).json()
        assert snap["run"] == 2 and snap["resumed_from"] is None and snap["processed"] == BIG_ROWS, snap
        values = await progress_values(page, job_id)
        top = next(i for i, v in enumerate(values) if v >= 90)  # the resumed run read to the end
        assert any(v < 50 for v in values[top:]), f"the page did not follow the export back to its first row: {values}"
    finally:
        await held.db.close()
        await miscounting.db.close()


async def test_narrow_screen_keyboard_and_labels(
    aiohttp_client: Any, browser_settings: Settings, browser: Any, output_dir: Path
) -> None:
    client = await aiohttp_client(create_app(browser_settings))
    page, errors = await open_page(browser, str(client.make_url("/")), width=375, height=812)
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "the page scrolls sideways at 375 px"
    await page.locator("#token-box summary").click()
    await expect(page.get_by_label("API token", exact=True)).to_be_visible()
    box = await page.locator("#token-form").bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, box  # the open token box fits the screen
    await page.locator("#token-box summary").click()
    await page.get_by_label("Choose fields and their order").check()
    # Select all takes what the search shows, not every sampled field.
    await page.get_by_role("searchbox", name="Sampled fields").fill("assignee")
    await page.get_by_role("button", name="Select all").click()
    chosen = await page.locator("#field-chosen li .path").all_text_contents()
    assert chosen and all("assignee" in path for path in chosen), chosen
    await page.get_by_role("button", name="Clear", exact=True).click()
    await page.get_by_role("searchbox", name="Sampled fields").fill("")
    await page.get_by_role("button", name="Add sort key").click()
    unlabelled = await page.evaluate(UNLABELLED_CONTROLS)
    assert unlabelled == [], f"controls without an accessible name: {unlabelled}"
    await page.get_by_role("button", name="Remove this sort key").click()
    await page.get_by_label("All fields").check()

    # Keyboard only: type a limit, tab to the start button, press Enter.
    await page.get_by_label("Limit", exact=True).focus()
    await page.keyboard.type("500")
    for _ in range(40):
        if await page.evaluate("document.activeElement.id") == "start":
            break
        await page.keyboard.press("Tab")
    else:
        raise AssertionError("Start export is not reachable with Tab")
    async with page.expect_response(lambda r: r.url.endswith("/api/exports") and r.request.method == "POST") as info:
        await page.keyboard.press("Enter")
    job_id = (await (await info.value).json())["id"]
    await expect(page.get_by_role("button", name="Start export")).to_be_focused()  # the keyboard stays where it was
    item = job_item(page, job_id)
    await expect(item).to_have_attribute("data-status", "completed", timeout=30_000)
    await expect(item.locator(".progress-text")).to_contain_text("500 rows")
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "a job scrolls sideways at 375 px"
    await item.scroll_into_view_if_needed()
    await page.screenshot(path=str(output_dir / "export-page-narrow.png"), full_page=True, animations="disabled")
    errors.check()
