"""Settings from EXPORT_* environment variables, and every typed application key."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

from aiohttp import web

if TYPE_CHECKING:  # the keys name these types; importing them here would be circular
    from .db import Database
    from .embedded_db import EmbeddedMongo
    from .events import EventHub
    from .health import Health
    from .manager import JobManager
    from .metrics import Metrics
    from .runner import BatchSource

DRIVERS = ("pymongo", "motor")


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line naming the variable."""


@dataclass(frozen=True)
class Settings:
    mongo_url: str | None = None  # None: start the embedded wire-protocol server
    db_name: str = "exports"
    driver: str = "pymongo"
    host: str = "127.0.0.1"
    port: int = 8080
    export_dir: Path = Path("var/exports")
    embedded_dir: Path = Path("var/db")
    batch_size: int = 1000
    max_concurrent: int = 2
    max_active_per_user: int = 10
    ttl_hours: float = 24.0
    api_tokens: Mapping[str, str] = field(default_factory=dict)  # token -> user
    collections: tuple[str, ...] = ()  # empty: every collection but system ones and the jobs collection
    redis_url: str | None = None
    jobs_collection: str = "export_jobs"
    lease_seconds: float = 30.0
    sweep_interval_seconds: float = 60.0
    xlsx_max_rows_per_sheet: int = 1_048_575
    seed_demo_rows: int = 0  # rows to generate into "tasks" at start-up when it is empty
    query_max_time_ms: int = 600_000  # the export cursor's server-side time limit (0: none)
    count_max_time_ms: int = 30_000  # the pre-count's; past it the export goes on without a total
    job_timeout_seconds: int = 43_200  # a job's wall-clock limit (0: none)
    secret_key: str | None = None  # signs download links; None: a key generated under export_dir
    download_url_seconds: int = 300  # how long a signed download link works
    checkpoint_batches: int = 10  # a resumable export records a checkpoint every this many batches (0: never)
    allowed_origins: tuple[str, ...] = ()  # Socket.IO origins besides the page's own; "*" for any

    @property
    def open_mode(self) -> bool:
        return not self.api_tokens


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise SettingsError(f"{name} must be positive, got {raw!r}")
    return value


def _tokens(raw: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        token, sep, user = item.partition(":")
        if not sep or not token or not user:
            raise SettingsError("EXPORT_API_TOKENS must look like token:user,token2:user2")
        tokens[token] = user
    return tokens


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = header.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _origins(raw: str) -> tuple[str, ...]:
    """Comma-separated origins as browsers send them (scheme://host[:port], no path), or "*"."""
    origins = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        parts = urlsplit(item)
        if item != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment):
            raise SettingsError(f"EXPORT_ALLOWED_ORIGINS must list origins like https://app.example.com:8443, got {item!r}")
        origins.append(item.lower() if item == "*" else f"{parts.scheme}://{parts.netloc.lower()}")
    return tuple(origins)


def settings_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from the environment; raises SettingsError with a one-line message."""
    env = os.environ if env is None else env
    driver = env.get("EXPORT_MONGO_DRIVER", "pymongo") or "pymongo"
    if driver not in DRIVERS:
        raise SettingsError(f"EXPORT_MONGO_DRIVER must be one of {', '.join(DRIVERS)}, got {driver!r}")
    values: dict[str, Any] = dict(
        mongo_url=env.get("EXPORT_MONGO_URL") or None,
        db_name=env.get("EXPORT_DB") or "exports",
        driver=driver,
        host=env.get("EXPORT_HOST") or "127.0.0.1",
        port=_int(env, "EXPORT_PORT", 8080),
        export_dir=Path(env.get("EXPORT_DIR") or "var/exports"),
        embedded_dir=Path(env.get("EXPORT_EMBEDDED_DIR") or "var/db"),
        batch_size=_int(env, "EXPORT_BATCH_SIZE", 1000, minimum=1),
        max_concurrent=_int(env, "EXPORT_MAX_CONCURRENT", 2, minimum=1),
        max_active_per_user=_int(env, "EXPORT_MAX_ACTIVE_PER_USER", 10, minimum=1),
        ttl_hours=_float(env, "EXPORT_TTL_HOURS", 24.0),
        api_tokens=_tokens(env.get("EXPORT_API_TOKENS", "")),
        collections=tuple(c.strip() for c in env.get("EXPORT_COLLECTIONS", "").split(",") if c.strip()),
        redis_url=env.get("EXPORT_REDIS_URL") or None,
        jobs_collection=env.get("EXPORT_JOBS_COLLECTION") or "export_jobs",
        lease_seconds=_float(env, "EXPORT_LEASE_SECONDS", 30.0),
        sweep_interval_seconds=_float(env, "EXPORT_SWEEP_INTERVAL_SECONDS", 60.0),
        xlsx_max_rows_per_sheet=_int(env, "EXPORT_XLSX_MAX_ROWS", 1_048_575, minimum=1),
        seed_demo_rows=_int(env, "EXPORT_SEED_DEMO_ROWS", 0),
        query_max_time_ms=_int(env, "EXPORT_QUERY_MAX_TIME_MS", 600_000),
        count_max_time_ms=_int(env, "EXPORT_COUNT_MAX_TIME_MS", 30_000),
        job_timeout_seconds=_int(env, "EXPORT_JOB_TIMEOUT_SECONDS", 43_200),
        secret_key=env.get("EXPORT_SECRET_KEY") or None,
        download_url_seconds=_int(env, "EXPORT_DOWNLOAD_URL_SECONDS", 300, minimum=1),
        checkpoint_batches=_int(env, "EXPORT_CHECKPOINT_BATCHES", 10),
        allowed_origins=_origins(env.get("EXPORT_ALLOWED_ORIGINS", "")),
    )
    if values["port"] > 65535:
        raise SettingsError(f"EXPORT_PORT must be at most 65535, got {values['port']}")
    if values["xlsx_max_rows_per_sheet"] > 1_048_575:
        raise SettingsError("EXPORT_XLSX_MAX_ROWS must be at most 1048575 (Excel's row limit less the header)")
    values.update(overrides)
    return Settings(**values)


# Every application key lives here, typed, so handlers never guess what they pull out of the app.
SETTINGS_KEY = web.AppKey("settings", Settings)
DB_KEY: web.AppKey["Database"] = web.AppKey("db")
EMBEDDED_KEY: web.AppKey["EmbeddedMongo | None"] = web.AppKey("embedded")
EVENTS_KEY: web.AppKey["EventHub"] = web.AppKey("events")
MANAGER_KEY: web.AppKey["JobManager"] = web.AppKey("manager")
METRICS_KEY: web.AppKey["Metrics"] = web.AppKey("metrics")
SOURCE_KEY: web.AppKey["BatchSource"] = web.AppKey("source")
HEALTH_KEY: web.AppKey["Health"] = web.AppKey("health")
