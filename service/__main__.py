"""python -m service: read settings, check them, run the app."""
from __future__ import annotations

import argparse
import logging
import socket
import sys

from aiohttp import web

from .app import StartupError, check_export_dir, create_app
from .db import DatabaseError
from .embedded_db import EmbeddedDbError
from .settings import SettingsError, settings_from_env

SHUTDOWN_SECONDS = 5.0
DESCRIPTION = """\
The MongoDB export service: an HTTP API, a browser page and Socket.IO progress events for exporting
collections to CSV, JSON, NDJSON, XLSX or Parquet files.

It takes no arguments: it is configured by EXPORT_* environment variables (EXPORT_MONGO_URL, EXPORT_PORT,
EXPORT_API_TOKENS, ...). `python -m service.settings --markdown` lists every one with its default, and the
README's Settings table says the same. Without EXPORT_MONGO_URL it starts an embedded database under var/db."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--help, and nothing else: every setting is an environment variable. Any argument is a usage error (exit
    2) before anything starts, so a mistyped option never starts the service nor creates var/."""
    parser = argparse.ArgumentParser(
        prog="python -m service", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.parse_args(argv)


def check_listen(host: str, port: int) -> int:
    """Bind each address run_app will bind, and let go: a port in use (or a host that is not ours) is then a
    one-line start-up error, found before the app recovers jobs or opens the database, not a traceback after.
    Returns the port to listen on: for port 0 a free one, chosen here so that the start-up line names it."""
    try:
        addresses = {info[:3] + (info[4],) for info in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
        for family, kind, proto, address in sorted(addresses):
            with socket.socket(family, kind, proto) as probe:
                # As asyncio's create_server sets them: a port left in TIME_WAIT is free; IPv6 stays IPv6.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((address[0], port, *address[2:]))
                port = port or probe.getsockname()[1]
    except OSError as exc:
        raise SettingsError(f"cannot listen on {host}:{port} (EXPORT_HOST, EXPORT_PORT): {exc.strerror or exc}") from None
    return port


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        settings = settings_from_env()
        check_export_dir(settings)
        port = check_listen(settings.host, settings.port)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    try:
        web.run_app(
            app,
            host=settings.host,
            port=port,
            # A request whose client is gone is cancelled: a long poll Socket.IO left open would otherwise hold the
            # stop until it times out, past a container's grace period.
            handler_cancellation=True,
            # Downloads under way get this long to finish at a stop, and as long again once cancelled (aiohttp waits
            # twice; its default of 60 s made a stop during a slow download outlast any container's grace period).
            # A cut download is asked again from the byte it reached (mexport does; so can a browser).
            shutdown_timeout=SHUTDOWN_SECONDS,
            print=lambda _: print(f"Export service on http://{settings.host}:{port}/", flush=True),
        )
    except (StartupError, EmbeddedDbError, DatabaseError) as exc:  # raised while starting: the database, its data
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
