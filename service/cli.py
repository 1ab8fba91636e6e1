"""mexport: the export service from a shell, with mongoexport's option names where they mean the same.

    mexport create tasks --type csv -q '{"status": "open"}' -f title,status --sort '{"seq": 1}' -o open.csv
    mexport list --status completed
    mexport status ID | mexport cancel ID | mexport download ID -o FILE | mexport delete ID

Talks to a running service over HTTP and Socket.IO only: it imports aiohttp's client, python-socketio's
AsyncClient and the standard library, never the service's own server modules, so it runs anywhere.
Exit codes: 0 done, 1 the service refused or the export failed, 2 bad usage, 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import aiohttp
import socketio

from .cli_progress import FINAL_STATES, Progress, progress_for

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EVENTS = ("export-fetching", "export-processing", "export-finalizing", "export-completed", "export-failed", "export-cancelled")
SILENCE_SECONDS = 5.0  # no event for this long (queued, or waiting on the database): ask for the snapshot
POLL_SECONDS = 1.0
CANCEL_WAIT_SECONDS = 60.0
CHUNK = 256 * 1024
T = TypeVar("T")


class CliError(Exception):
    """A message for stderr and the exit code that goes with it."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(Exception):
    pass


class LiveUnavailable(Exception):
    """Socket.IO could not connect or dropped: follow by polling instead."""


def error_message(error: dict[str, Any]) -> str:
    """The service's `{"code", "message", "field"}` as `field: message`."""
    return f"{error['field']}: {error['message']}" if error.get("field") else str(error["message"])


def error_text(status: int, body: str) -> str:
    """An HTTP error body in the service's words when it is the service's JSON error, else as is."""
    with suppress(ValueError, AttributeError):
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return error_message(error)
    return f"HTTP {status}: {body.strip()[:500]}"


