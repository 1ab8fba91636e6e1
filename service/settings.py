"""Settings from EXPORT_* environment variables, declared once in SETTINGS, and every typed application key.

`python -m service.settings --markdown` prints the README's settings table from SETTINGS.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .setting_types import (
    COLLECTION_NAME, DB_NAME, HOSTS, INTEGER, MONGO_URL, NAMES, NUMBER, ORIGINS, PATH, REDIS_URL, TEXT, TOKENS, Invalid, Kind,
)

if TYPE_CHECKING:  # the keys name these types; importing them here would be circular
    from .db import Database
    from .embedded_db import EmbeddedMongo
    from .events import EventHub
    from .health import Health
    from .manager import JobManager
    from .metrics import Metrics
    from .runner import BatchSource

DRIVERS = ("pymongo", "motor")
XLSX_MAX_ROWS = 1_048_575  # Excel's 1,048,576 rows less the header
MAX_TIME_MS = 2**31 - 1  # MongoDB refuses a longer maxTimeMS


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line naming the variable."""


@dataclass(frozen=True)
class Setting:
    """One setting: its attribute, its variable, its type, default and README help, and the values it takes."""

    name: str
    env: str
    kind: Kind
    default: Any  # None only for text that may be absent
    help: str
    minimum: float | None = None
    maximum: float | None = None
    why_maximum: str = ""  # said after the maximum in the error
    positive: bool = False
    choices: tuple[str, ...] = ()
    shown_default: str | None = None  # the README's default cell when the bare value would not tell enough


