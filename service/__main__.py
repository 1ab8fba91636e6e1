"""python -m service: read settings, check them, run the app."""
from __future__ import annotations

import logging
import sys

from aiohttp import web

from .app import check_export_dir, create_app
from .settings import SettingsError, settings_from_env


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        settings = settings_from_env()
        check_export_dir(settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=lambda _: print(f"Export service on http://{settings.host}:{settings.port}/", flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