class Api:
    """The service's HTTP API, with the bearer token in a header (never in a URL)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str | None) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.token = token

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        try:
            # json= sends Content-Type: application/json, which POST /api/exports requires.
            async with self.session.request(method, self.url(path), json=body, params=params, headers=self.headers()) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise CliError(error_text(resp.status, text))
                return json.loads(text)
        except aiohttp.ClientError as exc:
            raise CliError(f"cannot reach the service at {self.base_url}: {exc}") from exc

    async def snapshot(self, job_id: str) -> dict[str, Any]:
        return await self.call("GET", f"/api/exports/{job_id}")

    async def download(self, url: str, dest: Path) -> int:
        """Stream url into a temporary file next to dest, renamed to dest only once whole."""
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                written, expected = await self._copy(url, out)
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and written != expected:
                raise CliError(f"the download ended after {written} of {expected} bytes")
            os.chmod(tmp_name, 0o666 & ~current_umask())  # mkstemp's 0600 is for the partial file only
            os.replace(tmp_name, dest)
            return written
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    async def _copy(self, url: str, out: Any) -> tuple[int, int | None]:
        written = 0
        try:
            async with self.session.get(self.url(url), headers=self.headers()) as resp:
                if resp.status >= 400:
                    raise CliError(error_text(resp.status, await resp.text()))
                async for chunk in resp.content.iter_chunked(CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                return written, resp.content_length
        except aiohttp.ClientError as exc:
            raise CliError(f"the download failed after {written} bytes: {exc}") from exc


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Interrupts:
    """Counts SIGINTs; a coroutine run through guard() is cancelled by the next one."""

    def __init__(self) -> None:
        self.count = 0
        self._pressed = asyncio.Event()

    def install(self) -> None:
        with suppress(NotImplementedError, RuntimeError):  # no loop signal handlers: KeyboardInterrupt then
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._press)

    def _press(self) -> None:
        self.count += 1
        self._pressed.set()

    async def guard(self, coro: Coroutine[Any, Any, T], since: int | None = None) -> T:
        """coro's result, or Interrupted once SIGINT came after `since` (default: now), coro then cancelled."""
        seen = self.count if since is None else since
        task = asyncio.ensure_future(coro)
        while not task.done() and self.count == seen:
            self._pressed.clear()
            waiter = asyncio.ensure_future(self._pressed.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        raise Interrupted()


# --- following a job ------------------------------------------------------------------------


async def follow(api: Api, snap: dict[str, Any], progress: Progress, poll_only: bool) -> dict[str, Any]:
    """The job's final snapshot, showing progress on the way."""
    if not poll_only:
        try:
            return await follow_live(api, snap["id"], progress)
        except LiveUnavailable as exc:
            print(f"mexport: live progress unavailable ({exc}); polling every second", file=sys.stderr, flush=True)
    return await follow_polling(api, snap["id"], progress)


async def follow_polling(api: Api, job_id: str, progress: Progress) -> dict[str, Any]:
    while True:
        state = await api.snapshot(job_id)
        if state["status"] in FINAL_STATES:
            return state
        progress.update(state)
        await asyncio.sleep(POLL_SECONDS)


async def follow_live(api: Api, job_id: str, progress: Progress) -> dict[str, Any]:
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    # handle_sigint=False: Ctrl-C is ours to turn into a cancel, not the client's to swallow.
    sio = socketio.AsyncClient(reconnection=False, handle_sigint=False)
    for name in EVENTS:
        sio.on(name, lambda data, _name=name: queue.put_nowait((_name, data)))
    sio.on("disconnect", lambda *_: queue.put_nowait(("disconnect", None)))
    try:
        await sio.connect(api.base_url, headers=api.headers(), auth={"token": api.token} if api.token else None, wait_timeout=10)
    except socketio.exceptions.ConnectionError as exc:
        raise LiveUnavailable(str(exc) or "could not connect") from exc
    try:
        ack = await sio.call("subscribe", {"id": job_id}, timeout=10)
        if not isinstance(ack, dict) or not ack.get("ok"):
            error = ack.get("error") if isinstance(ack, dict) else None
            raise CliError(error_message(error) if isinstance(error, dict) and error.get("message") else f"subscribe refused: {ack!r}")
        return await pump(api, job_id, queue, ack["job"], progress)
    except socketio.exceptions.TimeoutError as exc:
        raise LiveUnavailable("no answer to subscribe") from exc
    finally:
        await sio.disconnect()


async def pump(api: Api, job_id: str, queue: asyncio.Queue[tuple[str, Any]], state: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Merge each event into the subscription's snapshot until a final state."""
    while state["status"] not in FINAL_STATES:
        progress.update(state)
        try:
            name, payload = await asyncio.wait_for(queue.get(), SILENCE_SECONDS)
        except asyncio.TimeoutError:
            # Queued jobs and database waits may send nothing for a while; the snapshot still moves.
            state = await api.snapshot(job_id)
            continue
        if name == "disconnect":
            raise LiveUnavailable("the connection dropped")
        if isinstance(payload, dict) and payload.get("id") == job_id:
            state = {**state, **payload}
    return state


async def cancel_job(api: Api, job_id: str) -> dict[str, Any]:
    """DELETE the job, then wait until its end is recorded (another instance may be running it)."""
    snap = await api.call("DELETE", f"/api/exports/{job_id}")
    deadline = time.monotonic() + CANCEL_WAIT_SECONDS
    while not snap.get("deleted") and snap["status"] not in FINAL_STATES:
        if time.monotonic() > deadline:
            raise CliError(f"export {job_id} is still {snap['status']} {CANCEL_WAIT_SECONDS:.0f} s after the cancel")
        await asyncio.sleep(0.2)
        snap = await api.snapshot(job_id)
    return snap


def cancel_outcome(snap: dict[str, Any]) -> str:
    if snap.get("deleted"):
        return f"export {snap['id']} had already ended ({snap['status']}) and was deleted"
    return f"export {snap['id']} {snap['status']}"


def failure_text(snap: dict[str, Any]) -> str:
    error = snap.get("error") or {}
    reason = f"{error.get('message')} ({error.get('code')})" if error else "no reason given"
    if snap["status"] == "failed":
        return f"export {snap['id']} failed: {reason}"
    return f"export {snap['id']} ended {snap['status']}"


# --- commands -------------------------------------------------------------------------------


def parse_json_option(option: str, text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{option}: not valid JSON ({exc}); Extended JSON such as {{\"$oid\": \"...\"}} is fine", EXIT_USAGE) from exc
    if not isinstance(value, dict):
        raise CliError(f"{option}: must be a JSON object", EXIT_USAGE)
    return value


def export_format(args: argparse.Namespace) -> str:
    """mongoexport's json is one document per line unless --jsonArray: ndjson here, json with --jsonArray."""
    if args.jsonArray and args.type != "json":
        raise CliError("--jsonArray: only with --type json", EXIT_USAGE)
    if args.type == "json":
        return "json" if args.jsonArray else "ndjson"
    return str(args.type)


def create_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"collection": args.collection, "format": export_format(args)}
    if args.query is not None:
        body["filter"] = parse_json_option("--query", args.query)
    if args.fields is not None:
        body["fields"] = [field.strip() for field in args.fields.split(",") if field.strip()]
    if args.sort is not None:
        body["sort"] = parse_json_option("--sort", args.sort)  # key order kept: it is the sort order
    if args.limit is not None:
        body["limit"] = args.limit
    options: dict[str, Any] = {}
    if args.noHeaderLine:
        options["csv"] = {"header": False}
    if args.jsonFormat:
        options["json"] = {"mode": args.jsonFormat}
    if args.gzip:
        options["compress"] = "gzip"
    if options:
        body["options"] = options
    return body


def output_path(snap: dict[str, Any], out: str | None) -> Path:
    """-o as given, else the service's file name in the current directory (never a path it sent)."""
    if out:
        return Path(out)
    name = Path(str(snap.get("file_name") or "")).name
    return Path(name if name and not name.startswith(".") else f"{snap['id']}.{snap.get('format', 'out')}")


async def save(api: Api, snap: dict[str, Any], out: str | None, interrupts: Interrupts, since: int) -> int:
    """Download a completed job's file through its (signed, short-lived) download_url; a Ctrl-C after
    `since` stops it."""
    dest = output_path(snap, out)
    if not snap.get("download_url"):
        raise CliError(f"export {snap['id']} is {snap['status']}; there is nothing to download")
    try:
        size = await interrupts.guard(api.download(snap["download_url"], dest), since)
    except Interrupted:
        print(f"mexport: download interrupted; {dest} not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    rows = f"{snap['processed']:,} rows, " if snap.get("processed") is not None else ""
    print(f"wrote {dest} ({rows}{size:,} bytes)", flush=True)
    return EXIT_OK


async def cmd_create(api: Api, args: argparse.Namespace, interrupts: Interrupts) -> int:
    body = create_body(args)
    since = interrupts.count  # a Ctrl-C during the POST still cancels the job it creates
    snap = await api.call("POST", "/api/exports", body)
    progress = progress_for(sys.stdout)
    progress.note(f"export {snap['id']}: {snap['collection']} as {snap['format']}")
    try:
        final = await interrupts.guard(follow(api, snap, progress, args.poll), since)
    except Interrupted:
        progress.note(f"interrupted: cancelling export {snap['id']}")
        try:
            ended = await interrupts.guard(cancel_job(api, snap["id"]))
        except Interrupted:
            print("mexport: stopped waiting; the cancel was sent", file=sys.stderr)
            return EXIT_INTERRUPTED
        progress.note(cancel_outcome(ended))
        return EXIT_INTERRUPTED
    progress.finish(final)
    if final["status"] != "completed":
        raise CliError(failure_text(final))
    since = interrupts.count
    # A fresh snapshot: its signed download_url is short-lived, so take it just before the download.
    return await save(api, await api.snapshot(snap["id"]), args.out, interrupts, since)


async def cmd_download(api: Api, args: argparse.Namespace, interrupts: Interrupts) -> int:
    since = interrupts.count
    return await save(api, await api.snapshot(args.id), args.out, interrupts, since)


async def cmd_cancel(api: Api, args: argparse.Namespace, interrupts: Interrupts) -> int:
    snap = await api.snapshot(args.id)
    if snap["status"] in FINAL_STATES:
        raise CliError(f"export {args.id} is {snap['status']}; nothing to cancel (mexport delete removes it)")
    print(cancel_outcome(await cancel_job(api, args.id)), flush=True)
    return EXIT_OK


async def cmd_delete(api: Api, args: argparse.Namespace, interrupts: Interrupts) -> int:
    snap = await api.call("DELETE", f"/api/exports/{args.id}")
    print(f"export {args.id} deleted" if snap.get("deleted") else f"export {args.id} {snap['status']}", flush=True)
    return EXIT_OK


STATUS_KEYS = ("id", "status", "collection", "format", "filter", "fields", "sort", "limit", "processed", "total",
               "percent", "bytes", "file_name", "error", "warnings", "created_at", "started_at", "finished_at", "expires_at")


async def cmd_status(api: Api, args: argparse.Namespace, interrupts: Interrupts) -> int:
    snap = await api.snapshot(args.id)
    if args.json:
        print(json.dumps(snap, indent=2, ensure_ascii=False))
        return EXIT_OK
    for key in STATUS_KEYS:
        value = snap.get(key)
        if value not in (None, [], {}):
            print(f"{key + ':':12} {value if isinstance(value, (str, int, float)) else json.dumps(value, ensure_ascii=False)}")
    return EXIT_OK


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


async def cmd_list(api: Api, args: argparse.Namespace, interrupts: Interrupts) -> int:
    params = {"limit": str(args.limit)} if args.limit is not None else {}
    if args.status:
        params["status"] = args.status
    jobs = (await api.call("GET", "/api/exports", params=params))["exports"]
    if args.json:
        print(json.dumps(jobs, indent=2, ensure_ascii=False))
        return EXIT_OK
    rows = [["ID", "STATUS", "COLLECTION", "FORMAT", "ROWS", "CREATED", "FILE"]]
    for job in jobs:
        rows.append([job["id"], job["status"], job["collection"], job["format"], str(job.get("processed") or 0),
                     job.get("created_at") or "", job.get("file_name") or ""])
    print(table(rows))
    return EXIT_OK


Command = Callable[[Api, argparse.Namespace, Interrupts], Awaitable[int]]
COMMANDS: dict[str, Command] = {
    "create": cmd_create, "list": cmd_list, "status": cmd_status,
    "cancel": cmd_cancel, "delete": cmd_delete, "download": cmd_download,
}
# These handle Ctrl-C themselves: create cancels its job, a download removes its partial file.
SELF_GUARDED = frozenset({"create", "download"})


# --- command line ---------------------------------------------------------------------------


def connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--url and --token, accepted before and after the command (after it, only when given)."""
    url_default = (os.environ.get("MEXPORT_URL") or DEFAULT_URL) if defaults else argparse.SUPPRESS
    token_default = (os.environ.get("MEXPORT_TOKEN") or None) if defaults else argparse.SUPPRESS
    parser.add_argument("--url", default=url_default, help=f"service URL (env MEXPORT_URL, default {DEFAULT_URL})")
    parser.add_argument("--token", default=token_default, help="API token, sent as a bearer header (env MEXPORT_TOKEN)")


def add_create(commands: Any, common: argparse.ArgumentParser) -> None:
    create = commands.add_parser("create", parents=[common], help="export a collection, follow it, download the file")
    create.add_argument("collection", nargs="?", help="the collection to export")
    create.add_argument("-c", "--collection", dest="collection_option", help="the collection (mongoexport's spelling)")
    create.add_argument("--type", choices=("json", "csv", "ndjson", "xlsx"), default="json",
                        help="json (one document per line, as mongoexport), csv, ndjson or xlsx; default json")
    create.add_argument("--jsonArray", action="store_true", help="with --type json: one JSON array instead of lines")
    create.add_argument("--jsonFormat", choices=("relaxed", "canonical"), help="Extended JSON mode for json/ndjson")
    create.add_argument("-q", "--query", help="filter, relaxed Extended JSON, e.g. '{\"status\": \"open\"}'")
    create.add_argument("-f", "--fields", help="comma-separated field paths, e.g. title,assignee.name")
    create.add_argument("--sort", help="sort document, e.g. '{\"createdAt\": -1}'")
    create.add_argument("--limit", type=int, help="at most this many documents")
    create.add_argument("--noHeaderLine", action="store_true", help="csv without its header line")
    create.add_argument("--gzip", action="store_true", help="a gzip-compressed file")
    create.add_argument("-o", "--out", help="output file (default: the service's file name, here)")
    create.add_argument("--poll", action="store_true", help="follow by polling HTTP once a second, not over Socket.IO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mexport", description="Export MongoDB collections through the export service.")
    connection_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    connection_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_create(commands, common)
    listing = commands.add_parser("list", parents=[common], help="your exports, newest first")
    listing.add_argument("--status", help="only exports in this state (queued, processing, completed, ...)")
    listing.add_argument("--limit", type=int, help="at most this many (service default 50)")
    listing.add_argument("--json", action="store_true", help="the snapshots as JSON")
    status = commands.add_parser("status", parents=[common], help="one export's snapshot")
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="the snapshot as JSON")
    for name, text in (("cancel", "cancel a queued or running export"), ("delete", "delete an export and its file")):
        commands.add_parser(name, parents=[common], help=text).add_argument("id")
    download = commands.add_parser("download", parents=[common], help="download a completed export's file")
    download.add_argument("id")
    download.add_argument("-o", "--out", help="output file (default: the service's file name, here)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "create":
        if args.collection and args.collection_option and args.collection != args.collection_option:
            parser.error("the collection is given twice, differently")
        args.collection = args.collection or args.collection_option
        if not args.collection:
            parser.error("create: the collection is required (COLLECTION or -c/--collection)")
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"--url: expected http:// or https://, got {args.url!r}")
    return args


async def run(args: argparse.Namespace) -> int:
    interrupts = Interrupts()
    interrupts.install()
    # No total timeout: a download may take long; a silent connection still times out.
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=120)
    # auto_decompress=False: the file is saved byte for byte as the service sent it.
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        api = Api(session, args.url, args.token)
        try:
            command = COMMANDS[args.command](api, args, interrupts)
            if args.command in SELF_GUARDED:
                return await command
            return await interrupts.guard(command)
        except CliError as exc:
            print(f"mexport: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code
        except Interrupted:
            print("mexport: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:  # where the loop cannot take over SIGINT
        print("mexport: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