SETTINGS: tuple[Setting, ...] = (
    Setting("mongo_url", "EXPORT_MONGO_URL", MONGO_URL, None,
        "MongoDB connection string; the service waits 5 s to reach a server (`serverSelectionTimeoutMS`, "
        "`connectTimeoutMS`; 30 s for connecting to the embedded server) and 5 minutes for any one reply, or "
        "`EXPORT_QUERY_MAX_TIME_MS` and a minute when that is longer "
        "(`socketTimeoutMS`; a job whose reply never comes fails with `database_unavailable`), and the string's "
        "own values of those options win (`socketTimeoutMS=0`: no limit)",
        shown_default="*(empty: embedded server)*",
    ),
    Setting("db_name", "EXPORT_DB", DB_NAME, "exports", "database holding the collections and the jobs"),
    Setting("driver", "EXPORT_MONGO_DRIVER", TEXT, "pymongo",
        "`pymongo` (PyMongo's `AsyncMongoClient`) or `motor`",
        choices=DRIVERS,
    ),
    Setting("host", "EXPORT_HOST", TEXT, "127.0.0.1", "the address the HTTP server listens on"),
    Setting("port", "EXPORT_PORT", INTEGER, 8080, "the port the HTTP server listens on", minimum=0, maximum=65_535),
    Setting("export_dir", "EXPORT_DIR", PATH, Path("var/exports"),
        "export files; must be writable (checked at start-up); shared by all instances",
    ),
    Setting("batch_size", "EXPORT_BATCH_SIZE", INTEGER, 1000,
        "cursor batch size, set explicitly on every cursor",
        minimum=1,
    ),
    Setting("max_concurrent", "EXPORT_MAX_CONCURRENT", INTEGER, 2,
        "exports running at once in this process; the rest wait `queued`, oldest first",
        minimum=1,
    ),
    Setting("max_active_per_user", "EXPORT_MAX_ACTIVE_PER_USER", INTEGER, 10,
        "queued + running jobs per user; more answers `429`. In open mode one limit for all callers together",
        minimum=1,
    ),
    Setting("ttl_hours", "EXPORT_TTL_HOURS", NUMBER, 24.0,
        "completed files are removed after this long; the job becomes `expired`",
        positive=True, maximum=87_600, why_maximum=" (ten years)",
    ),
    Setting("api_tokens", "EXPORT_API_TOKENS", TOKENS, {},
        "`token:user,token2:user2`, each token once (one user may have several); users see, cancel and delete only "
        "their own jobs. Empty: open mode, no authentication, every caller is the one user `anonymous`, who sees, "
        "cancels and deletes every job (see [Open mode](#open-mode))",
        shown_default="*(empty: open mode, logged loudly)*",
    ),
    Setting("collections", "EXPORT_COLLECTIONS", NAMES, (),
        "comma-separated allow list",
        shown_default="*(empty: all but system ones and the jobs collection)*",
    ),
    Setting("redis_url", "EXPORT_REDIS_URL", REDIS_URL, None, "Redis for Socket.IO fan-out across several instances"),
    Setting("jobs_collection", "EXPORT_JOBS_COLLECTION", COLLECTION_NAME, "export_jobs", "where jobs are kept"),
    Setting("lease_seconds", "EXPORT_LEASE_SECONDS", NUMBER, 30.0,
        "a running job's lease; another instance takes over a job whose lease ran out",
        minimum=0.1, maximum=86_400,  # a shorter one would keep the loops that watch it busy
    ),
    Setting("sweep_interval_seconds", "EXPORT_SWEEP_INTERVAL_SECONDS", NUMBER, 60.0,
        "how often retention runs; the same loop requeues expired leases, so it runs at least every half `EXPORT_LEASE_SECONDS`",
        minimum=0.1, maximum=86_400,  # a shorter one would keep the loops that watch it busy
    ),
    Setting("xlsx_max_rows_per_sheet", "EXPORT_XLSX_MAX_ROWS", INTEGER, XLSX_MAX_ROWS,
        "data rows per XLSX sheet before a new sheet (Excel's limit less the header)",
        minimum=1, maximum=XLSX_MAX_ROWS, why_maximum=" (Excel's row limit less the header)",
    ),
    Setting("embedded_dir", "EXPORT_EMBEDDED_DIR", PATH, Path("var/db"), "data directory of the embedded server"),
    Setting("seed_demo_rows", "EXPORT_SEED_DEMO_ROWS", INTEGER, 0,
        "generate this many tasks at start-up when `tasks` is empty",
        minimum=0, shown_default="`0` (`make demo`: 100000)",
    ),
    Setting("query_max_time_ms", "EXPORT_QUERY_MAX_TIME_MS", INTEGER, 600_000,
        "the export cursor's `maxTimeMS` (server time over all its batches); `0`: none",
        minimum=0, maximum=MAX_TIME_MS, why_maximum=" (MongoDB's limit for maxTimeMS)",
    ),
    Setting("count_max_time_ms", "EXPORT_COUNT_MAX_TIME_MS", INTEGER, 30_000,
        "the pre-count's `maxTimeMS`; past it the export goes on without a total; `0`: none",
        minimum=0, maximum=MAX_TIME_MS, why_maximum=" (MongoDB's limit for maxTimeMS)",
    ),
    Setting("job_timeout_seconds", "EXPORT_JOB_TIMEOUT_SECONDS", INTEGER, 43_200,
        "each attempt's wall-clock limit (a job taken over after a crash starts a new one), then `failed` with `timeout`; `0`: none",
        minimum=0,
    ),
    Setting("secret_key", "EXPORT_SECRET_KEY", TEXT, None,
        "the key that signs download links; give every instance the same one, or share `EXPORT_DIR`",
        shown_default="*(empty: generated into `EXPORT_DIR/.signing-key`)*",
    ),
    Setting("download_url_seconds", "EXPORT_DOWNLOAD_URL_SECONDS", INTEGER, 300,
        "how long a signed download link works",
        minimum=1, maximum=604_800, why_maximum=" (a week: links are meant to be short-lived)",
    ),
    Setting("checkpoint_batches", "EXPORT_CHECKPOINT_BATCHES", INTEGER, 10,
        "a resumable export records a checkpoint every this many batches (see \"Resume after a crash\"); `0`: never",
        minimum=0,
    ),
    Setting("allowed_origins", "EXPORT_ALLOWED_ORIGINS", ORIGINS, (),
        "comma-separated origins (`https://app.example.com,http://intranet:8080`) whose pages may connect to "
        "Socket.IO besides the service's own; `*` for any. A browser connection from any other origin is "
        "refused; clients that send no `Origin` (not browsers) are not affected",
        shown_default="*(empty: the page's own origin only)*",
    ),
    Setting("allowed_hosts", "EXPORT_ALLOWED_HOSTS", HOSTS, (),
        "comma-separated host names (`exports.intranet`) the service answers to in open mode besides `localhost`, IP "
        "addresses and `EXPORT_HOST`; a request whose `Host` names another answers `421`, so a site that points its "
        "own name at this address (DNS rebinding) cannot use an open service. Not checked with `EXPORT_API_TOKENS`, "
        "nor on `/healthz`, `/readyz` and `/metrics`",
        shown_default="*(empty)*",
    ),
)
SETTING_BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """Every setting's value; built only by settings_from_env, whose SETTINGS hold the defaults and the rules."""

    mongo_url: str | None  # None: start the embedded wire-protocol server
    db_name: str
    driver: str
    host: str
    port: int
    export_dir: Path
    batch_size: int
    max_concurrent: int
    max_active_per_user: int
    ttl_hours: float
    api_tokens: Mapping[str, str]  # token -> user
    collections: tuple[str, ...]  # empty: every collection but system ones and the jobs collection
    redis_url: str | None
    jobs_collection: str
    lease_seconds: float
    sweep_interval_seconds: float
    xlsx_max_rows_per_sheet: int
    embedded_dir: Path
    seed_demo_rows: int
    query_max_time_ms: int
    count_max_time_ms: int
    job_timeout_seconds: int
    secret_key: str | None  # None: a key generated under export_dir
    download_url_seconds: int
    checkpoint_batches: int
    allowed_origins: tuple[str, ...]  # "*" for any
    allowed_hosts: tuple[str, ...]

    @property
    def open_mode(self) -> bool:
        return not self.api_tokens


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = header.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _check(setting: Setting, value: Any, given: Any) -> None:
    """Raise Invalid when a parsed value is outside what the setting takes; `given` is what the user wrote."""
    if setting.choices and value not in setting.choices:
        raise Invalid(f"must be one of {', '.join(setting.choices)}, got {value!r}")
    if setting.positive and not value > 0:  # also refuses NaN
        raise Invalid(f"must be positive, got {given!r}")
    if setting.minimum is not None and value < setting.minimum:
        raise Invalid(f"must be at least {setting.minimum}, got {value}")
    if setting.maximum is not None and value > setting.maximum:
        raise Invalid(f"must be at most {setting.maximum}{setting.why_maximum}, got {value}")


