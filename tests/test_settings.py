"""Settings: one table drives the environment, Python overrides, the start-up errors and the README's table."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import typing
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from service import setting_types
from service.setting_types import COLLECTION_NAME, DB_NAME, HOSTS, INTEGER, MONGO_URL, NAMES, NUMBER, ORIGINS, PATH, REDIS_URL, TEXT, TOKENS
from service.settings import SETTINGS, Settings, SettingsError, settings_from_env, settings_markdown

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- settings table:", "<!-- end of settings table -->"


def test_every_dataclass_field_has_one_table_entry_of_the_same_type() -> None:
    assert [f.name for f in fields(Settings)] == [s.name for s in SETTINGS]
    assert len({s.env for s in SETTINGS}) == len(SETTINGS) and all(s.env.startswith("EXPORT_") for s in SETTINGS)
    python_type = {id(TEXT): str, id(MONGO_URL): str, id(DB_NAME): str, id(COLLECTION_NAME): str, id(REDIS_URL): str,
                   id(INTEGER): int, id(NUMBER): float, id(PATH): Path,
                   id(TOKENS): Mapping[str, str], id(NAMES): tuple[str, ...], id(ORIGINS): tuple[str, ...],
                   id(HOSTS): tuple[str, ...]}
    hints = typing.get_type_hints(Settings)
    for setting in SETTINGS:
        expected = python_type[id(setting.kind)]
        assert hints[setting.name] == (expected | None if setting.default is None else expected), setting.name


def test_an_empty_environment_gives_every_default_as_its_python_type() -> None:
    settings = settings_from_env({})
    for setting in SETTINGS:
        value = getattr(settings, setting.name)
        assert value == setting.default, setting.name
        assert setting.default is None or type(value) is type(setting.default), setting.name
    assert settings.open_mode
    other = settings_from_env({})
    assert other.api_tokens is not settings.api_tokens  # no mutable default shared between instances


def test_an_empty_variable_means_its_default() -> None:
    env = {s.env: "" for s in SETTINGS}
    assert settings_from_env(env) == settings_from_env({})


def test_environment_text_is_parsed_per_type() -> None:
    settings = settings_from_env({
        "EXPORT_MONGO_URL": "mongodb://db:27017", "EXPORT_MONGO_DRIVER": "motor", "EXPORT_PORT": "0",
        "EXPORT_DIR": "/srv/exports", "EXPORT_BATCH_SIZE": " 250 ", "EXPORT_TTL_HOURS": "0.5",
        "EXPORT_API_TOKENS": " t1:alice , t2:bob:ops ,", "EXPORT_COLLECTIONS": "tasks, people ,,",
        "EXPORT_ALLOWED_ORIGINS": "https://App.Example:8443, *", "EXPORT_XLSX_MAX_ROWS": "1048575",
        "EXPORT_CHECKPOINT_BATCHES": "0", "EXPORT_ALLOWED_HOSTS": "Exports.Intranet, app-1.example.com, export_app",
    })
    assert settings.mongo_url == "mongodb://db:27017" and settings.driver == "motor" and settings.port == 0
    assert settings.export_dir == Path("/srv/exports") and isinstance(settings.export_dir, Path)
    assert settings.batch_size == 250 and settings.ttl_hours == 0.5 and settings.checkpoint_batches == 0
    assert settings.api_tokens == {"t1": "alice", "t2": "bob:ops"} and not settings.open_mode
    assert settings.collections == ("tasks", "people")
    assert settings.allowed_origins == ("https://app.example:8443", "*")
    assert settings.allowed_hosts == ("exports.intranet", "app-1.example.com", "export_app")
    assert settings.xlsx_max_rows_per_sheet == 1_048_575


def test_one_user_may_have_several_tokens() -> None:
    settings = settings_from_env({"EXPORT_API_TOKENS": "old-token:alice,new-token:alice,t3:bob"})
    assert settings.api_tokens == {"old-token": "alice", "new-token": "alice", "t3": "bob"}


@pytest.mark.parametrize(("env", "message"), [
    ({"EXPORT_BATCH_SIZE": "many"}, "EXPORT_BATCH_SIZE must be an integer, got 'many'"),
    ({"EXPORT_PORT": "80.5"}, "EXPORT_PORT must be an integer, got '80.5'"),
    ({"EXPORT_MAX_CONCURRENT": "0"}, "EXPORT_MAX_CONCURRENT must be at least 1, got 0"),
    ({"EXPORT_JOB_TIMEOUT_SECONDS": "-1"}, "EXPORT_JOB_TIMEOUT_SECONDS must be at least 0, got -1"),
    ({"EXPORT_PORT": "70000"}, "EXPORT_PORT must be at most 65535, got 70000"),
    ({"EXPORT_XLSX_MAX_ROWS": "1048576"},
     "EXPORT_XLSX_MAX_ROWS must be at most 1048575 (Excel's row limit less the header), got 1048576"),
    ({"EXPORT_TTL_HOURS": "a day"}, "EXPORT_TTL_HOURS must be a number, got 'a day'"),
    ({"EXPORT_LEASE_SECONDS": "0"}, "EXPORT_LEASE_SECONDS must be at least 0.1, got 0.0"),
    ({"EXPORT_TTL_HOURS": "1e8"}, "EXPORT_TTL_HOURS must be at most 87600 (ten years), got 100000000.0"),
    ({"EXPORT_QUERY_MAX_TIME_MS": "2147483648"},
     "EXPORT_QUERY_MAX_TIME_MS must be at most 2147483647 (MongoDB's limit for maxTimeMS), got 2147483648"),
    ({"EXPORT_MONGO_URL": "http://user:secret@example.com"},
     "EXPORT_MONGO_URL must be a MongoDB connection string (mongodb://... or mongodb+srv://...)"),
    ({"EXPORT_DB": "bad.name"}, "EXPORT_DB must be a MongoDB database name (1-63 bytes, none of / \\ . \" $ or a space), got 'bad.name'"),
    ({"EXPORT_JOBS_COLLECTION": "system.jobs"}, "EXPORT_JOBS_COLLECTION must be a MongoDB collection name (no $, not system.*), got 'system.jobs'"),
    ({"EXPORT_REDIS_URL": "nonsense://x"}, "EXPORT_REDIS_URL must be a Redis URL (redis://, rediss:// or unix://)"),
    ({"EXPORT_SWEEP_INTERVAL_SECONDS": "nan"}, "EXPORT_SWEEP_INTERVAL_SECONDS must be a finite number, got 'nan'"),
    ({"EXPORT_LEASE_SECONDS": "inf"}, "EXPORT_LEASE_SECONDS must be a finite number, got 'inf'"),
    ({"EXPORT_TTL_HOURS": "-Infinity"}, "EXPORT_TTL_HOURS must be a finite number, got '-Infinity'"),
    ({"EXPORT_MONGO_DRIVER": "mongo"}, "EXPORT_MONGO_DRIVER must be one of pymongo, motor, got 'mongo'"),
    ({"EXPORT_API_TOKENS": "secret-token"}, "EXPORT_API_TOKENS must look like token:user,token2:user2"),
    ({"EXPORT_API_TOKENS": "a:alice,:bob"}, "EXPORT_API_TOKENS must look like token:user,token2:user2"),
    ({"EXPORT_API_TOKENS": "secret-token:alice,secret-token:bob"},
     "EXPORT_API_TOKENS repeats a token: the 2nd entry has the token of the 1st"),
    ({"EXPORT_API_TOKENS": "t1:alice, ,t2:bob,t3:carol,secret-token:dave,t5:erin,t6:frank,t7:gina,t8:hal,t9:ida,"
                           "t10:jo,secret-token:ken"},
     "EXPORT_API_TOKENS repeats a token: the 11th entry has the token of the 4th"),
    ({"EXPORT_ALLOWED_HOSTS": "exports.intranet:8080"},
     "EXPORT_ALLOWED_HOSTS must be host names such as exports.example.com (no scheme, port or path), got 'exports.intranet:8080'"),
    ({"EXPORT_ALLOWED_ORIGINS": "https://app.example/\npath"},
     "EXPORT_ALLOWED_ORIGINS must list origins like https://app.example.com:8443, got 'https://app.example/\\npath'"),
])
def test_a_bad_variable_is_one_line_naming_it(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from_env(env)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)
    assert "secret-token" not in str(caught.value)  # a malformed token list is never echoed


def test_python_overrides_keep_their_types_and_beat_the_environment(tmp_path: Path) -> None:
    settings = settings_from_env(
        {"EXPORT_BATCH_SIZE": "many", "EXPORT_DIR": "/elsewhere"},
        batch_size=10, export_dir=str(tmp_path), lease_seconds=2, job_timeout_seconds=2, ttl_hours=1 / 3600,
        api_tokens={"tok": "alice"}, collections=["tasks"], allowed_origins=("HTTP://Intranet:8080",), mongo_url=None,
    )
    assert settings.batch_size == 10 and settings.export_dir == tmp_path and isinstance(settings.export_dir, Path)
    assert settings.lease_seconds == 2.0 and isinstance(settings.lease_seconds, float)
    assert settings.job_timeout_seconds == 2 and math.isclose(settings.ttl_hours, 1 / 3600)
    assert settings.api_tokens == {"tok": "alice"} and settings.collections == ("tasks",)
    assert settings.allowed_origins == ("http://intranet:8080",) and settings.mongo_url is None


@pytest.mark.parametrize(("overrides", "message"), [
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"batch_size": "10"}, "batch_size must be an integer, got '10'"),
    ({"max_concurrent": True}, "max_concurrent must be an integer, got True"),
    ({"port": 65536}, "port must be at most 65535, got 65536"),
    ({"lease_seconds": -1.0}, "lease_seconds must be at least 0.1, got -1.0"),
    ({"ttl_hours": "24"}, "ttl_hours must be a number, got '24'"),
    ({"lease_seconds": float("inf")}, "lease_seconds must be a finite number, got inf"),
    ({"driver": "mongo"}, "driver must be one of pymongo, motor, got 'mongo'"),
    ({"db_name": None}, "db_name must be text, got None"),
    ({"export_dir": 3}, "export_dir must be a path, got 3"),
    ({"collections": "tasks"}, "collections must be a list of names, got 'tasks'"),
    ({"collections": ("tasks", "")}, "collections must be a list of non-empty names, got ('tasks', '')"),
    ({"api_tokens": ["tok:alice"]}, "api_tokens must map tokens to users"),
    ({"api_tokens": {"tok": ""}}, "api_tokens must map non-empty token strings to non-empty user strings"),
    ({"allowed_origins": ["https://app.example/path"]},
     "allowed_origins must list origins like https://app.example.com:8443, got 'https://app.example/path'"),
])
def test_overrides_go_through_the_same_checks(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from_env({}, **overrides)
    assert str(caught.value) == message


def test_an_unknown_override_is_refused() -> None:
    with pytest.raises(TypeError, match="unknown settings: batchsize"):
        settings_from_env({}, batchsize=10)


def test_start_up_with_a_bad_variable_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "EXPORT_DIR": str(tmp_path), "EXPORT_MONGO_DRIVER": "mongo"}
    proc = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == "error: EXPORT_MONGO_DRIVER must be one of pymongo, motor, got 'mongo'"


def _service_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """python -m service run from cwd with no EXPORT_* variable: started for real, it would create var/ there
    (the embedded database's and the exports' default directories). This checkout's code, whatever the cwd."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("EXPORT_")}
    env.update(PYTHONPATH=str(ROOT), EXPORT_PORT="0")  # were it to start, on a port nobody else has
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_help_describes_the_service_and_starts_nothing(tmp_path: Path) -> None:
    proc = _service_in(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m service")
    assert "EXPORT_* environment variables" in proc.stdout and "python -m service.settings --markdown" in proc.stdout
    assert "Settings table" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no var/: neither the database nor the export directory was made


@pytest.mark.parametrize("args", [("--port", "9000"), ("serve",), ("-v",)])
def test_any_other_argument_is_a_usage_error_and_starts_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = _service_in(tmp_path, *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[0] == "usage: python -m service [-h]"
    assert proc.stderr.splitlines()[-1].startswith("python -m service: error: unrecognized arguments: ")
    assert list(tmp_path.iterdir()) == []


def test_the_readme_table_is_the_one_the_settings_print() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(START) == 1 and readme.count(END) == 1
    table = readme[readme.index("\n", readme.index(START)) + 1:readme.index(END)]
    assert table == settings_markdown(), "paste the output of `python -m service.settings --markdown` into README.md"
    rows = table.splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{s.env}`" for s in SETTINGS]
    cells = {row.split(" | ")[0][3:-1]: row.split(" | ")[1] for row in rows}
    assert cells["EXPORT_BATCH_SIZE"] == "`1000`" and cells["EXPORT_TTL_HOURS"] == "`24`"


def test_the_markdown_command_prints_the_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "service.settings", "--markdown"], cwd=ROOT, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == settings_markdown()
    assert subprocess.run([sys.executable, "-m", "service.settings"], cwd=ROOT, capture_output=True, timeout=60, check=False).returncode == 2


def test_connection_strings_are_checked_without_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = settings_from_env({"EXPORT_MONGO_URL": "mongodb+srv://user:pw@cluster0.example.net/?retryWrites=true",
                            "EXPORT_REDIS_URL": "redis://cache:6379/0"})
    assert ok.mongo_url.startswith("mongodb+srv://") and ok.redis_url == "redis://cache:6379/0"
    with pytest.raises(SettingsError, match=r"^EXPORT_MONGO_URL is not a valid connection string: ") as bad:
        settings_from_env({"EXPORT_MONGO_URL": "mongodb://user:p@ss:word@db:27017"})
    assert "p@ss" not in str(bad.value)  # never the password
    # Without the redis package, python-socketio would start and then drop every event.
    monkeypatch.setattr(setting_types, "find_spec", lambda name: None)
    with pytest.raises(SettingsError, match=r"^EXPORT_REDIS_URL needs the redis package"):
        settings_from_env({"EXPORT_REDIS_URL": "redis://cache:6379/0"})
