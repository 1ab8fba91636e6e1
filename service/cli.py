"""mexport: the export service from a shell, with mongoexport's option names where they mean the same.

    mexport create tasks --type csv -q '{"status": "open"}' -f title,status --sort '{"seq": 1}' -o open.csv
    mexport list --status completed
    mexport status ID | mexport cancel ID | mexport download ID -o FILE | mexport delete ID

Talks to a running service over HTTP and Socket.IO only: it imports aiohttp's client, python-socketio's
AsyncClient and the standard library, never the service's own server modules, so it runs anywhere.
Exit codes: 0 done, 1 the service refused, the export failed or the service stayed unreachable, 2 bad usage,
130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from .cli_client import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Api,
    CliError,
    Interrupted,
    Interrupts,
    cancel_job,
    cancel_outcome,
    failure_text,
    follow,
    lasting_snapshot,
)
from .cli_progress import FINAL_STATES, progress_for

DEFAULT_URL = "http://127.0.0.1:8080"


# --- commands -------------------------------------------------------------------------------


def not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def parse_json_option(option: str, text: str, kind: type = dict) -> Any:
    try:
        # Python's json takes NaN and Infinity; the service does not, and a bad option is ours to say.
        value = json.loads(text, parse_constant=not_json)
    except ValueError as exc:
        raise CliError(f"{option}: not valid JSON ({exc}); Extended JSON such as {{\"$oid\": \"...\"}} is fine", EXIT_USAGE) from exc
    if not isinstance(value, kind):
        raise CliError(f"{option}: must be a JSON {'object' if kind is dict else 'array of stages'}", EXIT_USAGE)
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
    if args.pipeline is not None:  # the service refuses it beside --query, --fields or --sort, and says why
        body["pipeline"] = parse_json_option("--pipeline", args.pipeline, list)
    if args.count:
        body["count"] = True
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
        return checked_out(out)
    name = Path(str(snap.get("file_name") or "")).name
    return Path(name if name and not name.startswith(".") else f"{snap['id']}.{snap.get('format', 'out')}")


FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def checked_out(out: str) -> Path:
    """-o as a path, refused when it names anything but a regular file: the whole file is renamed onto it,
    which would swap a device's or a FIFO's entry for a plain file, and cannot replace a directory."""
    if out.endswith(("/", os.sep)):
        raise CliError(f"-o {out}: names a directory; give a file name", EXIT_USAGE)
    dest = Path(out)
    try:
        mode = dest.stat().st_mode  # follows a symbolic link: a link to a device is refused as the device is
    except OSError:  # not there (the usual case), or not reachable: the download says why it cannot write
        return dest
    if not stat.S_ISREG(mode):
        kind = next((word for test, word in FILE_KINDS if test(mode)), "a special file")
        raise CliError(f"-o {out}: is {kind}, not a regular file; give a file name", EXIT_USAGE)
    return dest


async def save(api: Api, snap: dict[str, Any], out: str | None, interrupts: Interrupts, since: int) -> int:
    """Download a completed job's file through its (signed, short-lived) download_url; a Ctrl-C after
    `since` stops it."""
    dest = output_path(snap, out)
    if not snap.get("download_url"):
        raise CliError(f"export {snap['id']} is {snap['status']}; there is nothing to download")

    def warn(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def relink() -> str:
        fresh = await lasting_snapshot(api, snap["id"], warn)
        if not fresh.get("download_url"):
            raise CliError(f"export {snap['id']} is {fresh['status']}; there is nothing to download")
        return str(fresh["download_url"])

    try:
        size = await interrupts.guard(api.download(snap["download_url"], dest, relink, warn), since)
    except Interrupted:
        print(f"mexport: download interrupted; {dest} not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    rows = f"{snap['processed']:,} rows, " if snap.get("processed") is not None else ""
    print(f"wrote {dest} ({rows}{size:,} bytes)", flush=True)
    return EXIT_OK


async def cmd_create(api: Api, args: argparse.Namespace, interrupts: Interrupts) -> int:
    body = create_body(args)
    if args.out:  # before the job exists: an export with nowhere to go is not worth running
        checked_out(args.out)
    try:
        snap = await interrupts.guard(api.call("POST", "/api/exports", body))
    except Interrupted:  # the service may have created the job and not yet answered
        print("mexport: interrupted before the service answered; the export may have been created "
              "(mexport list shows it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    since = interrupts.count
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
    fresh = await interrupts.guard(lasting_snapshot(api, snap["id"], progress.warn), since)
    return await save(api, fresh, args.out, interrupts, since)


async def cmd_download(api: Api, args: argparse.Namespace, interrupts: Interrupts) -> int:
    since = interrupts.count
    return await save(api, await interrupts.guard(api.snapshot(args.id), since), args.out, interrupts, since)


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
    create.add_argument("--type", choices=("json", "csv", "ndjson", "xlsx", "parquet"), default="json",
                        help="json (one document per line, as mongoexport), csv, ndjson, xlsx or parquet; default json")
    create.add_argument("--jsonArray", action="store_true", help="with --type json: one JSON array instead of lines")
    create.add_argument("--jsonFormat", choices=("relaxed", "canonical"), help="Extended JSON mode for json/ndjson")
    create.add_argument("-q", "--query", help="filter, relaxed Extended JSON, e.g. '{\"status\": \"open\"}'")
    create.add_argument("-f", "--fields", help="comma-separated field paths, e.g. title,assignee.name")
    create.add_argument("--sort", help="sort document, e.g. '{\"createdAt\": -1}'")
    create.add_argument("--limit", type=int, help="at most this many documents")
    create.add_argument("--pipeline", help="an aggregation pipeline instead of --query/--fields/--sort, e.g. "
                        "'[{\"$match\": {\"status\": \"open\"}}, {\"$group\": {\"_id\": \"$priority\", \"n\": {\"$sum\": 1}}}]'")
    create.add_argument("--count", action="store_true", help="with --pipeline: count its output first, for a percentage")
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
    for name, text in (("cancel", "cancel a queued or running export"), ("delete", "delete a finished export and its file; a queued or running one is cancelled (and kept, as cancelled)")):
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