def _value(setting: Setting, env: Mapping[str, str], overrides: Mapping[str, Any]) -> Any:
    """One setting's value from an override, else its variable, else its default: all checked alike."""
    if setting.name in overrides:
        label, given, parse = setting.name, overrides[setting.name], setting.kind.from_value
    elif env.get(setting.env, ""):
        label, given, parse = setting.env, env[setting.env], setting.kind.from_text
    else:  # unset or empty: the default
        label, given, parse = setting.env, setting.default, setting.kind.from_value
    if given is None and setting.default is None:
        return None
    try:
        value = parse(given)
        _check(setting, value, given)
    except Invalid as exc:
        raise SettingsError(f"{label} {exc}") from None
    return value


def settings_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and Python overrides, both checked by SETTINGS; raises a one-line SettingsError."""
    env = os.environ if env is None else env
    unknown = sorted(set(overrides) - set(SETTING_BY_NAME))
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(unknown)}")
    return Settings(**{setting.name: _value(setting, env, overrides) for setting in SETTINGS})


def _accepts(setting: Setting) -> str:
    if setting.choices:
        return " or ".join(f"`{choice}`" for choice in setting.choices)
    word = setting.kind.word
    if setting.positive:
        return f"{word} > 0" + ("" if setting.maximum is None else f", ≤ {setting.maximum}")
    if setting.minimum is not None and setting.maximum is not None:
        return f"{word} {setting.minimum}–{setting.maximum}"
    return word if setting.minimum is None else f"{word} ≥ {setting.minimum}"


def _shown_default(setting: Setting) -> str:
    if setting.shown_default is not None:
        return setting.shown_default
    default = setting.default
    if default is None or default in ((), {}):
        return "*(empty)*"
    if isinstance(default, float) and default.is_integer():
        default = int(default)  # 24, as a reader writes it, not 24.0
    return f"`{default}`"


def settings_markdown() -> str:
    """The README's settings table, one row per entry of SETTINGS."""
    lines = ["| variable | default | accepts | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        cells = (f"`{setting.env}`", _shown_default(setting), _accepts(setting), setting.help)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`--markdown`: print the README's settings table."""
    parser = argparse.ArgumentParser(prog="python -m service.settings", description="The service's EXPORT_* settings.")
    parser.add_argument("--markdown", action="store_true", help="print the README's settings table")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_usage(sys.stderr)
        return 2
    sys.stdout.write(settings_markdown())
    return 0


# Every application key lives here, typed, so handlers never guess what they pull out of the app.
SETTINGS_KEY = web.AppKey("settings", Settings)
DB_KEY: web.AppKey["Database"] = web.AppKey("db")
EMBEDDED_KEY: web.AppKey["EmbeddedMongo | None"] = web.AppKey("embedded")
EVENTS_KEY: web.AppKey["EventHub"] = web.AppKey("events")
MANAGER_KEY: web.AppKey["JobManager"] = web.AppKey("manager")
METRICS_KEY: web.AppKey["Metrics"] = web.AppKey("metrics")
SOURCE_KEY: web.AppKey["BatchSource"] = web.AppKey("source")
HEALTH_KEY: web.AppKey["Health"] = web.AppKey("health")


if __name__ == "__main__":
    sys.exit(main())
